"""Grids for the GPTQ column sweep: how one column is snapped to codes, and when parameters are fitted.

The sweep (`gptq.gptq_sweep`) only calls `start_group` at group boundaries and `quantize_column` for each
column, in the (possibly permuted) sweep order, so another grid — CLAQ's per-column k-means codebooks —
plugs in by implementing the same three methods.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lowbit.formats.quant_primitives import affine_qparams, n_groups
from lowbit.formats.quantized_weight import UniformGrid


class ColumnGrid(Protocol):
    group_size: int  # columns per group in sweep order; ≤ 0 means parameters are fitted once

    def start_group(self, W_group: torch.Tensor, j: int) -> None:
        """Fit parameters for the group starting at sweep column j from the current weights."""

    def quantize_column(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes uint8 [rows], dequantized float [rows]) of sweep column j."""

    def finish(self, perm: torch.Tensor | None):
        """The storage grid in original column order (perm[j] = original index of sweep column j)."""


class UniformColumnGrid:
    """GPTQ's min-max affine grid (reference `quant.py`), with static or dynamic groups."""

    def __init__(self, W: torch.Tensor, bits: int, symmetric: bool, group_size: int,
                 static_groups: bool, perm: torch.Tensor | None):
        rows, cols = W.shape
        self.bits, self.symmetric = bits, symmetric
        self.maxq = 2**bits - 1
        self.perm = perm
        self.static = static_groups or group_size <= 0
        self.group_size = group_size if not self.static else 0
        self._gs = group_size
        if self.static:
            # Per channel / per tensor, or static groups: everything from the original W, original order.
            self.scale, self.zero = affine_qparams(W, bits, symmetric, group_size)
            self._col_group = self._static_col_group(cols, perm, W.device)
        else:
            G = n_groups(cols, group_size)  # the last group may be partial
            self.scale = torch.empty(rows, G, dtype=torch.float16, device=W.device)
            self.zero = torch.empty(rows, G, dtype=torch.int32, device=W.device)
        self._s = self._z = None

    def _static_col_group(self, cols: int, perm, device=None):
        gs = self._gs
        orig = torch.arange(cols, device=device) if perm is None else perm
        return orig // gs if gs > 0 else torch.zeros(cols, dtype=torch.long, device=orig.device)

    def start_group(self, W_group: torch.Tensor, j: int) -> None:
        s, z = affine_qparams(W_group, self.bits, self.symmetric, -1)
        self.scale[:, j // self._gs] = s[:, 0]
        self.zero[:, j // self._gs] = z[:, 0]
        self._s, self._z = s[:, 0].float(), z[:, 0].float()

    def _static_columns(self, dtype: torch.dtype):
        """Every sweep column's (scale, zero) as rows of [cols, out] tensors in `dtype`, built once: the
        sweep then reads one contiguous row per column instead of gathering and casting."""
        if getattr(self, "_cols", None) is None or self._cols[0].dtype != dtype:
            s, z = self.scale.to(dtype), self.zero.to(dtype)
            g = self._col_group
            self._cols = (s[:, g].T.contiguous(), z[:, g].T.contiguous())
        return self._cols

    def quantize_column(self, w: torch.Tensor, j: int):
        if self.static:
            S, Z = self._static_columns(w.dtype)
            s, z = S[j].expand_as(w), Z[j].expand_as(w)  # per tensor: one row of length 1
        else:
            if self._s.dtype != w.dtype:
                self._s, self._z = self._s.to(w.dtype), self._z.to(w.dtype)
            s, z = self._s, self._z
        q = torch.round(w / s).add_(z).clamp_(0, self.maxq)
        return q.to(torch.uint8), (q - z) * s

    def finish(self, perm: torch.Tensor | None) -> UniformGrid:
        g_idx = None
        if not self.static and perm is not None:
            # Dynamic groups were formed in sweep order: original column perm[j] belongs to group j // g.
            g_idx = torch.empty(len(perm), dtype=torch.int32, device=perm.device)
            g_idx[perm] = (torch.arange(len(perm), device=perm.device) // self._gs).to(torch.int32)
        return UniformGrid(self.bits, self._gs, self.symmetric, self.scale, self.zero, g_idx)
