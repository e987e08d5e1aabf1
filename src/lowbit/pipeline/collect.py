"""One full-precision pass over calibration windows with hooks: what tools outside the block-by-block
pipeline (budget sensitivity, LQER spectra) need from the unquantized model."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.methods.stats import LayerStats, StatsAccumulator
from lowbit.models.adapters import layer_weight


@torch.inference_mode()
def forward_batches(model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
    """Run the model on `windows` [n, seqlen] in batches, for the hooks' sake."""
    for i in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[i:i + batch_size], use_cache=False)


def collect_stats(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int = 8, *,
                  hessian: bool = True) -> dict[str, LayerStats]:
    """Input statistics of every named linear in one pass: H = (2/N)·Σxxᵀ (when `hessian`) and the
    mean|x| statistics, each calibration batch one `add`."""
    accs, handles = {}, []
    for name in names:
        mod = model.get_submodule(name)
        accs[name] = StatsAccumulator(layer_weight(mod).shape[1], hessian=hessian)
        handles.append(mod.register_forward_pre_hook(lambda m, a, acc=accs[name]: acc.add(a[0].detach())))
    try:
        forward_batches(model, calib, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {n: a.result() for n, a in accs.items()}
