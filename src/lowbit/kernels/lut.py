"""LUT path for codebook grids (`formats.codebook`: ŵ[r, c] = LUT[c, q[r, c]] per input column, or
LUT[r, q[r, c]] per output row): the weight stays as uint8 codes + a small table in memory (1 byte per
weight plus the table, against 2 for bf16 and 4 for fp32).

* Small batches (≤ NATIVE_MAX_ROWS activation rows: decode) run the native matvec (`lut_matvec.c`, built
  on first use by `kernels.lut_native`): a table look-up per weight straight from the codes, no Ŵ built,
  in float32 (the fp16 table is exact in float32; only the summation order differs from
  `dequantize()`-then-matmul). Codes of a per-column table are kept in the kernel's blocked layout.
* Larger batches (prefill), or without the native library: Ŵ is rebuilt by a gather one chunk of rows at
  a time right before each GEMM, exactly `dequantize()` rounded to the activation dtype. ATen has no
  LUT-GEMM op and the gather costs more than the GEMM it feeds: that path saves memory, not time.
`python bench/inference.py` measures both against dense fp32 / bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS_PER_CHUNK = 1024  # bounds the transient int64 index / dense chunk to ~1024·in·10 bytes (a multiple of 16)
# activation rows up to which the native matvec (cost ∝ rows) beats rebuilding Ŵ for a GEMM (4096², 16
# rows: per-column codebooks 5.7 ms native against ~89 ms rebuilt; AQLM 2x8 52 ms against 126 ms)
NATIVE_MAX_ROWS = 64


@dataclass
class LutPacked:
    codes: torch.Tensor  # uint8 [N, K], or [⌈N/16⌉, K, 16] blocked for the native per-column kernel
    table: torch.Tensor  # [2^b, K] (column axis) or [N, 2^b] (row axis), activation dtype
    axis: str
    out_features: int = 0
    table16: torch.Tensor | None = None  # float32 [K or N, 16] for the native kernel; None: torch path only
    # (axis "additive", AQLM: `table` the codebooks [M, 2^B, g], `table16` them in float32, `scale` [N])
    scale: torch.Tensor | None = None

    @property
    def blocked(self) -> bool:
        return self.codes.dim() == 3

    def nbytes(self) -> int:
        t16 = 0 if self.table16 is None else self.table16.numel() * 4
        return self.codes.numel() + self.table.numel() * self.table.element_size() + t16


def lut_reason(qw) -> str | None:
    g = qw.grid
    if getattr(g, "kind", None) == "additive":
        return None if g.nbits_per_codebook <= 8 else "additive codes wider than 8 bits"
    if getattr(g, "kind", None) != "codebook":
        return f"{g.kind} grid"
    if getattr(g, "row_scale", None) is not None:  # ŵ = s_r · LUT[c, q]: the table alone is not ŵ
        return "codebook grid with row scales"
    return None


def prepare_lut(qw, dtype: torch.dtype = torch.bfloat16, native: bool | None = None) -> LutPacked:
    """Pack a codebook layer; `native` None: use the native kernel when it builds (`lut_native.library`)."""
    from lowbit.kernels import lut_native

    g = qw.grid
    if g.kind == "additive":  # AQLM: codes [N, J, M] uint8, codebooks [M, K, g], row scales
        return LutPacked(qw.codes.contiguous(), g.codebooks.to(dtype), "additive", qw.codes.shape[0],
                         g.codebooks.float() if native is not False and lut_native.library() is not None else None,
                         g.scale.float())
    lut = g.codebook.to(dtype)
    table = lut.T.contiguous() if g.axis == "column" else lut.contiguous()
    n = qw.codes.shape[0]
    if native is None:
        native = lut_native.library() is not None
    if not native or g.codebook.shape[1] > lut_native.TAB:
        return LutPacked(qw.codes.contiguous(), table, g.axis, n)
    codes = lut_native.block_codes(qw.codes) if g.axis == "column" else qw.codes.contiguous()
    return LutPacked(codes, table, g.axis, n, lut_native.pad_table(g.codebook))


def lut_dequantize_rows(p: LutPacked, r0: int, r1: int) -> torch.Tensor:
    from lowbit.kernels import lut_native

    if p.axis == "additive":
        from lowbit.formats.additive import additive_vectors

        v = additive_vectors(p.table.float(), p.codes[r0:r1])  # summed in float32, as dequantize()
        return (v * p.scale[r0:r1, None, None]).reshape(r1 - r0, -1).to(p.table.dtype)

    codes = lut_native.unblock_rows(p.codes, r0, r1) if p.blocked else p.codes[r0:r1]
    idx = codes.long()
    if p.axis == "column":
        return torch.gather(p.table, 0, idx)  # [rows, K]: table[q[r, c], c]
    return torch.gather(p.table[r0:r1], 1, idx)


def lut_mm(x: torch.Tensor, p: LutPacked) -> torch.Tensor:
    """x [..., K] → x·Ŵᵀ [..., N]: the native matvec for a few rows, else Ŵ rebuilt chunk by chunk of
    output rows and multiplied."""
    from lowbit.kernels import lut_native

    n = p.out_features or p.codes.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    lib = lut_native.library() if p.table16 is not None else None
    if lib is not None and x2.shape[0] <= NATIVE_MAX_ROWS:
        xf = x2.float().contiguous()
        if p.axis == "additive":
            return lut_native.additive_matvec(lib, xf, p.table16, p.codes, p.scale).to(x.dtype).reshape(*x.shape[:-1], n)
        if p.axis == "column":
            y = lut_native.col_matvec(lib, xf, p.table16, p.codes, n)
        else:
            y = lut_native.row_matvec(lib, xf, p.table16, p.codes)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    table = p.table if p.table.dtype == x.dtype else p.table.to(x.dtype)
    q = LutPacked(p.codes, table, p.axis, n, scale=p.scale)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    for r0 in range(0, n, ROWS_PER_CHUNK):
        r1 = min(n, r0 + ROWS_PER_CHUNK)
        y[:, r0:r1] = x2 @ lut_dequantize_rows(q, r0, r1).T
    return y.reshape(*x.shape[:-1], n)
