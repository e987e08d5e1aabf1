"""lowbit's post-training tables on the reference model (SmolLM2-135M-Instruct), under one protocol.

    python bench/suite.py [--profile quick|full] [--only ptq lqer budget tune] [--recipes NAME ...] [--list]

Each suite is one `lowbit compare` run (`lowbit.compare.run_compare`) of the recipes below into
bench/results/<profile>/<suite>/: every quantization as its own `lowbit quantize` process (its time and
peak memory are its own), every model evaluated on the same WikiText-2 windows against the cached
outputs of the fp model, every run calibrated on the same C4 windows, the report (report.md / .html,
pareto.png, runs/NAME.json with provenance) written as runs finish. A killed suite resumes: finished runs
are reused by key. `python bench/summarize.py` then builds the tables by bit width, the paper-claim lines
and the README section from these files.

Group sizes are 128, 64 or per channel: the reference model's weights are dequantized Q4_1 (4-bit groups
of 32 with a float minimum), so 4-bit g32 grids would reproduce them almost exactly and say nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _q(method: str, bits: int, group_size: int | None = None, **kw) -> dict:
    q = {"method": method, "bits": bits, **kw}
    if group_size is not None:
        q["group_size"] = group_size
    return {"quant": q}


def _lqer(q: dict, rank: int, scale: str = "act-mean", factors: str = "int8") -> dict:
    return {"quant": {**q["quant"], "lqer": {"rank": rank, "scale": scale, "factor_dtype": factors}}}


def _ptq() -> dict[str, dict]:
    """Uniform grids, AWQ, HQQ, codebooks (SqueezeLLM, CLAQ) and outlier reservation at 4, 3 and 2 bits."""
    s: dict[str, dict] = {}
    for b in (4, 3):
        s[f"rtn-w{b}-g128"] = _q("rtn", b, 128)
        s[f"rtn-w{b}-g64"] = _q("rtn", b, 64)
        s[f"gptq-w{b}-pc"] = _q("gptq", b, -1)
        s[f"gptq-w{b}-g128"] = _q("gptq", b, 128)
        s[f"gptq-w{b}-g64"] = _q("gptq", b, 64)
        s[f"awq-rtn-w{b}-g128"] = _q("awq", b, 128)
        s[f"awq-gptq-w{b}-g128"] = _q("awq", b, 128, base="gptq")
        s[f"hqq-w{b}-g128"] = _q("hqq", b, 128)
        s[f"hqq-w{b}-g64"] = _q("hqq", b, 64)
        s[f"squeezellm-w{b}"] = _q("squeezellm", b, codebook_bits=8)
        s[f"claq-w{b}"] = _q("claq", b, codebook_bits=8)
    s["gptq-w3-g128-or0.005"] = _q("gptq", 3, 128, outliers=0.005)
    s["claq-w3-or1"] = _q("claq", 3, codebook_bits=8, outlier_count=1)
    s["claq-ap3.1"] = _q("claq", 3, codebook_bits=8, target_bits=3.1)
    s["gptq-w2-g64"] = _q("gptq", 2, 64)
    s["gptq-w2-g32"] = _q("gptq", 2, 32)
    s["rtn-w2-g64"] = _q("rtn", 2, 64)
    s["hqq-w2-g32"] = _q("hqq", 2, 32)
    s["claq-w2"] = _q("claq", 2, codebook_bits=8)
    s["claq-w2-or1"] = _q("claq", 2, codebook_bits=8, outlier_count=1)
    s["claq-ap2.1"] = _q("claq", 2, codebook_bits=8, target_bits=2.1)
    s["claq-w2-dynamic-or"] = _q("claq", 2, codebook_bits=8, outliers="dynamic")
    # AQLM: additive codes, 2x8 g8 (2 code bits; codebooks and row scales on top), the default solver
    # settings and a fast one (1 round, beam 4)
    s["aqlm-2x8-g8"] = {"quant": {"method": "aqlm", "num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8}}
    s["aqlm-2x8-g8-fast"] = {"quant": {"method": "aqlm", "num_codebooks": 2, "nbits_per_codebook": 8,
                                       "in_group_size": 8, "rounds": 1, "beam_size": 4, "cg_iters": 15,
                                       "kmeans_iters": 10}}
    # AQLM's block fine-tuning on the fast start: 20 Adam steps per block on codebooks and scales (codes
    # fixed), lr 1e-3 for so short a budget (the authors: 1e-4, epochs over 1k+ sequences with early stop)
    s["aqlm-2x8-g8-fast-ft"] = {"quant": {**s["aqlm-2x8-g8-fast"]["quant"], "finetune_steps": 20,
                                          "finetune_lr": 1e-3}}
    # QuantEase: coordinate descent on the same static grid as GPTQ, from W (the paper) and from GPTQ
    s["quantease-w3-g128"] = _q("quantease", 3, 128)
    s["quantease-gptq-w3-g128"] = _q("quantease", 3, 128, init="gptq")
    # LRQ: block reconstruction per channel (the paper's grid), 100 steps per block (the authors run 5000:
    # what 2 CPU cores allow), the authors' rates and clipping rule
    s["lrq-w4-pc"] = _q("lrq", 4, -1, iters=100)
    s["lrq-w3-pc"] = _q("lrq", 3, -1, iters=100)
    # W4A8 (the paper's per-token 8-bit activations): LRQ trains with the activations quantized; the baseline
    # is GPTQ's per-channel W4 with the same activation format
    a8 = {"format": "int", "bits": 8}
    s["gptq-w4a8-pc"] = _q("gptq", 4, -1, act=a8)
    s["lrq-w4a8-pc"] = _q("lrq", 4, -1, iters=100, act=a8)
    return s


def _tune() -> dict[str, dict]:
    """Composed recipes, a fine-tuning stage after the quantizer (32 steps of 4 calibration windows, KL to
    the fp model), beside their starting points: CLAQ's codebook entries tuned (codes and bits unchanged),
    and L4Q from the GPTQ grid."""
    return {"claq-w3": _q("claq", 3, codebook_bits=8),
            "claq-w3-tuned": {**_q("claq", 3, codebook_bits=8), "finetune": {"method": "codebook", "steps": 32}},
            "gptq-w3-g128": _q("gptq", 3, 128),
            "gptq-w3-g128-l4q": {**_q("gptq", 3, 128), "finetune": {"method": "l4q", "steps": 32}}}


def _lqer_suite() -> dict[str, dict]:
    """LQER / L²QER (paper's ablation on INT3 and MXINT4, W4A8) and stacking on GPTQ, int8 factors."""
    s: dict[str, dict] = {}
    int3 = _q("rtn", 3, 128)
    mx4 = _q("rtn", 4, format="mxint", block_size=16)
    s["int3-g128"] = int3
    s["mxint4"] = mx4
    for r in (8, 32):
        s[f"int3-g128-lqer{r}"] = _lqer(int3, r, "none")
        s[f"int3-g128-l2qer{r}"] = _lqer(int3, r)
        s[f"mxint4-lqer{r}"] = _lqer(mx4, r, "none", "mxint8")
        s[f"mxint4-l2qer{r}"] = _lqer(mx4, r, "act-mean", "mxint8")
    w4a8 = _lqer(mx4, 32, "act-mean", "mxint8")
    w4a8["quant"]["act"] = {"bits": 8}
    s["mxint4-l2qer32-a8"] = w4a8
    s["gptq-w3-g128-l2qer16"] = _lqer(_q("gptq", 3, 128), 16)
    s["gptq-w3-g128-lqer16"] = _lqer(_q("gptq", 3, 128), 16, "none")
    return s


def _budget() -> dict[str, dict]:
    """The per-layer bit allocator (measured KL sensitivity, knapsack) against the uniform recipes of the
    ptq suite at the same bits. The option grid is GPTQ at 2/3/4 bits, group 128, with the sensitivity
    measured on 4 calibration windows: 3 options × 210 layers, each a forward pass from the layer's block
    to the logits, is what fits 2 CPU cores (the default grid of 48 options on 16 windows would take hours)."""
    grid = {"bits": [2, 3, 4], "group_sizes": [128], "ranks": [0], "n_samples": 4}
    s = {f"budget-{b}": {"quant": {"method": "gptq", "bits": 3, "group_size": 128},
                         "budget": {**grid, "bits_per_weight": b}} for b in (2.5, 3.17)}
    # the uniform recipes it is judged against, in this suite so that both sides share one profile
    s.update({f"gptq-w{b}-g128": _q("gptq", b, 128) for b in (2, 3, 4)})
    return s


SUITES = {"ptq": _ptq, "lqer": _lqer_suite, "budget": _budget, "tune": _tune}


def run_suite(name: str, profile: str, model: str | None = None, only: list[str] | None = None) -> dict:
    from lowbit.compare import run_compare
    from lowbit.eval.protocol import get_protocol
    from lowbit.progress import log_line
    from lowbit.recipe import make_recipe
    from lowbit.reference import build_reference

    model = model or str(build_reference())
    recipes = SUITES[name]()
    unknown = sorted(set(only or []) - set(recipes))
    if unknown:
        sys.exit(f"suite {name} has no recipe {', '.join(unknown)} (see --list)")
    named = [(n, make_recipe(r, source=f"{name}/{n}")) for n, r in recipes.items() if not only or n in only]
    out = RESULTS / profile / name
    log_line(f"suite {name}: {len(named)} recipes -> {out}")
    return run_compare(model, named, out, get_protocol(profile), isolate=True, progress=True,
                       command=f"python bench/suite.py --profile {profile} --only {name}",
                       on_run=lambda r: log_line(f"{name}/{r['name']}: {r['bits_per_weight']:.3f} bpw, "
                                                 f"ppl {r['ppl']:.3f}, KL {r['kl']:.4f}"
                                                 + (" (reused)" if r["resumed"] else "")))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick", choices=["quick", "full"])
    ap.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES))
    ap.add_argument("--recipes", nargs="+", default=None,
                    help="run only these recipes of the suite (finished runs of the others are kept)")
    ap.add_argument("--list", action="store_true", help="print the recipes and exit")
    a = ap.parse_args()
    if a.list:
        for s in a.only:
            print(s, ", ".join(SUITES[s]()))
        sys.exit(0)
    known = {n for s in a.only for n in SUITES[s]()}
    if a.recipes and set(a.recipes) - known:
        sys.exit(f"no recipe {', '.join(sorted(set(a.recipes) - known))} in {', '.join(a.only)} (see --list)")
    for s in a.only:
        if a.recipes and not set(a.recipes) & set(SUITES[s]()):
            continue
        run_suite(s, a.profile, only=[n for n in a.recipes if n in SUITES[s]()] if a.recipes else None)
