"""Content hashes for resumable work: a checkpoint or cache is reused only when what it depends on
(settings, calibration windows, weights) hashes the same."""

from __future__ import annotations

import hashlib

import torch


def sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:32]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Shape, dtype and raw bytes: two tensors give the same bytes only when they are identical."""
    t = t.detach().cpu().contiguous()
    return str((tuple(t.shape), t.dtype)).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()
