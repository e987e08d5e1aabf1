"""Policy-gradient structural pruning (Gao et al., ACL 2025): learn Bernoulli keep-probabilities s over
structures (attention KV groups, MLP channels) with forward passes only.

    min_s  E_{m ~ Bern(s)} L(m)   subject to  Σ s = keep·N,  0 ≤ s ≤ 1

The loss does not depend on s except through the sampling, so (REINFORCE)

    ∇_s E[L] = E[ L(m) · ∇_s log p(m | s) ],   ∇_s log p(m | s) = (m − s) / (s (1 − s))

estimated from K sampled masks per step, with a baseline δ (a moving average of earlier steps' mean
loss, independent of this step's samples, so the estimate stays unbiased; it only lowers the variance):

    g = (1/K) Σ_j (L_j − δ) · (m_j − s) / (s (1 − s))

`kind="normalized"` (the default, the authors' code) uses (m − s)/√(s(1 − s)) and divides by K − 1: the
same samples rescaled per coordinate by √(s(1−s)) (a natural-gradient-like preconditioning), no longer an
unbiased ∇ but a descent direction whose variance stays bounded as s nears 0 or 1, where the exact
score's 1/(s(1−s)) explodes (on a 12-structure toy with a brute-forced optimum: normalised 3 of 3 seeds,
exact 1 of 3; tests).
After each step s ← Π(s − lr·g): the projection onto {0 ≤ s ≤ 1, Σ s = keep·N}, clip(s − v) with v
found by bisection. The final mask keeps the keep·N structures with the largest s.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

EPS = 1e-4  # s is kept inside [EPS, 1 − EPS] when sampling so that the score stays finite


def project_budget(s: torch.Tensor, total: float, iters: int = 100) -> torch.Tensor:
    """argmin_x ‖x − s‖² s.t. 0 ≤ x ≤ 1, Σ x = total: x = clip(s − v, 0, 1), v by bisection (float64)."""
    s = s.double()
    n = s.numel()
    if not 0 <= total <= n:
        raise ValueError(f"budget {total} outside [0, {n}]")
    lo, hi = float(s.min()) - 1.0, float(s.max())  # Σ clip(s − lo) = n ≥ total ≥ 0 = Σ clip(s − hi)
    for _ in range(iters):
        v = 0.5 * (lo + hi)
        if float((s - v).clamp(0, 1).sum()) > total:
            lo = v
        else:
            hi = v
    return (s - 0.5 * (lo + hi)).clamp(0, 1)


def score(m: torch.Tensor, s: torch.Tensor, kind: str = "exact") -> torch.Tensor:
    s = s.clamp(EPS, 1 - EPS)
    var = s * (1 - s)
    return (m - s) / (var if kind == "exact" else var.sqrt())


def estimate(losses: torch.Tensor, masks: torch.Tensor, s: torch.Tensor, baseline: float,
             kind: str = "exact") -> torch.Tensor:
    """g from K losses [K] and masks [K, N] (the module docstring)."""
    K = losses.numel()
    w = (losses.double() - baseline)[:, None]
    div = K if kind == "exact" else max(1, K - 1)
    return (w * score(masks.double(), s.double(), kind)).sum(0) / div


def _project(s: torch.Tensor, keep: float, segments: list[tuple[int, int]]) -> torch.Tensor:
    out = s.double().clone()
    for a, b in segments:  # one budget per kind of structure (the authors: heads and channels apart)
        out[a:b] = project_budget(s[a:b], keep * (b - a))
    return out


def optimise(loss_fn: Callable[[torch.Tensor, int], float], s0: torch.Tensor, keep: float, *, steps: int,
             samples: int = 2, lr: float = 2e-3, window: int = 5,
             kind: Literal["exact", "normalized"] = "normalized", segments: list[tuple[int, int]] | None = None,
             seed: int = 0, on_step: Callable[[int, dict], None] | None = None) -> torch.Tensor:
    """Minimise E_{m~Bern(s)} loss_fn(m, step) over s with Σ s = keep·N per segment (forward passes only;
    `segments` [(start, end)], default the whole vector); returns s.

    lr follows a cosine decay to 0 (the authors' schedule); δ starts at the first step's mean loss.
    """
    gen = torch.Generator().manual_seed(seed)
    segments = segments or [(0, s0.numel())]
    s = _project(s0, keep, segments)
    baseline = None
    for t in range(steps):
        ps = s.clamp(EPS, 1 - EPS)
        masks = (torch.rand((samples, s.numel()), generator=gen, dtype=torch.float64) < ps).double()
        losses = torch.tensor([float(loss_fn(m, t)) for m in masks], dtype=torch.float64)
        mean = float(losses.mean())
        baseline = mean if baseline is None else baseline
        g = estimate(losses, masks, s, baseline, kind)
        rate = lr * 0.5 * (1 + math.cos(math.pi * t / max(1, steps)))
        s = _project(s - rate * g, keep, segments)
        baseline = (1 - 1 / window) * baseline + mean / window
        if on_step is not None:
            on_step(t, {"loss": mean, "baseline": baseline})
    return s


def hard_mask(s: torch.Tensor, keep: float) -> torch.Tensor:
    """The round(keep·N) structures with the largest s (ties by index): a bool mask."""
    k = int(round(keep * s.numel()))
    m = torch.zeros(s.numel(), dtype=torch.bool)
    m[torch.argsort(-s.double(), stable=True)[:k]] = True
    return m


def init_from_scores(score: torch.Tensor, keep: float, per_layer: int, spread: float = 1.0) -> torch.Tensor:
    """A start for s from a one-shot metric: logit(keep) + spread × (log score standardised within its
    layer), through a sigmoid (the authors start from Wanda-SP scores; scores of different layers are
    not comparable, so each layer is standardised on its own)."""
    z = score.double().clamp_min(1e-30).log().view(-1, per_layer)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True).clamp_min(1e-12)
    return torch.sigmoid(math.log(keep / (1 - keep)) + spread * z).reshape(-1)
