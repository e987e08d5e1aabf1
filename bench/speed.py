"""Speed of `gptq_quantize` and `rtn_quantize` on LLaMA-7B layer shapes, written to
bench/results/speed.{json,md}.

    python bench/speed.py            # q_proj 4096→4096, up/gate 4096→11008, down 11008→4096
    python bench/speed.py --quick    # 1024→1024, 1024→2816, 2816→1024 (≈ same aspect ratios)

Settings: 4 bits, asymmetric, group 128, act-order on (dynamic groups), blocks of 128, float32, the
torch default thread count. Hessian: H = 2·XᵀX/N of random correlated inputs with per-channel scales,
built as a rank-512 term plus a diagonal so that down_proj's 11008² Hessian costs seconds, not minutes.
Times are the median of --repeats runs (1 run for the slowest shape, down_proj, unless --repeats-slow).
A separate pass times the GPTQ stages (Hessian preparation, the three factorizations, the column sweep,
and inside the sweep the lazy-block GEMMs alone) to say where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lowbit.methods.column_grids import UniformColumnGrid
from lowbit.methods.config import GPTQConfig, RTNConfig
from lowbit.methods.gptq import gptq_quantize, gptq_sweep, inverse_cholesky_upper, prepare_hessian
from lowbit.methods.rtn import rtn_quantize

RESULTS = Path(__file__).parent / "results"

# (name, in_features, out_features); weight is [out, in]
FULL = [("q_proj", 4096, 4096), ("up_proj/gate_proj", 4096, 11008), ("down_proj", 11008, 4096)]
QUICK = [("q_proj/4", 1024, 1024), ("up_proj/4", 1024, 2816), ("down_proj/4", 2816, 1024)]  # 2816 = 22·128

# Written down BEFORE the first full run (2 shared AMD EPYC cores, AVX2; a 4096³ fp32 GEMM ran at
# ~130 GFLOP/s, Cholesky-type factorizations at ~80–100 GFLOP/s):
#   factorizations  chol(H) + cholesky_inverse + chol(H⁻¹) ≈ (1/3 + 1 + 1/3)·in³ flop
#   lazy-block GEMMs W[:, i2:] −= Err·U[blk, i2:]  ≈ out·in² flop (thin [out×128]·[128×rest], ~80 GFLOP/s)
#   inner column loop: in columns × (~12 small torch calls ≈ 0.2 ms + a rank-1 update of out×≤128
#     floats, memory-bound ≈ out·64·8 B at ~10 GB/s)
#   q_proj   : 1.3 s + 0.9 s + 4096·0.4 ms = 1.6 s, + ~0.2 s permutations → ≈ 4 s
#   up/gate  : 1.3 s + 2.3 s + 4096·0.75 ms = 3.1 s                     → ≈ 7 s
#   down_proj: 25 s  + 6 s   + 11008·0.4 ms = 4.4 s, + ~1 s for 485 MB H copies → ≈ 37 s
#   RTN      : ~10 elementwise passes over out·in floats → q 0.15 s, up/gate 0.4 s, down 0.4 s
PREDICTED_S = {
    "q_proj": {"gptq": 4.0, "rtn": 0.15},
    "up_proj/gate_proj": {"gptq": 7.0, "rtn": 0.4},
    "down_proj": {"gptq": 37.0, "rtn": 0.4},
}


def make_problem(d_in: int, d_out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) * 0.02
    r = 512
    chan = torch.exp(0.5 * torch.randn(d_in, generator=g))
    A = torch.randn(d_in, r, generator=g) * chan[:, None] / r**0.5
    H = 2 * (A @ A.T + torch.diag(0.1 * chan**2))  # = 2·XᵀX/N for X with a rank-512 + diagonal covariance
    return W, H


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def gptq_breakdown(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig) -> dict[str, float]:
    """Stage times of one GPTQ run, replicating gptq_quantize's body step by step."""
    out = {}
    t0 = time.perf_counter()
    Wf, Hp, perm = prepare_hessian(W, H, cfg.act_order, cfg.damp_percent)
    t1 = time.perf_counter()
    U = inverse_cholesky_upper(Hp)
    t2 = time.perf_counter()
    grid = UniformColumnGrid(Wf[:, torch.argsort(perm)], cfg.bits, cfg.symmetric, cfg.group_size,
                             cfg.static_groups, perm)
    t3 = time.perf_counter()
    gptq_sweep(Wf, U, grid, cfg.block_size)
    t4 = time.perf_counter()
    # the lazy-block GEMMs alone, same shapes as inside the sweep
    rows, cols = W.shape
    B = cfg.block_size
    Wt = torch.randn(rows, cols)
    Err = torch.randn(B, rows)  # the sweep keeps a block's errors transposed, [B, out]
    t5 = time.perf_counter()
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        if i2 < cols:
            Wt[:, i2:].addmm_(Err[: i2 - i1].T, U[i1:i2, i2:], alpha=-1)
    t6 = time.perf_counter()
    out.update(prepare_s=t1 - t0, factorizations_s=t2 - t1, grid_init_s=t3 - t2, sweep_s=t4 - t3,
               sweep_block_gemms_s=t6 - t5, sweep_column_loop_s=(t4 - t3) - (t6 - t5))
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    t0 = time.perf_counter()
    a @ b
    gemm = 2 * 4096**3 / (time.perf_counter() - t0) / 1e9
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "gemm_4096_fp32_gflops": round(gemm, 1),
            "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)


