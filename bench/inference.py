"""CPU inference speed and memory of lowbit's kernels, written to bench/results/inference.{json,md}.

    python bench/inference.py                 # LLaMA-7B layer shapes + the reference model (if built)
    python bench/inference.py --quick         # quarter-size layers, fewer repeats (a smoke run)
    python bench/inference.py --threads 2     # torch intra-op threads (default 1, see below)

Part 1, one linear layer y = x·Wᵀ, W [out, in] (4096→4096 like q_proj, 4096→11008 like up/gate_proj),
batch 1 (decode) and 16: fp32 and bf16 dense (`F.linear`), int8 weight-only per channel
(`aten._weight_int8pack_mm`), int4 group 128 (`aten._weight_int4pack_mm_for_cpu`), int4 + a rank-32
low-rank branch (x·A)·B in bf16 (LQER), and the LUT paths for codebooks: 3-bit per input column (CLAQ's
layout) through the native matvec and through the torch gather-then-GEMM path, and 4-bit per output row
(SqueezeLLM's layout) through the native matvec (`kernels.lut`, `kernels/lut_matvec.c`), and AQLM 2x8 g8
additive codes through their native matvec (random codes and codebooks: a speed stand-in, same storage). Every quantized
variant runs with bf16 activations (the ATen ops are fast only there; the native LUT matvec computes in fp32). "decode tok/s" is 1 / (batch-1 time):
tokens per second through this one layer. Memory is what the variant must keep for the GEMM (weights
or packed operands + scales + factors / tables).

Part 2, the reference model (`lowbit reference path`): RTN-quantized variants (int8 per channel
symmetric, int4 g128 asymmetric, int4 + LQER rank 32 with fp16 factors, 3-bit LUT with quantile
codebooks per input column: a speed stand-in for CLAQ, same storage), greedy decode of 64 tokens after a
fixed prompt with the KV cache; RAM = bytes the model holds for its weights at run time (kernel operands
+ the unquantized tensors; lowbit also keeps the uint8 codes of each layer, listed separately) and disk =
the saved file (fp32/bf16 safetensors, or lowbit's native model.safetensors).

Timing: the machine is shared, so the variants run round-robin (every variant once per round, back to
back) for --repeats rounds and each number is the median over rounds; ratios are of those medians.
One thread by default: with 2 threads on 2 busy cores, OpenMP synchronisation stalls dominate small GEMMs
(a rank-32 branch took 60+ ms instead of 0.1 ms in a probe), so single-thread ratios are the stable ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lowbit.eval.protocol import provenance
from lowbit.eval.report import write_results
from lowbit.formats.codebook import make_codebook_grid
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.kernels import cpu, lut
from lowbit.methods import parse_method_config, quantize_weight

RESULTS = Path(__file__).parent / "results"
FULL = [(4096, 4096), (4096, 11008)]
QUICK = [(1024, 1024), (1024, 2752)]
PROMPT = "The history of the city begins in the"


def _timeit(fn, target_s: float = 0.15) -> float:
    """Seconds per call: warm up, then enough calls to fill ~target_s."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(3, int(target_s / once))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def round_robin(fns: dict, repeats: int, target_s: float) -> dict[str, float]:
    runs = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            runs[k].append(_timeit(f, target_s))
    return {k: statistics.median(v) for k, v in runs.items()}


def quantile_codebook(W: torch.Tensor, bits: int, axis: str = "column") -> QuantizedWeight:
    """Per-input-column (or per-output-row) codebook of the 2^b quantile midpoints, nearest-entry codes
    (a speed stand-in for CLAQ / SqueezeLLM: same storage and kernels)."""
    K = 2**bits
    Wv = W.float().T if axis == "column" else W.float()  # one vector per table
    qs = torch.quantile(Wv, (torch.arange(K) + 0.5) / K, dim=1).T  # [n_vec, K]
    grid = make_codebook_grid(axis, torch.full((Wv.shape[0],), bits, dtype=torch.uint8), qs, 16)
    lut16 = grid.codebook.float()  # [n_vec, K]
    codes = torch.empty(Wv.shape, dtype=torch.uint8)
    for c0 in range(0, Wv.shape[1], 512):  # chunked: [n_vec, 512, K] distances
        d = (Wv[:, c0:c0 + 512, None] - lut16[:, None]).abs()
        codes[:, c0:c0 + 512] = d.argmin(-1).to(torch.uint8)
    return QuantizedWeight(tuple(W.shape), torch.float32, grid, codes.T.contiguous() if axis == "column" else codes)


