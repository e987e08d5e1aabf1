"""What every exporter shares: the loaded lowbit output, the HF skeleton it came from, the plain tensors,
refusals, and the atomic write of config + safetensors + tokenizer + model card."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import QuantizedWeight, UniformGrid

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Source:
    """A native lowbit output, loaded: the model with QuantLinears, its QuantizedWeights, provenance."""

    path: Path
    model: nn.Module
    qweights: dict[str, QuantizedWeight]
    quantization_config: dict
    provenance: dict
    config: dict  # the model's own HF config (without lowbit's quantization_config)
    dtype: torch.dtype  # dtype of the non-quantized tensors as saved
    module_types: dict[str, str] = field(default_factory=dict)  # quantized layer → original class name
    evaluation: dict | None = None
    act: dict[str, dict] = field(default_factory=dict)  # layers that fake-quantize their inputs (W4A8)

    @property
    def method(self) -> str:
        return str(self.quantization_config.get("method") or "?")


def load_source(path: str | Path, eval_json: str | Path | None = None) -> Source:
    from lowbit.io.native import load_quantized
    from lowbit.io.read import read_json

    path = Path(path)
    model, qweights, info = load_quantized(path)
    config = read_json(path / "config.json", "not a model directory")
    config.pop("quantization_config", None)
    floats = [p for p in model.parameters() if p.is_floating_point()]
    dtype = max(floats, key=torch.Tensor.numel).dtype if floats else torch.float32
    # The class each quantized layer had (GPT-2's Conv1D stores [in, out]): from a meta-device skeleton.
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(path))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    types = {n: type(skeleton.get_submodule(n)).__name__ for n in qweights}
    evaluation = None
    if eval_json is not None:
        evaluation = read_json(Path(eval_json), "evaluation JSON (from `lowbit eval --json`) not found")
    elif (path / "eval.json").is_file():
        evaluation = read_json(path / "eval.json", "")
    act = {n: m["act"] for n, m in info["quantization_config"]["layers"].items() if m.get("act") is not None}
    return Source(path, model, qweights, info["quantization_config"], info["provenance"], config, dtype,
                  types, evaluation, act)


def require_weight_only(src: Source, fmt: str) -> None:
    """Activation fake-quantization (MXINT per token) has no counterpart in any export format."""
    if src.act:
        name, a = next(iter(src.act.items()))
        raise refuse(fmt, name, f"quantizes its input activations ({a}), which {fmt} cannot express",
                     "use --format dequantized (weight-only: the card says the activations run unquantized)")


def plain_tensors(src: Source, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every non-quantized tensor under its HF name (tied ones once), floats cast to `dtype`."""
    from lowbit.io.native import plain_state

    out = plain_state(src.model, set(src.qweights))
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in out.items()}


def hf_weight(src: Source, name: str, w: torch.Tensor) -> torch.Tensor:
    """[out, in] → the layout the original module stores (Conv1D keeps [in, out])."""
    return w.T.contiguous() if src.module_types[name] == "Conv1D" else w.contiguous()


def refuse(fmt: str, name: str, why: str, hint: str) -> LowbitError:
    return LowbitError(f"cannot export to {fmt}: layer {name} {why}; {hint}")


def require_uniform(src: Source, fmt: str, bits: tuple[int, ...], *, split_lowrank: bool,
                    linear_only: bool = True) -> None:
    """Refuse anything `fmt` cannot hold exactly: non-uniform grids, float (HQQ) zero points, outliers,
    AWQ input scales, low-rank terms, Conv1D, activation quantization."""
    require_weight_only(src, fmt)
    for name, qw in src.qweights.items():
        g = qw.grid
        if not isinstance(g, UniformGrid):
            raise refuse(fmt, name, f"uses a {g.kind} grid, which {fmt} cannot represent",
                         "use --format dequantized (plain fp16/bf16 weights)")
        if g.bits not in bits:
            raise refuse(fmt, name, f"has {g.bits}-bit codes; {fmt} here holds {'/'.join(map(str, bits))} bits",
                         "use --format dequantized")
        if g.float_zero:  # gptq / compressed-tensors zero points are b-bit integers; Q4_1's m = −z·s would round
            raise refuse(fmt, name, f"has unrounded fp16 zero points (HQQ), which {fmt} cannot hold exactly",
                         "use --format dequantized, or quantize with integer zeros (hqq `zero: int` in the recipe)")
        if qw.outliers is not None:
            raise refuse(fmt, name, "has sparse fp16 outliers, which no runtime format stores",
                         "use --format dequantized")
        if qw.in_scale is not None:
            raise refuse(fmt, name, f"has an AWQ per-input-channel scale (in_scale: Ŵ = Q(W·diag s)·diag(s)⁻¹), which "
                         f"{fmt} cannot store", "use --format dequantized")
        if qw.lowrank is not None and not split_lowrank:
            raise refuse(fmt, name, "carries LQER low-rank factors W ≈ Ŵ + (A·B)ᵀ that this format cannot hold",
                         "pass --lowrank-adapter to write the base here plus a PEFT LoRA adapter for A·B "
                         "(both are needed), or use --format dequantized")
        if linear_only and src.module_types[name] != "Linear":
            raise refuse(fmt, name, f"is a {src.module_types[name]}, not an nn.Linear",
                         "use --format dequantized")


def per_row(g: UniformGrid, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [rows, G], zero [rows, G]): a per-tensor grid repeated over rows (the same weights, exactly)."""
    s, z = g.scale, g.zero
    if s.shape[0] == 1 and rows != 1:
        s, z = s.expand(rows, -1).contiguous(), z.expand(rows, -1).contiguous()
    return s, z


def group_size_of(g: UniformGrid, cols: int) -> int:
    """Columns per group; per-channel and per-tensor grids are one group of all `cols`."""
    return g.group_size if g.group_size > 0 else cols


def write_output(out: Path, tensors: dict[str, torch.Tensor], config: dict | None, src: Source, card: str, *,
                 overwrite: bool, extra_files: dict[str, str] | None = None, weights_name: str = "model.safetensors",
                 tokenizer: bool = True, subdirs: dict[str, callable] | None = None) -> Path:
    """Atomically create `out` with the weights, config.json, tokenizer files, README.md and extras.

    `subdirs` maps a subdirectory name to a function writing into it (a LoRA adapter next to its base).
    """
    from safetensors.torch import save_file

    from lowbit.io.atomic import atomic_dir
    from lowbit.io.native import write_tokenizer

    out = Path(out)
    if out.resolve() == src.path.resolve() or src.path.resolve().is_relative_to(out.resolve()):
        raise LowbitError(f"output directory {out} is (or contains) the input {src.path}; choose another one")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if tensors:
            save_file(tensors, str(tmp / weights_name), metadata={"format": "pt"})
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer:
            write_tokenizer(src.path, tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        for d, fn in (subdirs or {}).items():
            (tmp / d).mkdir()
            fn(tmp / d)
        (tmp / "README.md").write_text(card)
    return out
