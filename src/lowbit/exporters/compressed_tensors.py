"""`compressed-tensors` (format `pack-quantized`): what vLLM and transformers load for uniform int weights.

Per linear layer (compressed-tensors ≥ 0.20, `compressors/pack_quantized`):
    weight_packed      int32 [out, ⌈in·b/32⌉]  codes + 2^(b−1) offset as one LSB-first bitstream per row
    weight_scale       [out, G]                 (G = 1 for strategy "channel")
    weight_zero_point  int32 [⌈out·b/32⌉, G]   asymmetric only: signed zero + 2^(b−1), packed along dim 0
    weight_shape       int64 [2]
and ŵ = (q_signed − zp_signed)·scale. Our codes q ∈ [0, 2^b) with zero z are q_signed = q − 2^(b−1),
zp_signed = z − 2^(b−1), so the stored (offset) values are exactly our codes and zeros, and the packed
words are exactly `formats.packing.pack` of them: the export is lossless. A symmetric grid (z = 2^(b−1))
is CT's symmetric (zp = 0). Layers with different grids become different `config_groups` (mixed precision).
Act-order with dynamic groups (g_idx) is refused: compressed-tensors 0.20 removed actorder "group". So is a
partial last group (input dimension not a multiple of the group size): CT computes ⌈in/g⌉ scales but its
group dequantization refuses a partial group.

Scales are stored in fp32 when the model is fp32 (our fp16 scales exactly, and CT dequantizes in the
scale's dtype, so Ŵ is bit-exact), otherwise in fp16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.exporters.card import model_card
from lowbit.exporters.common import Source, per_row, plain_tensors, refuse, require_uniform, write_output
from lowbit.exporters.dequantized import hf_config
from lowbit.formats import packing

CT_BITS = (2, 3, 4, 5, 6, 7, 8)


def _scheme(qw) -> tuple:
    g = qw.grid
    strategy = "group" if g.group_size > 0 else "channel"
    return (g.bits, strategy, g.group_size if g.group_size > 0 else None, g.symmetric, None)


def ct_layer_tensors(qw, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g, (rows, cols) = qw.grid, qw.shape
    s, z = per_row(g, rows)
    t = {"weight_packed": packing.pack(qw.codes, g.bits),
         "weight_scale": s.to(scale_dtype).contiguous(),
         "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if not g.symmetric:
        t["weight_zero_point"] = packing.pack(z.T.contiguous(), g.bits).T.contiguous()
    return t


def ct_quantization_config(src: Source, names: list[str]) -> dict:
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(_scheme(src.qweights[name]), []).append(name)
    config_groups = {}
    for i, ((bits, strategy, gs, sym, actorder), targets) in enumerate(sorted(groups.items(), key=str)):
        config_groups[f"group_{i}"] = {
            "targets": sorted(targets),
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy,
                        "group_size": gs, "dynamic": False, "actorder": actorder, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    from lowbit.models.adapters import is_quantizable

    unquantized = sorted(n for n, m in src.model.named_modules() if is_quantizable(m) and n not in src.qweights)
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": unquantized, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}}


def export_compressed_tensors(src: Source, out: Path, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                              lowrank_adapter: bool = False) -> Path:
    require_uniform(src, "compressed-tensors", CT_BITS, split_lowrank=lowrank_adapter)
    for name, qw in src.qweights.items():
        gs, cols = qw.grid.group_size, qw.shape[1]
        if gs > 0 and cols % gs:
            raise refuse("compressed-tensors", name, f"has {cols} input columns, which groups of {gs} do not divide "
                         f"(shape {list(qw.shape)}: the last group holds {cols % gs} columns), and compressed-tensors' "
                         "group dequantization requires the group size to divide the input dimension",
                         "quantize with a group size that divides every input dimension (e.g. 64 or 32 for "
                         "576/1536), or use --format gptq / gguf / dequantized")
        if qw.grid.g_idx is not None:
            raise refuse("compressed-tensors", name, "uses act-order with dynamic groups (g_idx), which "
                         "compressed-tensors ≥ 0.20 no longer stores (actorder 'group' was removed)",
                         "use --format gptq, or quantize with static groups (the default)")
    dtype = dtype or src.dtype
    scale_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    tensors = plain_tensors(src, dtype)
    stored = 0
    for name, qw in src.qweights.items():
        for k, v in ct_layer_tensors(qw, scale_dtype).items():
            tensors[f"{name}.{k}"] = v
            stored += v.numel() * v.element_size() * 8 if k != "weight_shape" else 0
    config = hf_config(src, dtype)
    config["quantization_config"] = ct_quantization_config(src, list(src.qweights))
    n = sum(q.shape[0] * q.shape[1] for q in src.qweights.values())
    how = (f"from transformers import AutoModelForCausalLM  # needs: pip install compressed-tensors\n"
           f"model = AutoModelForCausalLM.from_pretrained('{out.name}')\n"
           f"# vLLM: LLM(model='{out.name}')")
    notes = ["Codes, scales and zero points are the lowbit output's own: dequantizing gives the same Ŵ "
             "(exactly with fp32 scales; fp16 scales are the values lowbit stores)."]
    if scale_dtype == torch.float32:
        notes.append("Scales are stored in fp32 (fp16 values widened) so that compressed-tensors, which "
                     "dequantizes in the scale's dtype, reproduces Ŵ bit for bit; export with --dtype float16 "
                     "for fp16 scales.")
    if any(q.grid.bits in (3, 5, 6, 7) for q in src.qweights.values()):
        notes.append("3/5/6/7-bit layers use compressed-tensors' dense cross-word packing (version ≥ 0.20); "
                     "vLLM's int kernels take 4 and 8 bits only.")
    subdirs = None
    if lowrank_adapter and any(q.lowrank is not None for q in src.qweights.values()):
        from lowbit.exporters.peft_lora import adapter_writer

        subdirs = {"lora_adapter": adapter_writer(src, base=".", dtype=dtype)}
        notes.append("The LQER low-rank term is NOT in these weights: it is the PEFT LoRA adapter in "
                     "`lora_adapter/` (lora_alpha = r, so scaling 1); load both "
                     "(`PeftModel.from_pretrained(model, 'lora_adapter')`) to get the quantized model.")
    card = model_card(src, "compressed-tensors (pack-quantized)", loads_with="transformers + compressed-tensors, vLLM",
                      how=how, notes=notes, file_bits=stored / n if n else None)
    return write_output(out, tensors, config, src, card, overwrite=overwrite, subdirs=subdirs)
