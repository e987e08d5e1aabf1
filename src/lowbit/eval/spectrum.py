"""The LQER paper's Figure 1a: singular values of the quantization error E and of the scaled error S·E.

For each chosen linear layer: Ŵ = RTN(W) on the requested grid, E = (W − Ŵ)ᵀ [in, out], S = diag(s)
with the L²QER activation statistic s (max over calibration batches of mean|x|, clamped, normalised;
collected on the unquantized model, as the authors profile it). Both spectra are normalised to unit
Frobenius norm (σ / ‖σ‖₂), so the curves compare *shape*: the steeper S·E decays, the more of the
error that matters a small rank captures.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.config import RTNConfig
from lowbit.methods.lqer import diagonal_scale
from lowbit.methods.rtn import rtn_quantize
from lowbit.pipeline.collect import collect_stats
from lowbit.models.adapters import get_adapter, layer_weight
from lowbit.patterns import compile_pattern


def selected_layers(model: nn.Module, pattern: str | None) -> list[str]:
    """Quantizable layers inside the decoder blocks whose full name matches `pattern` (RE2 search)."""
    rx = compile_pattern(pattern, "--layers pattern") if pattern else None
    adapter = get_adapter(model)
    names = [n for bn, b in adapter.blocks(model) for g in adapter.groups(model, bn, b) for n in g]
    names = [n for n in names if rx is None or rx.search(n)]
    if not names:
        raise LowbitError(f"no quantizable layer matches {pattern!r}")
    return names


def activation_stats(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int = 8) -> dict:
    """Per layer: LayerStats (mean|x| statistics only) from forward passes of the unquantized model."""
    return collect_stats(model, names, calib, batch_size, hessian=False)


def layer_spectra(model: nn.Module, names: list[str], stats: dict, bits: int, group_size: int,
                  fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (σ(E), σ(S·E)), each normalised to unit 2-norm, float64, descending."""
    cfg = RTNConfig(bits=bits, group_size=group_size, format=fmt)
    out = {}
    for n in names:
        W = layer_weight(model.get_submodule(n)).float()
        E = (W.double() - rtn_quantize(W, cfg).dequantize().double()).T
        s = diagonal_scale("act-mean", stats[n], E.shape[0])
        sig = [torch.linalg.svdvals(M) for M in (E, s[:, None] * E)]
        out[n] = tuple(v / v.norm() if v.norm() > 0 else v for v in sig)
    return out


def plot_spectra(spectra: dict, path: str | Path, title: str) -> Path:
    """Draw the spectra (log scale, E dashed, S·E solid, one colour per layer) to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit.io.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, (e, se)) in enumerate(spectra.items()):
        c = f"C{i % 10}"
        ax.plot(range(1, len(e) + 1), e.numpy(), "--", color=c, lw=1, label=f"{name}: E")
        ax.plot(range(1, len(se) + 1), se.numpy(), "-", color=c, lw=1.5, label=f"{name}: S·E")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ_i / ‖σ‖₂")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=1 if len(spectra) <= 4 else 2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    if not path.parent.is_dir():
        raise LowbitError(f"output directory {path.parent} does not exist")
    atomic_write_bytes(path, buf.getvalue())
    return path
