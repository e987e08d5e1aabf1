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
        n_groups(cols, group_size)
        self.bits, self.symmetric = bits, symmetric
        self.maxq = 2**bits - 1
        self.perm = perm
        self.static = static_groups or group_size <= 0
        self.group_size = group_size if not self.static else 0
        self._gs = group_size
        if self.static:
            # Per channel / per tensor, or static groups: everything from the original W, original order.
            self.scale, self.zero = affine_qparams(W, bits, symmetric, group_size)
            self._col_group = self._static_col_group(cols, perm)
        else:
            g = group_size
            self.scale = torch.empty(rows, cols // g, dtype=torch.float16)
            self.zero = torch.empty(rows, cols // g, dtype=torch.int32)
        self._s = self._z = None

    def _static_col_group(self, cols: int, perm):
        gs = self._gs
        orig = torch.arange(cols) if perm is None else perm
        return orig // gs if gs > 0 else torch.zeros(cols, dtype=torch.long)

    def start_group(self, W_group: torch.Tensor, j: int) -> None:
        s, z = affine_qparams(W_group, self.bits, self.symmetric, -1)
        self.scale[:, j // self._gs] = s[:, 0]
        self.zero[:, j // self._gs] = z[:, 0]
        self._s, self._z = s[:, 0].float(), z[:, 0].float()

    def quantize_column(self, w: torch.Tensor, j: int):
        if self.static:
            g = self._col_group[j]
            s = self.scale[:, g] if self.scale.shape[0] > 1 else self.scale[0, g].expand_as(w)
            z = self.zero[:, g] if self.zero.shape[0] > 1 else self.zero[0, g].expand_as(w)
            s, z = s.to(w.dtype), z.to(w.dtype)
        else:
            s, z = self._s.to(w.dtype), self._z.to(w.dtype)
        q = torch.clamp(torch.round(w / s) + z, 0, self.maxq)
        return q.to(torch.uint8), (q - z) * s

    def finish(self, perm: torch.Tensor | None) -> UniformGrid:
        g_idx = None
        if not self.static and perm is not None:
            # Dynamic groups were formed in sweep order: original column perm[j] belongs to group j // g.
            g_idx = torch.empty(len(perm), dtype=torch.int32)
            g_idx[perm] = (torch.arange(len(perm)) // self._gs).to(torch.int32)
        return UniformGrid(self.bits, self._gs, self.symmetric, self.scale, self.zero, g_idx)
