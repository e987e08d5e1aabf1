"""Statistics of a layer's inputs, collected once by the pipeline and handed to methods.

Methods never run the model; they receive what they need from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    """Input statistics of one linear layer over N calibration tokens.

    hessian: H = (2/N) Σ x xᵀ  [in, in] (GPTQ's convention: the Hessian of ‖XWᵀ − XŴᵀ‖²/N).
    act_mean_abs: mean |x_j| per input channel over all N tokens [in] (AWQ's activation scale).
    act_mean_abs_max: max over calibration batches b of mean_{t∈b} |x_tj| [in] — the LQER authors'
        statistic (`statistic_profiler/scale.py`, notes §1.3): a running maximum of per-batch means,
        not a global mean. One batch is one forward call of the calibration loop.
    """

    hessian: torch.Tensor | None = None
    act_mean_abs: torch.Tensor | None = None
    nsamples: int = 0
    act_mean_abs_max: torch.Tensor | None = None


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(Δ H Δᵀ) for a weight change Δ [out, in]: with H = (2/N)·XᵀX it is (2/N)·‖XΔᵀ‖²_F, the layer's
    output error on the calibration inputs, from the statistics alone."""
    return ((delta @ hessian) * delta).sum()


class StatsAccumulator:
    """Running H = (2/N) Σ xxᵀ, mean|x| and the max over `add` calls of the per-call mean|x|, in float32,
    updated batch by batch (as the GPTQ reference; each `add` is one calibration batch)."""

    def __init__(self, in_features: int, hessian: bool = True):
        self.n = 0
        self.H = torch.zeros(in_features, in_features) if hessian else None
        self.mean_abs = torch.zeros(in_features)
        self.mean_abs_max = torch.zeros(in_features)  # mean|x| ≥ 0, so 0 is the identity of max

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        a = x.abs().sum(0)
        self.mean_abs.mul_(self.n / total).add_(a, alpha=1 / total)
        torch.maximum(self.mean_abs_max, a / m, out=self.mean_abs_max)
        if self.H is not None:
            self.H.mul_(self.n / total)
            xs = x * (2 / total) ** 0.5
            self.H.addmm_(xs.T, xs)
        self.n = total

    def result(self) -> LayerStats:
        return LayerStats(hessian=self.H, act_mean_abs=self.mean_abs, nsamples=self.n,
                          act_mean_abs_max=self.mean_abs_max)
