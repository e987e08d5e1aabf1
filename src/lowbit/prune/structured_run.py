"""Structured pruning of an in-memory model, end to end: masks (activation scores, the policy-gradient
masks or the structure search), the least-squares refit of o_proj / down_proj, then the structures cut out
per layer; or whole layers dropped by the policy-gradient depth search (`prune.depth`). `lowbit prune
--method activation|pg|search|depth` and a recipe's `prune:` stage both run it."""

from __future__ import annotations

import time

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.prune import structured as st
from lowbit.prune.criteria import check_ratio
from lowbit.prune.policy import hard_mask
from lowbit.prune.slicing import at_least_one, slice_model

METHODS = ("activation", "pg", "search", "depth")


def structured_prune(model: nn.Module, method: str, ratio: float, calib: torch.Tensor, train: torch.Tensor | None,
                     *, pg_steps: int = 100, search_generations: int = 8, search_population: int = 16,
                     seed: int = 0) -> dict:
    """Remove `ratio` of all KV groups and of all MLP channels from `model` in place. `calib`: windows for
    the input moments (scores and refit); `train`: the batches the policy or the search evaluates masks on
    (pg, search, depth; depth falls back to `calib`). Returns the report: widths, parameters before / after, refit errors, the search record."""
    if method not in METHODS:
        raise LowbitError(f"unknown structured pruning method {method!r}: {' | '.join(METHODS)}")
    check_ratio(ratio)
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise LowbitError(f"{name}: NaN/inf values in the weight; refusing to prune")
    if calib is None or calib.numel() == 0:
        raise LowbitError(f"structured pruning ({method}) needs calibration windows")
    keep = 1.0 - ratio
    t0 = time.perf_counter()
    S = st.find_structures(model)
    if method == "depth":
        return _depth(model, S, ratio, calib if train is None else train, pg_steps, seed, t0)
    moments = st.input_moments(model, S, calib)
    record: dict = {}
    if method == "activation":
        gs, cs = st.scores(S, "activation", moments)
        g = at_least_one(hard_mask(gs, keep), gs, S.n_kv)
        c = st.per_layer_mask(cs, S.n_channels, keep)
    elif method == "pg":
        from lowbit.prune.pg import pg_masks

        g, c, record = pg_masks(model, S, train, keep, moments, steps=pg_steps, batch_size=4, seed=seed)
    else:
        from lowbit.prune.search import search_masks

        g, c, record = search_masks(model, S, train, keep, moments, generations=search_generations,
                                    population=search_population, seed=seed)
    before = sum(p.numel() for p in model.parameters())
    refit = st.compensate(S, g, c, moments)
    widths = slice_model(model, S, g, c)
    return {"method": method, "ratio": ratio, "widths": widths,
            "parameters": [before, sum(p.numel() for p in model.parameters())],
            "calibration_windows": list(calib.shape), "seconds": time.perf_counter() - t0,
            "refit": refit["layers"], "search": {k: v for k, v in record.items() if k != "history"},
            "history": record.get("history", [])}


def _depth(model: nn.Module, S, ratio: float, windows: torch.Tensor, steps: int, seed: int, t0: float) -> dict:
    from lowbit.prune.depth import drop_layers, pg_layer_mask
    from lowbit.prune.slicing import KEY

    before = sum(p.numel() for p in model.parameters())
    mask, record = pg_layer_mask(model, S, windows, 1.0 - ratio, steps=steps, seed=seed)
    kept = drop_layers(model, mask)
    widths = {"kv_groups": [S.n_kv] * len(kept), "channels": [S.n_channels] * len(kept)}
    setattr(model.config, KEY, widths)  # saved and loaded like any per-layer structure
    return {"method": "depth", "ratio": ratio, "widths": widths, "kept_layers": kept,
            "parameters": [before, sum(p.numel() for p in model.parameters())],
            "calibration_windows": list(windows.shape), "seconds": time.perf_counter() - t0, "refit": [],
            "search": {k: v for k, v in record.items() if k != "history"}, "history": record["history"]}
