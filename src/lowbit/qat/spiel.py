"""SpIEL (Ansell et al., 2024): sparse fine-tuning at a fixed density, the index set dropped and regrown.

    W' = W + Δ,   Δ = scatter(η, δ):  k = density·numel entries, η flat indices, δ trained (δ₀ = 0)

W is the float weight, or a lowbit quantization of it (RTN / GPTQ: the "quantized SpIEL" setting, the
base dequantized once into a float buffer). Only δ trains, so optimizer state is ∝ k.

Every R steps (`reselect_every`) the set changes (SpIEL-AG, the authors' default "rigl" selector):
- **candidates**: S steps before the change (`accumulate_steps`), the k entries with the largest |∇W| of
  that step's first backward; their gradients are then summed over the S steps;
- **drop** the n = ⌊p_t·k⌋ active entries with the smallest |δ|, p_t = p₀·(1 − t/T) (p₀ = 0.2, linear decay);
- **grow** the n candidates, not already active, with the largest |Σ ∇W|, at δ = 0 with zeroed Adam
  moments. A grown entry takes a dropped entry's slot, so δ keeps its size and k never changes.

The dense ∇W = Gᵀ·X exists only inside one layer's backward (a custom autograd function forms it, takes
δ's gradient ∇W[η] and the candidates, and frees it), never for all layers at once. (The authors' CUDA
op avoids even that; SpIEL-MA's SM3 moment scores, which need no dense gradient, are not built.)

Export: a sparse delta file (`sparse_delta.safetensors`: per layer, sorted int32 flat indices and fp32
values) and a merged model: the float base merged (an HF model), or the quantized base with the merged
entries Ŵ[η] + δ as fp16 outliers (counted in bits: values and positions).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import Outliers, QuantizedWeight
from lowbit.qat.loop import StepSchedule

DELTA_FILE = "sparse_delta.safetensors"
DELTA_FORMAT = "lowbit-sparse-delta/1"


def drop_fraction(step: int, total: int, p0: float) -> float:
    """p_t = p₀·(1 − t/T): the share of active entries replaced at the reselection after step t."""
    return p0 * max(0.0, 1.0 - step / max(1, total))


def reselection_steps(total: int, every: int) -> list[int]:
    """Steps t (0-based) after whose optimizer step the set changes: t + 1 = R, 2R, … < T."""
    return [t for t in range(every - 1, total - 1, every)]


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x·(W + Δ)ᵀ + b with δ's gradient ∇W[η]; the dense ∇W is handed to `observe` and freed."""

    @staticmethod
    def forward(ctx, x, W, index, delta, bias, observe):
        Wd = W.reshape(-1).index_add(0, index, delta.to(W.dtype)).view_as(W).to(x.dtype)
        ctx.save_for_backward(x, W, index, delta)
        ctx.observe = observe
        return F.linear(x, Wd, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        x, W, index, delta = ctx.saved_tensors
        Wd = W.reshape(-1).index_add(0, index, delta.to(W.dtype)).view_as(W).to(g.dtype)
        gx = g @ Wd if ctx.needs_input_grad[0] else None
        G = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # ∇W [out, in]
        gd = G.reshape(-1)[index]
        if ctx.observe is not None:
            ctx.observe(G)
        return gx, None, None, gd, None, None


class SpIELLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, density: float,
                 base: QuantizedWeight | None = None, generator: torch.Generator | None = None):
        super().__init__()
        out_f, in_f = weight.shape
        self.in_features, self.out_features = in_f, out_f
        n = out_f * in_f
        self.k = max(1, min(n, round(density * n)))
        self.base = base
        W = base.dequantize().float() if base is not None else weight.detach().float()
        self.register_buffer("weight", W.clone())
        self.register_buffer("index", torch.randperm(n, generator=generator)[:self.k].sort().values)
        self.delta = nn.Parameter(torch.zeros(self.k))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.candidates: torch.Tensor | None = None  # flat indices chosen at the start of an S-step window
        self.accumulated: torch.Tensor | None = None  # Σ ∇W[candidates] over the window
        self.collecting = False
        self.reduce = None  # set by the trainer in data-parallel runs: sums a tensor over processes

    # ---- training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observe = self._observe if (self.collecting and self.training) else None
        return _SparseDeltaLinear.apply(x, self.weight, self.index, self.delta, self.bias, observe)

    def _observe(self, G: torch.Tensor) -> None:
        if self.candidates is None:  # the window's first backward picks the candidates (summed over processes)
            if self.reduce is not None:
                G = self.reduce(G.clone())
            self.candidates = torch.topk(G.abs().reshape(-1), self.k, sorted=False).indices.sort().values
            self.accumulated = torch.zeros(self.k, device=G.device)
        self.accumulated += G.reshape(-1)[self.candidates]

    @torch.no_grad()
    def reselect(self, n_drop: int, opt: torch.optim.Optimizer | None = None) -> int:
        """Drop the ≤ n_drop smallest |δ| and grow as many candidates by |Σ ∇W|; returns how many moved."""
        if self.candidates is None or n_drop <= 0:
            self.candidates = self.accumulated = None
            return 0
        acc = self.accumulated if self.reduce is None else self.reduce(self.accumulated.clone())
        fresh = ~torch.isin(self.candidates, self.index)
        n = min(n_drop, int(fresh.sum()))
        if n:
            score = torch.where(fresh, acc.abs(), torch.full_like(acc, -1.0))
            grow = self.candidates[torch.topk(score, n, sorted=False).indices]
            slots = torch.topk(self.delta.abs(), n, largest=False, sorted=False).indices
            self.index[slots] = grow
            self.delta[slots] = 0
            state = opt.state.get(self.delta, {}) if opt is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):  # a grown entry starts with fresh moments
                if key in state:
                    state[key][slots] = 0
        self.candidates = self.accumulated = None
        return n

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.weight.reshape(-1).index_add(0, self.index, self.delta).view_as(self.weight)

    # ---- resume: the index set and a window's candidates change during training

    def state_tensors(self) -> dict[str, torch.Tensor]:
        d = {"index": self.index}
        if self.candidates is not None:
            d.update(candidates=self.candidates, accumulated=self.accumulated)
        return d

    @torch.no_grad()
    def load_state_tensors(self, d: dict[str, torch.Tensor]) -> None:
        self.index.copy_(d["index"])
        self.candidates = d["candidates"].clone() if "candidates" in d else None
        self.accumulated = d["accumulated"].clone() if "accumulated" in d else None

    # ---- export

    @torch.no_grad()
    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 flat indices sorted, fp32 values)."""
        order = torch.argsort(self.index)
        return self.index[order].to(torch.int32).cpu(), self.delta.detach()[order].float().cpu()

    @torch.no_grad()
    def export(self, dtype: torch.dtype) -> QuantizedWeight:
        """The quantized base with the merged entries Ŵ[η] + δ as fp16 outliers (quantized base only)."""
        if self.base is None:
            raise ValueError("a float base exports merged float weights, not a QuantizedWeight")
        idx, val = self.sparse_delta()
        b = self.base
        merged = b.dequantize().float().reshape(-1)[idx.long()] + val
        qw = QuantizedWeight(b.shape, dtype, b.grid, b.codes, Outliers(idx, merged.half()), None)
        qw.check()
        return qw

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"base={'quantized' if self.base is not None else 'float'}")


# ---- the sparse delta file: what a user applies to the base model (or shares instead of a checkpoint)


def delta_tensors(layers: dict[str, SpIELLinear]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, shapes = {}, {}
    for name, layer in layers.items():
        tensors[f"{name}.index"], tensors[f"{name}.values"] = layer.sparse_delta()
        shapes[name] = [layer.out_features, layer.in_features]
    return tensors, {"format": DELTA_FORMAT, "shapes": json.dumps(shapes)}


def load_sparse_delta(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """{layer: (flat indices, values, (out, in))} from a sparse delta file, checked."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"sparse delta file {p} not found")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != DELTA_FORMAT:
                raise LowbitError(f"{p} is not a lowbit sparse delta file (format {meta.get('format')!r})")
            shapes = json.loads(meta["shapes"])
            out = {}
            for name, (rows, cols) in shapes.items():
                idx, val = f.get_tensor(f"{name}.index").long(), f.get_tensor(f"{name}.values")
                if idx.shape != val.shape or idx.ndim != 1 or (idx.numel() and (idx.min() < 0 or idx.max() >= rows * cols)):
                    raise LowbitError(f"{p}: layer {name} has indices outside its {rows}×{cols} weight or a size mismatch")
                out[name] = (idx, val, (rows, cols))
            return out
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise LowbitError(f"{p} is damaged ({e}); write it again") from None


