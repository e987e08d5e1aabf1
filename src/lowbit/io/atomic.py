"""Atomic outputs: a reader sees the old result or the complete new one, never a half-written file.

Everything is built next to its destination (same filesystem, so the final `os.replace`/`rename` is
atomic) under a dot-prefixed temporary name, and only renamed into place once complete. A crash leaves
at most a hidden temporary behind, which the failing process removes when it can.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lowbit.errors import LowbitError


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


@contextmanager
def atomic_dir(final: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `final`.

    With `overwrite`, an existing `final` is moved aside, the new one renamed in, then the old one
    deleted, so `final` is missing only between two renames. On an exception the temporary directory
    is deleted and any previous `final` is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise LowbitError(f"output directory {final} exists; pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier crash of a process with our pid
    tmp.mkdir()
    try:
        yield tmp
        # Checked again: another process may have created `final` while we were writing.
        if final.exists():
            if not overwrite:
                raise LowbitError(f"output directory {final} exists; pass --overwrite")
            old = _sibling(final, "old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename


def atomic_write(path: Path | str, write, durable: bool = True) -> None:
    """`write(tmp)` fills a temporary sibling of `path`, which then replaces `path` in one rename."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        if durable:  # flush to disk before the rename makes the file visible (scratch files skip it)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write UTF-8 `text` to `path` via a temporary file and an atomic rename."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and an atomic rename."""
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str,
                            metadata: dict[str, str] | None = None, durable: bool = True) -> None:
    """`safetensors.torch.save_file` via a temporary file and an atomic rename (`durable`: fsync first)."""
    from safetensors.torch import save_file

    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), durable)
