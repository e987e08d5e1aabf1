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
        statistic (`statistic_profiler/scale.py` in the LQER repository): a running maximum of per-batch means,
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


# Width of the row strips of H's upper triangle: H[i:i+S, i:] += x[:, i:i+S]ᵀ·x[:, i:] computes about
# half of xᵀx (d²/2 + d·S/2 products instead of d²); narrower strips lose GEMM efficiency. 128 gave
# 0.64–0.65× the time of the full product at d = 576 and 1536 (4096 tokens, 2 threads).
STRIP = 128


class StatsAccumulator:
    """H = (2/N) Σ xxᵀ, mean|x| and the max over `add` calls of the per-call mean|x|, in float32, fed batch
    by batch (each `add` is one calibration batch).

    The sum S = Σ xxᵀ is accumulated unscaled and only in its upper triangle (H is symmetric); `result()`
    mirrors it and scales by 2/N once. (The GPTQ reference rescales H at every batch; in float32 the two
    differ by rounding only, and the unscaled sum spares a copy of x and a pass over H per batch.)"""

    def __init__(self, in_features: int, hessian: bool = True, activations: bool = True,
                 device: torch.device | str | None = None):
        self.n = 0
        self.H = torch.zeros(in_features, in_features, device=device) if hessian else None
        # mean|x| and its per-batch maximum (≥ 0, so 0 is the identity of max); None when not wanted
        self.mean_abs = torch.zeros(in_features, device=device) if activations else None
        self.mean_abs_max = torch.zeros(in_features, device=device) if activations else None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        if self.mean_abs is not None:
            a = x.abs().sum(0)
            self.mean_abs.mul_(self.n / total).add_(a, alpha=1 / total)
            torch.maximum(self.mean_abs_max, a / m, out=self.mean_abs_max)
        if self.H is not None:
            for i in range(0, x.shape[1], STRIP):
                self.H[i:i + STRIP, i:].addmm_(x[:, i:i + STRIP].T, x[:, i:])
        self.n = total

    def result(self) -> LayerStats:
        H = None
        if self.H is not None:
            H = (self.H.triu() + self.H.triu(1).T) * (2 / self.n) if self.n else self.H.clone()
        return LayerStats(hessian=H, act_mean_abs=self.mean_abs, nsamples=self.n,
                          act_mean_abs_max=self.mean_abs_max)
