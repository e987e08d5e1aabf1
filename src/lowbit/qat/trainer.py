"""The QAT training loop shared by every method: AdamW, warm-up + cosine schedule, gradient accumulation,
data parallelism, periodic evaluation, resumable checkpoints, and the final export.

Loss: next-token cross-entropy over the target tokens of each window (`ce`, what L4Q and LR-QAT train
with), or `kd`, KL(P_float ‖ P_student) per token against the unquantized model, which targets the
KL-to-fp32 metric directly (neither paper uses it; LLM-QAT-style distillation). Either way the loss of a
micro-batch is its *sum* over target tokens divided by the target count of the whole global batch, so
micro-batching and any number of processes give the same gradient as one big batch.

Determinism: the batch of step t and the learning rate are functions of (seed, t); layer initialisation
uses seeded generators; a resumed run restores parameters and AdamW moments exactly, so it ends
bit-identical to an uninterrupted one (same process count and thread count).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.fingerprint import json_sha, tensors_sha
from lowbit.qat import checkpoint as ckpt
from lowbit.progress import OptionalProgress, peak_memory_mb
from lowbit.qat import distributed as dd
from lowbit.qat.config import TrainConfig
from lowbit.qat.data import Windows, batch_indices, load_windows, target_count
from lowbit.qat.loop import StepSchedule, run_steps
from lowbit.qat.prepare import needs_ptq, prepare_model, ptq_weights, trainable


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup`·steps, then cosine decay to `min_lr_ratio` (L4Q's schedule)."""
    warm = int(cfg.warmup * cfg.steps)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _logits(model: nn.Module, ids: torch.Tensor, hidden: bool = False):
    out = model(input_ids=ids, use_cache=False, **({"output_hidden_states": True} if hidden else {}))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return (logits, out.hidden_states[1:]) if hidden else logits


def window_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, loss: str,
                teacher: nn.Module | None = None, kd_hidden: float = 0.0) -> torch.Tensor:
    """Σ over target tokens of the per-token loss (not averaged). `kd_hidden` (kd only): plus that weight
    times Σ over decoder blocks of ‖h_T/‖h_T‖ − h_S/‖h_S‖‖² per token (OneBit's hidden-state term)."""
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    hid = loss == "kd" and kd_hidden > 0
    out = _logits(model, ids, hid)
    logits, hs = out if hid else (out, None)
    logits = logits[:, :-1].float()
    m = mask[:, 1:].to(logits.dtype)
    if loss == "ce":
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return (nll * m.reshape(-1)).sum()
    with torch.no_grad():
        t_out = _logits(teacher, ids, hid)
        t_logits, t_hs = t_out if hid else (t_out, None)
        lp = F.log_softmax(t_logits[:, :-1].float(), dim=-1)
    kl = F.kl_div(F.log_softmax(logits, dim=-1), lp, reduction="none", log_target=True).sum(-1)
    total = (kl * m).sum()
    if hid:  # every position whose next token is a target (the mask of the positions scored by the KL)
        for s, t in zip(hs, t_hs):
            d = F.normalize(s[:, :-1].float(), dim=-1) - F.normalize(t[:, :-1].float(), dim=-1)
            total = total + kd_hidden * (d.pow(2).sum(-1) * m).sum()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, w: Windows, loss: str, teacher: nn.Module | None, batch: int = 4) -> dict:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(w), batch):
        ids, m = w.ids[i:i + batch], w.mask[i:i + batch]
        total += float(window_loss(model, ids, m, "ce"))
        n += int(m[:, 1:].sum())
    out = {"eval_nll": total / n, "eval_ppl": math.exp(total / n)}
    if loss == "kd" and teacher is not None:
        kl = sum(float(window_loss(model, w.ids[i:i + batch], w.mask[i:i + batch], "kd", teacher))
                 for i in range(0, len(w), batch))
        out["eval_kl"] = kl / n
    model.train(was)
    return out


class _Progress(OptionalProgress):
    """rich bar: step, loss, held-out loss, tokens/s, elapsed, ETA. No-op when disabled."""

    def __init__(self, enabled: bool, total: int, done: int):
        super().__init__()
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.p = Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("eval {task.fields[ev]}"),
                                TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.p.add_task("train", total=total, completed=done, loss=float("nan"), ev="—", tps=0.0)

    def update(self, **fields):
        if self.p:
            self.p.update(self.task, advance=1, **fields)


