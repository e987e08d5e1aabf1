"""CPU weight-only GEMM kernels for `QuantizedWeight`s, on top of PyTorch's ATen ops.

Each kernel has two halves: `prepare_*` turns a QuantizedWeight into the op's packed operands once (at
the first forward pass), `*_mm` runs y = x·Ŵᵀ. Both reproduce `QuantizedWeight.dequantize()` (the grid
part; outliers and the low-rank term are not theirs) exactly up to the rounding of the scales to the
activation dtype. The ops are fast only with bf16 activations (fp32 runs 10-100x slower in torch 2.13).

**int4** (`aten._weight_int4pack_mm_for_cpu`): the op dequantizes ŵ = (q − 8)·s' + z' with one
(s', z') pair per group of `qGroupSize` ∈ {32, 64, 128, 256} input columns, q ∈ [0, 15]. Ours is
ŵ = (q − z)·s = (q − 8)·s + (8 − z)·s, so s' = s and z' = (8 − z)·s: exact in fp32; in bf16 s' and z'
are rounded to 8 significant bits (relative error ≤ 2^-9 each). Any uniform grid of ≤ 4 bits fits
(codes < 16), asymmetric or symmetric; per-channel and per-tensor grids repeat their one (s, z) over
groups of 256 (or the largest allowed size dividing the input dimension). The op needs N % 16 == 0 and
K a multiple of the group size: a partial last group (K mod g columns) is zero-padded to a whole group,
in the packed codes once and in the activations per call (x·0 adds nothing, whatever the padded codes).

**int8** (`aten._weight_int8pack_mm`): y = x·(w8·s)ᵀ with w8 int8 and one scale per output channel.
Ours (5-8 bits, per channel or per tensor): ŵ = (q − z)·s = (q − 128)·s + (128 − z)·s, so
y = int8mm(x, q − 128, s) + (Σ_k x_k)·(128 − z)·s: one extra rank-1 term, zero for symmetric 8-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.quantized_weight import QuantizedWeight, UniformGrid

INT4_GROUP_SIZES = (256, 128, 64, 32)


def _per_row_group(grid: UniformGrid, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32 [rows, G], zero int32 [rows, G], or fp32 for a float-zero (HQQ) grid) with per-tensor
    parameters broadcast to every row. Float zeros go to fp32 first: (8 − z) in fp16 would round."""
    s, z = grid.scale.float(), (grid.zero.float() if grid.float_zero else grid.zero)
    if s.shape[0] == 1 and rows != 1:
        s, z = s.expand(rows, -1), z.expand(rows, -1)
    return s, z


# ------------------------------------------------------------------------------------------------ int4


@dataclass
class Int4Packed:
    packed: torch.Tensor  # uint8 [N, K/2], the op's own layout
    scale_zero: torch.Tensor  # [K/group, N, 2] in the activation dtype: (s', z')
    group_size: int
    out_features: int
    in_features: int  # K of the layer; the packed operand may hold more (padding of a partial group)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * self.scale_zero.element_size()


def int4_reason(qw: QuantizedWeight) -> str | None:
    """None when the int4 kernel can run `qw`'s grid exactly, else why not."""
    g, (rows, cols) = qw.grid, qw.shape
    if not isinstance(g, UniformGrid):
        return f"{g.kind} grid"
    if g.bits > 4:
        return f"{g.bits}-bit codes do not fit int4"
    if g.g_idx is not None:
        return "act-order g_idx (dynamic groups)"
    if rows % 16:
        return f"output features {rows} not a multiple of 16"
    if g.group_size > 0 and g.group_size not in INT4_GROUP_SIZES:
        return f"group size {g.group_size} not in {INT4_GROUP_SIZES}"
    return None


def prepare_int4(qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> Int4Packed:
    g, (rows, cols) = qw.grid, qw.shape
    s, z = _per_row_group(g, rows)
    gs = g.group_size if g.group_size > 0 else next((k for k in INT4_GROUP_SIZES if cols % k == 0), 32)
    G = -(-cols // gs)
    if g.group_size <= 0:  # one (s, z) per row: repeat it over every op group
        s, z = s.expand(rows, G), z.expand(rows, G)
    zp = (8 - z).float() * s  # exact in fp32 (≤ 9-bit integer times an fp16 value)
    scale_zero = torch.stack([s.T, zp.T], dim=-1).to(dtype).contiguous()
    codes = torch.nn.functional.pad(qw.codes.to(torch.int32), (0, G * gs - cols), value=8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return Int4Packed(packed, scale_zero, gs, rows, cols)


def int4_mm(x: torch.Tensor, p: Int4Packed) -> torch.Tensor:
    """x [..., K] → x·Ŵᵀ [..., N] in x's dtype (the op wants 2-D, contiguous, dtype == scales')."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    pad = p.scale_zero.shape[0] * p.group_size - p.in_features
    x2 = torch.nn.functional.pad(x2, (0, pad)) if pad else x2.contiguous()
    sz = p.scale_zero if p.scale_zero.dtype == x.dtype else p.scale_zero.to(x.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, p.packed, p.group_size, sz)
    return y.reshape(*lead, p.out_features)


def int4_dequantize(p: Int4Packed, in_features: int) -> torch.Tensor:
    """The weight the int4 op actually multiplies by, [N, K] in the scales' dtype (identity input)."""
    eye = torch.eye(in_features, dtype=p.scale_zero.dtype)
    return int4_mm(eye, p).T.contiguous()


# ------------------------------------------------------------------------------------------------ int8


@dataclass
class Int8Packed:
    weight: torch.Tensor  # int8 [N, K] = q − 128
    scale: torch.Tensor  # [N] in the activation dtype
    zero_term: torch.Tensor | None  # [N] fp32 (128 − z)·s, None when every zero is 128

    def nbytes(self) -> int:
        n = self.weight.numel() + self.scale.numel() * self.scale.element_size()
        return n + (0 if self.zero_term is None else self.zero_term.numel() * self.zero_term.element_size())


def int8_reason(qw: QuantizedWeight) -> str | None:
    g = qw.grid
    if not isinstance(g, UniformGrid):
        return f"{g.kind} grid"
    if g.bits <= 4:
        return "4-bit or narrower codes: the int4 kernel applies"
    if g.group_size > 0:
        return "grouped scales (the int8 op has one scale per output channel)"
    return None


def prepare_int8(qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> Int8Packed:
    s, z = _per_row_group(qw.grid, qw.shape[0])
    s, z = s[:, 0], z[:, 0]
    w8 = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    zt = None if bool((z == 128).all()) else (128 - z).float() * s  # fp32: added after the op, in fp32
    return Int8Packed(w8, s.to(dtype).contiguous(), zt)


def int8_mm(x: torch.Tensor, p: Int8Packed) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    s = p.scale if p.scale.dtype == x.dtype else p.scale.to(x.dtype)
    y = torch.ops.aten._weight_int8pack_mm(x2, p.weight, s)
    if p.zero_term is not None:
        y = (y.float() + x2.sum(-1, keepdim=True, dtype=torch.float32) * p.zero_term).to(x.dtype)
    return y.reshape(*lead, p.weight.shape[0])
