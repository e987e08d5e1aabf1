"""Layer-by-layer loading: a model skeleton on the meta device, filled one decoder block at a time.

A 7B model in bf16 is 14 GB on disk and 28 GB as float32, more than the memory of the machines people
quantize on. The calibration pipeline never needs more than one block's weights at once, so (as
llm-compressor, GPTQModel and AutoRound do) the model is built without weights (`init_empty_weights`:
parameters on the meta device, computed buffers such as rotary tables real), the tensors outside the
decoder blocks (embeddings, final norm, lm_head) are read from the checkpoint, and each block is read
from the safetensors shards when its turn comes (`load_block`) and dropped after it is quantized and
written (`release_block`). Tensors keep the checkpoint's dtype; the pipeline computes in float32 inside
one block only.

Only safetensors are read (no pickle). The checkpoint's tensor names must be the model's own (what
`save_pretrained` writes); fused experts (`mlp.experts.gate_up_proj`) are split per expert on the fly for
the unfused `ExpertList` the pipeline uses. A missing tensor is a clear error naming it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.read import DAMAGED_WEIGHTS, dtype_kwargs, open_safetensors, shard_map, weight_files

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class TensorSource:
    """The safetensors weights of an HF model directory (one file or an index of shards), read one tensor
    at a time through memory-mapped `safe_open` handles."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        weight_map, files = shard_map(self.path), weight_files(self.path)
        if not files:
            raise LowbitError(f"{self.path} has no safetensors weights (model.safetensors or an index of "
                              "shards); layer-by-layer loading reads safetensors only")
        self._names = files
        self._files = {f: self._open(f) for f in files}
        self.where = weight_map or {k: files[0] for k in self._files[files[0]].keys()}
        for f, h in self._files.items():
            missing = set(k for k, v in self.where.items() if v == f) - set(h.keys())
            if missing:
                raise LowbitError(f"{self.path / f}: corrupt/partial shard, missing tensor {sorted(missing)[0]}")
        self.key = {k: k for k in self.where}  # the model's name → the checkpoint's
        self.expert_leaf: dict[str, str] = {}  # unfused expert layer → its per-expert checkpoint leaf

    def rename_for(self, model: nn.Module) -> None:
        """Read checkpoints in the layout transformers converts on load (Mixtral's `block_sparse_moe.
        experts.3.w1.weight` for `mlp.experts` gate/up/down): its renamings applied to every checkpoint
        name, and the per-expert source tensors of its fused-experts converters remembered per leaf."""
        import re

        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        except ImportError:  # transformers 4: checkpoints hold the model's own names
            return
        rules = (get_checkpoint_conversion_mapping(type(model).__name__)
                 or get_checkpoint_conversion_mapping(getattr(model.config, "model_type", "")) or [])
        for rule in rules:
            src, dst = list(rule.source_patterns), list(rule.target_patterns)
            if type(rule).__name__ == "WeightRenaming" and len(src) == len(dst) == 1:
                self.key = {re.sub(src[0], dst[0], m): k for m, k in self.key.items()}
            elif len(dst) == 1 and dst[0].endswith("experts.gate_up_proj") and len(src) == 2:
                self.expert_leaf.update(gate_proj=src[0].split("*.")[-1], up_proj=src[1].split("*.")[-1])
            elif len(dst) == 1 and dst[0].endswith("experts.down_proj") and len(src) == 1:
                self.expert_leaf["down_proj"] = src[0].split("*.")[-1]

    def _open(self, f: str):
        return open_safetensors(self.path / f, DAMAGED_WEIGHTS)

    def close(self) -> None:
        """Unmap the files. The pages of a memory-mapped file that were read count in the process's
        resident memory while the map is open: a 3B checkpoint read block after block would otherwise show
        up whole in the peak. The next `get` maps the file again."""
        self._files = {}

    def __contains__(self, name: str) -> bool:
        return name in self.key

    def get(self, name: str) -> torch.Tensor:
        if name not in self.key:
            raise LowbitError(f"{self.path}: the checkpoint has no tensor {name} (its names must be the model's "
                              "own or transformers' conversions of them; load the whole model with --load whole)")
        name = self.key[name]
        f = self.where[name]
        try:
            if f not in self._files:
                self._files[f] = self._open(f)
            return self._files[f].get_tensor(name)
        except Exception as e:  # safetensors raises its own error types on a damaged file
            raise LowbitError(f"{self.path / self.where[name]}: cannot read tensor {name}: {e}") from None

    def dtype(self) -> torch.dtype:
        """The dtype of the largest floating-point tensor (the model's storage dtype)."""
        best, size = torch.float32, -1
        for name, f in self.where.items():
            if f not in self._files:
                self._files[f] = self._open(f)
            sl = self._files[f].get_slice(name)
            n = 1
            for d in sl.get_shape():
                n *= d
            if sl.get_dtype() in _DTYPES and n > size:
                best, size = _DTYPES[sl.get_dtype()], n
        return best


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    if leaf in m._parameters:
        m._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in m._buffers:
        m._buffers[leaf] = value
    else:
        raise LowbitError(f"{name} is neither a parameter nor a buffer of {type(m).__name__}")