def _fingerprint(qcfg, tcfg: TrainConfig, model: nn.Module, windows: Windows, world: dd.World) -> dict:
    """What a checkpoint depends on, hashed per part so that a refusal can say which part changed."""
    weights = list(model.parameters())
    return {"method": json_sha(qcfg.model_dump()),
            "training settings": json_sha(tcfg.model_dump(exclude={"eval_every", "checkpoint_every"})),
            "model": tensors_sha(weights[0], weights[-1]),
            "data": tensors_sha(windows.ids, windows.mask),
            "process count": str(world.size)}


def _schedule(qcfg, layers: dict[str, nn.Module], world: dd.World, steps: int) -> StepSchedule:
    if qcfg.method == "loqt":
        from lowbit.qat.loqt import LoQTSchedule

        return LoQTSchedule(qcfg, layers, world, steps)
    if qcfg.method == "spiel":
        from lowbit.qat.spiel import SpIELSchedule

        return SpIELSchedule(qcfg, layers, world, steps)
    return StepSchedule()


def _layer_state(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Non-parameter state that training changes (layers with `state_tensors`), for the checkpoint."""
    return {f"{n}.{k}": t for n, layer in layers.items() if hasattr(layer, "state_tensors")
            for k, t in layer.state_tensors().items()}


def _load_layer_state(layers: dict[str, nn.Module], saved: dict[str, torch.Tensor], device) -> None:
    for n, layer in layers.items():
        if hasattr(layer, "load_state_tensors"):
            layer.load_state_tensors({k[len(n) + 1:]: v.to(device) for k, v in saved.items()
                                      if k.startswith(n + ".") and "." not in k[len(n) + 1:]})


def _calibration(tokenizer, model, tcfg: TrainConfig, data: str | None) -> torch.Tensor:
    from lowbit.calibration import CalibrationConfig, calibration_windows

    seqlen = min(tcfg.seqlen, getattr(model.config, "max_position_embeddings", tcfg.seqlen) or tcfg.seqlen)
    return calibration_windows(CalibrationConfig(seqlen=seqlen), tokenizer, seqlen, data)


def train(model_path: str, out: str | Path, qcfg, tcfg: TrainConfig, *, data: str | None = None,
          overwrite: bool = False, progress: bool = True, restart: bool = False,
          on_step: Callable[[int, dict], None] | None = None, threads: int | None = None,
          device: str | None = None) -> dict:
    """Fine-tune `model_path` with `qcfg` and write the result to `out`. Returns the summary.

    Runs as one process of a data-parallel group when launched that way (`distributed.setup`).
    `on_step(step, record)` is called after every optimizer step (tests use it to simulate a kill).
    `device`: `lowbit.devices.resolve_device` (auto: the first GPU when there is one); the model, its
    adapters and quantizer steps, the optimizer state and every batch live there; the export is written
    from host memory.
    """
    from lowbit.devices import resolve_device

    world = dd.setup(resolve_device(device))
    try:
        return _train(world, model_path, Path(out), qcfg, tcfg, data, overwrite, progress and world.main, restart,
                      on_step, threads)
    finally:
        dd.teardown(world)


def _train(world, model_path, out, qcfg, tcfg, data, overwrite, progress, restart, on_step, threads) -> dict:
    from lowbit.io.native import load_model

    if threads:
        torch.set_num_threads(threads)
    if out.exists() and not overwrite:
        raise LowbitError(f"output directory {out} exists; pass --overwrite to replace it")
    if tcfg.batch_size % world.size:
        raise LowbitError(f"batch size {tcfg.batch_size} is not divisible by the {world.size} processes")
    local = tcfg.batch_size // world.size
    micro = tcfg.micro_batch or local
    if local % micro:
        raise LowbitError(f"micro batch {micro} does not divide the per-process batch {local}")
    t_start = time.perf_counter()
    model, tokenizer = load_model(model_path)
    device = torch.device(world.device)
    if getattr(model, "_lowbit_quantized", False):
        raise LowbitError(f"{model_path} is already quantized by lowbit; fine-tune the original model")
    if tokenizer is None:
        raise LowbitError(f"{model_path} has no tokenizer files; QAT needs one to read the training text")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and tcfg.seqlen > max_pos:
        raise LowbitError(f"seqlen {tcfg.seqlen} exceeds the model's {max_pos} positions")
    train_w, eval_w = load_windows(tokenizer, tcfg.dataset, tcfg.seqlen, path=tcfg.data_path, data=data,
                                   eval_windows=tcfg.eval_windows)
    fp = _fingerprint(qcfg, tcfg, model, train_w, world)
    teacher = None
    if tcfg.loss == "kd":
        import copy

        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    ptq_kind = needs_ptq(qcfg)
    ptq = None
    if ptq_kind is not None:
        calib = _calibration(tokenizer, model, tcfg, data) if ptq_kind == "gptq" else None
        ptq = ptq_weights(model, qcfg, ptq_kind, calib, device=device)
    layers = prepare_model(model, qcfg, seed=tcfg.seed, ptq=ptq)
    del ptq
    model.to(device)  # after the QAT layers are made on the host: their tensors move with the model
    if teacher is not None:
        teacher.to(device)
    main, quant = trainable(layers)
    params = {**main, **quant}
    groups = [{"params": list(main.values()), "lr": tcfg.lr, "weight_decay": tcfg.weight_decay}]
    if quant:
        groups.append({"params": list(quant.values()), "lr": tcfg.quant_lr(), "weight_decay": 0.0})
    base_lrs = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=False)

    root = ckpt.checkpoint_dir_for(out)
    if restart and world.main:
        shutil.rmtree(root, ignore_errors=True)
    dd.barrier(world)
    start, history, saved = ckpt.load(root, params, opt, fp) if tcfg.checkpoint_every else (0, [], {})
    if saved:
        _load_layer_state(layers, saved, device)
    schedule = _schedule(qcfg, layers, world, tcfg.steps)
    setup_s = time.perf_counter() - t_start

    initial = {}
    if world.main and tcfg.eval_every and start == 0:
        initial = {f"initial_{k}": v for k, v in evaluate(model, eval_w, tcfg.loss, teacher).items()}
    model.train()
    t0 = time.perf_counter()
    evals: list[dict] = [h for h in history if "eval_nll" in h]

    def backward(step: int) -> float:
        idx = batch_indices(len(train_w), tcfg.batch_size, step, tcfg.seed)
        n_tgt = target_count(train_w, idx)  # the loss is a mean over the whole batch's target tokens
        mine = idx[world.rank * local:(world.rank + 1) * local]
        total = 0.0
        for i in range(0, local, micro):
            j = mine[i:i + micro]
            loss = window_loss(model, train_w.ids[j], train_w.mask[j], tcfg.loss, teacher, tcfg.kd_hidden) / n_tgt
            loss.backward()
            total += float(loss.detach())
        return total

    with _Progress(progress, tcfg.steps, start) as bar:
        def after(step: int, loss: float, f: float) -> None:
            rec = {"step": step + 1, "loss": loss, "lr": base_lrs[0] * f}
            last = step + 1 == tcfg.steps
            if world.main and tcfg.eval_every and ((step + 1) % tcfg.eval_every == 0 or last):
                rec.update(evaluate(model, eval_w, tcfg.loss, teacher))
                evals.append(rec)
            history.append(rec)
            tokens = (step + 1 - start) * tcfg.batch_size * tcfg.seqlen
            bar.update(loss=loss, tps=tokens / (time.perf_counter() - t0),
                       ev=f"{evals[-1]['eval_nll']:.4f}" if evals else "—")
            if tcfg.checkpoint_every and ((step + 1) % tcfg.checkpoint_every == 0) and not last:
                if world.main:
                    ckpt.save(root, step + 1, params, opt, fp, history, _layer_state(layers))
                dd.barrier(world)
            if on_step is not None:
                on_step(step + 1, rec)

        run_steps(opt, tcfg.steps, start=start, backward=backward, lr_factor=lambda step: lr_factor(step, tcfg),
                  schedule=schedule, world=world, grad_clip=tcfg.grad_clip, after=after)
    tokens = (tcfg.steps - start) * tcfg.batch_size * tcfg.seqlen
    train_s = time.perf_counter() - t0
    for layer in layers.values():  # LoQT: the last merge and re-quantization, so that what is evaluated is what is saved
        if hasattr(layer, "finalize"):
            layer.finalize(qcfg.export)
    final_eval = evaluate(model, eval_w, tcfg.loss, teacher) if world.main else {}
    summary = {"method": qcfg.method, "bits": getattr(qcfg, "bits", None), "steps": tcfg.steps,
               "resumed_from_step": start, "processes": world.size,
               "trainable_params": sum(p.numel() for p in params.values()),
               "train_seconds": train_s, "setup_seconds": setup_s,
               "tokens_per_second": tokens / train_s if train_s > 0 else None,
               "peak_memory_mb": peak_memory_mb(), **initial, **final_eval}
    if world.main:
        from lowbit.qat.export import export

        model.to("cpu")
        summary.update(export(model, layers, qcfg, tcfg, out, model_path=model_path, tokenizer=tokenizer,
                              summary=summary, history=history, overwrite=overwrite))
        shutil.rmtree(root, ignore_errors=True)
    dd.barrier(world)
    return summary
