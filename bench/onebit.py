"""OneBit on the reference model: the SVID start (step 0) and a distillation run, under the shared protocol.

    python bench/onebit.py [--steps 100] [--lr 2e-3] [--batch-size 4] [--seqlen 256] [--profile full]

Each run is `lowbit finetune --method onebit --loss kd --kd-hidden 1` (KL to the float model plus the
hidden-state term, the paper's objective) on C4 training windows, then `lowbit eval --profile PROFILE`
(WikiText-2 test, the shared windows; KL against the float model). Writes bench/results/<profile>/onebit.json
/ .md with the training budget (steps, tokens, wall time) and provenance. The paper trains LLaMA-7B for
about 1.3k A100-hours on 132k teacher-generated sequences; this is what 2 CPU cores allow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from lowbit.eval.protocol import provenance
from lowbit.eval.report import write_results
from lowbit.reference import build_reference


def run(cmd: list[str]) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--profile", default="full", choices=["quick", "full"])
    a = ap.parse_args()
    ref = str(build_reference())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (0, a.steps):
            out = Path(tmp) / f"onebit-{steps}"
            run([sys.executable, "-m", "lowbit.cli", "finetune", ref, "-o", str(out), "--method", "onebit",
                 "--loss", "kd", "--kd-hidden", "1", "--steps", str(steps), "--lr", str(a.lr),
                 "--batch-size", str(a.batch_size), "--seqlen", str(a.seqlen), "--checkpoint-every", "0",
                 "--eval-windows", "4", "--quiet"])
            ev = json.loads(run([sys.executable, "-m", "lowbit.cli", "eval", str(out), "--base", ref,
                                 "--profile", a.profile, "--json", "--quiet"]))
            info = json.loads((out / "lowbit.json").read_text())
            summ = info.get("summary", {})
            cfg = json.loads((out / "config.json").read_text()).get("quantization_config", {})
            rows.append({"recipe": f"onebit-{steps}-steps", "bits_per_weight": cfg.get("bits_per_weight"),
                         "ppl": ev.get("ppl"), "kl": ev.get("kl"), "top1": ev.get("top1_agreement"),
                         "steps": steps, "tokens": steps * a.batch_size * a.seqlen, "lr": a.lr,
                         "train_seconds": summ.get("train_seconds"), "peak_memory_mb": summ.get("peak_memory_mb")})
            print(rows[-1], flush=True)
    note = (f"OneBit (sign ⊙ rank-1, Post-LN) on SmolLM2-135M-Instruct; KD (KL + hidden-state term, α = 1) on "
            f"C4 training windows of {a.seqlen} tokens, batch {a.batch_size}, AdamW lr {a.lr} (warm-up 10 %, cosine); "
            f"evaluated with the {a.profile} protocol. Step 0 is the SVID start. Command: python bench/onebit.py "
            f"--steps {a.steps} --lr {a.lr} --batch-size {a.batch_size} --seqlen {a.seqlen} --profile {a.profile}.")
    write_results(rows, Path(__file__).parent / "results" / a.profile, "onebit", note=note,
                  provenance=provenance(ref, threads="torch default"))
    print(note)
