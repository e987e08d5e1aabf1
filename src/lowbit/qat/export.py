"""The end of a QAT run: every QAT layer becomes a `QuantizedWeight` in lowbit's native format.

L4Q, LSQ and LR-QAT layers export their integer codes on the UniformGrid they trained on (bit-identical
to the training forward, `qat.grid`); the QLoRA-style layer exports its PTQ grid plus the adapter as a fp16
LowRank term. Plain LoRA has no grid: its merged float weights are saved as an ordinary HF model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir
from lowbit.nn.quant_linear import QuantLinear, replace_module
from lowbit.qat.config import LoQTConfig, LoRAConfig, SpIELConfig


def _tokenizer_source(model_path: str, tokenizer):
    p = Path(model_path)
    return str(p) if p.is_dir() else tokenizer


def export(model: nn.Module, layers: dict[str, nn.Module], qcfg, tcfg, out: Path, *, model_path: str,
           tokenizer, summary: dict, history: list[dict], overwrite: bool) -> dict:
    """Swap the trained layers for their exported form and save `out`. Returns {bits_per_weight, out}."""
    extra = {"source_model": str(model_path), "summary": summary, "history": history,
             "finetune": {"method": qcfg.model_dump(), "train": tcfg.model_dump()}}
    sidecars = {}
    if isinstance(qcfg, SpIELConfig):
        from lowbit.qat.spiel import DELTA_FILE, delta_tensors

        sidecars[DELTA_FILE] = delta_tensors(layers)
    if isinstance(qcfg, LoRAConfig) or (isinstance(qcfg, SpIELConfig) and qcfg.base == "fp"):
        for name, layer in layers.items():
            lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(layer.merged_weight())
                if layer.bias is not None:
                    lin.bias.copy_(layer.bias)
            replace_module(model, name, lin)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            from safetensors.torch import save_file

            for fname, (t, meta) in sidecars.items():
                save_file(t, str(tmp / fname), metadata=meta)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            import json

            (tmp / "lowbit.json").write_text(json.dumps(extra, indent=1, default=str))
        return {"bits_per_weight": 32.0, "out": str(out)}
    from lowbit.io.native import save_quantized

    dtype = next(iter(model.parameters())).dtype
    qweights = {}
    for name, layer in layers.items():
        qw = layer.export(dtype, qcfg.export) if isinstance(qcfg, LoQTConfig) else layer.export(dtype)
        qweights[name] = qw
        replace_module(model, name, QuantLinear(qw, layer.bias))
    bits = sum(sum(q.storage().values()) for q in qweights.values())
    n = sum(q.shape[0] * q.shape[1] for q in qweights.values())
    if not n:
        raise LowbitError("no layer was fine-tuned")
    save_quantized(model, qweights, out, tokenizer=_tokenizer_source(model_path, tokenizer),
                   recipe={"quant": qcfg.model_dump(), "train": tcfg.model_dump()}, extra=extra, overwrite=overwrite,
                   sidecars=sidecars)
    return {"bits_per_weight": bits / n, "out": str(out)}
