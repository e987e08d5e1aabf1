"""Measured sensitivity: the model's KL divergence to itself when one layer takes one quantization option.

d[l, o] = mean over tokens of KL(P_fp ‖ P_{layer l ← Ŵ_o}) on a few calibration windows, every other layer
left in full precision. Summing d over layers is the first-order model of the loss of a mixed plan (small,
independent perturbations add; cross terms average out), which is what the knapsack optimises. Each Ŵ_o is
produced by the real method (`quantize_weight`) from statistics of the full-precision model, so it is the
same weight the final run stores up to GPTQ's sequential inputs; its bits are the real stored bits.

The base grid is computed once per (bits, group size, outliers) and every rank of the low-rank correction
is fitted on that same base (`lqer`), as `quantize_weight` would.

Two savings keep it to minutes:
* Options dominated within a layer — another option stores no more bits and has no larger output error
  tr(ΔHΔᵀ) on the calibration statistics (`methods.stats.output_error`) — are not measured (recorded as unusable): the knapsack would
  only take one if the KL ordering inverted the output-error ordering of the same layer.
* The forward starts at the layer's block: the full-precision inputs of every block are cached once and
  the blocks before it are skipped (decoder stacks the adapter knows; others run the whole model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.fingerprint import sha, tensor_bytes
from lowbit.io.atomic import atomic_write_text
from lowbit.methods import MethodConfig, quantize_weight
from lowbit.methods.lqer import lqer
from lowbit.methods.stats import output_error
from lowbit.models.adapters import layer_weight, merge_config
from lowbit.pipeline.collect import collect_stats
from lowbit.progress import OptionalProgress


@dataclass
class Sensitivity:
    layers: list[str]
    numel: list[int]
    options: list[dict]
    kl: np.ndarray  # [L, O] nats per token; inf where the option does not apply to the layer
    bits: np.ndarray  # [L, O] stored bits of the layer (all metadata); inf where it does not apply
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        fin = lambda a: [[None if not np.isfinite(x) else float(x) for x in row] for row in a]  # noqa: E731
        return {"layers": self.layers, "numel": self.numel, "options": self.options,
                "kl": fin(self.kl), "bits": fin(self.bits), "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> "Sensitivity":
        arr = lambda a: np.array([[np.inf if x is None else x for x in row] for row in a], dtype=np.float64)  # noqa: E731
        return cls(d["layers"], d["numel"], d["options"], arr(d["kl"]), arr(d["bits"]), d.get("meta", {}))


def _mean_kl(model: nn.Module, windows: torch.Tensor, ref: list[torch.Tensor], batch_size: int,
             start: "_FromBlock | None" = None) -> float:
    total, n = 0.0, 0
    with torch.inference_mode():
        for j, i in enumerate(range(0, windows.shape[0], batch_size)):
            if start is not None:
                start.batch = j
            lq = F.log_softmax(model(input_ids=windows[i:i + batch_size], use_cache=False).logits.float(), -1)
            kl = F.kl_div(lq, ref[j], reduction="none", log_target=True).sum(-1)
            total += float(kl.double().sum())
            n += kl.numel()
    return max(total / n, 0.0)


def _fingerprint(model: nn.Module, names, base: MethodConfig, options, calib, n_samples) -> str:
    settings = json.dumps([names, base.model_dump(mode="json"), options, n_samples], sort_keys=True).encode()
    return sha(settings, tensor_bytes(calib), *(tensor_bytes(layer_weight(model.get_submodule(n))) for n in names))[:16]


def measure_sensitivity(model: nn.Module, names: list[str], calib: torch.Tensor, base: MethodConfig,
                        options: list[dict], *, n_samples: int = 16, batch_size: int = 8,
                        cache: str | Path | None = None, progress: bool = False) -> Sensitivity:
    """The [layers × options] KL and bits tables. With `cache` (a directory), the tables are saved as
    `sensitivity-<key>.json` after each layer, the key hashing the model's weights, the calibration
    windows, the base config and the options (not the budget): a run started again continues where it
    stopped, and every budget over the same model and options reuses one measurement."""
    if calib is None or calib.shape[0] == 0:
        raise LowbitError("budgeted allocation needs calibration windows to measure sensitivity")
    windows = calib[:n_samples]
    key = _fingerprint(model, names, base, options, calib, n_samples)
    done: dict[str, dict] = {}
    cache = Path(cache) / f"sensitivity-{key}.json" if cache else None
    if cache and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                done = saved["rows"]
        except (json.JSONDecodeError, KeyError, TypeError):
            done = {}  # a damaged cache is only lost time: measure again

    todo = [n for n in names if n not in done]
    stats = collect_stats(model, todo, calib, batch_size) if todo else {}
    configs = [merge_config(base, o) for o in options]  # as the plan's per-layer overrides will
    ref = _Reference(model, windows, batch_size) if todo else None
    with _Bar(progress, len(names) * len(options)) as bar:
        for name in names:
            if name in done:
                bar.advance(len(options))
                continue
            mod = model.get_submodule(name)  # before the decoder stack is cut short
            with ref.start_at(name) as start:
                _measure_layer(model, mod, name, stats[name], configs, windows, ref.log_probs, batch_size, bar,
                               done, start)
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache, json.dumps({"key": key, "rows": done}))
    numel = [layer_weight(model.get_submodule(n)).numel() for n in names]
    kl = np.array([[np.inf if x is None else x for x in done[n]["kl"]] for n in names], dtype=np.float64)
    bits = np.array([[np.inf if x is None else x for x in done[n]["bits"]] for n in names], dtype=np.float64)
    return Sensitivity(list(names), numel, options, kl, bits,
                       {"n_samples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "key": key})


def _set_weight(mod: nn.Module, W: torch.Tensor) -> None:
    """Write W [out, in] into the module in its own layout (Conv1D stores [in, out])."""
    mod.weight.data.copy_(W if isinstance(mod, nn.Linear) else W.T)


def _dominated(bits: list[float | None], err: list[float | None]) -> list[bool]:
    """True where another option has ≤ bits and ≤ error, one of them strictly (ties: the later index)."""
    out = []
    for i, (b, e) in enumerate(zip(bits, err)):
        out.append(b is None or any(
            b2 is not None and b2 <= b and e2 <= e and (b2 < b or e2 < e or j < i)
            for j, (b2, e2) in enumerate(zip(bits, err)) if j != i))
    return out


def _measure_layer(model, mod, name, stats, configs, windows, ref, batch_size, bar, done, start) -> None:
    W = layer_weight(mod).float().clone()
    bases: dict[str, object] = {}  # one base grid per (bits, group size, outliers): ranks share it
    Wqs, bits_row, err = [], [], []
    for cfg in configs:
        bkey = json.dumps(cfg.model_dump(mode="json", exclude={"lqer"}), sort_keys=True)
        try:
            if bkey not in bases:
                bases[bkey] = quantize_weight(W, stats, cfg.model_copy(update={"lqer": None}))
            q = bases[bkey] if cfg.lqer is None else lqer(bases[bkey], W, stats, cfg.lqer)
        except LowbitError:  # e.g. a group size that does not divide this layer's inputs
            Wqs.append(None)
            bits_row.append(None)
            err.append(None)
            continue
        Wqs.append(q.dequantize())
        bits_row.append(float(sum(q.storage().values())))
        err.append(float(output_error(W.double() - Wqs[-1].double(), stats.hessian.double())))
    skip = _dominated(bits_row, err)
    kl_row: list[float | None] = []
    try:
        for Wq, dominated in zip(Wqs, skip):
            if dominated:
                kl_row.append(None)
            else:
                _set_weight(mod, Wq)
                kl_row.append(_mean_kl(model, windows, ref, batch_size, start))
            bar.advance(1)
    finally:
        _set_weight(mod, W)
    bits_row = [b if k is not None else None for b, k in zip(bits_row, kl_row)]
    done[name] = {"kl": kl_row, "bits": bits_row}


class _FromBlock:
    """While active: the decoder stack holds only blocks[b:], and block b receives the cached
    full-precision hidden states of batch `self.batch` instead of what the (skipped) earlier blocks made."""

    def __init__(self, parent: nn.Module, attr: str, blocks: nn.ModuleList, b: int, cached: list[torch.Tensor]):
        self.parent, self.attr, self.blocks, self.b, self.cached, self.batch = parent, attr, blocks, b, cached, 0

    def _hook(self, module, args, kwargs):
        h = self.cached[self.batch]
        if args:
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def __enter__(self):
        setattr(self.parent, self.attr, nn.ModuleList(list(self.blocks)[self.b:]))
        self.handle = self.blocks[self.b].register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        setattr(self.parent, self.attr, self.blocks)


class _Reference:
    """One full-precision pass over the sensitivity windows: the reference log-probabilities, and the
    inputs of every decoder block for `start_at(layer)`."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        from lowbit.models.adapters import get_adapter

        self.prefix = get_adapter(model).blocks_prefix(model)
        self.inputs: list[list[torch.Tensor]] = []
        hooks = []
        if self.prefix is not None:
            self.blocks = model.get_submodule(self.prefix)
            parent, _, self.attr = self.prefix.rpartition(".")
            self.parent = model.get_submodule(parent) if parent else model
            self.inputs = [[] for _ in self.blocks]
            hooks = [blk.register_forward_pre_hook(
                lambda m, a, k, i=i: self.inputs[i].append((a[0] if a else k["hidden_states"]).detach().clone()),
                with_kwargs=True) for i, blk in enumerate(self.blocks)]
        try:
            with torch.inference_mode():
                self.log_probs = [
                    F.log_softmax(model(input_ids=windows[i:i + batch_size], use_cache=False).logits.float(), -1)
                    for i in range(0, windows.shape[0], batch_size)]
        finally:
            for h in hooks:
                h.remove()

    def start_at(self, name: str):
        import contextlib

        if self.prefix and name.startswith(self.prefix + "."):
            b = int(name[len(self.prefix) + 1:].split(".")[0])
            if b > 0:
                return _FromBlock(self.parent, self.attr, self.blocks, b, self.inputs[b])
        return contextlib.nullcontext(None)


class _Bar(OptionalProgress):
    def __init__(self, enabled: bool, total: int):
        super().__init__()
        if enabled:
            from rich.progress import Progress

            self.p = Progress()
            self.task = self.p.add_task("sensitivity (layer × option)", total=total)

    def advance(self, n: int) -> None:
        if self.p:
            self.p.update(self.task, advance=n)
