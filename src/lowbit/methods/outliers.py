"""Outlier reservation (OR) for uniform-grid base quantizers: a fraction f of a layer's entries is kept
exactly in fp16 (values and positions stored, `formats.quantized_weight.Outliers`), the rest on the grid.

OR pays only when the reserved entries leave the grid fit: a min-max group's step is Δ = (max − min)/(2^b − 1),
so the group's rounding MSE ≈ Δ²/12 for *every* entry falls quadratically with the range the extremes
span (SpQR's outliers are likewise excluded from the group statistics). So:

1. `reserve_mask` scores every entry within its (row, group) of the base grid and takes the
   k = ⌊f·n + ½⌋ largest scores over the layer (ties to the lower flat index, so deterministic). Rules:
   * "range" (default): the drop of the group's squared min-max range (0 included) when the entry is
     reserved after the more extreme entries of its side — the group MSE n·Δ²/12 falls by that times
     n/(12·(2^b − 1)²), so the layer-wide top-k is a greedy MSE choice (the two sides are scored
     independently, and each side's scores are made non-increasing towards the centre);
   * "group-z": |w − μ_g| / σ_g, the entry's deviation relative to its group's spread;
   * "magnitude": |w − μ_g| / σ_layer, one layer-wide threshold (SqueezeLLM / CLAQ style).
   "range" gave the lowest RTN MSE on the reference model's weights and the lowest GPTQ tr(ΔHΔᵀ) on
   Student-t weights at every fraction tried (numbers in the helper report / bench/outliers.py).
2. The grid is fitted on `fit_view(W, mask)`: reserved entries replaced by 0. Since min-max affine grids
   always include 0 in their range (`affine_qparams`), that is exactly the min-max of the kept entries.
3. Codes exist for every entry (a reserved entry's code is its clamped grid value, what a consumer that
   drops the outliers would see); `dequantize` overwrites reserved entries with their fp16 value.

GPTQ: `ReservedColumnGrid` wraps any `ColumnGrid` of the sweep; reserved entries of a column take their
current (error-fed) value rounded to fp16 — the error there is only fp16 rounding, so the error feedback
comes from the quantized entries alone — and dynamic groups are fitted with reserved entries masked.

Another base quantizer (HQQ, AWQ) composes the same way: `mask = reserve_mask(W, cfg.outliers,
cfg.group_size, cfg.outlier_rule)`, fit its grid without the masked entries (`fit_view` for min-max
fits; an optimiser should rather give them zero weight), attach `take_outliers(W, mask)` to the
`QuantizedWeight`, and set `reserves_outliers = True` on its config (until then the config refuses f > 0).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lowbit.errors import LowbitError
from lowbit.formats.quant_primitives import n_groups, per_entry
from lowbit.formats.quantized_weight import Outliers

Rule = Literal["group-z", "magnitude", "range"]
RULES: tuple[str, ...] = ("group-z", "magnitude", "range")


def reserved_count(fraction: float, numel: int) -> int:
    """k = ⌊f·n + ½⌋ entries for fraction f of n (round half up)."""
    if not 0 <= fraction < 0.5:
        raise LowbitError(f"outlier fraction {fraction} must be in [0, 0.5)")
    return int(math.floor(fraction * numel + 0.5))


def outlier_scores(W: torch.Tensor, group_size: int, rule: Rule = "range") -> torch.Tensor:
    """Score [out, in] (float64): how far each entry pushes its (row, group)'s range, by `rule`."""
    if rule not in RULES:
        raise LowbitError(f"unknown outlier rule {rule!r}: choose one of {RULES}")
    n_groups(W.shape[1], group_size)
    Wd = W.double()
    layer_sd = Wd.std(correction=0).clamp(min=1e-300)

    def score(g: torch.Tensor) -> torch.Tensor:  # one piece [R, G, n] of group_pieces
        if rule == "range":
            return _range_gain(g)
        dev = (g - g.mean(dim=-1, keepdim=True)).abs()
        if rule == "magnitude":
            return dev / layer_sd
        sd = g.std(dim=-1, correction=0, keepdim=True)
        return torch.where(sd > 0, dev / torch.where(sd > 0, sd, 1.0), 0.0)

    return per_entry(score, Wd, group_size)