@torch.no_grad()
def apply_sparse_delta(model: nn.Module, path: str | Path) -> None:
    """W += Δ for every layer of the file, in place (the model must have the shapes the file names)."""
    from lowbit.models.adapters import layer_weight

    for name, (idx, val, shape) in load_sparse_delta(path).items():
        try:
            W = layer_weight(model.get_submodule(name))
        except AttributeError:
            raise LowbitError(f"sparse delta layer {name} is not a module of the model") from None
        if tuple(W.shape) != shape:
            raise LowbitError(f"sparse delta layer {name} is {shape[0]}×{shape[1]}, the model's is "
                              f"{W.shape[0]}×{W.shape[1]}")
        idx = idx.to(W.device)  # 2-D positions: the weight may be a transposed view (GPT-2's Conv1D)
        W.index_put_((idx // shape[1], idx % shape[1]), val.to(W.dtype).to(W.device), accumulate=True)


# ---- the schedule, called by the trainer around every optimizer step


class SpIELSchedule(StepSchedule):
    """Candidate gradients during the S steps that end at a reselection step; drop and grow after it.
    Data-parallel runs sum the candidate choice's ∇W and the accumulated gradients over processes."""

    def __init__(self, cfg, layers: dict[str, nn.Module], world, total: int):
        from lowbit.qat import distributed as dd

        self.cfg, self.layers, self.total = cfg, layers, total
        self.at = set(reselection_steps(total, cfg.reselect_every))
        for layer in layers.values():
            layer.reduce = (lambda t: dd.all_reduce_tensor(t, world)) if world.size > 1 else None

    def begin(self, step: int) -> bool:
        on = any(r - self.cfg.accumulate_steps < step <= r for r in self.at)
        for layer in self.layers.values():
            layer.collecting = on
        return False  # δ takes AdamW's step as usual

    def take_step(self, step, opt) -> None:
        raise AssertionError("SpIEL never replaces the optimizer step")

    def end(self, step: int, opt: torch.optim.Optimizer) -> None:
        if step in self.at:
            p = drop_fraction(step + 1, self.total, self.cfg.drop_fraction)
            for layer in self.layers.values():
                layer.reselect(int(p * layer.k), opt)
