"""Data-parallel calibration with torch.distributed (`torchrun --nproc-per-node N -m lowbit.cli quantize ...`).

The forward passes are what a calibration spends its time on, and they are independent per batch: each
process takes a contiguous range of the calibration batches (the same batches a single process forms,
`shard`), captures their block inputs and runs the block on them. Only the statistics meet:

* **Statistics, identical to one process.** A single process adds batch after batch into each layer's
  accumulator (H = Σ xxᵀ in float32, mean|x|, the token count); float addition is not associative, so
  summing per-process partial Hessians (an all-reduce) would round differently and GPTQ would flip codes.
  Instead each process keeps its layer inputs of the pass, and the accumulator travels down the ranks
  (`chain`): rank 0 adds its batches and sends the state to rank 1, which adds its own, and so on, the
  last rank hands it to rank 0. The additions are those of one process in the same order, so the result
  is bit-identical. What is serialised is only the H updates (tokens·in² flops per layer), not the forward
  passes of the block (about 24·tokens·hidden² for a LLaMA block).
* **One solve.** Rank 0 quantizes the layer and broadcasts the QuantizedWeight (`to_state`) and its
  record; every process swaps the same QuantLinear in and runs its own batches on.

Backend: gloo on CPU, NCCL with CUDA (`qat.distributed.setup`). Across nodes the same command runs under
torchrun with `--nnodes`, `--node-rank` and a rendezvous endpoint; every node needs the model and data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods import StatsAccumulator
from lowbit.qat.distributed import World


@dataclass(frozen=True)
class Parallel:
    world: World

    @property
    def main(self) -> bool:
        return self.world.main

    def shard(self, n_windows: int, batch_size: int) -> tuple[int, int]:
        """This rank's windows [lo, hi): a contiguous range of whole batches of the single-process split."""
        n_batches = -(-n_windows // batch_size)
        per, extra = divmod(n_batches, self.world.size)
        r = self.world.rank
        lo_b = r * per + min(r, extra)
        hi_b = lo_b + per + (1 if r < extra else 0)
        return min(lo_b * batch_size, n_windows), min(hi_b * batch_size, n_windows)

    def chain(self, names: list[str], buffers: dict[str, list[torch.Tensor]], in_features: dict[str, int],
              hessian: bool, activations: bool) -> dict[str, StatsAccumulator]:
        """Every layer's accumulator over all ranks' inputs, added in rank (= batch) order; on rank 0
        (empty on the others)."""
        rank, size = self.world.rank, self.world.size
        out = {}
        for name in names:
            acc = StatsAccumulator(in_features[name], hessian=hessian, activations=activations)
            if rank > 0:
                _recv(acc, rank - 1)
            for x in buffers.get(name, []):
                acc.add(x)
            if rank < size - 1:
                _send(acc, rank + 1)
            elif rank != 0:
                _send(acc, 0)
            if rank == 0:
                if size > 1:
                    acc = StatsAccumulator(in_features[name], hessian=hessian, activations=activations)
                    _recv(acc, size - 1)
                out[name] = acc
        return out

    def broadcast(self, qw: QuantizedWeight | None, record: dict | None) -> tuple[QuantizedWeight, dict]:
        """Rank 0's QuantizedWeight and layer record on every rank."""
        if self.world.size == 1:
            return qw, record
        box = [None]
        if self.main:
            tensors, meta = qw.to_state()
            box = [({k: v.contiguous() for k, v in tensors.items()}, meta, record, qw.dtype)]
        dist.broadcast_object_list(box, src=0)  # between the processes of this job only
        tensors, meta, record, dtype = box[0]
        if self.main:
            return qw, record
        q = QuantizedWeight.from_state(tensors, meta)
        q.dtype = dtype
        return q, record

    def barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier()


def _state(acc: StatsAccumulator) -> list[torch.Tensor]:
    parts = [torch.tensor([acc.n], dtype=torch.float64)]
    parts += [t for t in (acc.H, acc.mean_abs, acc.mean_abs_max) if t is not None]
    return parts


def _send(acc: StatsAccumulator, dst: int) -> None:
    for t in _state(acc):
        dist.send(t.contiguous(), dst)


def _recv(acc: StatsAccumulator, src: int) -> None:
    parts = _state(acc)
    for t in parts:
        dist.recv(t, src)
    acc.n = int(parts[0].item())


def current() -> Parallel | None:
    """The process group this process belongs to (torchrun's environment), or None for one process."""
    from lowbit.qat.distributed import setup

    world = setup()
    return Parallel(world) if world.size > 1 else None
