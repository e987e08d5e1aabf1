"""The CUDA path of `--device`: quantize on the GPU and on the CPU, compare, time. Runs only with CUDA.

    python bench/gpu_smoke.py [--out bench/results/gpu-smoke.json] [--large 1B]

Random-initialised Llama-shaped models in bf16 (vocabulary of the toy tokenizer, which is trained here in
seconds: nothing is downloaded), calibrated on 16 windows of 512 tokens of the packaged C4 split:

1. a 0.1B-shaped model quantized with RTN and GPTQ (w4 g128, layer by layer) on the CPU and on the GPU:
   the share of codes that differ (GPTQ amplifies float-rounding differences of H into code flips, so a
   few are expected; RTN should be identical), the KL between the two quantized models, and the time;
2. `lowbit eval` of the GPU-quantized model on the GPU against the same model on the CPU (perplexity);
3. a larger model (--large, default the 1B shape) quantized on the GPU only: time per block.

Writes one JSON with the provenance (commit, torch, device name) of the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GPU = "cuda"
sys.path.insert(0, str(ROOT / "bench"))


def _model(path: Path, size: str, tokenizer_dir: Path) -> Path:
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from scale import SIZES

    h, i, n, heads, kv = SIZES[size]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    for f in [*tokenizer_dir.glob("tokenizer*"), *tokenizer_dir.glob("special_tokens_map.json")]:
        shutil.copy(f, path / f.name)
    return path


def _quantize(src: Path, out: Path, method: str, device: str) -> dict:
    from lowbit.jobs import quantize_job
    from lowbit.recipe import make_recipe

    r = make_recipe({"quant": {"method": method, "bits": 4, "group_size": 128},
                     "calibration": {"n_samples": 16, "seqlen": 512}}, source="gpu smoke")
    t0 = time.perf_counter()
    s = quantize_job(str(src), out, r, overwrite=True, progress=False, load="layers", device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"wall_seconds": round(time.perf_counter() - t0, 2), "quantize_seconds": round(s["quantize_seconds"], 2),
            "block_seconds_mean": round(sum(s["block_seconds"]) / len(s["block_seconds"]), 3),
            "bits_per_weight": s["bits_per_weight"], "device": s.get("device")}


def _codes_differ(a: Path, b: Path) -> dict:
    from lowbit.io.native import load_quantized

    _, qa, _ = load_quantized(a)
    _, qb, _ = load_quantized(b)
    diff = sum(int((qa[k].codes != qb[k].codes).sum()) for k in qa)
    total = sum(qa[k].codes.numel() for k in qa)
    rel = max(float((qa[k].dequantize() - qb[k].dequantize()).norm() / qa[k].dequantize().norm()) for k in qa)
    return {"codes_differ_share": diff / total, "max_rel_weight_diff": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-smoke.json"))
    ap.add_argument("--large", default="1B")
    ap.add_argument("--dry-cpu", action="store_true", help="check the script itself on a CPU-only machine ('cuda' runs on the CPU)")
    args = ap.parse_args()
    global GPU
    GPU = "cpu" if args.dry_cpu else "cuda"
    if not torch.cuda.is_available() and not args.dry_cpu:
        print("gpu_smoke: CUDA is not available here; nothing to do")
        return
    from lowbit.eval.protocol import get_protocol, provenance
    from lowbit.jobs import eval_job
    from lowbit.toy import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="lowbit-gpu-"))
    toy = build_tiny(tmp / "toy", steps=5)  # only its tokenizer is used
    small = _model(tmp / "small", "0.1B", toy)
    res: dict = {"gpu": torch.cuda.get_device_name() if GPU == "cuda" else "none (dry run)", "provenance": provenance(), "small": {}, "large": {}}
    import os

    res["code_commit"] = os.environ.get("LOWBIT_COMMIT") or res["provenance"].get("commit")  # (a copy without .git)
    print(json.dumps({"gpu": res["gpu"]}), flush=True)
    proto = get_protocol("quick")
    for method in ("rtn", "gptq"):
        row = {}
        for dev in ("cpu", "cuda"):
            row[dev] = _quantize(small, tmp / f"{method}-{dev}", method, GPU if dev == "cuda" else dev)
            print(method, dev, json.dumps(row[dev]), flush=True)
        row["compare"] = _codes_differ(tmp / f"{method}-cpu", tmp / f"{method}-cuda")
        ev = {dev: eval_job(str(tmp / f"{method}-cuda"), base=str(tmp / f"{method}-cpu"), protocol=proto,
                            progress=False, device=GPU if dev == "cuda" else dev) for dev in ("cpu", "cuda")}
        row["eval_gpu_model_vs_cpu_model"] = {dev: {k: ev[dev][k] for k in ("ppl", "kl", "top1_agreement",
                                                                           "eval_seconds")} for dev in ev}
        print(method, json.dumps(row["compare"]), json.dumps(row["eval_gpu_model_vs_cpu_model"]), flush=True)
        res["small"][method] = row
    large = _model(tmp / "large", args.large, toy)
    for method in ("rtn", "gptq"):
        res["large"][method] = {"size": args.large, **_quantize(large, tmp / f"large-{method}", method, GPU)}
        print("large", method, json.dumps(res["large"][method]), flush=True)
    res["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if GPU == "cuda" else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
