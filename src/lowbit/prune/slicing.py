"""Cut masked structures out of a LLaMA-family decoder, per layer, and load such a model back.

A layer keeps its own number of KV groups and MLP channels (`structured` masks with a global budget), which
one `intermediate_size` / head count in config.json cannot express. The saved config carries
`lowbit_structure = {"kv_groups": [...], "channels": [...]}` (per layer); `load_sliced` builds the model
from its config, shrinks every layer's linears to those widths, then loads the weights strictly.
Attention keeps working with fewer heads: each kept KV group keeps all of its query heads, so the
query/key-value ratio is unchanged and the head count is read from the tensor shapes. Every layer keeps
at least one KV group (`at_least_one`): a layer without attention would leave the KV cache of that layer
empty, which the generation code does not expect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.prune.structured import Structures

KEY = "lowbit_structure"


def at_least_one(mask: torch.Tensor, s: torch.Tensor, per_layer: int) -> torch.Tensor:
    """The same number kept, but every layer keeps ≥ 1: an empty layer takes its best structure (largest s)
    from the kept structure with the smallest s among layers that keep ≥ 2."""
    m = mask.clone().view(-1, per_layer)
    sv = s.double().view(-1, per_layer)
    for i in torch.nonzero(m.sum(1) == 0).flatten().tolist():
        donors = (m.sum(1) >= 2).unsqueeze(1) & m
        flat = torch.where(donors, sv, torch.full_like(sv, float("inf")))
        j = int(torch.argmin(flat))
        m.view(-1)[j] = False
        m[i, int(torch.argmax(sv[i]))] = True
    return m.reshape(-1)


def _shrink(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    W = lin.weight.detach()
    W = W[rows] if rows is not None else W
    W = W[:, cols] if cols is not None else W
    new = nn.Linear(W.shape[1], W.shape[0], bias=lin.bias is not None, dtype=W.dtype, device=W.device)
    new.weight.data = W.clone()
    if lin.bias is not None:
        new.bias.data = (lin.bias.detach()[rows] if rows is not None else lin.bias.detach()).clone()
    return new


@torch.no_grad()
def slice_model(model: nn.Module, S: Structures, group_mask: torch.Tensor, channel_mask: torch.Tensor) -> dict:
    """Remove the masked-out structures in place; returns the widths (also written into model.config)."""
    g, c = S.split(group_mask.bool(), channel_mask.bool())
    if bool((g.sum(1) == 0).any()) or bool((c.sum(1) == 0).any()):
        raise LowbitError("every layer must keep at least one KV group and one MLP channel")
    q_per = S.n_heads // S.n_kv
    widths = {"kv_groups": [], "channels": []}
    for i, (_, attn, mlp) in enumerate(S.blocks):
        groups = torch.nonzero(g[i]).flatten()
        kv_rows = (groups[:, None] * S.head_dim + torch.arange(S.head_dim)).reshape(-1)
        q_rows = (groups[:, None] * q_per * S.head_dim + torch.arange(q_per * S.head_dim)).reshape(-1)
        attn.q_proj, attn.o_proj = _shrink(attn.q_proj, rows=q_rows), _shrink(attn.o_proj, cols=q_rows)
        attn.k_proj, attn.v_proj = _shrink(attn.k_proj, rows=kv_rows), _shrink(attn.v_proj, rows=kv_rows)
        keep = torch.nonzero(c[i]).flatten()
        mlp.gate_proj, mlp.up_proj = _shrink(mlp.gate_proj, rows=keep), _shrink(mlp.up_proj, rows=keep)
        mlp.down_proj = _shrink(mlp.down_proj, cols=keep)
        widths["kv_groups"].append(int(groups.numel()))
        widths["channels"].append(int(keep.numel()))
    setattr(model.config, KEY, widths)
    return widths


def _resize(model: nn.Module, S: Structures, widths: dict) -> None:
    """Shrink the freshly built linears to the saved widths (their values are overwritten by the load)."""
    q_per = S.n_heads // S.n_kv
    for i, (_, attn, mlp) in enumerate(S.blocks):
        ng, nc = widths["kv_groups"][i], widths["channels"][i]
        if not (1 <= ng <= S.n_kv and 1 <= nc <= S.n_channels):
            raise LowbitError(f"{KEY}: layer {i} keeps {ng} KV groups and {nc} channels, outside 1…{S.n_kv} / "
                              f"1…{S.n_channels}")
        qr, kr = torch.arange(ng * q_per * S.head_dim), torch.arange(ng * S.head_dim)
        attn.q_proj, attn.o_proj = _shrink(attn.q_proj, rows=qr), _shrink(attn.o_proj, cols=qr)
        attn.k_proj, attn.v_proj = _shrink(attn.k_proj, rows=kr), _shrink(attn.v_proj, rows=kr)
        ch = torch.arange(nc)
        mlp.gate_proj, mlp.up_proj = _shrink(mlp.gate_proj, rows=ch), _shrink(mlp.up_proj, rows=ch)
        mlp.down_proj = _shrink(mlp.down_proj, cols=ch)


def is_sliced_dir(p: Path) -> bool:
    try:
        return KEY in json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False


def resize(model: nn.Module, config, where: Path) -> None:
    """Shrink a model built from `config` to its `lowbit_structure` widths (checked; `where` names the file)."""
    from lowbit.prune.structured import find_structures

    widths = getattr(config, KEY, None)
    L = config.num_hidden_layers
    if not isinstance(widths, dict) or len(widths.get("kv_groups", [])) != L or len(widths.get("channels", [])) != L:
        raise LowbitError(f"{where}: {KEY} must list kv_groups and channels for all {L} layers")
    try:
        _resize(model, find_structures(model), widths)
    except LowbitError as e:
        raise LowbitError(f"{where}: {e}") from None


def load_sliced(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model saved after `slice_model` (config with `lowbit_structure`), weights loaded strictly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.io.read import dtype_kwargs, read_safetensors, weight_files

    p = Path(path)
    config = AutoConfig.from_pretrained(str(p))
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype))
    resize(model, config, p / "config.json")
    files = weight_files(p)  # the model's own weights, not a SpIEL delta file beside them
    if not files:
        raise LowbitError(f"{p} has no safetensors weights (model.safetensors or an index of shards)")
    state = {}
    for f in files:
        state.update(read_safetensors(p / f, "the weights are damaged or partial: prune again"))
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items() if v is not None}, strict=True)
    except RuntimeError as e:
        raise LowbitError(f"{p}: the weights do not match the saved layer widths ({str(e).splitlines()[0]})") from None
    return model.eval()
