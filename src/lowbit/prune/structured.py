"""Structures of a LLaMA-family decoder that structured pruning removes, as masks on one flat vector each:
attention KV groups (a key/value head with the query heads that read it) and MLP intermediate channels.

Masking a structure is the same function as slicing it out: a channel's h_i enters only down_proj's
column i, and a KV group's heads enter only their columns of o_proj, so multiplying those inputs by 0
(forward pre-hooks on down_proj and o_proj) computes what the sliced model computes. The masks may differ
per layer (a global budget); `compensate` then refits down_proj / o_proj on the kept inputs by least
squares on calibration activations.

Scores for the one-shot baselines, per layer:
- `magnitude`: ‖[W_gate; W_up] row i‖₂ for a channel; ‖W_q, W_k, W_v rows and W_o columns of the group‖₂.
- `activation`: the input's RMS over calibration tokens times the norm of its down_proj / o_proj columns
  (‖x_i‖·‖W_{:,i}‖, Wanda-SP / FLAP-style: what deleting the input removes from the output, to first order).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError


@dataclass
class Structures:
    blocks: list[tuple[str, nn.Module, nn.Module]]  # (name, self_attn, mlp)
    n_heads: int
    n_kv: int
    head_dim: int
    n_channels: int

    @property
    def n_groups(self) -> int:
        return len(self.blocks) * self.n_kv

    @property
    def n_all_channels(self) -> int:
        return len(self.blocks) * self.n_channels

    def split(self, group_mask: torch.Tensor, channel_mask: torch.Tensor):
        """Per layer ([n_kv], [n_channels]) views of the flat masks."""
        return group_mask.view(len(self.blocks), self.n_kv), channel_mask.view(len(self.blocks), self.n_channels)

    @property
    def group_params(self) -> int:
        """Weights of one KV group: q rows and o columns of its query heads, k and v rows of its head."""
        hidden = self.blocks[0][2].gate_proj.in_features
        return ((self.n_heads // self.n_kv) + 1) * self.head_dim * hidden * 2

    @property
    def channel_params(self) -> int:
        """Weights of one MLP channel: a row of gate and of up, a column of down."""
        return 3 * self.blocks[0][2].gate_proj.in_features

    def parameters_removed(self, group_mask: torch.Tensor, channel_mask: torch.Tensor) -> int:
        """Weights a slice would delete."""
        return (int((~group_mask.bool()).sum()) * self.group_params
                + int((~channel_mask.bool()).sum()) * self.channel_params)


def find_structures(model: nn.Module) -> Structures:
    from lowbit.models.adapters import get_adapter

    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
        raise LowbitError(f"structured pruning supports LLaMA-family decoders, not model_type="
                          f"{getattr(cfg, 'model_type', None)!r}")
    blocks = []
    for name, block in get_adapter(model).blocks(model):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not all(isinstance(getattr(mlp, p, None), nn.Linear)
                                                  for p in ("gate_proj", "up_proj", "down_proj")):
            raise LowbitError(f"{name}: expected self_attn and mlp.gate/up/down_proj linears")
        blocks.append((name, attn, mlp))
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return Structures(blocks, n_heads, n_kv, head_dim, cfg.intermediate_size)


@contextmanager
def masked(model: nn.Module, S: Structures, group_mask: torch.Tensor, channel_mask: torch.Tensor):
    """Run `model` with the structures whose mask is 0 removed (multiplied out at the inputs of o_proj
    and down_proj). Masks may be float (a sampled Bernoulli mask) or bool."""
    g, c = S.split(group_mask, channel_mask)
    per_group = (S.n_heads // S.n_kv) * S.head_dim
    hooks = []
    for i, (_, attn, mlp) in enumerate(S.blocks):
        gi = g[i].repeat_interleave(per_group)  # the group's query heads are consecutive in o_proj's input
        ci = c[i]
        hooks.append(attn.o_proj.register_forward_pre_hook(
            lambda mod, args, m=gi: (args[0] * m.to(args[0].dtype).to(args[0].device),)))
        hooks.append(mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, m=ci: (args[0] * m.to(args[0].dtype).to(args[0].device),)))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def run_windows(model: nn.Module, windows: torch.Tensor, hooks: list, batch: int = 4) -> int:
    """Forward `windows` in batches (no cache) with `hooks` registered, then remove them; the token count."""
    dev = next(model.parameters()).device
    count = 0
    try:
        for s in range(0, windows.shape[0], batch):
            ids = windows[s:s + batch]
            model(input_ids=ids.to(dev), use_cache=False)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return count


@torch.no_grad()
def input_moments(model: nn.Module, S: Structures, windows: torch.Tensor, batch: int = 4):
    """Per layer E[x xᵀ] of o_proj's and down_proj's inputs on `windows` (float64), the unpruned model."""
    acc_o = [torch.zeros(S.n_heads * S.head_dim, S.n_heads * S.head_dim, dtype=torch.float64) for _ in S.blocks]
    acc_d = [torch.zeros(S.n_channels, S.n_channels, dtype=torch.float64) for _ in S.blocks]

    def add(acc):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double().cpu()
            acc.add_(x.T @ x)
        return hook

    hooks = [h for (_, attn, mlp), ao, ad in zip(S.blocks, acc_o, acc_d)
             for h in (attn.o_proj.register_forward_pre_hook(add(ao)), mlp.down_proj.register_forward_pre_hook(add(ad)))]
    n = max(1, run_windows(model, windows, hooks, batch))
    return [a / n for a in acc_o], [a / n for a in acc_d]


def scores(S: Structures, kind: str, moments=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (group scores, channel scores): larger = more important (module docstring)."""
    per_group = (S.n_heads // S.n_kv) * S.head_dim
    gs, cs = [], []
    for i, (_, attn, mlp) in enumerate(S.blocks):
        Wo, Wd = attn.o_proj.weight.detach().double(), mlp.down_proj.weight.detach().double()
        if kind == "magnitude":
            rows = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()], 1).double()
            cs.append(rows.norm(dim=1))
            q = attn.q_proj.weight.detach().double().view(S.n_kv, per_group, -1).pow(2).sum((1, 2))
            kv = sum(getattr(attn, p).weight.detach().double().view(S.n_kv, S.head_dim, -1).pow(2).sum((1, 2))
                     for p in ("k_proj", "v_proj"))
            o = Wo.view(Wo.shape[0], S.n_kv, per_group).pow(2).sum((0, 2))
            gs.append((q + kv + o).sqrt())
        elif kind == "activation":
            if moments is None:
                raise LowbitError("activation scores need calibration moments")
            Co, Cd = moments[0][i], moments[1][i]
            cs.append(torch.diagonal(Cd).clamp_min(0).sqrt() * Wd.norm(dim=0))
            # a group's contribution: E‖W_o[:, g] x_g‖² = tr(W_gᵀ W_g C_gg), exact for the group as a whole
            e = []
            for k in range(S.n_kv):
                sl = slice(k * per_group, (k + 1) * per_group)
                Wg = Wo[:, sl]
                e.append(torch.trace(Wg.T @ Wg @ Co[sl, sl]).clamp_min(0).sqrt())
            gs.append(torch.stack(e))
        else:
            raise LowbitError(f"unknown structure score {kind!r}: magnitude | activation")
    return torch.cat(gs), torch.cat(cs)


