"""Peak memory and time of quantization against model size, layer by layer and whole.

    python bench/scale.py [--sizes 0.1B 0.5B 1B 3B] [--methods rtn gptq] [--loads layers whole]
                          [--whole-up-to 1B] [--calib-samples 16]
    python bench/scale.py --plot          # bench/results/scale.png from bench/results/scale.json

Random-initialised Llama-shaped models (the shapes of common checkpoints: 0.1B ≈ GPT-2-small width,
1B = TinyLlama, 3B = OpenLLaMA-3B; vocabulary 49152 so that SmolLM2's tokenizer calibrates them) are
written once in bf16 as sharded safetensors under ~/.cache/lowbit/scale/. Each run is one
`lowbit quantize MODEL --method M --bits 4 --group-size 128 --load L` process under /usr/bin/time
(peak RSS of the whole process, wall clock), with GPTQ calibrated on --calib-samples windows of 512
tokens of the packaged C4 split. The checkpoint is read once before each run, so every run starts
with it in the page cache (reads from a cold disk would otherwise decide the small models' times).
The time of each block comes from the run's own summary (`block_seconds`: load, forward passes, solve,
checkpoint write); the fits use the median over blocks (the first block also pays one-off warm-up).

The memory bound the layer-by-layer path is judged against:

    peak RSS ≤ 2.5 GB + 4 × (largest block in float32) + calibration activations of one block

where the activations are n_windows × seqlen × hidden × 4 bytes. Every row records it beside the
measured peak. The exponent of time per block against parameters per block is fitted by least squares
on log-log scale, per method, and so is the exponent against the block's arithmetic (`block_flops`):

    RTN   a constant number of passes over the weights: ∝ P
    GPTQ  2·T·P (forward of the T calibration tokens, run twice: statistics, then the quantized
          block's outputs) + 2·T·Σ_H d_in² (one Hessian X·Xᵀ per distinct input) + Σ_layers
          (2·d_out·d_in² sweep + d_in³/3 Cholesky and inverse)

GPTQ's solver is cubic in the width (d_out·d_in² per layer) while P is quadratic, so at a fixed
calibration set no GPTQ implementation has an exponent of 1 against P; the exponent against the
arithmetic says whether the implementation scales as the algorithm does. Results: bench/results/scale.json (with provenance), scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.json"
PY = sys.executable

VOCAB = 49152
SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "0.1B": (768, 2048, 12, 12, 12),
    "0.5B": (1536, 4096, 16, 16, 8),
    "1B": (2048, 5632, 22, 32, 4),
    "3B": (3200, 8640, 26, 32, 32),
}
GB = 2**30


def shapes(size: str) -> dict:
    h, i, n, heads, kv = SIZES[size]
    head = h // heads
    block = h * h * 2 + 2 * h * kv * head + 3 * h * i + 2 * h  # q, o, k, v, gate/up/down, two norms
    total = n * block + 2 * VOCAB * h + h  # untied embeddings + final norm
    return {"hidden": h, "intermediate": i, "layers": n, "heads": heads, "kv_heads": kv,
            "params": total, "block_params": block}


def model_dir(size: str) -> Path:
    from lowbit.cache import cache_root

    return cache_root() / "scale" / f"llama-{size}-bf16"


def build(size: str) -> Path:
    """Write the random model once (bf16, 2 GB shards, the reference model's tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.reference import build_reference

    out = model_dir(size)
    if (out / "config.json").is_file():
        return out
    s = shapes(size)
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=VOCAB,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: a 3B model never exists in float32
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB")
    ref = build_reference()
    for f in ref.glob("tokenizer*"):
        shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
    print(f"[scale] built {size}: {s['params'] / 1e9:.2f} B params in {time.perf_counter() - t0:.0f} s -> {out}",
          flush=True)
    return out


def bound_gb(size: str, windows: int, seqlen: int = 512) -> float:
    s = shapes(size)
    return 2.5 + (4 * s["block_params"] * 4 + windows * seqlen * s["hidden"] * 4) / GB


def block_flops(size: str, method: str, tokens: int) -> float:
    """Floating-point operations of one block (the cost model of the module docstring)."""
    s = shapes(size)
    h, i, kv = s["hidden"], s["intermediate"], s["kv_heads"] * (s["hidden"] // s["heads"])
    if method == "rtn":
        return float(s["block_params"])
    layers = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (d_out, d_in): q k v o gate up down
    hessians = [h, h, h, i]  # q/k/v share one input, o, gate/up share one, down
    return float(2 * 2 * tokens * s["block_params"] + sum(2 * tokens * d * d for d in hessians)
                 + sum(2 * o * d * d + d**3 / 3 for o, d in layers))


def warm(src: Path) -> None:
    """Read the checkpoint once: the timed run then finds it in the page cache."""
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def run(size: str, method: str, load: str, windows: int, results: Path = RESULTS) -> dict:
    import statistics

    from lowbit.eval.protocol import provenance

    src = build(size)
    warm(src)
    out = Path(f"/tmp/lowbit-scale-{size}-{method}-{load}")
    cmd = [PY, "-m", "lowbit.cli", "quantize", str(src), "-o", str(out), "--method", method, "--bits", "4",
           "--group-size", "128", "--load", load, "--calib-samples", str(windows), "--calib-seqlen", "512",
           "--overwrite", "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{size} {method} {load} failed:\n{p.stderr[-3000:]}")
    summary = json.loads((out / "lowbit.json").read_text())["summary"]
    rss = int(re.search(r"maxrss_kb (\d+)", p.stderr).group(1)) * 1024
    blocks = summary.get("block_seconds") or []
    s = shapes(size)
    row = {"size": size, **s, "method": method, "load": load, "dtype": "bfloat16",
           "calibration": f"c4 {windows}x512" if method != "rtn" else "none",
           "wall_seconds": round(wall, 1), "quantize_seconds": round(summary["quantize_seconds"], 1),
           "peak_rss_gb": round(rss / GB, 3), "bound_gb": round(bound_gb(size, windows if method != "rtn" else 0), 3),
           "block_seconds_mean": round(sum(blocks) / len(blocks), 3) if blocks else None,
           "block_seconds_median": round(statistics.median(blocks), 3) if blocks else None,
           "block_flops": block_flops(size, method, windows * 512), "page_cache": "warm",
           "block_seconds": blocks, "bits_per_weight": summary["bits_per_weight"],
           "checkpoint_gb": round(sum(f.stat().st_size for f in src.glob("*.safetensors")) / GB, 3),
           "provenance": provenance(src)}
    shutil.rmtree(out, ignore_errors=True)
    d = json.loads(results.read_text()) if results.is_file() else {"runs": {}}
    d["runs"][f"{size}/{method}/{load}"] = row
    d["fit"] = fit(d["runs"])
    from lowbit.io.atomic import atomic_write_text

    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(d, indent=1) + "\n")
    print(f"[scale] {size} {method} {load}: peak {row['peak_rss_gb']:.2f} GB (bound {row['bound_gb']:.2f}), "
          f"wall {wall:.0f} s, {row['block_seconds_median']} s/block (median)", flush=True)
    return row


def fit(runs: dict) -> dict:
    """Per method (layer-by-layer runs, median block time): the exponent a of time per block ∝ (params per
    block)^a, and the exponent against the block's arithmetic (`block_flops`). Runs marked superseded, run
    by hand or without a median are left out."""
    import numpy as np

    out = {}
    for method in sorted({r["method"] for r in runs.values()}):
        rs = [r for r in runs.values() if r["method"] == method and r["load"] == "layers"
              and r.get("block_seconds_median") and "superseded_by" not in r]
        if len(rs) >= 2:
            y = np.log([r["block_seconds_median"] for r in rs])
            a, _ = np.polyfit(np.log([r["block_params"] for r in rs]), y, 1)
            b, _ = np.polyfit(np.log([r["block_flops"] for r in rs]), y, 1)
            out[method] = {"exponent": round(float(a), 3), "exponent_vs_flops": round(float(b), 3),
                           "points": len(rs), "sizes": [r["size"] for r in rs], "time": "median s/block"}
    return out


def plot(results: Path = RESULTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(results.read_text())["runs"].values()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in sorted({r["method"] for r in runs}):
        for load, style in (("layers", "-o"), ("whole", "--s")):
            rs = sorted((r for r in runs if r["method"] == method and r["load"] == load
                         and "superseded_by" not in r), key=lambda r: r["params"])
            if rs:
                a.plot([r["params"] / 1e9 for r in rs], [r["peak_rss_gb"] for r in rs], style, label=f"{method} {load}")
            rs = [r for r in rs if r.get("block_seconds_median")]
            if rs and load == "layers":
                b.loglog([r["block_params"] / 1e6 for r in rs], [r["block_seconds_median"] for r in rs], style,
                         label=method)
    rs = sorted((r for r in runs if r["method"] == "gptq"), key=lambda r: r["params"]) or list(runs)
    a.plot([r["params"] / 1e9 for r in rs], [r["bound_gb"] for r in rs], ":", color="gray", label="bound")
    a.set(xlabel="parameters (B)", ylabel="peak RSS (GB)", title="peak memory of lowbit quantize")
    b.set(xlabel="parameters per block (M)", ylabel="seconds per block (median)", title="time per block (layer by layer)")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(results.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    ap.add_argument("--loads", nargs="+", default=["layers", "whole"], choices=["layers", "whole"])
    ap.add_argument("--whole-up-to", default="1B", choices=list(SIZES),
                    help="the whole-model load (float32) only up to this size: beyond it needs more memory than here")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not args.plot:
        limit = list(SIZES).index(args.whole_up_to)
        for size in args.sizes:
            for method in args.methods:
                for load in args.loads:
                    if load == "whole" and list(SIZES).index(size) > limit:
                        continue
                    run(size, method, load, args.calib_samples, args.out)
    if args.out.is_file():
        plot(args.out)


if __name__ == "__main__":
    main()
