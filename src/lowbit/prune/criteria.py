"""Which channels to prune: filter norms (L1/L2) or the reconstruction error itself (docs/udfc.md §5)."""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def n_pruned(n: int, ratio: float) -> int:
    """round(ratio·n) channels, always leaving at least one."""
    return min(int(round(ratio * n)), n - 1)


def norm_scores(W: torch.Tensor, p: int) -> torch.Tensor:
    """‖w_j‖_p of each output channel's filter (rows of W [n, ...]): small norm → prune first (Li et al.)."""
    return W.double().reshape(W.shape[0], -1).norm(p=p, dim=1)


def recon_order(G_diag: torch.Tensor, C: torch.Tensor, k: int, damp: float = 1e-6) -> torch.Tensor:
    """Greedy: k channels, each the one whose removal adds the least expected output error when the
    remaining channels compensate it. Removing p alone costs G_pp / (C⁻¹)_pp (G_pp = ‖W_{:,p}‖² of the
    next layer; 1/(C⁻¹)_pp = E[residual² of a_p regressed on the others]); after each removal C⁻¹ is
    downdated, C⁻¹ ← C⁻¹ − C⁻¹[:, p]·C⁻¹[p, :] / C⁻¹_pp (the inverse of the remaining block). Cross terms
    G_pq between pruned channels are ignored in the ranking (not in the compensation). Returns indices."""
    n = C.shape[0]
    C = C.double() + damp * float(torch.diagonal(C).mean().clamp_min(1e-300)) * torch.eye(n, dtype=torch.float64)
    Ci = torch.linalg.inv(C)
    alive = torch.ones(n, dtype=torch.bool)
    order = []
    g = G_diag.double()
    for _ in range(k):
        score = torch.where(alive, g / torch.diagonal(Ci).clamp_min(1e-300), torch.inf)
        p = int(torch.argmin(score))
        order.append(p)
        col = Ci[:, p].clone()
        Ci -= torch.outer(col, col) / col[p]
        alive[p] = False
        Ci[p, :] = 0
        Ci[:, p] = 0
    return torch.tensor(order, dtype=torch.long)


def recon_scores(G_diag: torch.Tensor, C: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """One-shot costs G_pp / (C⁻¹)_pp (for a global ranking across layers)."""
    n = C.shape[0]
    C = C.double() + damp * float(torch.diagonal(C).mean().clamp_min(1e-300)) * torch.eye(n, dtype=torch.float64)
    return G_diag.double() / torch.diagonal(torch.linalg.inv(C)).clamp_min(1e-300)


def keep_from_pruned(n: int, pruned: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[pruned] = False
    return torch.nonzero(mask).flatten()


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest scores (ties broken by index, so results are deterministic)."""
    return torch.sort(torch.argsort(scores, stable=True)[:k]).values


def global_counts(scores: list[torch.Tensor], ratio: float) -> list[int]:
    """Prune the globally lowest `ratio` of all channels, scores already normalised per layer; each layer
    keeps at least one channel."""
    total = sum(s.numel() for s in scores)
    k = int(round(ratio * total))
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    counts = [0] * len(scores)
    for i in owner[torch.argsort(flat, stable=True)].tolist():
        if k == 0:
            break
        if counts[i] < scores[i].numel() - 1:
            counts[i] += 1
            k -= 1
    return counts


def check_ratio(ratio: float) -> None:
    if not (0.0 <= ratio < 1.0) or ratio != ratio:
        raise LowbitError(f"pruning ratio {ratio} is out of range: use 0 <= ratio < 1")
