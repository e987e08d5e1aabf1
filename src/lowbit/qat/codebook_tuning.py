"""Codebook tuning: after a codebook quantizer (CLAQ, SqueezeLLM) the codes stay frozen and only the table
*values* are trained (plus, when present, LQER's low-rank factors), end to end against a loss on the model's
output. This is the fine-tuning stage of AQLM / QuIP#-style codebook methods reduced to its cheapest form:
the gradient of entry k of vector v is the sum of ∂L/∂ŵ over the weights that point at it,

    ŵ[r, c] = LUT[v, codes[r, c]]  ⇒  ∂L/∂LUT[v, k] = Σ_{(r, c) ∈ vector v, codes[r, c] = k} ∂L/∂ŵ[r, c],

which autograd forms with one gather (scatter-add backward), vectorised over the whole matrix.

Storage never changes, so neither do the bits: the training forward always uses the value that will be
stored (straight-through estimator on the rounding), and the export writes it into the same containers:
* fp16 entries: LUT = fp16(lut);
* e-bit entries (`entry_bits` 2..8): the per-vector affine grid (fp16 scale, fp16 minimum) of the base is
  kept and the tuned value is re-quantized onto it, entry = clamp(round((lut − min)/scale), 0, 2^e − 1), so
  a value can move anywhere inside the vector's original [min, min + (2^e − 1)·scale] range;
* low-rank factors: "float" factors are rounded to their stored dtype, "int8" / "mxint8" factors to their
  integer codes with the base's per-row scales / per-block exponents kept.
Frozen: the codes, outliers (fp16 entries stored apart, which replace the grid value), per-row scales
(`row_scale`) and AWQ's input scales (`in_scale`); unused table entries of narrower vectors (CLAQ's mixed
widths) stay zero. At step 0 the layer computes exactly the base weight (`QuantizedWeight.dequantize`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.codebook import CodebookGrid, _decode, _mask
from lowbit.formats.quant_primitives import mxint_dequantize
from lowbit.formats.quantized_weight import LowRank, QuantizedWeight


def _ste(x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Forward the stored value, backward the identity."""
    return x + (stored - x).detach()


def _round_entries(lut: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, entry_bits: int) -> torch.Tensor:
    """uint8 entries of `lut` on the fixed per-vector affine grid (the inverse of `codebook._decode`)."""
    q = torch.round((lut - lo.float()[:, None]) / scale.float()[:, None])
    return q.clamp(0, 2**entry_bits - 1).to(torch.uint8)


def _factor_steps(kind: str, F: torch.Tensor, s: torch.Tensor | None, block_size: int) -> torch.Tensor | None:
    """Per-element quantization step of a stored int8 / mxint8 factor (None for float factors)."""
    if kind == "float":
        return None
    if kind == "int8":
        return s.float()[:, None].expand_as(F)
    n = F.shape[1]
    ones = torch.ones(F.shape[0], n + (-n % block_size))
    return mxint_dequantize(ones, s, 8, block_size)[:, :n]


class CodebookTuneLinear(nn.Module):
    """A codebook-grid linear layer whose table values (and low-rank factors) are trainable."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, tune_lowrank: bool = True):
        super().__init__()
        g = qw.grid
        if not isinstance(g, CodebookGrid):
            raise LowbitError(f"codebook tuning needs a codebook grid, got a {g.kind} grid")
        self.qw = qw
        self.register_buffer("codes", qw.codes.long())
        self.register_buffer("used", _mask(g.vec_bits, g.codebook.shape[1]))
        self.lut = nn.Parameter(g.codebook.float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = qw.shape
        rs, ins = getattr(g, "row_scale", None), getattr(qw, "in_scale", None)
        self.register_buffer("row_scale", None if rs is None else rs.float())
        self.register_buffer("in_scale", None if ins is None else ins.float())
        o = qw.outliers
        self.register_buffer("out_index", None if o is None else o.index.long())
        self.register_buffer("out_values", None if o is None else o.values.float())
        lr = qw.lowrank
        self.A = self.B = None
        if lr is not None:
            A, B = lr.factors()
            self.A = nn.Parameter(A.clone(), requires_grad=tune_lowrank)
            self.B = nn.Parameter(B.clone(), requires_grad=tune_lowrank)
            self._a_step = _factor_steps(lr.kind, lr.A, lr.a_scale, lr.block_size)
            self._b_step = _factor_steps(lr.kind, lr.B, lr.b_scale, lr.block_size)

    # ---- what is stored

    def stored_lut(self) -> torch.Tensor:
        """The table the export writes, as float32 (no gradient)."""
        g = self.qw.grid
        with torch.no_grad():
            lut = self.lut.detach()
            if g.entry_bits == 16:
                stored = lut.half().float()
            else:
                q = _round_entries(lut, g.entry_scale, g.entry_min, g.entry_bits)
                stored = _decode(q, g.entry_scale, g.entry_min).float()
            return torch.where(self.used, stored, torch.zeros((), dtype=stored.dtype))

    def _stored_factor(self, F: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            if step is None:
                return F.detach().to(self.qw.lowrank.A.dtype).float()
            return torch.round(F.detach() / step).clamp(-127, 127) * step

    # ---- forward

    def weight(self) -> torch.Tensor:
        g = self.qw.grid
        lut = _ste(self.lut, self.stored_lut())
        W = torch.gather(lut.T, 0, self.codes) if g.axis == "column" else torch.gather(lut, 1, self.codes)
        if self.row_scale is not None:
            W = W * self.row_scale[:, None]
        if self.out_index is not None:
            W = W.reshape(-1).index_copy(0, self.out_index, self.out_values).reshape(W.shape)
        return W if self.in_scale is None else W / self.in_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.A is not None:
            A = _ste(self.A, self._stored_factor(self.A, self._a_step))
            B = _ste(self.B, self._stored_factor(self.B, self._b_step))
            y = y + (x @ A.to(x.dtype)) @ B.to(x.dtype)
        return y

    # ---- export

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """The tuned layer in the base's containers: same codes, same widths, same storage, new values."""
        g, q = self.qw.grid, self.qw
        lut = self.stored_lut()
        entries = None
        if g.entry_bits != 16:
            entries = torch.where(self.used, _round_entries(self.lut.detach(), g.entry_scale, g.entry_min,
                                                            g.entry_bits), torch.zeros((), dtype=torch.uint8))
        # only the values change: every other field (scales, minimums, widths, row scales) is the base's
        grid = dataclasses.replace(g, codebook=lut.half(), entries=entries)
        lowrank = q.lowrank
        if lowrank is not None and self.A.requires_grad:
            lowrank = _export_factors(lowrank, self.A.detach(), self.B.detach(), self._a_step, self._b_step)
        out = dataclasses.replace(q, grid=grid, codes=q.codes.clone(), lowrank=lowrank)
        out.check()
        return out


def _export_factors(lr: LowRank, A: torch.Tensor, B: torch.Tensor, a_step, b_step) -> LowRank:
    if lr.kind == "float":
        return LowRank(A.to(lr.A.dtype), B.to(lr.B.dtype))
    qa = torch.round(A / a_step).clamp(-127, 127).to(torch.int8)
    qb = torch.round(B / b_step).clamp(-127, 127).to(torch.int8)
    return LowRank(qa, qb, lr.kind, lr.a_scale, lr.b_scale, lr.block_size, lr.exp_bits)