def _state_names(module: nn.Module) -> list[str]:
    """Parameters and persistent buffers that live on the meta device (what a checkpoint must supply)."""
    names = [n for n, p in module.named_parameters() if p.is_meta]
    for mod_name, m in module.named_modules():
        for b, t in m._buffers.items():
            if t is not None and t.is_meta and b not in m._non_persistent_buffers_set:
                names.append(f"{mod_name}.{b}" if mod_name else b)
    return names


def skeleton(path: str | Path, source: TensorSource, *, trust_remote_code: bool = False) -> nn.Module:
    """The model of the HF directory `path` with every tensor outside the decoder blocks loaded (in the
    checkpoint's dtype) and the blocks left on the meta device, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.models.adapters import find_blocks

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     **dtype_kwargs(source.dtype()))
    except (ValueError, KeyError, OSError) as e:
        raise LowbitError(f"cannot build the model from {Path(path) / 'config.json'}: {e}") from e
    blocks = find_blocks(model)
    if blocks is None:
        raise LowbitError(f"{type(model).__name__}: no decoder stack found; layer-by-layer loading needs one "
                          "(use --load whole)")
    source.rename_for(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    for name in _state_names(model):
        if name.startswith(blocks + "."):
            continue
        if name not in source and tied and head is not None and name.endswith("weight") and \
                model.get_submodule(name.rpartition(".")[0]) is head:
            continue  # the output embedding is the input embedding: tied below
        _set(model, name, source.get(name))
    model.tie_weights()
    source.close()
    left = [n for n in _state_names(model) if not n.startswith(blocks + ".")]
    if left:
        raise LowbitError(f"{path}: no value for {left[0]} outside the decoder blocks")
    model.eval()
    model._lowbit_blocks = blocks
    return model


def load_block(block: nn.Module, prefix: str, source: TensorSource, skip: set[str] = frozenset()) -> nn.Module:
    """Fill a meta block from the checkpoint; returns a meta copy of it (for `release_block`). Tensors named
    in `skip` (block-relative) stay on the meta device."""
    from lowbit.models.experts import ExpertList

    template = copy.deepcopy(block)
    fused: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    experts = [mname for mname, m in block.named_modules() if isinstance(m, ExpertList)]
    for name in _state_names(block):
        if name in skip:
            continue
        full = f"{prefix}.{name}"
        owner = next((f for f in experts if name.startswith(f + ".")), None)
        if owner is None or full in source:
            _set(block, name, source.get(full))
            continue
        e, leaf = name[len(owner) + 1:].split(".", 1)  # "3", "gate_proj.weight"
        per_expert = f"{prefix}.{owner}.{e}.{source.expert_leaf.get(leaf.split('.')[0], '?')}"
        if per_expert in source:  # the checkpoint stores each expert (Mixtral's w1 / w3 / w2)
            _set(block, name, source.get(per_expert))
            continue
        if owner not in fused:  # the checkpoint holds the fused [E, 2I, H] and [E, H, I] tensors
            fused[owner] = (source.get(f"{prefix}.{owner}.gate_up_proj"), source.get(f"{prefix}.{owner}.down_proj"))
        gate_up, down = fused[owner]
        i = gate_up.shape[1] // 2
        value = {"gate_proj.weight": gate_up[int(e), :i], "up_proj.weight": gate_up[int(e), i:],
                 "down_proj.weight": down[int(e)]}.get(leaf)
        if value is None:
            raise LowbitError(f"{prefix}.{name}: not a part of the fused experts tensors")
        _set(block, name, value.clone())
    source.close()
    return template


def release_block(model: nn.Module, blocks_path: str, index: int, template: nn.Module) -> None:
    """Put the meta copy back in place of block `index`: its weights (float or quantized) are freed."""
    model.get_submodule(blocks_path)[index] = template
