"""The one evaluation protocol: what every number lowbit reports was measured on, and how to say so.

`lowbit eval`, `lowbit compare`, the demo and every bench evaluate through `Protocol`:

* **evaluation**: WikiText-2 raw test, joined and tokenized once (the GPTQ protocol, `lowbit.data`),
  cut into non-overlapping windows of `seqlen` tokens; the first `windows` of them. Perplexity, the KL
  divergence KL(base ‖ model) and the top-1 agreement with the base model are all taken on those same
  windows, from one forward pass of the evaluated model (`lowbit.eval.evaluate`).
* **calibration**: `calib_samples` windows of `calib_seqlen` tokens from the C4 calibration documents
  (`data.C4_CALIB`, never evaluated on), drawn with `calib_seed`.

Two profiles: `quick` (the demo, `make bench`) and `full` (the committed bench tables). A result records
its protocol and `provenance()`: git commit, model key, windows, calibration set, seed, threads, torch
version and device, so tables from different benches can be compared — or refused as incomparable.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from lowbit.errors import LowbitError

DEFAULT_SEQLEN = 512


class Protocol(BaseModel):
    """Evaluation windows and calibration windows, fixed for every method compared under it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = "custom"
    dataset: Literal["wikitext2-test"] = "wikitext2-test"
    seqlen: int = Field(DEFAULT_SEQLEN, ge=2)
    windows: int | None = Field(64, ge=1)  # the first N windows; None = every window of the test split
    batch_size: int = Field(8, ge=1)
    calib_dataset: Literal["c4"] = "c4"
    calib_samples: int = Field(128, ge=1)
    calib_seqlen: int = Field(DEFAULT_SEQLEN, ge=2)
    calib_seed: int = 0

    def with_(self, **changes) -> "Protocol":
        """A copy with `changes` (None values ignored); renamed `custom` when anything measured changes."""
        changes = {k: v for k, v in changes.items() if v is not None}
        new = self.model_copy(update=changes)
        measured = {k for k in changes if k != "batch_size" and getattr(self, k) != changes[k]}
        return new.model_copy(update={"profile": "custom"}) if measured and "profile" not in changes else new

    def describe(self, n_windows: int | None = None, n_tokens: int | None = None) -> str:
        n = n_windows if n_windows is not None else (self.windows or "all")
        toks = f", {n_tokens} predicted tokens" if n_tokens else ""
        return (f"WikiText-2 raw test (GPTQ protocol), seqlen {self.seqlen}, first {n} windows{toks}; "
                f"perplexity, KL(base ‖ model) and top-1 agreement on the same windows; calibration "
                f"{self.calib_samples} × {self.calib_seqlen}-token windows of C4 validation documents "
                f"{_c4_calib_range()} (seed {self.calib_seed}), never evaluated on; profile {self.profile}")

    def calibration(self) -> dict:
        """The recipe `calibration` section this protocol calibrates with."""
        return {"dataset": self.calib_dataset, "n_samples": self.calib_samples, "seqlen": self.calib_seqlen,
                "seed": self.calib_seed}


PROFILES: dict[str, Protocol] = {
    # The demo and `make bench`: minutes on 2 CPU cores.
    "quick": Protocol(profile="quick", windows=16, calib_samples=32),
    # The committed tables: 64 windows (32,704 predicted tokens), 128 calibration windows.
    "full": Protocol(profile="full", windows=64, calib_samples=128),
}


def get_protocol(profile: str | Protocol | None = "full", **changes) -> Protocol:
    if isinstance(profile, Protocol):
        return profile.with_(**changes)
    if profile not in PROFILES:
        raise LowbitError(f"unknown evaluation profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[profile].with_(**changes)


def _c4_calib_range() -> str:
    from lowbit.data import C4_CALIB

    return f"{C4_CALIB.start}–{C4_CALIB.stop - 1}"


# ---- identity of a model and of a run


def _file_digest(path: Path, sample: int = 1 << 20) -> str:
    """sha256 of size + first and last MiB: changes when a checkpoint is replaced, in milliseconds."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if path.stat().st_size > 2 * sample:
            f.seek(-sample, 2)
            h.update(f.read(sample))
    return h.hexdigest()


def model_key(path: str | Path) -> str:
    """A short stable name for the weights at `path`: `<name>-<12 hex>`.

    The reference model's key comes from its manifest (the sha256 of the written weights); a lowbit
    output's from lowbit.json (which hashes every file); any other directory's from config.json and a
    digest of each weight file. A hub id that is not a local directory is keyed by its name only.
    """
    p = Path(path)
    if not p.is_dir():
        return f"{str(path).replace('/', '--')}-hub"
    manifest = p / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())["key"]
        except (ValueError, KeyError) as e:
            raise LowbitError(f"{manifest} is damaged ({e}); rebuild it with `lowbit reference build --force`") from None
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.name == "lowbit.json" or f.name == "config.json":
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".gguf"):
            h.update(f.name.encode() + _file_digest(f).encode())
    return f"{p.resolve().name}-{h.hexdigest()[:12]}"


def git_commit(root: Path | None = None) -> dict:
    """The commit of the lowbit checkout that ran (and whether its tree had changes), if it is one."""
    root = root or Path(__file__).resolve().parents[3]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if rev.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def device_name(device: torch.device | str | None = None) -> str:
    d = torch.device(device or "cpu")
    if d.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(d)}"
    return f"cpu:{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def provenance(model_path: str | Path | None = None, protocol: Protocol | None = None, **extra) -> dict:
    """What a result depends on and where it was measured: attach to every result JSON."""
    import transformers

    import lowbit

    out = {
        **git_commit(),
        "lowbit": lowbit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": device_name(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if model_path is not None:
        out["model"] = {"path": str(model_path), "key": model_key(model_path)}
    if protocol is not None:
        out["protocol"] = protocol.model_dump()
    return {**out, **extra}
