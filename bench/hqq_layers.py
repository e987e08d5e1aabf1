"""Why HQQ loses to RTN end to end at 3 bits on the reference model: per-layer errors of both.

    python bench/hqq_layers.py [--bits 3] [--group-size 64] [--windows 4]

For every quantized linear: the weight error (l_0.7 and l2, what HQQ minimises) and the relative output
error ‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖ on C4 calibration windows (what the model feels), for RTN and HQQ on the same
grid. Writes bench/results/full/hqq-layers.json with its provenance.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lowbit import data
from lowbit.eval.protocol import provenance
from lowbit.eval.report import write_results
from lowbit.io.native import load_model
from lowbit.methods import parse_method_config
from lowbit.pipeline.calibrate import quantize_model
from lowbit.reference import build_reference

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args()
    ref = build_reference()
    per = {}
    for meth in ("rtn", "hqq"):
        model, tok = load_model(str(ref))
        weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")
                   and m.weight is not None and m.weight.ndim == 2 and ".layers." in n}
        calib = data.calibration_windows(tok, data.c4_split("calib"), a.windows, 512, 0)
        cfg = parse_method_config({"method": meth, "bits": a.bits, "group_size": a.group_size})
        res = quantize_model(model, cfg, calib, progress=False, measure_error=True)
        for r in res.records:
            D = (weights[r.name] - res.qweights[r.name].dequantize()).abs()
            per.setdefault(r.name, {})[meth] = {"rel_output_error": r.rel_error, "l07": float(D.pow(0.7).sum()),
                                                "l2": float(D.pow(2).sum())}
    rows = [{"layer": n, **{f"{m}_{k}": v for m, d in p.items() for k, v in d.items()}} for n, p in per.items()]
    ratio = [r["hqq_rel_output_error"] / r["rtn_rel_output_error"] for r in rows]
    worse = [r["layer"] for r, x in zip(rows, ratio) if x > 1.2]
    note = (f"{a.bits}-bit, group {a.group_size}, output errors on {a.windows} × 512-token C4 calibration windows. "
            f"HQQ / RTN: l_0.7 weight error {sum(r['hqq_l07'] for r in rows) / sum(r['rtn_l07'] for r in rows):.3f}, "
            f"l2 {sum(r['hqq_l2'] for r in rows) / sum(r['rtn_l2'] for r in rows):.3f}, median relative output "
            f"error {statistics.median(ratio):.3f}; {len(worse)} of {len(rows)} layers have > 1.2× RTN's output "
            f"error: {', '.join(worse)}.")
    write_results(rows, Path(__file__).parent / "results" / "full",
                  "hqq-layers", note=note, provenance=provenance(ref))
    print(note)
