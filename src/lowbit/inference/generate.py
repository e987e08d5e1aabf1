"""`lowbit generate`: stream tokens from a quantized model on the CPU, reporting tokens/s and memory.

A plain greedy (or seeded sampling) loop over the HF model with its KV cache, so that prefill and decode
are timed separately. The backend picks the base GEMM of every QuantLinear (`kernels.dispatch`): the
kernels run with bf16 activations, the reference path in the model's dtype.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds for its weights, by kind: plain tensors, quantized records (codes kept
    unpacked as uint8, scales, zeros, factors), kernel operands, and reference-path caches."""
    from lowbit.nn.quant_linear import QuantLinear

    def nb(t):
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    seen, out = set(), {"plain": 0, "quantized_records": 0, "kernel_operands": 0, "dequantized_cache": 0}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out["plain"] += nb(t)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            q = m.qweight
            out["quantized_records"] += nb(q.codes) + sum(nb(v) for v in vars(q.grid).values()) + nb(q.in_scale)
            if q.lowrank is not None:
                out["quantized_records"] += sum(nb(v) for v in vars(q.lowrank).values())
            st = getattr(m, "_kernel_state", None)
            if st is not None and st[2] is not None:
                out["kernel_operands"] += st[2].nbytes()
            lr = getattr(m, "_lr_cache", None)  # the low-rank factors in the activation dtype
            if lr is not None:
                out["kernel_operands"] += nb(lr[1]) + nb(lr[2])
            out["dequantized_cache"] += nb(m._cache)
    return out


def _next_token(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    # one row of logits comes to the host: sampling with the host generator is the same on every device
    logits = logits.float().cpu()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, stream=None) -> dict:
    """Generate after `prompt`; `stream(text)` receives each new piece of text. Returns text and timings."""
    from lowbit.progress import peak_memory_mb

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    dev = next(model.parameters()).device
    if ids.shape[1] == 0:
        raise LowbitError("the prompt is empty after tokenization")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + max_new_tokens > limit:
        max_new_tokens = max(0, limit - ids.shape[1])
    gen = torch.Generator().manual_seed(seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    t0 = time.perf_counter()
    out = model(ids.to(dev), use_cache=True)
    t_prefill = time.perf_counter() - t0
    past, new, shown = out.past_key_values, [], ""
    tok = _next_token(out.logits[:, -1], temperature, top_k, gen)
    t1 = time.perf_counter()
    for _ in range(max_new_tokens):
        new.append(int(tok))
        text = tokenizer.decode(new, skip_special_tokens=True)
        if stream is not None and text.startswith(shown) and len(text) > len(shown):
            stream(text[len(shown):])
            shown = text
        if eos is not None and int(tok) == eos or len(new) == max_new_tokens:
            break
        out = model(tok.to(dev), past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = _next_token(out.logits[:, -1], temperature, top_k, gen)
    t_decode = time.perf_counter() - t1
    n_decode = max(len(new) - 1, 0)  # the first new token came from the prefill
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
            "new_tokens": len(new), "prefill_s": t_prefill,
            "prefill_tokens_per_s": ids.shape[1] / t_prefill if t_prefill > 0 else float("nan"),
            "decode_tokens_per_s": n_decode / t_decode if n_decode and t_decode > 0 else float("nan"),
            "peak_memory_mb": peak_memory_mb(), "weights_mb": {k: v / 2**20 for k, v in weight_bytes(model).items()}}


def load_for_inference(path: str | Path, backend: str = "auto", dtype: str | None = None, device: str | None = None):
    """(model, tokenizer, layer counts by kernel) from a native lowbit output, on `device`
    (`lowbit.devices.resolve_device`; default the CPU). The packed kernels are CPU kernels: on a GPU
    every layer runs the reference path (weights dequantized once into a cache on the device)."""
    from lowbit.devices import resolve_device
    from lowbit.exporters.common import DTYPES
    from lowbit.io.native import load_tokenizer, load_quantized
    from lowbit.kernels.dispatch import BACKENDS
    from lowbit.nn.quant_linear import set_backend

    if backend not in BACKENDS:
        raise LowbitError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    dtype = dtype or ("float32" if backend == "reference" else "bfloat16")
    if dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dev = resolve_device(device or "cpu")
    model, _, _ = load_quantized(path, dtype=DTYPES[dtype])
    model.to(dev, DTYPES[dtype])  # QuantLinear biases too
    counts = set_backend(model, backend if dev.type == "cpu" else "reference")
    return model, load_tokenizer(str(path), False), counts
