"""LUT path for codebook grids (`formats.codebook`: ŵ[r, c] = LUT[c, q[r, c]] per input column, or
LUT[r, q[r, c]] per output row): the weight stays as uint8 codes + a small table in memory (1 byte per
weight plus the table, against 2 for bf16) and is rebuilt by a table look-up, one chunk of rows at a
time, right before each GEMM. ATen has no LUT-GEMM op and the look-up (a gather with int64 indices) costs
more than the bf16 GEMM it feeds, so this path saves memory, not time (`python bench/inference.py`).
The rebuilt chunk is exactly `dequantize()` rounded to the activation dtype (the table is fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS_PER_CHUNK = 1024  # bounds the transient int64 index / dense chunk to ~1024·in·10 bytes


@dataclass
class LutPacked:
    codes: torch.Tensor  # uint8 [N, K]
    table: torch.Tensor  # [2^b, K] (column axis) or [N, 2^b] (row axis), activation dtype
    axis: str

    def nbytes(self) -> int:
        return self.codes.numel() + self.table.numel() * self.table.element_size()


def lut_reason(qw) -> str | None:
    g = qw.grid
    if getattr(g, "kind", None) != "codebook":
        return f"{g.kind} grid"
    if getattr(g, "row_scale", None) is not None:  # ŵ = s_r · LUT[c, q]: the table alone is not ŵ
        return "codebook grid with row scales"
    return None


def prepare_lut(qw, dtype: torch.dtype = torch.bfloat16) -> LutPacked:
    g = qw.grid
    lut = g.codebook.to(dtype)
    table = lut.T.contiguous() if g.axis == "column" else lut.contiguous()
    return LutPacked(qw.codes.contiguous(), table, g.axis)


def lut_dequantize_rows(p: LutPacked, r0: int, r1: int) -> torch.Tensor:
    idx = p.codes[r0:r1].long()
    if p.axis == "column":
        return torch.gather(p.table, 0, idx)  # [rows, K]: table[q[r, c], c]
    return torch.gather(p.table[r0:r1], 1, idx)


def lut_mm(x: torch.Tensor, p: LutPacked) -> torch.Tensor:
    """x [..., K] → x·Ŵᵀ [..., N]: rebuild Ŵ chunk by chunk of output rows and multiply."""
    n = p.codes.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    table = p.table if p.table.dtype == x.dtype else p.table.to(x.dtype)
    q = LutPacked(p.codes, table, p.axis)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    for r0 in range(0, n, ROWS_PER_CHUNK):
        r1 = min(n, r0 + ROWS_PER_CHUNK)
        y[:, r0:r1] = x2 @ lut_dequantize_rows(q, r0, r1).T
    return y.reshape(*x.shape[:-1], n)
