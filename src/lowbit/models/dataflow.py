"""True-sequential groups read off a block's dataflow, for any architecture.

GPTQ quantizes a block's linears in groups, each group's statistics taken with the groups before it
already quantized (GPTQ's true-sequential order): {q, k, v} → o → {gate, up} → down on a LLaMA block. What defines
a group is the dataflow, not the names: the layers of one group read the very same input tensor, and
the groups run in the order the block first calls them. So one forward pass of the block with a
pre-hook on each linear gives the groups of any architecture: Phi-3's fused qkv_proj and gate_up_proj,
GPT-2's c_attn / c_proj / c_fc / c_proj, OPT's fc1 / fc2, and mixture-of-experts blocks.

Experts: each expert's gate and up read one tensor (the tokens routed to it) and its down another, and
a batch need not reach every expert. Layers are therefore grouped by *role*, the block-relative name with
its numeric parts replaced by `*` (`mlp.experts.*.gate_proj`): two roles share a group when any of their
calls read the same tensor, so every expert's gate and up form one group, every down the next. Roles the
pass never reached go last, together.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def role(relative_name: str) -> str:
    """`mlp.experts.3.gate_proj` → `mlp.experts.*.gate_proj`."""
    return _INDEX.sub("*", relative_name)


def sequential_groups(block: nn.Module, prefix: str, names: list[str], run: Any) -> list[list[str]]:
    """Split `names` (full names of linears inside `block`) into true-sequential groups. `run()` runs the
    block forward once on real inputs (its output is ignored)."""
    rel = {n: n[len(prefix) + 1:] if prefix else n for n in names}
    calls: list[tuple[str, torch.Tensor]] = []  # (role, input) in call order; inputs kept alive: `is` works
    handles = []
    for n in names:
        r = role(rel[n])
        handles.append(block.get_submodule(rel[n]).register_forward_pre_hook(
            lambda m, args, kwargs, _r=r: calls.append((_r, args[0] if args else next(iter(kwargs.values())))),
            with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()

    parent: dict[str, str] = {}

    def find(r: str) -> str:
        while parent.setdefault(r, r) != r:
            r = parent[r]
        return r

    first: dict[str, int] = {}
    reader: dict[int, str] = {}  # id of an input tensor → the first role that read it (inputs are alive)
    for i, (r, x) in enumerate(calls):
        first.setdefault(r, i)
        r2 = reader.setdefault(id(x), r)
        a, b = find(r), find(r2)
        if a != b:  # the earlier-called role represents the group
            parent[max(a, b, key=first.get)] = min(a, b, key=first.get)
    order: dict[str, int] = {}
    for r in sorted(first, key=first.get):
        order.setdefault(find(r), len(order))
    groups: list[list[str]] = [[] for _ in order]
    rest = []
    for n in names:  # module order inside each group
        r = role(rel[n])
        (groups[order[find(r)]] if r in first else rest).append(n)
    return [g for g in groups if g] + ([rest] if rest else [])
