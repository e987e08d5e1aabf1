"""`dequantized`: a plain Hugging Face checkpoint whose linear weights are Ŵ = QuantizedWeight.dequantize()
(grid, outliers and the low-rank term merged) in fp16/bf16/fp32. Any runtime loads it; it is *not* smaller
than the original — the card says so. The one export every lowbit grid (codebooks, MXINT, outliers) fits."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.exporters.card import model_card
from lowbit.exporters.common import Source, hf_weight, plain_tensors, write_output


def dequantized_tensors(src: Source, dtype: torch.dtype, *, include_lowrank: bool = True) -> dict[str, torch.Tensor]:
    post = [n for n, q in src.qweights.items() if getattr(q.grid, "post_norm", False)]
    if post:
        raise LowbitError(f"{post[0]} normalises its output (OneBit's parameter-free LayerNorm after the sign "
                          f"matmul): no dense weight computes that, so a plain checkpoint cannot hold it; keep "
                          f"the native format ({len(post)} such layers)")
    t = plain_tensors(src, dtype)
    for name, qw in src.qweights.items():
        lr = qw.lowrank
        if not include_lowrank:
            qw.lowrank = None
        try:
            t[f"{name}.weight"] = hf_weight(src, name, qw.dequantize(dtype))
        finally:
            qw.lowrank = lr
    return t


def hf_config(src: Source, dtype: torch.dtype) -> dict:
    cfg = dict(src.config)
    name = str(dtype).removeprefix("torch.")
    cfg["torch_dtype"] = name  # transformers 4.x
    cfg["dtype"] = name  # transformers 5.x
    return cfg


def export_dequantized(src: Source, out: Path, *, dtype: torch.dtype = torch.float16, overwrite: bool = False,
                       lowrank_adapter: bool = False) -> Path:
    split = lowrank_adapter and any(q.lowrank is not None for q in src.qweights.values())
    tensors = dequantized_tensors(src, dtype, include_lowrank=not split)
    d = str(dtype).removeprefix("torch.")
    how = (f"from transformers import AutoModelForCausalLM\n"
           f"model = AutoModelForCausalLM.from_pretrained('{out.name}', dtype='{d}')")
    merged = "the low-rank term is NOT merged (see below)" if split else "any low-rank term (A·B)ᵀ merged"
    notes = [f"**These weights are dequantized** to {d}: every quantized layer holds Ŵ = dequantize(codes, "
             f"scales, zeros) with outliers and {merged}. The file is as large as an unquantized checkpoint; it "
             "reproduces the quantized model's function for runtimes that cannot represent its grid (codebooks, "
             f"MXINT, outliers, low-rank terms), up to the rounding of Ŵ to {d}.",
             "The bits per weight above are those of the lowbit output this was exported from, not of this file."]
    if src.act:
        notes.append(f"**Weight-only**: {len(src.act)} layers of the lowbit output also fake-quantize their input "
                     f"activations ({next(iter(src.act.values()))}); this checkpoint does not, so its outputs differ "
                     "from the lowbit model's by that activation rounding.")
    subdirs = None
    if split:
        from lowbit.exporters.peft_lora import adapter_writer

        subdirs = {"lora_adapter": adapter_writer(src, base=".", dtype=dtype)}
        notes.append("The LQER low-rank term is the PEFT LoRA adapter in `lora_adapter/` (lora_alpha = r); "
                     "apply it with `PeftModel.from_pretrained(model, 'lora_adapter')`.")
    card = model_card(src, "dequantized", loads_with="any Hugging Face transformers-compatible runtime",
                      how=how, notes=notes, file_bits=torch.finfo(dtype).bits)
    return write_output(out, tensors, hf_config(src, dtype), src, card, overwrite=overwrite, subdirs=subdirs)
