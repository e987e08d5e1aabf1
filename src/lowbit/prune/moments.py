"""Activation moments for UDFC (docs/udfc.md §3-4): closed forms under a Gaussian model, or samples.

Every compensation needs E[y] and E[y yᵀ] of the joint vector y = [a; ã] of layer l's channels before (a)
and after (ã) its filters are quantized. Two sources:

* **Rectified Gaussian** (Conv/Linear → BatchNorm → ReLU, data-free): the pre-activations are jointly
  Gaussian, u ~ N(m, Σ); a = ReLU(u). E[a], E[a²] have the univariate closed forms and E[a_i a_j] the
  bivariate one (Rosenbaum 1961, derived in docs/udfc.md §3):

      E[X⁺Y⁺] = s₁s₂·[(hk + ρ)·Φ₂(h, k; ρ) + h·φ(k)·Φ(B) + k·φ(h)·Φ(A) + q·φ(h)·φ(A)]
      h = m₁/s₁, k = m₂/s₂, q = √(1−ρ²), A = (k − ρh)/q, B = (h − ρk)/q,

  with Φ₂ by Drezner-Wesolowsky's integral in θ = asin r, integrated by Gauss-Legendre (smooth in θ).
* **Samples** (SwiGLU/GELU MLPs: Monte Carlo from a Gaussian input proxy, or calibration activations):
  plain sample moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.special.erfc(-x / _SQRT2)


@dataclass
class Moments:
    """First and raw second moments of a random vector: mean [n], second [n, n] = E[y yᵀ] (float64)."""

    mean: torch.Tensor
    second: torch.Tensor

    def cov(self) -> torch.Tensor:
        return self.second - torch.outer(self.mean, self.mean)

    def index(self, idx: torch.Tensor) -> "Moments":
        return Moments(self.mean[idx], self.second[idx][:, idx])


def relu_mean_sq(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[a], E[a²] of a = ReLU(u), u ~ N(m, s²) (s > 0):

        E[a]  = m·Φ(m/s) + s·φ(m/s),        E[a²] = (m² + s²)·Φ(m/s) + m·s·φ(m/s).
    """
    h = m / s
    return m * _cdf(h) + s * _pdf(h), (m * m + s * s) * _cdf(h) + m * s * _pdf(h)


def bvn_cdf(h: torch.Tensor, k: torch.Tensor, rho: torch.Tensor, nodes: int = 48) -> torch.Tensor:
    """Φ₂(h, k; ρ) = P(Z₁ < h, Z₂ < k) for standard normals with correlation ρ (elementwise, broadcast).

    Φ₂ = Φ(h)Φ(k) + (1/2π) ∫₀^{asin ρ} exp(−(h² + k² − 2hk·sin θ) / (2cos²θ)) dθ; the integrand is
    bounded and smooth in θ, so `nodes`-point Gauss-Legendre reaches ~1e-12 for |ρ| < 1.
    """
    x, w = np.polynomial.legendre.leggauss(nodes)
    x = torch.as_tensor(x, dtype=h.dtype)
    w = torch.as_tensor(w, dtype=h.dtype)
    h, k, rho = torch.broadcast_tensors(h, k, rho)
    top = torch.asin(rho.clamp(-1.0, 1.0))
    theta = (top.unsqueeze(-1) * (x + 1) / 2)  # [..., nodes] on [0, asin ρ]
    sin, cos2 = torch.sin(theta), torch.cos(theta) ** 2
    hh, kk = h.unsqueeze(-1), k.unsqueeze(-1)
    expo = -(hh * hh + kk * kk - 2 * hh * kk * sin) / (2 * cos2.clamp_min(1e-300))
    integral = (torch.exp(expo) * w).sum(-1) * top / 2
    return _cdf(h) * _cdf(k) + integral / (2 * math.pi)


def relu_pair_second(m1, s1, m2, s2, rho) -> torch.Tensor:
    """E[ReLU(X)·ReLU(Y)] for (X, Y) Gaussian with means m, std s > 0 and correlation ρ (elementwise)."""
    rho = rho.clamp(-1 + 1e-12, 1 - 1e-12)
    h, k = m1 / s1, m2 / s2
    q = torch.sqrt(1 - rho * rho)
    A, B = (k - rho * h) / q, (h - rho * k) / q
    L = bvn_cdf(h, k, rho)
    val = (h * k + rho) * L + h * _pdf(k) * _cdf(B) + k * _pdf(h) * _cdf(A) + q * _pdf(h) * _pdf(A)
    return s1 * s2 * val


def rectified_gaussian_moments(mean: torch.Tensor, cov: torch.Tensor, chunk: int = 256) -> Moments:
    """Moments of a = ReLU(u), u ~ N(mean, cov), all in float64. Diagonal by the univariate forms, the
    rest by the bivariate one (pairs processed in row chunks to bound memory)."""
    mean, cov = mean.double(), cov.double()
    n = mean.numel()
    s = torch.sqrt(torch.diagonal(cov).clamp_min(1e-24))  # a dead channel: a constant
    ea, ea2 = relu_mean_sq(mean, s)
    second = torch.empty(n, n, dtype=torch.float64)
    rho = cov / torch.outer(s, s)
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        second[sl] = relu_pair_second(mean[sl, None], s[sl, None], mean[None, :], s[None, :], rho[sl])
    second = (second + second.T) / 2
    second.diagonal().copy_(ea2)
    return Moments(ea, second)


def sample_moments(a: torch.Tensor) -> Moments:
    """Sample mean and raw second moment of rows a [N, n], accumulated in float64."""
    a = a.double()
    return Moments(a.mean(0), a.T @ a / a.shape[0])


class MomentAccumulator:
    """Streaming sample moments of [N, n] batches (float64 sums), for calibration activations."""

    def __init__(self, n: int):
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.outer = torch.zeros(n, n, dtype=torch.float64)
        self.count = 0

    def add(self, a: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).double()
        self.sum += a.sum(0).cpu()
        self.outer += (a.T @ a).cpu()
        self.count += a.shape[0]

    def moments(self) -> Moments:
        return Moments(self.sum / self.count, self.outer / self.count)


def bn_preactivation_gaussian(W: torch.Tensor, Wq: torch.Tensor | None, gamma: torch.Tensor,
                              beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free Gaussian model of the BatchNorm outputs u (and ũ with quantized filters) of one layer.

    BatchNorm standardises each channel over the training data, so u_j has mean β_j and std |γ_j|; we
    take u jointly Gaussian (UDFC's assumption). Correlations come from the filters w_j (rows of W
    [n, d], a conv flattened over in-channels × taps) under a white-input proxy, Cov(x) ∝ I:
        u_j = β_j + γ_j·(w_j/‖w_j‖)ᵀξ,  ũ_j = β_j + γ_j·(w̃_j/‖w_j‖)ᵀξ,  ξ ~ N(0, I),
    so corr(u_j, u_k) = cos(w_j, w_k), Var ũ_j = γ_j²·‖w̃_j‖²/‖w_j‖² and corr(u_j, ũ_j) = cos(w_j, w̃_j).
    The mean shift of ũ from a non-zero input mean is neglected. Returns (mean, cov) of [u] or [u; ũ].
    """
    W = W.double().reshape(W.shape[0], -1)
    norm = W.norm(dim=1, keepdim=True).clamp_min(1e-300)
    g = gamma.double()[:, None]
    E = g * W / norm
    mean = beta.double()
    if Wq is not None:
        E = torch.cat([E, g * Wq.double().reshape(W.shape) / norm])
        mean = torch.cat([mean, mean])
    return mean, E @ E.T
