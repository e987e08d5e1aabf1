"""Mixture-of-experts layers as one linear layer per expert, so that each expert is quantized on its own.

transformers ≥ 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE (and others) fused: one module with
3-D parameters `gate_up_proj` [E, 2I, H] (gate rows first, then up rows) and `down_proj` [E, H, I]. Such a
module is not a linear layer: no method could quantize it, and the statistics of its input mix every
expert's tokens. `unfuse_experts` replaces it by `ExpertList`, a ModuleList of E small MLPs whose
gate_proj / up_proj / down_proj are ordinary `nn.Linear`s holding the same weights, with a forward that
computes the same function (each token through its top-k experts, weighted by the router, summed). A
hook on `mlp.experts.3.gate_proj` then sees exactly the tokens routed to expert 3: the Hessian of the
tokens routed to it (GPTQ per expert, as GPTQModel and llm-compressor do).

The router (`mlp.gate`, a module with its own weight) is not a linear layer here and stays in full
precision, as the peers keep it. A saved lowbit model records which modules were unfused
(`quantization_config["unfused_experts"]`), and the loader unfuses the same modules before loading.

Only the layout above is accepted; any other (biases, interleaved gate/up, transposed weights, no gate,
a norm after each expert) is refused with its name rather than computed wrongly.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError

# the layout flags transformers' `use_experts_implementation` sets on a fused experts class
_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
           "has_post_expert_norm": False}


def is_fused_experts(module: nn.Module) -> bool:
    p, d = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(p, nn.Parameter) and isinstance(d, nn.Parameter) and p.ndim == 3 and d.ndim == 3


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) · up(x))."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    return lin


class ExpertList(nn.ModuleList):
    """The experts of one MoE layer, one `ExpertMLP` each; called like the fused module it replaces."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        # tokens in the fused module's order (by top-k slot, then token): the same sums in the same order
        slot_major = top_k_index.T
        for e, expert in enumerate(self):
            pos, tok = torch.where(slot_major == e)
            if tok.numel() == 0:
                continue
            y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def unfuse(module: nn.Module, name: str = "experts") -> ExpertList:
    for flag, want in _LAYOUT.items():
        if getattr(module, flag, want) != want:
            raise LowbitError(f"{name}: fused experts with {flag}={getattr(module, flag)} are not supported "
                              f"(lowbit unfuses only concatenated [gate; up] weights without biases)")
    extra = sorted(n for n, _ in module.named_parameters(recurse=False) if n not in ("gate_up_proj", "down_proj"))
    if extra:
        raise LowbitError(f"{name}: fused experts with extra parameters {extra} are not supported")
    act = getattr(module, "act_fn", None)
    if act is None:
        raise LowbitError(f"{name}: fused experts without an act_fn are not supported")
    gate_up, down = module.gate_up_proj, module.down_proj
    E, two_i, H = gate_up.shape
    if two_i % 2 or down.shape != (E, H, two_i // 2):
        raise LowbitError(f"{name}: fused experts of shapes gate_up {tuple(gate_up.shape)} and down "
                          f"{tuple(down.shape)} do not form [E, 2I, H] and [E, H, I]")
    i = two_i // 2
    return ExpertList(ExpertMLP(gate_up[e, :i], gate_up[e, i:], down[e], act) for e in range(E))


def unfuse_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace fused experts modules (all found, or exactly `names`) by `ExpertList`s, in place.
    Returns the names replaced. Meta-device (not yet loaded) weights stay on the meta device."""
    from lowbit.nn.quant_linear import replace_module

    found = [n for n, m in model.named_modules() if is_fused_experts(m)]
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise LowbitError(f"{missing[0]}: recorded as unfused experts, but the model has no fused experts "
                              "module there (the checkpoint does not match config.json)")
        found = [n for n in found if n in set(names)]
    for n in found:
        replace_module(model, n, unfuse(model.get_submodule(n), n))
    return found


def expert_layers(model: nn.Module) -> frozenset[str]:
    """Full names of the linears inside unfused experts (`...mlp.experts.3.gate_proj`)."""
    return frozenset(f"{n}.{leaf}" for n, m in model.named_modules() if isinstance(m, ExpertMLP)
                     for leaf, c in m.named_children() if leaf != "act_fn")
