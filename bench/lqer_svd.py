"""Randomized against full SVD for LQER's factors: seconds and how much of the optimum the fast one keeps.

    python bench/lqer_svd.py [--quick]      # 4096×11008 (LLaMA-7B's MLP), or 1024×2816 with --quick

Writes bench/results/lqer-svd.json with the provenance of the run. (LQER's quality tables are the `lqer`
suite of bench/suite.py.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def svd_note(s: dict) -> str:
    return (f"SVD of a {s['shape'][0]}×{s['shape'][1]} error matrix (MXINT4 block 16 error of a Gaussian weight, "
            f"L²QER scale with log-normal channel magnitudes), rank {s['rank']}, float64: full "
            f"{s['full_seconds']:.1f} s, randomized (oversample {s['oversample']}, {s['power_iters']} power iterations) "
            f"{s['rand_seconds']:.2f} s ({s['full_seconds'] / s['rand_seconds']:.0f}× faster); scaled residual "
            f"‖S(E−AB)‖_F randomized / full = {s['residual_ratio']:.6f}; captured scaled energy ‖S·AB‖²_F "
            f"randomized / full = {s['energy_ratio']:.4f}. Timings: 1 thread on a shared 2-core machine under "
            f"contention from other jobs, measured back to back in one process.")


def svd_part(out_f: int = 11008, in_f: int = 4096) -> dict:
    from lowbit.methods.config import LQERConfig, RTNConfig
    from lowbit.methods.lqer import error_factors
    from lowbit.methods.rtn import rtn_quantize
    from lowbit.methods.stats import LayerStats

    torch.set_num_threads(1)  # gentle on the shared machine; both solvers get the same single thread
    g = torch.Generator().manual_seed(0)
    k = 32
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    E = (W - rtn_quantize(W, RTNConfig(bits=4, format="mxint", block_size=16)).dequantize()).T.double()
    s = torch.exp(torch.randn(in_f, generator=g))
    st = LayerStats(act_mean_abs_max=s)
    res = {"shape": [in_f, out_f], "rank": k}
    sn = s.double().clamp(min=1e-4)
    sn = sn / torch.sqrt(sn.min() * sn.max())
    for mode in ("randomized", "full"):
        cfg = LQERConfig(rank=k, scale="act-mean", svd=mode)
        t0 = time.perf_counter()
        A, B = error_factors(E, st, cfg)
        res[f"{mode[:4]}_seconds"] = time.perf_counter() - t0
        res[f"{mode[:4]}_residual"] = float((sn[:, None] * (E - A @ B)).norm())
        res[f"{mode[:4]}_energy"] = float((sn[:, None] * (A @ B)).square().sum())
        res["oversample"], res["power_iters"] = cfg.oversample, cfg.power_iters
        print(mode, res, flush=True)
    res["residual_ratio"] = res["rand_residual"] / res["full_residual"]
    res["energy_ratio"] = res["rand_energy"] / res["full_energy"]
    return res



if __name__ == "__main__":
    from lowbit.eval.protocol import provenance
    from lowbit.io.atomic import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    res = svd_part(2816, 1024) if a.quick else svd_part()
    stem = "lqer-svd-quick" if a.quick else "lqer-svd"
    atomic_write_text(RESULTS / f"{stem}.json", json.dumps({"result": res, "note": svd_note(res),
                                                             "provenance": provenance()}, indent=1) + "\n")
    print(svd_note(res))
