"""`make demo` / `lowbit demo`: the reference model through RTN and GPTQ at 4 and 3 bits, evaluated.

Each quantization runs as its own `lowbit quantize` process, so its peak memory is its own and the demo
exercises exactly the command a user runs; evaluation then happens in this process with the base model
loaded once (perplexity on every window, KL on the first `kl_windows`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from lowbit.errors import LowbitError

console = Console()

RUNS = [("rtn", 4), ("gptq", 4), ("rtn", 3), ("gptq", 3)]
COLUMNS = ["method", "bits", "group_size", "bits_per_weight", "ppl", "kl", "top1_agreement",
           "quantize_seconds", "peak_memory_mb"]


def group_size_for(model, preferred: int = 128) -> int:
    """`preferred` when it divides the input dim of every linear in the decoder blocks, else per channel."""
    import torch

    ins = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    return preferred if all(i % preferred == 0 for i in ins) else -1


def run_demo(results: Path, *, data: str | None = None, max_windows: int | None = None, kl_windows: int = 128,
             runs=RUNS, stem: str = "demo") -> list[dict]:
    from lowbit.eval.report import results_table, write_results
    from lowbit.io.native import load_model
    from lowbit.jobs import eval_job
    from lowbit.reference import build_reference

    ref = build_reference()
    base_model, tokenizer = load_model(str(ref))
    gs = group_size_for(base_model)
    console.print(f"reference model: {ref} (group size {gs})")
    rows = []
    base = eval_job(str(ref), model=base_model, tokenizer=tokenizer, data=data, max_windows=max_windows, progress=True)
    rows.append({"method": "fp32", "bits": 32, "group_size": None, "bits_per_weight": 32.0, "ppl": base["ppl"],
                 "kl": 0.0, "top1_agreement": 1.0, "quantize_seconds": 0.0, "peak_memory_mb": None})
    models_dir = results / "models"
    for method, bits in runs:
        out = models_dir / f"{method}-w{bits}g{gs}"
        cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(ref), "-o", str(out), "--method", method,
               "--bits", str(bits), "--group-size", str(gs), "--overwrite"]
        if data:
            cmd += ["--data", data]
        console.rule(f"{method} {bits}-bit")
        if subprocess.run(cmd).returncode != 0:
            raise LowbitError(f"quantization failed: {' '.join(cmd)}")
        summary = json.loads((out / "lowbit.json").read_text())["summary"]
        qmodel, _ = load_model(str(out))
        ev = eval_job(str(out), model=qmodel, tokenizer=tokenizer, base_model=base_model, data=data,
                      max_windows=max_windows, kl_windows=kl_windows, progress=True)
        rows.append({"method": method, "bits": bits, "group_size": gs, **{k: summary[k] for k in (
            "bits_per_weight", "quantize_seconds", "peak_memory_mb")},
            "ppl": ev["ppl"], "kl": ev["kl"], "top1_agreement": ev["top1_agreement"]})
        del qmodel
    protocol = (f"WikiText-2 raw test, GPTQ protocol, seqlen {base['seqlen']}, {base['n_windows']} windows "
                f"({base['n_tokens']} tokens); KL(fp32 ‖ quantized) on the first {min(kl_windows, base['n_windows'])} "
                f"windows; bits per weight count codes, scales, zeros and g_idx of the quantized linears; "
                f"calibration 128 × {base['seqlen']}-token windows of C4 documents not used for training.")
    md, _ = results_table(rows, COLUMNS)
    print(md)  # Markdown, not a rich table: readable in any terminal width and in CI logs
    print(protocol)
    write_results(rows, results, stem, note=protocol)
    return rows
