"""AWQ against RTN and GPTQ on the reference model, through the CLI as a user runs it.

For each (method, bits) at group size 128: `lowbit quantize REF -o DIR --method M --bits B --group-size 128`
(+ `--recipe` for AWQ's gptq base), then `lowbit eval DIR --max-windows 64 --kl-windows 32 --json`.
Writes bench/results/awq.{md,json}. Timings are wall-clock on a shared 2-core machine (contention).

    .venv/bin/python bench/awq.py [--bits 3 4] [--work /tmp/awq_bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWBIT = str(ROOT / ".venv" / "bin" / "lowbit")

METHODS = {  # name -> extra quantize arguments (a recipe file for AWQ's gptq base)
    "rtn": ["--method", "rtn"],
    "awq (rtn + clip)": ["--method", "awq"],
    "gptq": ["--method", "gptq"],
    "awq (gptq)": ["--recipe", "{recipe}"],
}


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--work", type=Path, default=Path("/tmp/awq_bench"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--stem", default="awq")
    args = ap.parse_args()
    ref = run([LOWBIT, "reference", "path"]).strip()
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.work / "awq_gptq.yaml"
    recipe.write_text("quant: {method: awq, base: gptq}\n")
    rows = []
    for bits in args.bits:
        for name in args.methods:
            out = args.work / f"{name.replace(' ', '_').replace('(', '').replace(')', '').replace('+', '')}-w{bits}"
            extra = [a.format(recipe=recipe) for a in METHODS[name]]
            t0 = time.perf_counter()
            run([LOWBIT, "quantize", ref, "-o", str(out), *extra, "--bits", str(bits), "--group-size", "128",
                 "--quiet", "--overwrite"])
            wall = time.perf_counter() - t0
            summary = json.loads((out / "lowbit.json").read_text())["summary"]
            ev = json.loads(run([LOWBIT, "eval", str(out), "--max-windows", "64", "--kl-windows", "32", "--json"]))
            row = {"method": name, "bits": bits, "group": 128, "bits/weight": summary["bits_per_weight"],
                   "ppl": ev.get("perplexity", ev.get("ppl")), "KL": ev.get("kl", ev.get("kl_divergence")),
                   "quantize s": summary["quantize_seconds"], "wall s": wall}
            rows.append(row)
            print(json.dumps(row), flush=True)
    from lowbit.eval.report import write_results

    write_results(rows, ROOT / "bench" / "results", args.stem,
                  note="Reference model (5.5M LLaMA), WikiText-2 test, `lowbit eval --max-windows 64 --kl-windows 32`; "
                       "calibration: the CLI default (128 C4 windows × 256 tokens). bits/weight counts every stored "
                       "bit (codes, scales, zeros, AWQ's fp16 in_scale). Times on a shared 2-core machine under "
                       "heavy contention from other jobs: compare only roughly.")


if __name__ == "__main__":
    main()