def _nb(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def layer_bench(d_in: int, d_out: int, repeats: int, target_s: float, rank: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d_out, d_in, generator=g) * 0.02
    Wb = W.bfloat16()
    q4 = quantize_weight(W, None, parse_method_config({"method": "rtn", "bits": 4, "group_size": 128}))
    q8 = quantize_weight(W, None, parse_method_config({"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True}))
    p4, p8 = cpu.prepare_int4(q4), cpu.prepare_int8(q8)
    A = (torch.randn(d_in, rank, generator=g) * 0.01).bfloat16()
    B = (torch.randn(rank, d_out, generator=g) * 0.01).bfloat16()
    qc = quantile_codebook(W, 3)
    pl, pt = lut.prepare_lut(qc), lut.prepare_lut(qc, native=False)
    pr = lut.prepare_lut(quantile_codebook(W, 4, "row"))
    from lowbit.formats.additive import AdditiveGrid

    aq = AdditiveGrid(2, 8, 8, (0.02 * torch.randn(2, 256, 8, generator=g)).half(), torch.ones(d_out).half())
    pa = lut.prepare_lut(QuantizedWeight((d_out, d_in), torch.float32, aq,
                                         torch.randint(0, 256, (d_out, d_in // 8, 2), generator=g, dtype=torch.uint8)))
    assert pl.table16 is not None and pr.table16 is not None, "the native LUT kernel did not build"
    mem = {"fp32": _nb(W), "bf16": _nb(Wb), "int8": p8.nbytes(), "int4 g128": p4.nbytes(),
           f"int4 g128 + rank-{rank}": p4.nbytes() + _nb(A, B), "LUT 3-bit col": pl.nbytes(),
           "LUT 3-bit col (torch)": pt.nbytes(), "LUT 4-bit row": pr.nbytes(),
           "AQLM 2x8 g8": pa.codes.numel() + pa.table16.numel() * 4 + pa.scale.numel() * 4}
    rows = []
    for batch in (1, 16):
        x = torch.randn(batch, d_in, generator=g)
        xb = x.bfloat16()
        fns = {"fp32": lambda: torch.nn.functional.linear(x, W),
               "bf16": lambda: torch.nn.functional.linear(xb, Wb),
               "int8": lambda: cpu.int8_mm(xb, p8),
               "int4 g128": lambda: cpu.int4_mm(xb, p4),
               f"int4 g128 + rank-{rank}": lambda: cpu.int4_mm(xb, p4) + (xb @ A) @ B,
               "LUT 3-bit col": lambda: lut.lut_mm(xb, pl),
               "LUT 3-bit col (torch)": lambda: lut.lut_mm(xb, pt),
               "LUT 4-bit row": lambda: lut.lut_mm(xb, pr),
               "AQLM 2x8 g8": lambda: lut.lut_mm(xb, pa)}
        med = round_robin(fns, repeats, target_s)
        for k, t in med.items():
            rows.append({"part": "layer", "shape": f"{d_in}→{d_out}", "batch": batch, "variant": k,
                         "ms": t * 1e3, "vs fp32": med["fp32"] / t, "vs int4": t / med["int4 g128"],
                         "decode tok/s": 1 / t if batch == 1 else None, "MB": mem[k] / 2**20})
        print(f"{d_in}→{d_out} batch {batch}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items()), flush=True)
    return rows


# ------------------------------------------------------------------------------------------ model


def _dir_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in Path(p).glob("*.safetensors")) / 2**20


def model_bench(path: Path, repeats: int, new_tokens: int, rank: int = 32) -> list[dict]:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.io.native import plain_state, save_quantized
    from lowbit.nn.quant_linear import set_backend
    from lowbit.inference.generate import generate, weight_bytes
    from lowbit.models.swap import swap_in
    from lowbit.pipeline.calibrate import quantize_model

    tok = AutoTokenizer.from_pretrained(str(path))

    def fresh(dtype=torch.float32):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()

    def quantized(cfg: dict | None):
        m = fresh()
        if cfg is None:  # per-column quantile codebooks on every block linear
            names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in f".{n}."]
            qweights = {n: quantile_codebook(m.get_submodule(n).weight.detach(), 3) for n in names}
            swap_in(m, qweights)
        else:  # quantize_model swaps QuantLinears in
            qweights = quantize_model(m, cfg, None, progress=False).qweights
        return m, qweights

    tmp = Path(tempfile.mkdtemp(prefix="lowbit-inference-bench-"))
    models, disk = {}, {}
    m32 = fresh()
    save_file({k: v.contiguous() for k, v in plain_state(m32, set()).items()}, str(tmp / "fp32.safetensors"))
    models["fp32"], disk["fp32"] = m32, (tmp / "fp32.safetensors").stat().st_size / 2**20
    mb = fresh(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in plain_state(mb, set()).items()}, str(tmp / "bf16.safetensors"))
    models["bf16"], disk["bf16"] = mb, (tmp / "bf16.safetensors").stat().st_size / 2**20
    c = m32.config
    gs = next(k for k in (128, 64, 32) if c.hidden_size % k == 0 and c.intermediate_size % k == 0)
    specs = {"int8": {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": True},
             "int4 g128": {"method": "rtn", "bits": 4, "group_size": gs},
             f"int4 g128 + rank-{rank}": {"method": "rtn", "bits": 4, "group_size": gs,
                                          "lqer": {"rank": rank, "scale": "none"}},
             "LUT 3-bit": None}
    bpw = {}
    for name, cfg in specs.items():
        m, qweights = quantized(cfg)
        bpw[name] = sum(sum(q.storage().values()) for q in qweights.values()) / sum(q.shape[0] * q.shape[1] for q in qweights.values())
        out = save_quantized(m, qweights, tmp / name.replace(" ", "_"), recipe=cfg or {"method": "codebook"})
        disk[name] = _dir_mb(out)
        m.to(torch.bfloat16)
        set_backend(m, "kernel")
        models[name] = m
    runs = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            runs[k].append(generate(m, tok, PROMPT, new_tokens)["decode_tokens_per_s"])
    rows = []
    base = statistics.median(runs["fp32"])
    for k, m in models.items():
        wb = weight_bytes(m)
        tps = statistics.median(runs[k])
        rows.append({"part": "model", "shape": path.name, "batch": 1, "variant": k, "decode tok/s": tps,
                     "vs fp32": tps / base, "MB": (wb["plain"] + wb["kernel_operands"]) / 2**20,
                     "codes MB (kept)": wb["quantized_records"] / 2**20, "disk MB": disk[k],
                     "bits/weight": bpw.get(k, 32.0 if k == "fp32" else 16.0)})
        print(f"model {k}: {tps:.1f} tok/s", flush=True)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None, help="round-robin rounds (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None, help="default: the reference model, when built")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    repeats = a.repeats or (3 if a.quick else 7)
    target = 0.05 if a.quick else 0.15
    rows = []
    for d_in, d_out in (QUICK if a.quick else FULL):
        rows += layer_bench(d_in, d_out, repeats, target)
    model = a.model
    if model is None:
        from lowbit.reference import reference_path

        model = Path(reference_path())
    if (model / "config.json").is_file():
        rows += model_bench(model, repeats, a.new_tokens)
    else:
        print(f"no model at {model}: model part skipped")
    stem = "inference_quick" if a.quick else "inference"
    note = (f"`python bench/inference.py{' --quick' if a.quick else ''} --threads {a.threads}` on "
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared with other jobs; "
            f"load average at the end {os.getloadavg()[0]:.1f}), torch {torch.__version__}, {a.threads} thread(s). "
            f"Medians of {repeats} round-robin rounds (all variants back to back per round). Quantized variants run "
            "bf16 activations. 'vs fp32' = fp32 time / variant time (model rows: tok/s ratio); 'vs int4' = variant "
            "time / int4 time. MB = weights (or packed operands) the GEMM reads; model rows: unquantized tensors + "
            "kernel operands, with lowbit's kept uint8 codes listed apart.")
    write_results(rows, a.out, stem, columns=["part", "shape", "batch", "variant", "ms", "vs fp32", "vs int4",
                                              "decode tok/s", "MB", "codes MB (kept)", "disk MB", "bits/weight"],
                  note=note, provenance=provenance(model) if model is not None else provenance())
    print(f"wrote {a.out / stem}.json/.md")


if __name__ == "__main__":
    main()
