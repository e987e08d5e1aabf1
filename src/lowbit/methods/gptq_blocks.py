"""GPTQ's column sweep into ggml blocks: GPTQ codes in a K-quant (or Q4_0 / Q5_0 / Q8_0 ...) file that
llama.cpp runs as it is.

A ggml block stores its scales beside the codes, ŵ = step·q − off per sub-block (`formats.kquants`). The
sweep (`methods.gptq.gptq_sweep`) feeds each column's rounding error forward through the inverse Hessian
exactly as GPTQ does, and a block's scales are fitted — with the layer's activation second moments as
importance (diag H / 2, llama.cpp's imatrix) — when the sweep reaches the block's first column, to the
weights as the errors of all earlier columns have updated them (GPTQ's dynamic groups; scales fitted to
the original weights first clip the updated ones). The file holds precisely the swept values, so nothing is
re-quantized afterwards: the export is exact by construction. Columns are swept in their natural order
(a block's columns are contiguous; act-order would need per-column scale indices ggml does not have).
"""

from __future__ import annotations

import torch

from lowbit.formats.kquants import BLOCKS, BlockFit, fit
from lowbit.methods.gptq import gptq_sweep, sweep_operands


class BlockFitColumnGrid:
    """`ColumnGrid` over ggml blocks: at each block's first column its scales are fitted (`kquants.fit`) to
    the current weights; column j then snaps to q = round((w + off_j)/step_j) in [0, nmax]."""

    def __init__(self, qtype: str, rows: int, cols: int, importance: torch.Tensor | None):
        self.qtype, self.importance = qtype, importance
        self.group_size = BLOCKS[qtype][0]
        self.step = torch.empty(cols, rows)  # [cols, rows]: column j is row j
        self.off = torch.empty(cols, rows)
        self.fits: list[BlockFit] = []

    def start_group(self, W_group: torch.Tensor, j: int) -> None:
        n = self.group_size
        imp = None if self.importance is None else self.importance[j:j + n]
        f = fit(W_group, self.qtype, imp)
        self.fits.append(f)
        self.step[j:j + n] = f.per_element(f.step).T
        self.off[j:j + n] = f.per_element(f.off).T

    def quantize_column(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, off = self.step[j], self.off[j]
        ok = step != 0
        q = torch.round((w + off) / torch.where(ok, step, torch.ones_like(step)))
        q = torch.where(ok, q, torch.zeros_like(q)).clamp(0, self.fits[-1].nmax)
        return q.to(torch.uint8), step * q - off

    def finish(self, perm=None) -> BlockFit:
        """The whole layer's BlockFit: the blocks' fits side by side."""
        fs = self.fits
        cat = lambda ts: torch.cat(ts, dim=1)  # noqa: E731  (dim 1: blocks along the row)
        return BlockFit(self.qtype, cat([f.step for f in fs]), cat([f.off for f in fs]), fs[0].nmax,
                        {k: cat([f.header[k] for f in fs]) for k in fs[0].header})


def gptq_block_codes(W: torch.Tensor, hessian: torch.Tensor, qtype: str, importance: torch.Tensor | None = None,
                     damp_percent: float = 0.01) -> tuple[BlockFit, torch.Tensor]:
    """(the block fit, codes uint8 [rows, cols]) for `kquants.pack`, chosen by GPTQ's sweep on H [cols, cols];
    `importance` [cols] (default diag H / 2) weights each block's scale fit."""
    if importance is None:
        importance = hessian.diagonal().float() / 2
    Wf, U, _ = sweep_operands(W, hessian, False, damp_percent)
    grid = BlockFitColumnGrid(qtype, *W.shape, importance)
    # lazy blocks of one ggml block: every fit then sees the weights updated by all earlier columns (the
    # sweep fits a group from the block-level W, which lags inside a lazy block)
    codes, _ = gptq_sweep(Wf, U, grid, block_size=grid.group_size)
    return grid.finish(), codes
