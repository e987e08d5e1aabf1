"""UDFC's closed-form compensation (Bai et al., ICCV 2023, reconstructed; derivation in docs/udfc.md §2).

Layer l has n output channels a (after its nonlinearity); layer l+1 computes z = W·a + b with W [m, n]
(a conv: one such W_t per kernel tap). Compression keeps the channels K, drops P, and quantizes the kept
filters, so layer l+1 sees ã_K. The compensation folds a matrix T [n, |K|] into layer l+1:

    W'[:, k] = Σ_j W[:, j]·T[j, k],    b' = b + W·(E[a] − T·E[ã_K])   (when layer l+1 can take a bias)

and T minimises the expected reconstruction error of layer l+1's output (pruning and quantization terms
in one objective):

    ℓ(T) = E‖W·(a − T·ã_K)‖² = tr(G·(C_aa − X·Tᵀ − T·Xᵀ + T·C·Tᵀ)),   G = Σ_t W_tᵀW_t,
    X = E[a·ã_Kᵀ] [n, |K|],  C = E[ã_K·ã_Kᵀ] [|K|, |K|]   (centred moments when the bias is re-fitted).

Families of T (each contains "no compensation", T = [I; 0], so none of them can do worse than it):
* `scale` (UDFC): T[K] = diag(s′) (a rescale of each kept, quantized channel), T[P] = S free
  (each pruned channel as a linear combination of the kept ones): W'[:, k] = s′_k·W[:, k] + Σ_p S_pk·W[:, p].
  Normal equations (docs/udfc.md §2.3), with Z = G_PP⁻¹G_PK and H = G_KK − G_KP·Z:
      (H ⊙ C)·s′ = diag(H·X_K),      S = (X_P − Z·(diag(s′)·C − X_K))·C⁻¹.
* `prune`: the same with s′ = 1 fixed (pruning compensation only).
* `full`: T free: T = X·C⁻¹ (G drops out: every channel regressed on the kept quantized channels).
* `merge` (Neuron Merging): one partner per pruned channel, built by the caller (`merge_T`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.prune.moments import Moments


@dataclass
class JointMoments:
    """Moments of layer l's channels before (a, all n) and after compression (q = ã, all n quantized).

    aa = E[a aᵀ], aq = E[a ãᵀ], qq = E[ã ãᵀ] (raw, float64 [n, n]); mean_a, mean_q [n].
    Without quantization ã = a.
    """

    mean_a: torch.Tensor
    mean_q: torch.Tensor
    aa: torch.Tensor
    aq: torch.Tensor
    qq: torch.Tensor

    @classmethod
    def from_joint(cls, m: Moments, n: int) -> "JointMoments":
        """Split the moments of y = [a; ã] (2n) or of a alone (n, no quantization)."""
        if m.mean.numel() == n:
            return cls(m.mean, m.mean, m.second, m.second, m.second)
        return cls(m.mean[:n], m.mean[n:], m.second[:n, :n], m.second[:n, n:], m.second[n:, n:])

    def centred(self) -> "JointMoments":
        o = torch.outer
        return JointMoments(self.mean_a, self.mean_q, self.aa - o(self.mean_a, self.mean_a),
                            self.aq - o(self.mean_a, self.mean_q), self.qq - o(self.mean_q, self.mean_q))


def gram(W: torch.Tensor) -> torch.Tensor:
    """G = Σ_t W_tᵀW_t [n, n] of a next layer W [m, n] or conv [m, n, kh, kw] (taps treated as
    uncorrelated copies of the activation: docs/udfc.md §2.4)."""
    F = W.double().transpose(0, 1).reshape(W.shape[1], -1)
    return F @ F.T


def _sym_solve(A: torch.Tensor, B: torch.Tensor, damp: float) -> torch.Tensor:
    """(A + λ·mean(diag A)·I)⁻¹·B for symmetric PSD A; λ = damp keeps rank-deficient moments solvable."""
    lam = damp * float(torch.diagonal(A).mean().clamp_min(1e-300)) if A.numel() else 0.0
    A = A + lam * torch.eye(A.shape[0], dtype=A.dtype)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.lstsq(A, B).solution


def _split(n: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[keep] = True
    return keep, torch.nonzero(~mask).flatten()


def identity_T(n: int, keep: torch.Tensor) -> torch.Tensor:
    """No compensation: the kept columns as they are, pruned columns dropped."""
    T = torch.zeros(n, keep.numel(), dtype=torch.float64)
    T[keep, torch.arange(keep.numel())] = 1.0
    return T


def merge_T(n: int, keep: torch.Tensor, prune: torch.Tensor, partner: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Neuron Merging: pruned channel prune[i] is replaced by scale[i]·(kept channel keep[partner[i]]),
    i.e. W'[:, partner] += scale·W[:, p]. Scale 0 means plain pruning."""
    T = identity_T(n, keep)
    T[prune, partner] = scale.double()
    return T


