"""Data-parallel QAT through torch.distributed: each process takes its slice of every global batch, and the
gradients of the trainable tensors are summed across processes before the (identical) optimizer steps.

Started either by `torchrun --nproc-per-node N -m lowbit.cli finetune ...` (the environment carries RANK /
WORLD_SIZE / MASTER_ADDR) or by `lowbit finetune --nproc N`, which spawns N local processes itself.
Backend: NCCL when the training runs on CUDA (each process on its GPU, cuda:LOCAL_RANK), else gloo. The loss of every process is already divided by the
global number of target tokens, so a plain SUM all-reduce gives the single-process gradient.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"  # where the collectives' tensors live (NCCL takes CUDA tensors only)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device | str = "cpu") -> World:
    """Join the process group when launched with WORLD_SIZE > 1; a single process otherwise. `device`:
    where this process trains; on CUDA each process takes its own GPU, cuda:LOCAL_RANK."""
    device = torch.device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=str(device))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), str(device))


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum every gradient across processes, in one flat buffer (one collective per step)."""
    if world.size <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


def all_reduce_tensor(t: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `t` over processes (in place; returned)."""
    if world.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sum(x: float, world: World) -> float:
    if world.size <= 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, threads: int | None, fn, args: tuple, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    fn(*args, **kwargs)


def spawn(nproc: int, fn, *args, threads: int | None = None, start_method: str = "spawn", **kwargs) -> None:
    """Run fn(*args, **kwargs) in `nproc` local processes forming one process group (fresh interpreters
    with the default `spawn`; `fork` skips the re-imports where the platform allows it)."""
    import re

    import torch.multiprocessing as mp

    from lowbit.errors import LowbitError

    try:
        mp.start_processes(_worker, args=(nproc, free_port(), threads, fn, args, kwargs), nprocs=nproc, join=True,
                           start_method=start_method)
    except mp.ProcessRaisedException as e:  # a child's LowbitError stays one clear line
        m = re.search(r"LowbitError: (.*)", str(e))
        if m:
            raise LowbitError(m.group(1).strip()) from None
        raise