def _range_gain(g: torch.Tensor) -> torch.Tensor:
    """Per entry of g [R, G, n]: the drop of the group's squared min-max range (0 included, as
    `affine_qparams` fits it) when it is reserved after every more extreme entry on its side — the
    group MSE ≈ n·Δ²/12 falls by that times n/(12·(2^b − 1)²). Made non-increasing towards the centre
    (cumulative min), so a top-k never takes an entry before the more extreme ones of its side."""
    n = g.shape[-1]
    s, idx = torch.sort(g, dim=-1, stable=True)
    lo0, hi0 = s[..., :1].clamp(max=0), s[..., -1:].clamp(min=0)
    zero = torch.zeros_like(s[..., :1])
    hi = s.flip(-1).clamp(min=0)  # j-th largest
    top = (hi - lo0).square() - (torch.cat([hi[..., 1:], zero], -1) - lo0).square()
    lo = s.clamp(max=0)  # j-th smallest
    bot = (hi0 - lo).square() - (hi0 - torch.cat([lo[..., 1:], zero], -1)).square()
    top, bot = torch.cummin(top, -1).values.flip(-1), torch.cummin(bot, -1).values  # both in ascending order
    half = torch.arange(n, device=g.device) >= n // 2
    gain = torch.where(half, top, bot)
    return torch.empty_like(gain).scatter_(-1, idx, gain)


def reserve_mask(W: torch.Tensor, fraction: float, group_size: int, rule: Rule = "range") -> torch.Tensor:
    """Boolean [out, in]: exactly `reserved_count(fraction, W.numel())` entries with the largest scores,
    ties broken towards the lower flat index r·in + c."""
    k = reserved_count(fraction, W.numel())
    mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    if k:
        order = torch.sort(-outlier_scores(W, group_size, rule).flatten(), stable=True).indices
        mask[order[:k]] = True
    return mask.reshape(W.shape)


def fit_view(W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W with reserved entries set to 0: a min-max grid fitted on it spans exactly the kept entries (and 0)."""
    return W.masked_fill(mask, 0)


def take_outliers(W: torch.Tensor, mask: torch.Tensor) -> Outliers:
    """The reserved entries of W as stored: flat int32 index (ascending) and fp16 value."""
    index = torch.nonzero(mask.flatten())[:, 0]
    return Outliers(index.to(torch.int32), W.flatten()[index].to(torch.float16))


class ReservedColumnGrid:
    """`ColumnGrid` wrapper for the GPTQ sweep: reserved entries are kept exactly (fp16), never quantized.

    `mask` is in sweep order [out, in]. The inner grid's static parameters must already come from
    `fit_view`; dynamic groups are fitted here on the current weights with reserved entries masked.
    """

    def __init__(self, inner, mask: torch.Tensor):
        self.inner, self.mask = inner, mask
        self.group_size = inner.group_size
        nz = torch.nonzero(mask.T)  # (sweep column, row), sorted by column
        counts = torch.bincount(nz[:, 0], minlength=mask.shape[1]).tolist()
        self._rows = torch.split(nz[:, 1], counts)
        self._vals: list[torch.Tensor] = [None] * mask.shape[1]

    def start_group(self, W_group: torch.Tensor, j: int) -> None:
        self.inner.start_group(fit_view(W_group, self.mask[:, j : j + W_group.shape[1]]), j)

    def quantize_column(self, w: torch.Tensor, j: int):
        q, wq = self.inner.quantize_column(w, j)
        rows = self._rows[j]
        if rows.numel():
            vals = w[rows].to(torch.float16)
            wq[rows] = vals.to(wq.dtype)  # error = fp16 rounding only: nothing (else) propagates
            self._vals[j] = vals
        return q, wq

    def finish(self, perm: torch.Tensor | None):
        return self.inner.finish(perm)

    def outliers(self, perm: torch.Tensor | None, shape: tuple[int, int]) -> Outliers:
        """The stored outliers in original column order."""
        rows, cols = shape
        r = torch.cat(self._rows)
        orig = torch.arange(cols, device=r.device) if perm is None else perm
        c = torch.repeat_interleave(orig, torch.tensor([x.numel() for x in self._rows], dtype=torch.long, device=r.device))
        v = (torch.cat([x for x in self._vals if x is not None]) if r.numel()
             else torch.empty(0, dtype=torch.float16, device=r.device))
        return Outliers((r * cols + c).to(torch.int32), v)
