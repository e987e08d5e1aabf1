"""Architecture adapters: where the decoder blocks are, what runs before them, in which order a block's
linear layers are quantized, and which layers are quantized at all.

Known architectures get GPTQ's "true-sequential" order (research notes B1): inside a block the groups
{q, k, v} → o → {gate, up} → down are quantized one after another, each seeing the already quantized
groups before it. Any other `nn.Module` gets the generic fallback: the whole model is one "block" and all
its linears form one group, with statistics from a full forward pass.

Layers are named by their full module path (`model.layers.0.mlp.down_proj`). Include/ignore/override
patterns are Python regexes matched anywhere in the name (`re.search`): `down_proj` selects every
down projection; anchor or add the dot when a prefix is ambiguous (`layers\\.1` also matches `layers.10`,
`layers\\.1\\.` does not).
`lm_head` (the output embedding) and embeddings are never quantized: they are not in any block, and the
fallback excludes the output embedding explicitly. Linears outside the blocks of a known architecture
(OPT's project_in/project_out) stay in full precision too.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import LowbitError
from lowbit.methods import MethodConfig, parse_method_config
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
    """How to walk one architecture. `blocks_path=None` means the whole model is one block (fallback)."""

    name: str
    blocks_path: str | None
    pre_modules: tuple[str, ...] = ()
    sequential: tuple[tuple[str, ...], ...] = ()  # block-relative names, in quantization order

    def _resolve(self, model: nn.Module, path: str) -> str | None:
        """The path as given, or shortened from the front (a bare `LlamaModel` has `layers`, not `model.layers`)."""
        parts = path.split(".")
        for i in range(len(parts)):
            p = ".".join(parts[i:])
            try:
                m = model.get_submodule(p)
            except AttributeError:
                continue
            if isinstance(m, nn.ModuleList) and len(m) > 0:
                return p
        return None

    def blocks_prefix(self, model: nn.Module) -> str | None:
        return None if self.blocks_path is None else self._resolve(model, self.blocks_path)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(full name, module) of each block; the fallback's single block is the model, named ''."""
        if self.blocks_path is None:
            return [("", model)]
        prefix = self.blocks_prefix(model)
        if prefix is None:
            raise LowbitError(f"{self.name}: no decoder blocks at {self.blocks_path!r} in {type(model).__name__}")
        return [(f"{prefix}.{i}", b) for i, b in enumerate(model.get_submodule(prefix))]

    def pre_block_modules(self, model: nn.Module) -> list[str]:
        """Modules that run before the first block (embeddings, positions, rotary), shortened like the blocks."""
        if self.blocks_path is None:
            return []
        prefix = self.blocks_prefix(model) or ""
        drop = len(self.blocks_path.split(".")) - len(prefix.split("."))
        out = []
        for p in self.pre_modules:
            short = ".".join(p.split(".")[drop:])
            try:
                if model.get_submodule(short) is not None:
                    out.append(short)
            except AttributeError:
                pass
        return out

    def groups(self, model: nn.Module, block_name: str, block: nn.Module) -> list[list[str]]:
        """True-sequential groups of full layer names in one block, before include/ignore.

        Layers of the block that the order does not name (an architecture variant) come last, together.
        """
        present = {n: m for n, m in block.named_modules() if n and is_quantizable(m)}
        if self.blocks_path is None:
            skip = _output_embedding_names(model)
            return [[n for n in present if n not in skip]]
        pre = f"{block_name}." if block_name else ""
        out, seen = [], set()
        for g in self.sequential:
            names = [n for n in g if n in present]
            seen.update(names)
            if names:
                out.append([pre + n for n in names])
        rest = [pre + n for n in present if n not in seen]
        return out + ([rest] if rest else [])


def _output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (lm_head), found by identity so tied/renamed heads are caught too."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names | {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


_LLAMA_ORDER = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_LLAMA = dict(blocks_path="model.layers", pre_modules=("model.embed_tokens", "model.rotary_emb"),
              sequential=_LLAMA_ORDER)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", **_LLAMA),
    "mistral": Adapter("mistral", **_LLAMA),
    "qwen2": Adapter("qwen2", **_LLAMA),
    "opt": Adapter(
        "opt", "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    ),
    "gpt2": Adapter(
        "gpt2", "transformer.h", ("transformer.wte", "transformer.wpe", "transformer.drop"),
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
}
GENERIC = Adapter("generic", None)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model.config.model_type`, else the generic fallback; refuses models with nothing to quantize."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type, GENERIC)
    if adapter.blocks_path is not None and adapter.blocks_prefix(model) is None:
        adapter = GENERIC
    if not any(g for n, b in adapter.blocks(model) for g in adapter.groups(model, n, b)):
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            raise LowbitError(f"{type(model).__name__} is already quantized: no float linear layer is left")
        raise LowbitError(f"unsupported architecture {type(model).__name__} (model_type={model_type}): "
                          "no nn.Linear or Conv1D layer to quantize")
    return adapter


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
        self._inc = [_compile(p) for p in self.include or []]
        self._ign = [_compile(p) for p in self.ignore or []]
        self._ovr = [(_compile(p), dict(d)) for p, d in self.overrides or []]
        self._used: set[str] = set()

    def selected(self, name: str) -> bool:
        included = self._hit(self._inc, name) or not self._inc
        ignored = self._hit(self._ign, name)  # evaluated even when not included, for warn_unused
        return included and not ignored

    def _hit(self, pats: list[re.Pattern], name: str) -> bool:
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


def _compile(p: str) -> re.Pattern:
    try:
        return re.compile(p)
    except re.error as e:
        raise LowbitError(f"invalid layer pattern {p!r}: {e}") from None


def merge_config(cfg: MethodConfig, update: dict, name: str = "") -> MethodConfig:
    """Merge a partial config into `cfg` and validate it (model_copy(update=...) alone would not validate).

    Switching method keeps only the settings both methods share (bits, group size, symmetry).
    """
    base = cfg.model_dump()
    if update.get("method", cfg.method) != cfg.method:
        base = {k: base[k] for k in ("bits", "group_size", "symmetric")}
    try:
        return parse_method_config({**base, **update})
    except LowbitError as e:
        raise LowbitError(f"override for {name}: {e}" if name else str(e)) from None
