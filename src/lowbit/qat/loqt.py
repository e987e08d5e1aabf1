"""LoQT (Loeschcke et al., NeurIPS 2024): train a low-rank factor beside a quantized weight, merge it into the
weight at growing intervals and re-quantize, so that the quantized model itself moves.

    y = x·deq(Q)ᵀ + s·ΔW·x,   ΔW = B·P (P [r, in], when in ≤ out)  or  P·B (P [out, r], otherwise)

- P is frozen: the top-r singular vectors of the full-weight gradient ∇W on the smaller side of W. Only B
  trains, so gradients and Adam moments exist for r·max(in, out) numbers per layer. With P fixed, B's
  gradient is s·∇W·Pᵀ (or s·Pᵀ·∇W): GaLore's one-sided projection of ∇W (paper §3.2; tested).
- At every update step T_i (`update_steps`) the layer merges W = deq(Q) + s·ΔW, takes ∇W of that step's
  batch, and re-initialises (paper Alg. 1, the authors' compensation loop):
      P ← top-r singular vectors of ∇W;  Ŵ ← W;  repeat C times:
          Q ← q(Ŵ);  B ← (W − deq Q)·Pᵀ / s  (P has orthonormal rows: Pᵀ is P⁺);  Ŵ ← W − s·B·P
  keeping the (Q, B) with the smallest ‖W − deq Q − s·ΔW‖_F. So B does not start at zero: it holds the
  part of the quantization error that lies in P's span, and the merge loses nothing that P can carry.
  C = 0: Q = q(W), B = 0.
- Gaps grow: T = 0, τ, then T_{k+1} = T_k + τ + ⌊ψ^k⌋ (the authors' `get_proj_update_steps`; the
  paper writes τ + ψ^i). Large accumulated updates survive re-quantization where small ones would round
  away.

Departures from the authors' code, each for a stated reason:
- q is lowbit's asymmetric min-max integer grid per group (`bits`, `group_size`), not NF4: the result is a
  plain integer checkpoint every exporter and kernel here reads. P stays in float (the paper stores it in
  NF4 for memory; its ablation shows that costs little either way).
- The batch of an update step only yields ∇W (as in the authors' code) and the optimizer does not step on
  it; B's Adam moments are reset at every re-projection (the authors keep them, so moments of the old
  basis move the new B).
- Before step 0 the layer holds the float weight: the first ∇W is the float model's, and the first
  quantization is the compensated one.

Export: the final merge re-quantized (`requantize`, a plain integer checkpoint, what the paper deploys),
or Q with s·ΔW kept as a fp16 low-rank term (`lowrank`, bits counted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.quant_primitives import affine_quantize_groups
from lowbit.formats.quantized_weight import LowRank, QuantizedWeight, UniformGrid
from lowbit.methods.config import RTNConfig
from lowbit.methods.rtn import rtn_quantize
from lowbit.qat.loop import StepSchedule


def update_steps(total: int, gap: int, growth: float) -> list[int]:
    """Steps < total at which LoQT merges and re-projects: 0, gap, then + gap + ⌊growth^k⌋, k = 1, 2, …"""
    steps, cur, k = [0], gap, 0
    while cur < total:
        steps.append(cur)
        k += 1
        cur += gap + int(growth ** k)
    return [s for s in steps if s < total]


def top_subspace(G: torch.Tensor, rank: int) -> tuple[torch.Tensor, str]:
    """(P, side): P [r, in] (side "in": ΔW = B·P) when in ≤ out, else P [out, r] (side "out": ΔW = P·B)."""
    out_f, in_f = G.shape
    r = min(rank, out_f, in_f)
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    if in_f <= out_f:
        return Vh[:r].contiguous(), "in"
    return U[:, :r].contiguous(), "out"


def quantize(W: torch.Tensor, cfg: RTNConfig, grid: UniformGrid | None = None) -> QuantizedWeight:
    """q(W): a min-max grid fitted to W (grid None), or W rounded onto a given grid."""
    if grid is None:
        return rtn_quantize(W, cfg)
    return QuantizedWeight(W.shape, W.dtype, grid,
                           affine_quantize_groups(W, grid.scale, grid.zero, grid.bits, grid.group_size))


def compensate(W: torch.Tensor, P: torch.Tensor, side: str, scale: float, cfg: RTNConfig,
               iters: int, grid: UniformGrid | None = None) -> tuple[QuantizedWeight, torch.Tensor]:
    """(Q, B) minimising ‖W − deq Q − s·ΔW(B)‖_F over the alternating loop of the module docstring,
    on a fresh min-max grid per quantization (grid None) or on `grid`."""
    W = W.float()

    def fit_b(R: torch.Tensor) -> torch.Tensor:  # least squares with orthonormal P: B = R·Pᵀ/s or Pᵀ·R/s
        return (R @ P.T if side == "in" else P.T @ R) / scale

    def delta(B: torch.Tensor) -> torch.Tensor:
        return B @ P if side == "in" else P @ B

    if iters == 0:
        Q = quantize(W, cfg, grid)
        return Q, torch.zeros((W.shape[0], P.shape[0]) if side == "in" else (P.shape[1], W.shape[1]))
    best, W_hat = None, W
    for _ in range(iters):
        Q = quantize(W_hat, cfg, grid)
        R = W - Q.dequantize().float()
        B = fit_b(R)
        err = float(torch.linalg.norm(R - scale * delta(B)))
        if best is None or err < best[0]:
            best = (err, Q, B)
        W_hat = W - scale * delta(B)
    return best[1], best[2]


class LoQTLinear(nn.Module):
    """A linear layer as deq(Q) + s·ΔW with ΔW = B·P or P·B; only B trains (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, bits: int, group_size: int,
                 rank: int, scale: float, compensation_iters: int = 5, symmetric: bool = False,
                 regrid: bool = False):
        super().__init__()
        out_f, in_f = weight.shape
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.scale, self.iters, self.regrid = min(rank, in_f, out_f), scale, compensation_iters, regrid
        self.rtn = RTNConfig(bits=bits, group_size=group_size, symmetric=symmetric)
        self.side = "in" if in_f <= out_f else "out"
        r = self.rank
        # Until the first re-projection the layer is the float weight (W_deq = W, P = 0, no grid yet).
        self.register_buffer("W_deq", weight.detach().float().clone())
        self.register_buffer("P", torch.zeros((r, in_f) if self.side == "in" else (out_f, r)))
        self.B = nn.Parameter(torch.zeros((out_f, r) if self.side == "in" else (r, in_f)))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.qweight: QuantizedWeight | None = None
        self._full: torch.Tensor | None = None  # the merged weight as a leaf while ∇W is being collected

    def delta(self) -> torch.Tensor:
        return self.B @ self.P if self.side == "in" else self.P @ self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._full is not None:
            return F.linear(x, self._full.to(x.dtype), bias)
        y = F.linear(x, self.W_deq.to(x.dtype), bias)
        if self.side == "in":
            return y + self.scale * F.linear(F.linear(x, self.P.to(x.dtype)), self.B.to(x.dtype))
        return y + self.scale * F.linear(F.linear(x, self.B.to(x.dtype)), self.P.to(x.dtype))

    @torch.no_grad()
    def merged(self) -> torch.Tensor:
        return self.W_deq + self.scale * self.delta()

    def begin_reprojection(self) -> None:
        """Merge and expose W as a leaf: the next forward/backward passes accumulate ∇W in `weight_grad`."""
        self._full = self.merged().requires_grad_(True)

    @property
    def merged_leaf(self) -> torch.Tensor | None:
        """The merged weight whose `.grad` is ∇W, between `begin_reprojection` and `reproject`."""
        return self._full

    @torch.no_grad()
    def reproject(self) -> None:
        """P from ∇W, then (Q, B) by compensation around the merged weight."""
        W, G = self._full.detach(), self._full.grad
        self._full = None
        if G is None:
            G = torch.zeros_like(W)
        P, _ = top_subspace(G, self.rank)
        Q, B = compensate(W, P, self.side, self.scale, self.rtn, self.iters, self._grid())
        self.P.copy_(P)
        self.B.copy_(B)
        self._set_q(Q)

    def _grid(self) -> UniformGrid | None:
        """The grid merges round onto: the first quantization's, unless `regrid` (then None: fit anew)."""
        return None if self.regrid or self.qweight is None else self.qweight.grid

    @torch.no_grad()
    def hold(self, q: QuantizedWeight) -> None:
        """Start from a quantized weight on a uniform grid (a PTQ result): deq Q = deq q, and the merges
        round onto q's grid (unless `regrid`), so a merge with B = 0 gives back q's codes."""
        g = q.grid
        self._set_q(QuantizedWeight(q.shape, torch.float32, UniformGrid(g.bits, g.group_size, g.symmetric,
                                                                       g.scale.clone(), g.zero.clone()),
                                    q.codes.clone()))

    def _set_q(self, Q: QuantizedWeight) -> None:
        self.qweight = Q
        self.W_deq.copy_(Q.dequantize().float())

    # ---- resume: the grid is part of the training state (it changes at every merge)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        d = {"P": self.P}
        if self.qweight is not None:
            g = self.qweight.grid
            d.update(codes=self.qweight.codes, scale=g.scale, zero=g.zero)
        return d

    @torch.no_grad()
    def load_state_tensors(self, d: dict[str, torch.Tensor]) -> None:
        self.P.copy_(d["P"])
        if "codes" in d:
            c = self.rtn
            grid = UniformGrid(c.bits, c.group_size, c.symmetric, d["scale"].clone(), d["zero"].clone())
            self._set_q(QuantizedWeight((self.out_features, self.in_features), torch.float32, grid,
                                        d["codes"].clone()))

    # ---- the end of training

    @torch.no_grad()
    def finalize(self, mode: str = "requantize") -> None:
        """Make the training forward the exported one: `requantize` (or a layer never re-projected) merges
        and quantizes, Q ← q(deq Q + s·ΔW), ΔW ← 0; `lowrank` keeps Q and ΔW as they are."""
        if mode == "requantize" or self.qweight is None:
            self._set_q(quantize(self.merged(), self.rtn, self._grid()))
            self.B.zero_()
            self.P.zero_()

    @torch.no_grad()
    def export(self, dtype: torch.dtype, mode: str = "requantize") -> QuantizedWeight:
        """`requantize`: q(deq Q + s·ΔW), a plain integer grid. `lowrank`: Q plus s·ΔW as fp16 factors.
        After `finalize` the stored Q is returned as is."""
        if mode == "requantize" or self.qweight is None:
            final = self.qweight is not None and not self.delta().any()
            q = self.qweight.to(self.P.device) if final else quantize(self.merged(), self.rtn, self._grid())
            return QuantizedWeight(q.shape, dtype, q.grid, q.codes)
        # W ≈ Ŵ + (A'·B')ᵀ: ΔWᵀ = Pᵀ·Bᵀ (side in) or Bᵀ·Pᵀ (side out)
        if self.side == "in":
            A, Bf = self.P.T, self.scale * self.B.T
        else:
            A, Bf = self.scale * self.B.T, self.P.T
        lr = LowRank(A.contiguous().half(), Bf.contiguous().half())
        q = self.qweight.to(self.P.device)
        qw = QuantizedWeight(q.shape, dtype, q.grid, q.codes, None, lr)
        qw.check()
        return qw

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"side={self.side}, scale={self.scale}")


class LoQTSchedule(StepSchedule):
    """At the merge steps (`update_steps`) the step's batch only yields ∇W: every layer merges, takes its
    (process-summed) ∇W, re-projects and re-quantizes; AdamW does not step and B's moments restart."""

    def __init__(self, cfg, layers: dict[str, nn.Module], world, total: int):
        self.layers, self.world = layers, world
        self.at = set(update_steps(total, cfg.update_gap, cfg.gap_growth))

    def begin(self, step: int) -> bool:
        if step not in self.at:
            return False
        for layer in self.layers.values():
            layer.begin_reprojection()
        return True

    def take_step(self, step: int, opt: torch.optim.Optimizer) -> None:
        from lowbit.qat import distributed as dd

        for layer in self.layers.values():
            dd.all_reduce_grads([layer.merged_leaf], self.world)
            layer.reproject()
            opt.state.pop(layer.B, None)
