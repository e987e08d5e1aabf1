"""`peft-lora`: LQER's low-rank term as a standard PEFT LoRA adapter (what PEFT, vLLM and SGLang load).

lowbit stores W ≈ Ŵ + (A·B)ᵀ with A [in, k], B [k, out], i.e. y = x·Ŵᵀ + (x·A)·B. A PEFT LoRA layer adds
scaling·lora_B(lora_A(x)) = scaling·x·lora_Aᵀ·lora_Bᵀ, so lora_A.weight = Aᵀ [k, in], lora_B.weight =
Bᵀ [out, k] and scaling = lora_alpha / r = 1 (lora_alpha = r; per-layer ranks via rank_pattern and
alpha_pattern). Factors stored quantized (int8 / MXINT8) are dequantized to the export dtype, as GPTQModel's
EoRA adapters are. The adapter applies on top of the *grid-only* base (Ŵ without the low-rank term):
export that with `--format compressed-tensors|gptq|gguf --lowrank-adapter` or `--format dequantized --lowrank-adapter`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.exporters.card import model_card
from lowbit.exporters.common import Source, require_weight_only, write_output

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_tensors(src: Source, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    require_weight_only(src, "peft-lora")
    tensors, ranks = {}, {}
    for name, qw in src.qweights.items():
        if qw.lowrank is None:
            continue
        if src.module_types[name] != "Linear":
            raise LowbitError(f"cannot export layer {name} as a LoRA adapter: PEFT's LoRA for a "
                              f"{src.module_types[name]} uses another layout; use --format dequantized")
        A, B = qw.lowrank.factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.T.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.T.to(dtype).contiguous()
        ranks[name] = A.shape[1]
    if not ranks:
        raise LowbitError(f"{src.path} has no low-rank (LQER) factors: there is no adapter to export "
                          "(quantize with --lqer-rank K)")
    return tensors, ranks


def adapter_config(ranks: dict[str, int], base: str) -> dict:
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {n: k for n, k in ranks.items() if k != r}  # PEFT matches these keys as regexes: anchor them
    pattern = {"^" + n.replace(".", r"\.") + "$": k for n, k in pattern.items()}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
            "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": pattern, "alpha_pattern": pattern,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def adapter_writer(src: Source, base: str, dtype: torch.dtype):
    tensors, ranks = adapter_tensors(src, dtype)

    def write(d: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (d / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(ranks, base), indent=2))

    return write


def export_peft_lora(src: Source, out: Path, *, dtype: torch.dtype | None = None, base: str | None = None,
                     overwrite: bool = False) -> Path:
    dtype = dtype or src.dtype
    tensors, ranks = adapter_tensors(src, dtype)
    base = base or "<grid-only base: lowbit export ... --format compressed-tensors --lowrank-adapter>"
    n = sum(src.qweights[k].shape[0] * src.qweights[k].shape[1] for k in ranks)
    how = ("from peft import PeftModel\n"
           f"base = AutoModelForCausalLM.from_pretrained(BASE)  # the grid-only base (see notes)\n"
           f"model = PeftModel.from_pretrained(base, '{out.name}')")
    notes = ["The adapter is LQER's low-rank error term (A·B)ᵀ: lora_A = Aᵀ, lora_B = Bᵀ, lora_alpha = r "
             "(scaling 1). It must be applied to the **grid-only** quantized base (Ŵ without the low-rank term), "
             "which `lowbit export OUT --format compressed-tensors|gptq --lowrank-adapter` or "
             "`--format dequantized --lowrank-adapter` writes.",
             f"Factors dequantized to {str(dtype)[6:]}; ranks: {dict(Counter(ranks.values()))}.",
             "vLLM: raise max_lora_rank above its default 16 for these ranks."]
    file_bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values()) / n
    card = model_card(src, "PEFT LoRA adapter", loads_with="peft, vLLM (enable_lora), SGLang", how=how, notes=notes,
                      file_bits=file_bits)
    cfg = adapter_config(ranks, base)
    return write_output(out, tensors, None, src, card, overwrite=overwrite, weights_name=ADAPTER_WEIGHTS,
                        tokenizer=False, extra_files={ADAPTER_CONFIG: json.dumps(cfg, indent=2)})
