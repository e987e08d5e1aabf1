"""The quantizer core shared by QAT training and export: one grid, one rounding, the same integer codes.

Every QAT layer in lowbit trains on exactly the grid it exports to, lowbit's `UniformGrid`:

    q = clamp(round(W / s) + z, 0, 2^n − 1),   Ŵ = (q − z) · s,

with the scale s stored in fp16 and the zero point z an integer in [0, 2^n − 1], one (s, z) per group of
`group_size` input columns. The training forward computes q with the very expression of
`quant_primitives.affine_quantize` and Ŵ with that of `affine_dequantize`, on

* s_q = fp16(s): the learned float32 scale snapped to the fp16 value that will be stored (STE: the
  gradient passes the snap unchanged, as in mixed-precision training);
* z = 2^(n−1) − round(b / s_q): L4Q's real offset b (LSQ+, W_q = s·w̃ + b) snapped to a whole number of
  steps, because with b = s·β for an integer β,  s·clamp(round((W − b)/s), Q_N, Q_P) + b
  = s·(clamp(round(W/s) + z, 0, 2^n − 1) − z)  with z = −Q_N − β = 2^(n−1) − β.  β is clamped so that
  z stays a valid n-bit zero point.

So the exported `QuantizedWeight` dequantizes bit-identically to the training forward's W_q (float32
arithmetic on the same integers and the same fp16 scale), and every format, kernel and exporter of lowbit
applies to a QAT result unchanged. The price of integer zeros: L4Q's offset moves in whole steps (the
paper's float b would need a kernel with a float per-group offset).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.quant_primitives import SCALE_DTYPE, check_bits, expand_group_param, n_groups, per_group
from lowbit.formats.quantized_weight import QuantizedWeight, UniformGrid

SCALE_MIN = 2.0**-24  # smallest fp16 subnormal, the floor affine_qparams uses too
SCALE_MAX = 65504.0  # largest fp16


def group_sum(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Σ over each group: [rows, cols] → [R, G] (the gradient of a per-group parameter)."""
    return per_group(lambda p: p.sum(-1), t, group_size)


def expand(p: torch.Tensor, shape: torch.Size, group_size: int) -> torch.Tensor:
    return expand_group_param(p, shape, group_size)


def check_grid(shape: tuple[int, int], bits: int, group_size: int) -> tuple[int, int]:
    """(R, G) of the per-group parameters; LowbitError for bad bits / group size."""
    check_bits(bits)
    G = n_groups(shape[1], group_size)
    return (1 if group_size == 0 else shape[0]), G


def snap_scale(s: torch.Tensor) -> torch.Tensor:
    """The value s will have once stored in fp16, in s's own dtype (exact: fp16 ⊂ float32 ⊂ float64)."""
    return s.clamp(SCALE_MIN, SCALE_MAX).to(SCALE_DTYPE).to(s.dtype)


def offset_to_zero(b: torch.Tensor, s_q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zero point z = 2^(n−1) − round(b / s_q), clamped to [0, 2^n − 1] (float tensor of integers)."""
    half = 2 ** (bits - 1)
    beta = torch.round(b / s_q).clamp(half - (2**bits - 1), half)
    return half - beta


def zero_to_offset(z: torch.Tensor, s_q: torch.Tensor, bits: int) -> torch.Tensor:
    """The offset b = s·(2^(n−1) − z) that `offset_to_zero` maps back to z."""
    return s_q * (2 ** (bits - 1) - z.to(s_q.dtype))


def codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w/s) + z, 0, 2^n − 1), s and z broadcast to w; as floats of w's dtype.

    In float32 this is `affine_quantize` operation for operation (before its uint8 cast).
    """
    return (torch.round(w / s) + z).clamp_(0, 2**bits - 1)


def dequant(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Ŵ = (q − z)·s; q − z is an exact integer, so float32 gives `affine_dequantize`'s bits."""
    return (q - z) * s


def export_weight(Wc: torch.Tensor, s_q: torch.Tensor, z: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool, dtype: torch.dtype) -> QuantizedWeight:
    """The `QuantizedWeight` of the merged float32 weight `Wc` on the grid (s_q, z) [R, G]."""
    if Wc.dtype != torch.float32:
        raise LowbitError(f"export needs the float32 merged weight, got {Wc.dtype}")
    S, Z = expand(s_q, Wc.shape, group_size), expand(z, Wc.shape, group_size)
    q = codes(Wc, S, Z, bits).to(torch.uint8)
    grid = UniformGrid(bits, group_size, symmetric, s_q.to(SCALE_DTYPE).contiguous(),
                       z.to(torch.int32).contiguous())
    qw = QuantizedWeight(tuple(Wc.shape), dtype, grid, q)
    qw.check()
    return qw


# ---- initial steps


def l4q_init_scale(W: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """L4Q_init (paper Eq. 15): s = max(|min W / Q_N|, |max W / Q_P|) per group, with b = 0.

    Symmetric and conservative: with z = 2^(n−1) no weight is clipped at step 0 (up to the fp16 rounding
    of s, which moves the extreme weight by < 0.1% of a step). An all-zero group gets s = 1."""
    check_grid(tuple(W.shape), bits, group_size)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    Wf = W.float()
    lo, hi = per_group(lambda p: p.amin(-1), Wf, group_size), per_group(lambda p: p.amax(-1), Wf, group_size)
    s = torch.maximum(lo.abs() / qn, hi.abs() / qp)
    return torch.where(s > 0, s, torch.ones_like(s))
