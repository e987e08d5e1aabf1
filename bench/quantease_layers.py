"""QuantEase against GPTQ layer by layer on the reference model: the layer objective f(Ŵ) = tr((W−Ŵ)H(W−Ŵ)ᵀ)
that both minimise, on the same grid and the same Hessian.

    python bench/quantease_layers.py [--bits 3] [--group-size 128] [--windows 32] [--blocks 0 10 20 29]

H = (2/N)·Σxxᵀ of every linear of the chosen blocks, from the float model on C4 calibration windows (all
layers see float inputs, so every solver gets the same H). Per layer: f of RTN, GPTQ (static groups,
act-order, the ptq suite's setting), QuantEase from W (the paper's start, 30 sweeps, with and without the
authors' relaxed sweeps) and QuantEase from GPTQ's solution, each divided by GPTQ's. Writes
bench/results/full/quantease-layers.json / .md with provenance.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from lowbit import data
from lowbit.eval.protocol import provenance
from lowbit.eval.report import write_results
from lowbit.io.native import load_model
from lowbit.methods import parse_method_config, quantize_weight
from lowbit.methods.stats import LayerStats, output_error
from lowbit.pipeline.collect import collect_stats
from lowbit.reference import build_reference

SOLVERS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "quantease": {"method": "quantease"},
    "quantease_norelax": {"method": "quantease", "relax": False},
    "quantease_from_gptq": {"method": "quantease", "init": "gptq"},
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    a = ap.parse_args()
    ref = build_reference()
    model, tok = load_model(str(ref))
    calib = data.calibration_windows(tok, data.c4_split("calib"), a.windows, 512, 0)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and any(f".layers.{b}." in n for b in a.blocks)]
    stats = collect_stats(model, names, calib)
    rows, seconds = [], {s: 0.0 for s in SOLVERS}
    for n in names:
        W = model.get_submodule(n).weight.detach().float()
        H = stats[n].hessian
        row = {"layer": n}
        for s, d in SOLVERS.items():
            cfg = parse_method_config({**d, "bits": a.bits, "group_size": a.group_size})
            t0 = time.perf_counter()
            qw = quantize_weight(W, LayerStats(hessian=H, nsamples=stats[n].nsamples), cfg)
            seconds[s] += time.perf_counter() - t0
            row[s] = float(output_error((W - qw.dequantize()).double(), H.double()))
        for s in SOLVERS:
            if s != "gptq":
                row[f"{s}/gptq"] = row[s] / row["gptq"]
        rows.append(row)
        print(n, {k: round(v, 4) for k, v in row.items() if "/" in k}, flush=True)

    def gmean(k):
        return math.exp(statistics.fmean(math.log(r[k]) for r in rows))

    parts = [f"{s}: geometric mean {gmean(f'{s}/gptq'):.3f}, below GPTQ on "
             f"{sum(r[f'{s}/gptq'] < 1 for r in rows)}/{len(rows)} layers, {seconds[s]:.0f} s"
             for s in SOLVERS if s != "gptq"]
    note = (f"{a.bits}-bit, group {a.group_size}, layers of blocks {a.blocks}; H from the float model on "
            f"{a.windows} × 512-token C4 calibration windows; f(Ŵ) = tr((W−Ŵ)H(W−Ŵ)ᵀ) per solver over GPTQ's "
            f"(gptq {seconds['gptq']:.0f} s). " + "; ".join(parts) + ".")
    cols = ["layer"] + [f"{s}/gptq" for s in SOLVERS if s != "gptq"]
    write_results(rows, Path(__file__).parent / "results" / "full", "quantease-layers", columns=cols, note=note,
                  provenance=provenance(ref, windows=f"c4 calibration {a.windows}x512 seed 0", blocks=a.blocks))
    print(note)
