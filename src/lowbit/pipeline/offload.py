"""Calibration activations on disk: the inputs of the current block, one file per calibration batch.

The pipeline holds one block's inputs at a time, n_windows × seqlen × hidden × 4 bytes: 4.3 GB for 128
windows of 2048 tokens of a 4096-wide model, more than the block itself. `DiskBatches` keeps them as
safetensors files instead and reads one batch back when a pass needs it, so the memory of the
activations is one batch. It behaves like the list of tensors it replaces (`len`, `[b]`, `[b] = h`,
`append`, iteration); writes go through a temporary name and a rename.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowbit.io.atomic import atomic_save_safetensors


class DiskBatches:
    def __init__(self, root: str | Path | None = None):
        self._own = root is None
        self.root = Path(tempfile.mkdtemp(prefix="lowbit-acts-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._sizes: list[int] = []
        self.device: torch.device | None = None  # where a batch read back goes (the pipeline's device)

    def _path(self, b: int) -> Path:
        return self.root / f"batch-{b:06d}.safetensors"

    def _write(self, b: int, h: torch.Tensor) -> None:
        # scratch activations: renamed into place complete, but not fsynced (a crash recomputes them)
        atomic_save_safetensors({"h": h.detach().cpu().contiguous()}, self._path(b), durable=False)

    def append(self, h: torch.Tensor) -> None:
        self._write(len(self._sizes), h)
        self._sizes.append(h.numel() * h.element_size())

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, b: int) -> torch.Tensor:
        if not -len(self) <= b < len(self):
            raise IndexError(b)
        h = load_file(str(self._path(b % len(self))))["h"]
        return h if self.device is None else h.to(self.device)

    def __setitem__(self, b: int, h: torch.Tensor) -> None:
        if not 0 <= b < len(self):
            raise IndexError(b)
        self._write(b, h)
        self._sizes[b] = h.numel() * h.element_size()

    def __iter__(self):
        return (self[b] for b in range(len(self)))

    @property
    def nbytes(self) -> int:
        return sum(self._sizes)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def batches_bytes(hidden) -> int:
    """Bytes of a block's calibration inputs, on disk or in memory."""
    if isinstance(hidden, DiskBatches):
        return hidden.nbytes
    return sum(h.numel() * h.element_size() for h in hidden or [])
