"""Outlier reservation (OR) for GPTQ on the reference model: fractions, selection rules, and OR against
spending the same bits on a smaller group. Writes bench/results/outliers.{md,json}.

    python bench/outliers.py [--max-windows 64] [--kl-windows 32] [--calib-samples 32] [--only NAME ...]

Each run is `quantize_job` with the recipe below (what `lowbit quantize --method gptq --bits B
--group-size G --outliers F` runs, plus `outlier_rule`), then WikiText-2 test perplexity on the first
`max-windows` windows and KL(fp32 ‖ q) on the first `kl-windows`, with the fp32 model loaded once. Bits per
weight count everything stored over the quantized linears (codes, scales, zeros, outlier values and
positions). Finished runs are cached in WORK/rows/ so an interrupted bench resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WORK = Path(os.environ.get("LOWBIT_OR_WORK", "/tmp/lowbit-or-bench"))


def _run(bits: int, gs: int, f: float = 0.0, rule: str = "range") -> dict:
    return {"method": "gptq", "bits": bits, "group_size": gs, "outliers": f, "outlier_rule": rule}


RUNS: dict[str, dict] = {
    "w3g128": _run(3, 128),
    "w3g128-or1%-group-z": _run(3, 128, 0.01, "group-z"),
    "w3g128-or1%-magnitude": _run(3, 128, 0.01, "magnitude"),
    "w3g128-or1%-range": _run(3, 128, 0.01, "range"),
    "w2g64": _run(2, 64),
    "w2g64-or0.5%-group-z": _run(2, 64, 0.005, "group-z"),
    "w2g64-or0.5%-range": _run(2, 64, 0.005, "range"),
    "w3g128-or0.25%": _run(3, 128, 0.0025),
    "w3g128-or0.5%": _run(3, 128, 0.005),
    "w2g64-or0.25%": _run(2, 64, 0.0025),
    "w2g64-or1%": _run(2, 64, 0.01),
    # the same bits spent on smaller groups instead
    "w3g64": _run(3, 64),
    "w3g32": _run(3, 32),
    "w2g32": _run(2, 32),
}
COLUMNS = ["run", "bits_per_weight", "outlier_bits", "ppl", "kl", "top1_agreement", "quantize_seconds"]


def bits_breakdown(qweights) -> dict:
    n = sum(q.shape[0] * q.shape[1] for q in qweights.values())
    tot: dict[str, int] = {}
    for q in qweights.values():
        for k, v in q.storage().items():
            tot[k] = tot.get(k, 0) + v
    return {"bits_per_weight": sum(tot.values()) / n,
            "outlier_bits": (tot.get("outlier_values", 0) + tot.get("outlier_index", 0)) / n,
            "outlier_index_bits": tot.get("outlier_index", 0) / n,
            "storage": {k: v / n for k, v in tot.items()}}


def main(a) -> list[dict]:
    from lowbit.io.native import load_model, load_quantized
    from lowbit.jobs import eval_job, quantize_job
    from lowbit.recipe import make_recipe
    from lowbit.reference import reference_path

    ref = str(reference_path())
    rows_dir = WORK / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    base_model, tok = load_model(ref)
    model_id = Path(ref).name  # reference-<config hash>: rows of another reference model are never reused
    tag = f"{a.max_windows}-{a.kl_windows}-{a.calib_samples}"
    rows = []
    fp = rows_dir / f"{model_id}-fp32-{tag}.json"
    if not fp.exists():
        ev = eval_job(ref, model=base_model, tokenizer=tok, data=a.data, max_windows=a.max_windows, progress=False)
        fp.write_text(json.dumps({"run": "fp32", "bits_per_weight": 32.0, "outlier_bits": 0.0, "ppl": ev["ppl"],
                                  "kl": 0.0, "top1_agreement": 1.0}))
    rows.append(json.loads(fp.read_text()))
    for name, q in RUNS.items():
        if a.only and name not in a.only:
            continue
        f = rows_dir / f"{model_id}-{name}-{tag}.json"
        if f.exists():
            rows.append(json.loads(f.read_text()))
            continue
        out = WORK / "models" / model_id / name
        recipe = make_recipe({"quant": q, "calibration": {"n_samples": a.calib_samples}})
        t0 = time.perf_counter()
        quantize_job(ref, out, recipe, data=a.data, overwrite=True, progress=False)
        dt = time.perf_counter() - t0
        qmodel, qweights, _ = load_quantized(out)
        ev = eval_job(str(out), model=qmodel, tokenizer=tok, base_model=base_model, data=a.data,
                      max_windows=a.max_windows, kl_windows=a.kl_windows, progress=False)
        row = {"run": name, **bits_breakdown(qweights), "ppl": ev["ppl"], "kl": ev["kl"],
               "top1_agreement": ev["top1_agreement"], "quantize_seconds": dt, "quant": q}
        print({k: row[k] for k in COLUMNS}, flush=True)
        f.write_text(json.dumps(row, indent=1))
        rows.append(row)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--kl-windows", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    rows = main(a)
    from lowbit.eval.report import write_results

    note = (f"GPTQ (act-order, static groups, damp 0.01) on the reference model, {a.calib_samples} C4 calibration "
            f"windows; WikiText-2 test ppl on the first {a.max_windows} windows, KL(fp32 ‖ q) nats/token on the first "
            f"{a.kl_windows}. outlier_bits = fp16 values + positions (packed column index + per-row counts), "
            "included in bits_per_weight. Rule: outlier selection (default range). Timings on a shared 2-core "
            "machine under heavy load: not comparable.")
    write_results(rows, RESULTS, "outliers", COLUMNS, note)