def render_md(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# GPTQ / RTN speed on LLaMA-7B layer shapes",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} threads, Python {m['python']}; fp32 4096³ GEMM {m['gemm_4096_fp32_gflops']} "
        f"GFLOP/s at start; load average at start {m['load_avg_at_start']}.",
        "**The CPU is shared with other engineers' jobs, so timings are noisy** (see the per-repeat times).",
        "",
        f"Settings: {res['settings']}.",
        "",
        "| layer (in → out) | GPTQ s (median) | GPTQ predicted s | GPTQ repeats | RTN s (median) | RTN predicted s |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["layers"]:
        p = r.get("predicted_s") or {}
        lines.append(
            f"| {r['name']} ({r['in']} → {r['out']}) | {r['gptq_s']:.2f} | {p.get('gptq', '–')} | "
            f"{', '.join(f'{t:.2f}' for t in r['gptq_runs_s'])} | {r['rtn_s']:.3f} | {p.get('rtn', '–')} |"
        )
    lines += [
        "",
        "Where GPTQ's time goes (one separate run per shape):",
        "",
        "| layer | prepare (dead fix, perm, damp) | 3 factorizations | column sweep | of which block GEMMs | of which per-column loop |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["layers"]:
        b = r["gptq_breakdown_s"]
        lines.append(
            f"| {r['name']} | {b['prepare_s']:.2f} | {b['factorizations_s']:.2f} | {b['sweep_s']:.2f} | "
            f"{b['sweep_block_gemms_s']:.2f} | {b['sweep_column_loop_s']:.2f} |"
        )
    lines += ["", "Prediction model (written before the run):", "", "```", PREDICTION_NOTE.strip(), "```", ""]
    if res.get("notes"):
        lines += ["Notes:", ""] + [f"* {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


PREDICTION_NOTE = """
factorizations  chol(H) + cholesky_inverse + chol(H⁻¹) ≈ (1/3 + 1 + 1/3)·in³ flop at ~80–100 GFLOP/s
lazy-block GEMMs W[:, i2:] −= Err·U[blk, i2:] ≈ out·in² flop at ~80 GFLOP/s (thin 128-wide GEMMs)
per-column loop  in × (~12 small torch calls ≈ 0.2 ms + rank-1 update of out×≤128 floats, memory-bound)
q_proj    ≈ 1.3 + 0.9 + 1.6 + 0.2            ≈ 4 s
up/gate   ≈ 1.3 + 2.3 + 3.1                  ≈ 7 s
down_proj ≈ 25 + 6 + 4.4 + 1 (485 MB H copies) ≈ 37 s
RTN       ≈ 10 elementwise passes over out·in floats: 0.15 / 0.4 / 0.4 s
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quarter-size shapes (seconds, not minutes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-slow", type=int, default=1, help="repeats for down_proj (the slowest)")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", action="append", default=[], help="free-text note for the markdown")
    ap.add_argument("--rerender", action="store_true",
                    help="no timing: re-read the JSON, append --note lines, rewrite JSON and markdown")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    if a.rerender:
        stem = "speed_quick" if a.quick else "speed"
        res = json.loads((a.out / f"{stem}.json").read_text())
        res["notes"] = res.get("notes", []) + list(a.note)
        atomic_write(a.out / f"{stem}.json", json.dumps(res, indent=2) + "\n")
        atomic_write(a.out / f"{stem}.md", render_md(res))
        print(f"re-rendered {a.out / stem}.md")
        return

    shapes = QUICK if a.quick else FULL
    gcfg = GPTQConfig(bits=4, group_size=128, symmetric=False, act_order=True, block_size=128,
                      static_groups=False)
    rcfg = RTNConfig(bits=4, group_size=128, symmetric=False)
    res = {"machine": machine(), "quick": a.quick,
           "settings": "4-bit asymmetric, group 128, act-order (dynamic groups, g_idx), block 128, damp 0.01, "
                       "float32 arithmetic; weight [out, in] fp32",
           "layers": [], "notes": list(a.note)}
    stem = "speed_quick" if a.quick else "speed"
    for name, d_in, d_out in shapes:
        W, H = make_problem(d_in, d_out)
        slow = d_in > d_out
        reps = a.repeats_slow if slow else a.repeats
        gptq_s, gptq_runs = timed(lambda: gptq_quantize(W, H, gcfg), reps)
        rtn_s, rtn_runs = timed(lambda: rtn_quantize(W, rcfg), max(3, reps))
        row = {"name": name, "in": d_in, "out": d_out, "gptq_s": gptq_s, "gptq_runs_s": gptq_runs,
               "rtn_s": rtn_s, "rtn_runs_s": rtn_runs, "predicted_s": PREDICTED_S.get(name)}
        if not a.no_breakdown:
            row["gptq_breakdown_s"] = gptq_breakdown(W, H, gcfg)
        res["layers"].append(row)
        print(f"{name:>20} in={d_in} out={d_out}: GPTQ {gptq_s:.2f} s {['%.2f' % t for t in gptq_runs]}, "
              f"RTN {rtn_s:.3f} s", flush=True)
        del W, H
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    from lowbit.eval.protocol import provenance

    res["provenance"] = provenance()
    atomic_write(a.out / f"{stem}.json", json.dumps(res, indent=2) + "\n")
    if not a.no_breakdown:
        atomic_write(a.out / f"{stem}.md", render_md(res))
    print(f"wrote {a.out / stem}.json/.md")


if __name__ == "__main__":
    main()
