"""SpIEL against LoRA on the float reference model, at the same number of trainable parameters.

    python bench/sparse_ft.py [--steps 30] [--lr 1e-3] [--methods lora spiel]

The SpIEL paper's setting is fine-tuning an LLM on new text, so this bench adapts SmolLM2-135M-Instruct
to tiny-shakespeare (shipped with lowbit): every method trains on the first 95 % of the text with next-token
cross-entropy, the same steps, batch, learning rate, schedule and seed, and is scored on the held-out last
5 % (mean next-token loss on 16 windows of 256 tokens, before and after). LoRA: rank 4 on every decoder
linear, merged into float weights. SpIEL: a sparse Δ at the density whose trainable count equals LoRA r4's,
reselected every steps/4 steps (gradients accumulated over 2 steps). Each run is its own `lowbit finetune`
process with one torch thread; results go to bench/results/<profile>/sparse_ft.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["method", "trainable_params", "density", "steps", "tokens", "initial_eval_nll", "eval_nll",
           "eval_ppl", "train_seconds", "peak_memory_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["lora", "spiel"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--profile", default="quick", choices=["quick", "full"], help="where the results are filed")
    ap.add_argument("--work", default="/tmp/lowbit-bench-sparse-ft")
    a = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from qat import lora_density

    from lowbit.data import TINYSHAKESPEARE, corpus_text
    from lowbit.eval.protocol import get_protocol, model_key, provenance
    from lowbit.eval.report import results_table, write_results
    from lowbit.io.native import load_model
    from lowbit.reference import build_reference

    ref = str(build_reference())
    base, _ = load_model(ref)
    density = lora_density(base, a.rank)
    work = Path(a.work) / model_key(ref)
    work.mkdir(parents=True, exist_ok=True)
    text = work / "tinyshakespeare.txt"
    text.write_text(corpus_text(TINYSHAKESPEARE))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for method in a.methods:
        out = work / method
        cmd = [sys.executable, "-m", "lowbit.cli", "finetune", ref, "-o", str(out), "--method", method,
               "--rank", str(a.rank), "--steps", str(a.steps), "--lr", str(a.lr), "--batch-size", str(a.batch_size),
               "--seqlen", str(a.seqlen), "--loss", "ce", "--dataset", "text", "--data-file", str(text),
               "--eval-every", str(a.steps), "--eval-windows", "16", "--checkpoint-every", "0", "--threads", "1",
               "--overwrite", "--quiet"]
        if method == "spiel":
            cmd += ["--spiel-base", "fp", "--density", f"{density:.6f}", "--reselect-every", str(max(2, a.steps // 4)),
                    "--accumulate-steps", "2"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        s = json.loads((out / "lowbit.json").read_text())["summary"]
        rows.append({"method": method, "trainable_params": s["trainable_params"],
                     "density": density if method == "spiel" else None, "steps": a.steps,
                     "tokens": a.steps * a.batch_size * a.seqlen, "initial_eval_nll": s.get("initial_eval_nll"),
                     "eval_nll": s["eval_nll"], "eval_ppl": s["eval_ppl"], "train_seconds": s["train_seconds"],
                     "peak_memory_mb": s["peak_memory_mb"]})
        print(rows[-1], flush=True)
    note = (f"SmolLM2-135M-Instruct (float) adapted to tiny-shakespeare: {a.steps} steps of {a.batch_size}×{a.seqlen} "
            f"tokens, next-token cross-entropy, lr {a.lr} (the same for both, linear warm-up then cosine), seed 0; "
            "eval_nll = mean next-token loss on 16 held-out windows of the text's last 5 % (initial_eval_nll: "
            f"before training). lora: rank {a.rank} on every decoder linear. spiel: float base, density "
            f"{density:.5f} (LoRA r{a.rank}'s trainable count), drop-and-grow every {max(2, a.steps // 4)} steps. "
            "One torch thread per run on a 2-core machine.")
    prov = provenance(ref, get_protocol(a.profile),
                      training={"steps": a.steps, "batch_size": a.batch_size, "seqlen": a.seqlen, "lr": a.lr,
                                "loss": "ce", "data": "tinyshakespeare (95/5 split)"})
    write_results(rows, RESULTS / a.profile, "sparse_ft", COLUMNS, note=note, provenance=prov)
    print(results_table(rows, COLUMNS)[0])


if __name__ == "__main__":
    main()
