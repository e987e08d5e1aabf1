"""Reading the files lowbit did not just write: every failure is one `LowbitError` that names the file.

A model directory, a lowbit output, a checkpoint or a cache can be truncated by a full disk, a killed
copy or a partial download. The libraries underneath raise their own types (`json.JSONDecodeError`,
`safetensors.SafetensorError`, `OSError`); a user should instead read which file is damaged and what to do
about it, in one line. Only JSON and safetensors are read (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import LowbitError


def read_json(path: Path | str, what: str, fix: str = "the file is corrupt", *, format: str | None = None) -> dict:
    """The JSON object in `path`; `what` says what the file is, `fix` what to do when it is damaged.
    With `format`, the object's "format" key must equal it (files lowbit versions its layout in)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path} not found{f': {what}' if what else ''}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise LowbitError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path} is not a JSON object; {fix}")
    if format is not None and data.get("format") != format:
        raise LowbitError(f"{path} has format {data.get('format')!r}, not {format!r}; {fix}")
    return data


def _damaged(path: Path, e: Exception, fix: str) -> LowbitError:
    return LowbitError(f"{path} is not a readable safetensors file ({e}); {fix}")


def open_safetensors(path: Path | str, fix: str = "the file is corrupt or truncated"):
    """A memory-mapped `safe_open` handle; the header and the file's length are checked on open, so a
    truncated file fails here (safetensors: "file not fully covered") and not at some later tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path} not found; {fix}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError: safetensors has no common base class besides Exception
        raise _damaged(path, e, fix) from None


def read_safetensors(path: Path | str, fix: str = "the file is corrupt or truncated") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path} not found; {fix}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise _damaged(path, e, fix) from None


DAMAGED_WEIGHTS = "the model's weights are damaged or partially copied: copy or download them again"


def shard_map(path: Path | str) -> dict[str, str] | None:
    """Tensor name → shard file of a sharded checkpoint (`model.safetensors.index.json`), or None."""
    index = Path(path) / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = read_json(index, "", "the shard index is damaged: copy or download the model again").get("weight_map")
    if not isinstance(weight_map, dict):
        raise LowbitError(f"{index} has no weight_map; the shard index is damaged")
    return weight_map


def weight_files(path: Path | str) -> list[str]:
    """The model's own safetensors files in a directory, relative names: the shards of its index, else
    `model.safetensors`, else none (other safetensors in the directory, e.g. SpIEL's
    `sparse_delta.safetensors` beside a merged model, are not weights)."""
    shards = shard_map(path)
    if shards is not None:
        return sorted(set(shards.values()))
    return ["model.safetensors"] if (Path(path) / "model.safetensors").is_file() else []


def check_safetensors_dir(path: Path | str) -> None:
    """Open the model's weight files once (header and length only) before a loader that would fail deep
    inside with a foreign traceback reads them."""
    for f in weight_files(path):
        open_safetensors(Path(path) / f, DAMAGED_WEIGHTS)


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The keyword transformers' `from_pretrained` / `from_config` take a dtype by (renamed in version 5)."""
    import transformers

    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}
