"""Whole-layer (depth) pruning with the policy-gradient estimator of `prune.policy`.

A LLaMA block computes h + attn(norm(h)) and then h + mlp(norm(h)); o_proj and down_proj have no bias,
so a block whose KV groups and MLP channels are all masked out (`structured.masked`) is the identity on
the residual stream: dropping a layer is the mask that zeroes every structure of it (tested against the
model with the layer deleted). The policy is one Bernoulli keep-probability per layer with the budget
Σ s = keep·L; its loss is the masked model's next-token cross-entropy on one batch per step, forward
passes only. The start is the layers' Block Influence (ShortGPT: 1 − mean cos(h_in, h_out) over tokens,
a layer that barely turns the hidden state matters little), standardised over the layers; the final mask
keeps the round(keep·L) largest s. `drop_layers` then deletes the layers (renumbering the attention's
cache index), which `slicing` saves and loads like any per-layer structure.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.prune import policy
from lowbit.prune.structured import Structures, masked, run_windows


def expand(S: Structures, layer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group and channel masks that remove exactly the layers whose mask is 0."""
    m = layer_mask.float()
    return m.repeat_interleave(S.n_kv), m.repeat_interleave(S.n_channels)


@torch.no_grad()
def block_influence(model: nn.Module, S: Structures, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """[L] ShortGPT's Block Influence, 1 − mean over tokens of cos(block input, block output), float64."""
    total = torch.zeros(len(S.blocks), dtype=torch.float64)
    hooks = []
    for i, (name, _, _) in enumerate(S.blocks):
        def hook(mod, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos = F.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            total[i] += float((1 - cos).sum())
        hooks.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    return total / max(1, run_windows(model, windows, hooks, batch))


def pg_layer_mask(model: nn.Module, S: Structures, windows: torch.Tensor, keep: float, *, steps: int,
                  batch_size: int = 4, samples: int = 2, lr: float = 2e-3, window: int = 5, spread: float = 1.0,
                  seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(layer keep mask [L] bool, record): the learned policy's round(keep·L) most probable layers."""
    from lowbit.prune.pg import batch_loss

    L = len(S.blocks)
    if not 1 <= round(keep * L) < L:
        raise LowbitError(f"keeping {keep:.3f} of {L} layers keeps {round(keep * L)}: prune at least one layer "
                          "and keep at least one")
    bi = block_influence(model, S, windows)
    s0 = policy.init_from_scores(bi, keep, L, spread)
    batches = [windows[i:i + batch_size] for i in range(0, windows.shape[0] - batch_size + 1, batch_size)]
    if not batches:
        raise LowbitError(f"depth pruning needs at least {batch_size} windows")
    history: list[dict] = []

    def loss_fn(m: torch.Tensor, t: int) -> float:
        g, c = expand(S, m)
        with masked(model, S, g, c):
            return batch_loss(model, batches[t % len(batches)])

    model.eval()
    t0 = time.perf_counter()
    s = policy.optimise(loss_fn, s0, keep, steps=steps, samples=samples, lr=lr, window=window,
                        segments=[(0, L)], seed=seed, on_step=lambda t, rec: history.append(rec))
    mask = policy.hard_mask(s, keep)
    start = policy.hard_mask(s0, keep)
    return mask, {"steps": steps, "samples": samples, "batch_size": batch_size, "forward_passes": steps * samples,
                  "seconds": time.perf_counter() - t0, "block_influence": bi.tolist(), "keep_probability": s.tolist(),
                  "dropped": torch.nonzero(~mask).flatten().tolist(),
                  "changed_vs_start": int((mask != start).sum()) // 2, "history": history}


def drop_layers(model: nn.Module, layer_mask: torch.Tensor) -> list[int]:
    """Delete the decoder layers whose mask is 0, in place; returns the kept original indices. The kept
    layers' attention cache index and config.num_hidden_layers (and `layer_types`) follow."""
    from lowbit.models.adapters import get_adapter

    blocks = get_adapter(model).blocks(model)
    parent_name = blocks[0][0].rsplit(".", 1)[0]
    layers = model.get_submodule(parent_name)
    if not isinstance(layers, nn.ModuleList) or len(layers) != layer_mask.numel():
        raise LowbitError(f"{parent_name}: expected a ModuleList of {layer_mask.numel()} decoder layers")
    kept = torch.nonzero(layer_mask.bool()).flatten().tolist()
    if not kept:
        raise LowbitError("depth pruning must keep at least one layer")
    new = nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(new):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = j  # the KV cache is indexed by position in the kept stack
    parent, _, child = parent_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    return kept
