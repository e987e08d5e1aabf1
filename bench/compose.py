"""The fine-tuning stage of a composed recipe on the reference model, from one saved base.

    python bench/compose.py BASE_DIR [--lr 1e-4 3e-4 1e-3] [--steps 32] [--method codebook]

BASE_DIR is a `lowbit quantize` output of the reference model (e.g. CLAQ 3-bit). The base is loaded once;
each learning rate runs `pipeline.stages.finetune_stage` on a copy (calibration windows of the base's
recipe, KL to the fp32 model), and every variant is evaluated with the `lowbit eval` protocol (WikiText-2
test windows, KL on the first `--kl-windows`). Writes bench/results/compose-finetune.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from lowbit.eval.report import write_results
from lowbit.io.native import load_model, load_quantized
from lowbit.jobs import calibration_data, eval_job
from lowbit.pipeline.stages import FinetuneStageConfig, bit_counts, finetune_stage, keep_teacher
from lowbit.recipe import make_recipe
from lowbit.reference import reference_path

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--method", default="codebook")
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--kl-windows", type=int, default=32)
    ap.add_argument("--stem", default="compose-finetune")
    a = ap.parse_args()
    torch.manual_seed(0)
    ref = str(reference_path())
    fp32, tok = load_model(ref)
    model, qweights, info = load_quantized(a.base)
    recipe = make_recipe({k: v for k, v in info["provenance"]["recipe"].items() if k in ("quant", "calibration")})
    calib = calibration_data(recipe, tok, fp32)
    teacher = keep_teacher(fp32, FinetuneStageConfig(method=a.method))
    ev = dict(max_windows=a.max_windows, kl_windows=a.kl_windows, progress=False, base_model=fp32, tokenizer=tok)
    rows = []
    e = eval_job(a.base, model=model, **ev)
    rows.append({"variant": f"{recipe.quant.method} base", "steps": 0, "lr": None, "bits_per_weight":
                 bit_counts(qweights, None)["bits_per_weight"], "ppl": e["ppl"], "kl": e["kl"],
                 "calib_kl_before": None, "calib_kl_after": None, "seconds": 0.0})
    for lr in a.lr:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        new, rep = finetune_stage(m, teacher, qweights, FinetuneStageConfig(method=a.method, steps=a.steps, lr=lr),
                                  calib)
        s = time.perf_counter() - t0
        e = eval_job(a.base, model=m, **ev)
        rows.append({"variant": f"+ {a.method} tuning", "steps": a.steps, "lr": lr,
                     "bits_per_weight": bit_counts(new, None)["bits_per_weight"], "ppl": e["ppl"], "kl": e["kl"],
                     "calib_kl_before": rep["loss_before"], "calib_kl_after": rep["loss_after"], "seconds": s})
        print(rows[-1], flush=True)
    note = (f"Base {Path(a.base).name} ({recipe.quant.method}); fine-tuning on its {tuple(calib.shape)} C4 "
            f"calibration windows, KL to fp32, batch 4, Adam, cosine lr. Eval: WikiText-2 test, "
            f"{a.max_windows} windows for ppl, first {a.kl_windows} for KL. Seconds on a shared 2-core CPU "
            "(load ~15 from other jobs): indicative only.")
    write_results(rows, Path(__file__).parent / "results", a.stem, note=note)
