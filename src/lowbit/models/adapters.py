"""Architectures: where the decoder blocks are and which of their layers are quantized, found from the
module tree and the config, not from a list per model type.

* **Blocks.** The decoder stack of an HF causal LM is the `nn.ModuleList` whose entries are all of one
  class, hold linear layers, and together hold the most parameters (`model.layers`, `model.decoder.layers`,
  `transformer.h`, `gpt_neox.layers`, ...). Lists inside a block (unfused experts) are not candidates.
* **Layers.** Every `nn.Linear` / `Conv1D` inside a block, except routers: in a mixture-of-experts model
  (`num_experts` / `num_local_experts` in the config), a linear whose outputs are one per expert or a
  single gate value (Qwen2-MoE's `shared_expert_gate`) stays in full precision, like the peers keep it.
  Fused expert tensors are first unfolded into one linear per expert (`lowbit.models.experts`).
* **Order.** GPTQ's "true-sequential" groups ({q, k, v} → o → {gate, up} → down, as in IST-DASLab/gptq) are
  read off the block's dataflow (`lowbit.models.dataflow`) when calibration runs, not from names.

Anything else (a plain `nn.Module`, a model without such a list) gets the generic fallback: the whole
model is one "block" and all its linears form one group, with statistics from a full forward pass.

Layers are named by their full module path (`model.layers.0.mlp.down_proj`). Include/ignore/override
patterns are regexes (RE2: linear-time, no backreferences or lookarounds) matched anywhere in the name (`search`): `down_proj` selects every
down projection; anchor or add the dot when a prefix is ambiguous (`layers\\.1` also matches `layers.10`,
`layers\\.1\\.` does not).
`lm_head` (the output embedding) and embeddings are never quantized: they are not in any block, and the
fallback excludes the output embedding explicitly. Linears outside the blocks (OPT's project_in/out) stay
in full precision too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import LowbitError
from lowbit.patterns import compile_pattern
from lowbit.methods import MethodConfig, parse_method_config, switch_method
from lowbit.nn.quant_linear import QuantLinear

# ---- layer access: every method sees W in the PyTorch layout [out, in]


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in]. GPT-2's Conv1D stores [in, out] and computes x @ W + b, so transpose:
    a QuantLinear with Ŵ [out, in] then computes x @ Ŵᵀ + b, the same function."""
    if isinstance(module, Conv1D):
        return module.weight.detach().T
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise LowbitError(f"cannot quantize a {type(module).__name__}: only nn.Linear and Conv1D layers")


def layer_shape(module: nn.Module) -> tuple[int, int]:
    return tuple(layer_weight(module).shape)


# ---- architectures


@dataclass(frozen=True)
class Adapter:
    """How to walk one model. `blocks_path=None` means the whole model is one block (fallback)."""

    name: str  # the config's model_type, or "generic"
    blocks_path: str | None
    n_experts: int = 0  # experts per MoE layer (config), 0 for a dense model

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(full name, module) of each block; the fallback's single block is the model, named ''."""
        if self.blocks_path is None:
            return [("", model)]
        return [(f"{self.blocks_path}.{i}", b) for i, b in enumerate(model.get_submodule(self.blocks_path))]

    def blocks_prefix(self, model: nn.Module) -> str | None:
        return self.blocks_path

    def is_router(self, module: nn.Module) -> bool:
        """A MoE router or gate: one output per expert, or a single gate value."""
        return self.n_experts > 0 and is_quantizable(module) and layer_shape(module)[0] in (1, self.n_experts)

    def groups(self, model: nn.Module, block_name: str, block: nn.Module) -> list[list[str]]:
        """The block's quantizable layers (full names, module order) as one group, before include/ignore.
        The pipeline splits it into true-sequential groups from the dataflow (`dataflow.sequential_groups`)."""
        present = [n for n, m in block.named_modules() if n and is_quantizable(m) and not self.is_router(m)]
        if self.blocks_path is None:
            skip = _output_embedding_names(model)
            present = [n for n in present if n not in skip]
        pre = f"{block_name}." if block_name else ""
        return [[pre + n for n in present]] if present else []


