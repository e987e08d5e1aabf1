"""`lowbit generate`: registered on the main typer app in lowbit.cli (typer only at import time)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def generate_cmd(
    model: Path = typer.Argument(..., help="A lowbit output directory (from `lowbit quantize`)."),
    prompt: str = typer.Option(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate at most."),
    backend: str = typer.Option("auto", help="auto (kernels with bf16 activations) | reference (dequantize + "
                                "F.linear) | kernel (kernels wherever one applies)."),
    dtype: Optional[str] = typer.Option(None, help="Activation/unquantized dtype (default bfloat16, float32 for "
                                        "--backend reference)."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0 = all)."),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads (default: torch's)."),
    device: str = typer.Option("cpu", help="cpu | auto | cuda | cuda:N. On a GPU every layer runs the reference path (dequantized once, cached on the device): the packed kernels are CPU kernels."),
):
    """Stream a continuation of PROMPT with the quantized model; print tokens/s and memory."""
    import torch

    from lowbit.inference.generate import generate, load_for_inference

    if threads:
        torch.set_num_threads(threads)
    m, tok, counts = load_for_inference(model, backend, dtype, device)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    res = generate(m, tok, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    print()
    w = res["weights_mb"]
    layers = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"[{res['new_tokens']} tokens; prefill {res['prompt_tokens']} tokens in {res['prefill_s']:.3f} s; decode "
          f"{res['decode_tokens_per_s']:.1f} tokens/s; layers: {layers}; weights in RAM "
          f"{sum(w.values()):.1f} MB (plain {w['plain']:.1f}, quantized records {w['quantized_records']:.1f}, "
          f"kernel operands {w['kernel_operands']:.1f}, dequantized caches {w['dequantized_cache']:.1f}); "
          f"peak RSS {res['peak_memory_mb']:.0f} MB]", file=sys.stderr)
