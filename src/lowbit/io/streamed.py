"""The native lowbit directory written one decoder block at a time (the layer-by-layer path's save).

The output is the format `native.save_quantized` writes (config.json with the lowbit
`quantization_config`, one model.safetensors, lowbit.json with checksums, tokenizer files), but no more
than one block is in memory while it is written: each block's quantized layers come from the pipeline's
block checkpoints, its other tensors (norms, biases, layers left in full precision) from the source
checkpoint in its own dtype.

safetensors' writer takes a whole dict of tensors, so the file is laid out here, in two passes over the
blocks: the first collects every tensor's dtype and shape for the header, the second writes the bytes in
the same order. The layout is the format's own: an 8-byte little-endian header length, the JSON header
(name → dtype, shape, data_offsets; padded with spaces to a multiple of 8), then the raw little-endian
data. `safetensors.safe_open` reads it back (tested against the library's own writer).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir
from lowbit.io.lazy import TensorSource, load_block
from lowbit.io.native import WEIGHTS, _quant_config, plain_state, write_metadata

_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}

Parts = Callable[[], Iterator[dict[str, torch.Tensor]]]


def write_safetensors(path: Path, parts: Parts, metadata: dict[str, str] | None = None) -> None:
    """Write the tensors that `parts()` yields (dicts, one at a time) as one safetensors file. `parts` is
    called twice and must yield the same names, dtypes and shapes both times."""
    if sys.byteorder != "little":
        raise LowbitError("the safetensors writer needs a little-endian machine")
    header: dict[str, dict] = {}
    offset = 0
    for part in parts():
        for name, t in part.items():
            if name in header:
                raise LowbitError(f"tensor {name} is written twice")
            if t.dtype not in _NAMES:
                raise LowbitError(f"tensor {name}: dtype {t.dtype} has no safetensors name")
            size = t.numel() * t.element_size()
            header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
            offset += size
    head = json.dumps({"__metadata__": metadata or {}, **header}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for part in parts():
            for name, t in part.items():
                h = header.get(name)
                if h is None or h["shape"] != list(t.shape) or h["dtype"] != _NAMES[t.dtype] \
                        or h["data_offsets"][0] != written:
                    raise LowbitError(f"tensor {name} changed between the two passes of the writer")
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data.tobytes())
                written += data.size
    if written != offset:
        raise LowbitError(f"{path}: wrote {written} bytes of tensor data, the header promised {offset}")


def save_quantized_blocks(model: nn.Module, blocks_path: str, block_states: Callable[[int], dict[str, tuple[dict, dict]]],
                          source: TensorSource, out_dir: str | Path, *, counts: dict, tokenizer=None,
                          recipe: dict | None = None, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the skeleton `model` (decoder blocks on the meta device) with block i's quantized layers
    `block_states(i)` (name → `QuantizedWeight.to_state()`, as the block checkpoints store them) as a
    native lowbit directory, atomically. `counts`: the quantized layers'
    `bits_per_weight` and `stored_params` (`formats.quantized_weight.bit_counts`, summed over the blocks)."""
    from lowbit.models.experts import ExpertList

    out = Path(out_dir)
    stack = model.get_submodule(blocks_path)
    layers: dict[str, dict] = {}

    def block_tensors(i: int) -> dict[str, torch.Tensor]:
        prefix, filled = f"{blocks_path}.{i}", stack[i]
        states = block_states(i)
        quantized = {name[len(prefix) + 1:] for name in states}  # their float weights are neither read nor written
        # fills the rest of the block, puts a meta copy back in its place
        stack[i] = load_block(filled, prefix, source, skip={f"{q}.weight" for q in quantized})
        tensors = {f"{prefix}.{k}": v for k, v in plain_state(filled, quantized).items()}
        for name, (state, meta) in states.items():
            tensors.update({f"{name}.{k}": t for k, t in state.items()})
            layers[name] = meta
        return tensors

    def parts() -> Iterator[dict[str, torch.Tensor]]:
        yield plain_state(model, set(), skip=blocks_path)
        for i in range(len(stack)):
            yield block_tensors(i)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_safetensors(tmp / WEIGHTS, parts, {"format": "pt"})
        config = json.loads(model.config.to_json_string(use_diff=False))
        config["quantization_config"] = _quant_config({}, recipe, layers=layers, counts=counts)
        unfused = [name for name, m in model.named_modules() if isinstance(m, ExpertList)]
        if unfused:
            config["quantization_config"]["unfused_experts"] = unfused
        write_metadata(tmp, config, tokenizer, recipe, extra)
    return out