def _output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (lm_head), found by identity so tied/renamed heads are caught too."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names | {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


def _holds_linears(m: nn.Module) -> bool:
    return any(is_quantizable(c) or isinstance(c, QuantLinear) for c in m.modules())


def find_blocks(model: nn.Module) -> str | None:
    """The full name of the decoder stack: among the ModuleLists of one class that hold linear layers
    and are not inside another such list, the one with the most parameters; None when there is none."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(b) for b in m}) == 1 and _holds_linears(m[0])]
    outer = [(n, m) for n, m in lists if not any(o != n and n.startswith(o + ".") for o, _ in lists)]
    if not outer:
        return None
    size = lambda m: sum(p.numel() for p in m.parameters()) + sum(  # noqa: E731 (quantized layers count too)
        q.qweight.shape[0] * q.qweight.shape[1] for q in m.modules() if isinstance(q, QuantLinear))
    return max(outer, key=lambda nm: (size(nm[1]), -nm[0].count(".")))[0]


def _n_experts(config) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 1:
            return v
    return 0


def get_adapter(model: nn.Module) -> Adapter:
    """The decoder stack of an HF model found from its module tree, else the generic fallback; refuses
    models with nothing to quantize."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    path = find_blocks(model) if hasattr(model, "get_input_embeddings") and config is not None else None
    adapter = Adapter(model_type or "generic", path, _n_experts(config)) if path else GENERIC
    if not any(g for n, b in adapter.blocks(model) for g in adapter.groups(model, n, b)):
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            raise LowbitError(f"{type(model).__name__} is already quantized: no float linear layer is left")
        raise LowbitError(f"unsupported architecture {type(model).__name__} (model_type={model_type}): "
                          "no nn.Linear or Conv1D layer to quantize")
    return adapter


GENERIC = Adapter("generic", None)


# ---- selection and per-layer configs


@dataclass
class LayerPlan:
    """Which layers to quantize and with which config. Overrides apply in order, later ones win."""

    base: MethodConfig
    include: list[str] | None = None
    ignore: list[str] | None = None
    overrides: list[tuple[str, dict]] = field(default_factory=list)

    def __post_init__(self):
        self.base = parse_method_config(self.base)
        self._inc = [compile_pattern(p) for p in self.include or []]
        self._ign = [compile_pattern(p) for p in self.ignore or []]
        self._ovr = [(compile_pattern(p), dict(d)) for p, d in self.overrides or []]
        self._used: set[str] = set()

    def selected(self, name: str) -> bool:
        included = self._hit(self._inc, name) or not self._inc
        ignored = self._hit(self._ign, name)  # evaluated even when not included, for warn_unused
        return included and not ignored

    def _hit(self, pats: list, name: str) -> bool:
        hits = [p for p in pats if p.search(name)]
        self._used.update(p.pattern for p in hits)
        return bool(hits)

    def config_for(self, name: str) -> MethodConfig:
        cfg = self.base
        for pat, upd in self._ovr:
            if pat.search(name):
                self._used.add(pat.pattern)
                cfg = merge_config(cfg, upd, name)
        return cfg

    def warn_unused(self) -> None:
        """A pattern that matched no layer is almost always a typo: say so instead of silently doing nothing."""
        pats = [p.pattern for p in self._inc + self._ign + [p for p, _ in self._ovr]]
        for p in dict.fromkeys(pats):
            if p not in self._used:
                warnings.warn(f"lowbit: layer pattern {p!r} matched no layer to quantize", stacklevel=3)


def merge_config(cfg: MethodConfig, update: dict, name: str = "") -> MethodConfig:
    """Merge a partial config into `cfg` and validate it (model_copy(update=...) alone would not validate).

    Switching method keeps what `methods.switch_method` keeps (bits, symmetry, a chosen group size).
    """
    base = cfg.model_dump()
    if update.get("method", cfg.method) != cfg.method:
        base = switch_method(base, update["method"])
    try:
        return parse_method_config({**base, **update})
    except LowbitError as e:
        raise LowbitError(f"override for {name}: {e}" if name else str(e)) from None
