"""`gptq`: the GPTQ checkpoint format (v1), the widest-reaching int format (vLLM, SGLang, TGI, transformers
via GPTQModel, PEFT training).

Per linear layer (GPTQModel `nn_modules/qlinear`, AutoGPTQ `qlinear_cuda_old`):
    qweight  int32 [⌈in·b/32⌉, out]   codes along the input dimension, LSB first (3-bit: across words)
    qzeros   int32 [G, ⌈out·b/32⌉]    zero − 1 (the v1 convention), packed along the output dimension
    scales   fp16  [G, out]
    g_idx    int32 [in]               group of each input column (c // group_size without act-order)
and ŵ[o, c] = (q[o, c] − (qzeros[g, o] + 1))·scales[g, o], g = g_idx[c]. G = ⌈in / group size⌉: a partial last
group is one more row of scales and zeros that g_idx points to (GPTQModel's torch kernel runs it; kernels
that require in % group size == 0, such as exllama and marlin, are not selected for such a layer). Our packing already is GPTQ's
bitstream, so qweight = pack(codes)ᵀ and qzeros = pack((zero − 1)ᵀ). Lossless, except that v1 cannot hold a
zero point of 0 (it would be stored as −1): such layers are refused. Every quantized layer must share one
(bits, group size, symmetric) setting; unquantized linears inside blocks are listed in `dynamic` as "-:".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.exporters.card import model_card
from lowbit.exporters.common import Source, per_row, plain_tensors, refuse, require_uniform, write_output
from lowbit.exporters.dequantized import hf_config
from lowbit.formats import packing

GPTQ_BITS = (2, 3, 4, 8)


def gptq_layer_tensors(qw) -> dict[str, torch.Tensor]:
    g, (rows, cols) = qw.grid, qw.shape
    s, z = per_row(g, rows)
    gs = g.group_size if g.group_size > 0 else cols
    g_idx = g.g_idx if g.g_idx is not None else torch.arange(cols) // gs
    return {"qweight": packing.pack(qw.codes, g.bits).T.contiguous(),
            "qzeros": packing.pack((z - 1).T.contiguous(), g.bits),
            "scales": s.T.to(torch.float16).contiguous(),
            "g_idx": g_idx.to(torch.int32).contiguous()}


def gptq_config(src: Source) -> dict:
    (bits, gs, sym), = {(q.grid.bits, q.grid.group_size if q.grid.group_size > 0 else -1, q.grid.symmetric)
                        for q in src.qweights.values()}
    qcfg = src.quantization_config.get("config") or {}
    from lowbit.models.adapters import is_quantizable

    skipped = sorted(n for n, m in src.model.named_modules()
                     if is_quantizable(m) and n not in src.qweights and ".layers." in f".{n}.")
    cfg = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": gs, "sym": sym,
           "desc_act": any(q.grid.g_idx is not None for q in src.qweights.values()),
           "static_groups": bool(qcfg.get("static_groups", False)), "true_sequential": True, "lm_head": False,
           "damp_percent": qcfg.get("damp_percent", 0.01), "pack_dtype": "int32",
           "meta": {"quantizer": [f"lowbit:{lowbit.__version__}"], "method": src.method}}
    if skipped:
        cfg["dynamic"] = {"-:" + n.replace(".", r"\.") + "$": {} for n in skipped}
    return cfg


def export_gptq(src: Source, out: Path, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                lowrank_adapter: bool = False) -> Path:
    require_uniform(src, "gptq", GPTQ_BITS, split_lowrank=lowrank_adapter)
    settings = {(q.grid.bits, q.grid.group_size if q.grid.group_size > 0 else -1, q.grid.symmetric)
                for q in src.qweights.values()}
    if len(settings) > 1:
        raise LowbitError(f"cannot export to gptq: the layers use {len(settings)} different (bits, group size, "
                          f"symmetric) settings {sorted(settings)} and GPTQ loaders take one; use --format "
                          "compressed-tensors (one config group per setting)")
    for name, qw in src.qweights.items():
        if int(qw.grid.zero.min()) == 0:
            raise refuse("gptq", name, "has a zero point of 0, which the GPTQ v1 format (stores zero − 1) cannot hold",
                         "use --format compressed-tensors")
    dtype = dtype or torch.float16
    tensors = plain_tensors(src, dtype)
    stored = 0
    for name, qw in src.qweights.items():
        for k, v in gptq_layer_tensors(qw).items():
            tensors[f"{name}.{k}"] = v
            stored += v.numel() * v.element_size() * 8
    qc = gptq_config(src)
    config = hf_config(src, dtype)
    config["quantization_config"] = qc
    n = sum(q.shape[0] * q.shape[1] for q in src.qweights.values())
    how = (f"from transformers import AutoModelForCausalLM  # needs GPTQModel (pip install gptqmodel)\n"
           f"model = AutoModelForCausalLM.from_pretrained('{out.name}')\n"
           f"# vLLM: LLM(model='{out.name}', quantization='gptq')")
    notes = ["GPTQ v1 checkpoint: qzeros hold zero − 1. Codes, fp16 scales and zeros are the lowbit output's own.",
             "g_idx is stored for every layer (32 bits per input column) as the format requires, so the file "
             "costs more than the lowbit bits per weight when the lowbit output had no g_idx."]
    subdirs = None
    if lowrank_adapter and any(q.lowrank is not None for q in src.qweights.values()):
        from lowbit.exporters.peft_lora import adapter_writer

        subdirs = {"lora_adapter": adapter_writer(src, base=".", dtype=dtype)}
        notes.append("The LQER low-rank term is the PEFT LoRA adapter in `lora_adapter/` (lora_alpha = r); "
                     "both are needed. vLLM serves LoRA on GPTQ bases (raise max_lora_rank).")
    card = model_card(src, "GPTQ (v1)", loads_with="vLLM, SGLang, TGI, transformers + GPTQModel", how=how,
                      notes=notes, file_bits=stored / n if n else None)
    return write_output(out, tensors, config, src, card, overwrite=overwrite, subdirs=subdirs,
                        extra_files={"quantize_config.json": json.dumps(qc, indent=2)})
