"""Where the time of a GPTQ run on the reference model goes, and what the block runner changed.

    python bench/calib_speed.py [--windows 128] [--label after] [--checkout DIR --label before]
    python bench/calib_speed.py --compare before after     # same result? (codes, Hessians, KL)

One `lowbit quantize REF --method gptq --bits 4 --group-size 64 --calib-samples N --calib-seqlen 512`
per call, timed (wall clock of the whole command, the quantize phase lowbit reports, peak RSS), run
from this checkout or, with --checkout, from another one (an older lowbit: `git worktree add DIR REV`)
with this checkout's virtual environment. Each labelled run is kept in
bench/results/calib-speed.json with its provenance; the output model stays in /tmp for --compare.

--compare A B measures how far two runs' results are apart: the share of differing codes and the
relative difference of the dequantized weights, against the same measure for one lowbit run with 1 and
2 threads (the size of a pure float-rounding change: GPTQ amplifies any rounding of H into code flips
that feed forward), and the KL / perplexity of both outputs under the full protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "calib-speed.json"
PY = str(ROOT / ".venv" / "bin" / "python")


def _load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}, "compare": {}}


def _save(d: dict) -> None:
    from lowbit.io.atomic import atomic_write_text

    atomic_write_text(RESULTS, json.dumps(d, indent=2) + "\n")


def run(label: str, windows: int, checkout: Path, threads: int | None = None) -> dict:
    from lowbit.eval.protocol import provenance
    from lowbit.reference import build_reference

    ref = build_reference()
    out = Path(f"/tmp/lowbit-calib-speed-{label}")
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    if checkout != ROOT:  # an older checkout reads plain corpus files only (no packaged copies)
        from lowbit.data import data_dir

        env.setdefault("LOWBIT_DATA", str(data_dir()))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [PY, "-m", "lowbit.cli", "quantize", str(ref), "-o", str(out), "--method", "gptq", "--bits", "4",
           "--group-size", "64", "--calib-samples", str(windows), "--calib-seqlen", "512", "--overwrite", "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", *cmd], env=env, cwd=checkout,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{label} failed:\n{p.stderr[-2000:]}")
    summary = json.loads((out / "lowbit.json").read_text())["summary"]
    rss = int(re.search(r"maxrss_kb (\d+)", p.stderr).group(1))
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = {"label": label, "windows": windows, "seqlen": 512, "wall_seconds": round(wall, 1),
           "quantize_seconds": round(summary["quantize_seconds"], 1), "peak_rss_mb": round(rss / 1024),
           "threads": threads or "default", "code_commit": commit, "output": str(out),
           "provenance": provenance(ref)}
    d = _load()
    d["runs"][label] = row
    _save(d)
    print(json.dumps({k: v for k, v in row.items() if k != "provenance"}))
    return row


def compare(a: str, b: str, control: tuple[str, str] | None) -> None:
    import torch

    from lowbit.eval.protocol import get_protocol
    from lowbit.io.native import load_quantized
    from lowbit.jobs import eval_job
    from lowbit.reference import build_reference

    d = _load()

    def diff(x: str, y: str) -> dict:
        _, qa, _ = load_quantized(d["runs"][x]["output"])
        _, qb, _ = load_quantized(d["runs"][y]["output"])
        n = flips = 0
        rel = []
        for k in qa:
            flips += int((qa[k].codes != qb[k].codes).sum())
            n += qa[k].codes.numel()
            wa, wb = qa[k].dequantize(), qb[k].dequantize()
            rel.append(float((wa - wb).norm() / wa.norm()))
        return {"codes_differing": flips / n, "weight_rel_diff_median": sorted(rel)[len(rel) // 2],
                "weight_rel_diff_max": max(rel)}

    res = {"pair": [a, b], **diff(a, b)}
    if control:
        res["control"] = {"pair": list(control), **diff(*control)}
    ref = str(build_reference())
    proto = get_protocol("full")
    for lab in (a, b):
        ev = eval_job(d["runs"][lab]["output"], base=ref, protocol=proto, progress=False)
        res[f"eval_{lab}"] = {k: ev[k] for k in ("ppl", "kl", "top1_agreement", "n_windows", "seqlen")}
    d["compare"][f"{a}-vs-{b}"] = res
    _save(d)
    print(json.dumps(res, indent=1))
    del torch


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--label", default="after")
    ap.add_argument("--checkout", type=Path, default=ROOT)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    ap.add_argument("--control", nargs=2, metavar=("X", "Y"), help="a pair differing only by float rounding")
    a = ap.parse_args()
    if a.compare:
        compare(*a.compare, tuple(a.control) if a.control else None)
    else:
        run(a.label, a.windows, a.checkout.resolve(), a.threads)
