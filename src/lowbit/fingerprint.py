"""Content hashes for resumable work: a checkpoint or cache is reused only when what it depends on
(settings, calibration windows, weights) hashes the same."""

from __future__ import annotations

import hashlib
import json

import torch


def sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:32]


def json_sha(obj) -> str:
    """sha of canonical JSON (sorted keys; non-JSON values by str): settings that compare equal hash equal."""
    return sha(json.dumps(obj, sort_keys=True, default=str).encode())


def tensors_sha(*tensors: torch.Tensor) -> str:
    """sha of the tensors' shapes, dtypes and bytes, in order."""
    return sha(*(tensor_bytes(t) for t in tensors))


def file_sha256(path) -> str:
    """The full sha256 hex digest of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Shape, dtype and raw bytes: two tensors give the same bytes only when they are identical."""
    t = t.detach().cpu().contiguous()
    return str((tuple(t.shape), t.dtype)).encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every tensor's name, shape, dtype and up to 65,536 evenly spaced values: a retrained or
    edited model differs, and a 7B model is fingerprinted in seconds without hashing every byte."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sha(tensor_bytes(flat[:: max(1, flat.numel() // 65536)])).encode())
    return h.hexdigest()[:32]