def solve_T(G: torch.Tensor, jm: JointMoments, keep: torch.Tensor, mode: str = "scale",
            damp: float = 1e-6) -> torch.Tensor:
    """The minimiser of ℓ(T) over the family `mode` ('scale' | 'prune' | 'full'); see module docstring."""
    n = G.shape[0]
    K, P = _split(n, keep)
    X = jm.aq[:, K]  # E[a ã_Kᵀ], n × |K|
    C = jm.qq[K][:, K]
    eye = torch.eye(K.numel(), dtype=torch.float64)
    Cinv = _sym_solve(C, eye, damp)
    if mode == "full":
        return X @ Cinv
    G = G.double()
    XK, XP = X[K], X[P]
    if P.numel():
        Z = _sym_solve(G[P][:, P], G[P][:, K], damp)  # G_PP⁻¹ G_PK
        H = G[K][:, K] - G[K][:, P] @ Z
    else:
        Z = torch.zeros(0, K.numel(), dtype=torch.float64)
        H = G[K][:, K]
    if mode == "scale":
        # ∂ℓ/∂s′_k = 0: Σ_j H_kj·C_jk·s′_j = Σ_j H_kj·X_K[j, k]; H ⊙ C is PSD (Schur product theorem).
        s = _sym_solve(H * C, (H * XK.T).sum(1, keepdim=True), damp).flatten()
    elif mode == "prune":
        s = torch.ones(K.numel(), dtype=torch.float64)
    else:
        raise ValueError(f"unknown compensation family {mode!r}")
    RK = s[:, None] * C - XK
    T = torch.zeros(n, K.numel(), dtype=torch.float64)
    T[K] = torch.diag(s)
    T[P] = (XP - Z @ RK) @ Cinv
    return T


def expected_error(G: torch.Tensor, jm: JointMoments, keep: torch.Tensor, T: torch.Tensor) -> float:
    """ℓ(T) = tr(G·(C_aa − X·Tᵀ − T·Xᵀ + T·C·Tᵀ)) for the moments given (raw or centred)."""
    X = jm.aq[:, keep]
    C = jm.qq[keep][:, keep]
    E = jm.aa - X @ T.T - T @ X.T + T @ C @ T.T
    return float((G.double() * E).sum())


def output_energy(G: torch.Tensor, jm: JointMoments) -> float:
    """E‖W·a‖² = tr(G·C_aa): the scale that relative errors are measured against."""
    return float((G.double() * jm.aa).sum())


def bias_shift(jm: JointMoments, keep: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """t₀ = E[a] − T·E[ã_K]; the optimal bias of layer l+1 is b + W·t₀ (zero-mean error)."""
    return jm.mean_a - T @ jm.mean_q[keep]


def fold(W: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """W' = W·T along the input-channel dimension (dim 1) of a linear [m, n] or conv [m, n, ...] weight."""
    Wd = W.double().movedim(1, -1)
    return (Wd @ T).movedim(-1, 1).to(W.dtype).contiguous()
