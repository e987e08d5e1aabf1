"""Input checks every method shares: fail with one clear line before any work is done."""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def check_weight(W: torch.Tensor, name: str = "weight") -> None:
    if W.ndim != 2:
        raise LowbitError(f"{name}: expected a 2-D weight, got shape {tuple(W.shape)}")
    # min and max propagate NaN and ±inf: two reductions, no weight-sized temporary
    if W.numel() and not (torch.isfinite(W.amax()) and torch.isfinite(W.amin())):
        bad = (~torch.isfinite(W)).sum().item()
        raise LowbitError(f"{name}: {bad} NaN/inf entries in the weight; refusing to quantize")


def check_hessian(H: torch.Tensor | None, in_features: int, name: str = "weight") -> torch.Tensor:
    if H is None:
        raise LowbitError(f"{name}: this method needs calibration statistics (a Hessian)")
    if H.shape != (in_features, in_features):
        raise LowbitError(f"{name}: Hessian shape {tuple(H.shape)} does not match input dim {in_features}")
    if not torch.isfinite(H).all():
        raise LowbitError(f"{name}: Hessian has NaN/inf entries (calibration activations overflowed?)")
    return H
