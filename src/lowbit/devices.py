"""Where the work runs: `--device auto|cpu|cuda|cuda:N`.

The pipeline keeps the model on the host and moves one decoder block at a time to the device, with its
calibration inputs; the solver (GPTQ, RTN, AWQ, ...) runs there on the block's weights and statistics,
and each quantized layer comes back to host memory when its block is done. Evaluation moves the whole
(quantized) model. CPU is the tested path; `bench/gpu_smoke.py` checks the CUDA one where there is a GPU.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """"auto" (or None): the first GPU when CUDA is available, else the CPU; "cuda:N" must exist."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LowbitError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}); "
                              "use --device cpu")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LowbitError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise LowbitError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def is_cpu(device: torch.device | None) -> bool:
    return device is None or torch.device(device).type == "cpu"