def per_layer_mask(score: torch.Tensor, per_layer: int, keep: float) -> torch.Tensor:
    """Keep round(keep·n) of every layer's n structures, the largest scores (ties by index)."""
    s = score.view(-1, per_layer)
    k = int(round(keep * per_layer))
    m = torch.zeros_like(s, dtype=torch.bool)
    idx = torch.argsort(-s, dim=1, stable=True)[:, :k]
    m.scatter_(1, idx, True)
    return m.reshape(-1)


@torch.no_grad()
def compensate(S: Structures, group_mask: torch.Tensor, channel_mask: torch.Tensor, moments,
               damp: float = 1e-2) -> dict:
    """Refit o_proj and down_proj on their kept inputs (in place): W' = W·C_{:,K}·(C_KK + λI)⁻¹, the least-
    squares fit of the unpruned output W·x from x_K (λ = damp × mean diag C_KK); pruned columns become 0.
    Returns the relative output error per layer before/after."""
    g, c = S.split(group_mask.bool(), channel_mask.bool())
    per_group = (S.n_heads // S.n_kv) * S.head_dim
    report = []
    for i, (_, attn, mlp) in enumerate(S.blocks):
        for lin, C, keep in ((attn.o_proj, moments[0][i], g[i].repeat_interleave(per_group)),
                             (mlp.down_proj, moments[1][i], c[i])):
            W = lin.weight.detach().double()
            K = torch.nonzero(keep).flatten()
            energy = abs(float(torch.trace(W @ C @ W.T))) or 1.0
            W_drop = W.clone()
            W_drop[:, ~keep] = 0
            before = float(torch.trace((W - W_drop) @ C @ (W - W_drop).T)) / energy
            new = torch.zeros_like(W)
            if K.numel():
                CKK = C[K][:, K]
                lam = damp * float(torch.diagonal(CKK).mean().clamp_min(1e-12))
                new[:, K] = torch.linalg.solve(CKK + lam * torch.eye(K.numel(), dtype=W.dtype), (W @ C[:, K]).T).T
            after = float(torch.trace((W - new) @ C @ (W - new).T)) / energy
            lin.weight.copy_(new.to(lin.weight.dtype))
            report.append({"layer": i, "module": "o_proj" if lin is attn.o_proj else "down_proj",
                           "rel_error_masked": before, "rel_error_compensated": after})
    return {"layers": report}
