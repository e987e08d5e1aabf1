"""LQER / L²QER on the reference model: the paper's ablation, stacking on GPTQ, W4A8/W4A6, SVD speed.

    python bench/lqer.py [--part ablation|int8|gptq|act|svd|all] [--ppl-windows 128] [--kl-windows 64] [--calib-samples 32]

Parts (each row is one quantization of the reference model, then evaluation):
* ablation: weights MXINT4 block 16, INT4 g128, INT3 g128 × {none, LQER (scale none), L²QER (act-mean)}
  × rank {8, 16, 32, 64}, fp16 factors;
* gptq: GPTQ INT3 g128 without correction, with LQER / L²QER rank 32 (fp16), L²QER rank 16 (int8);
* act: MXINT4 + L²QER rank 32 (MXINT8 factors) with activations A16 / MXINT8 / MXINT6 (+ no correction);
* int8: quantized factors (int8 for the INT grids, MXINT8 for MXINT4): L²QER rank 8/16/32, LQER rank 16,
  so that rows at matched bits exist;
* svd: full vs randomized SVD of a 4096×11008 MXINT4 error matrix (rank 32), seconds and error ratio.

Resumable: every finished row is kept in results/.lqer-runs.json (keyed by its settings and the model);
a rerun skips them. Tables are written to results/lqer.{md,json} after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lowbit.eval.report import write_results
from lowbit.io.atomic import atomic_write_text

RESULTS = Path(__file__).parent / "results"
RANKS = (8, 16, 32, 64)
GRIDS = {  # label -> base method config
    "MXINT4 b16": {"method": "rtn", "format": "mxint", "bits": 4, "block_size": 16},
    "INT4 g128": {"method": "rtn", "bits": 4, "group_size": 128},
    "INT3 g128": {"method": "rtn", "bits": 3, "group_size": 128},
}
CORR = {"LQER": "none", "L²QER": "act-mean"}
COLUMNS = ["part", "weights", "correction", "rank", "factors", "acts", "bits_per_weight", "ppl", "kl",
           "top1_agreement", "quantize_seconds"]


def runs(part: str) -> list[dict]:
    out = []
    if part in ("ablation", "all"):
        for g, base in GRIDS.items():
            out.append(dict(part="ablation", weights=g, correction="none", rank=0, factors=None, acts="A16", cfg=base))
            for c, scale in CORR.items():
                for k in RANKS:
                    out.append(dict(part="ablation", weights=g, correction=c, rank=k, factors="fp16", acts="A16",
                                    cfg={**base, "lqer": {"rank": k, "scale": scale}}))
    if part in ("gptq", "all"):
        base = {"method": "gptq", "bits": 3, "group_size": 128}
        out.append(dict(part="gptq", weights="GPTQ INT3 g128", correction="none", rank=0, factors=None, acts="A16",
                        cfg=base))
        for c, scale, k, f in (("LQER", "none", 32, "fp16"), ("L²QER", "act-mean", 32, "fp16"),
                               ("L²QER", "act-mean", 16, "int8")):
            out.append(dict(part="gptq", weights="GPTQ INT3 g128", correction=c, rank=k, factors=f, acts="A16",
                            cfg={**base, "lqer": {"rank": k, "scale": scale, "factor_dtype": f}}))
    if part in ("act", "all"):
        base = GRIDS["MXINT4 b16"]
        for a in (None, 8, 6):
            act = None if a is None else {"format": "mxint", "bits": a, "block_size": 16}
            name = "A16" if a is None else f"MXINT{a} A"
            out.append(dict(part="act", weights="MXINT4 b16", correction="none", rank=0, factors=None, acts=name,
                            cfg={**base, "act": act}))
            out.append(dict(part="act", weights="MXINT4 b16", correction="L²QER", rank=32, factors="mxint8",
                            acts=name, cfg={**base, "act": act,
                                            "lqer": {"rank": 32, "scale": "act-mean", "factor_dtype": "mxint8"}}))
    if part in ("int8", "all"):  # quantized factors: rows at matched bits (e.g. INT3 + rank 8-16 ≈ INT4)
        for g, base in GRIDS.items():
            f = "mxint8" if base.get("format") == "mxint" else "int8"
            for c, scale, ks in (("LQER", "none", (16,)), ("L²QER", "act-mean", (8, 16, 32))):
                for k in ks:
                    out.append(dict(part="int8", weights=g, correction=c, rank=k, factors=f, acts="A16",
                                    cfg={**base, "lqer": {"rank": k, "scale": scale, "factor_dtype": f}}))
    return out


PROTOCOL: dict = {}  # evaluation settings: part of every row's key, so rows of different protocols never mix


def key(run: dict) -> str:
    return json.dumps({**run["cfg"], "protocol": PROTOCOL}, sort_keys=True)


def fp32_key() -> str:
    return "fp32:" + json.dumps(PROTOCOL, sort_keys=True)


def cache_path() -> Path:
    return RESULTS / ".lqer-runs.json"


def load_cache() -> dict:
    return json.loads(cache_path().read_text()) if cache_path().exists() else {}


def write_tables(cache: dict, protocol: str) -> None:
    rows = [cache[k] for k in [fp32_key()] + [key(r) for r in runs("all")] if k in cache]
    write_results(rows, RESULTS, "lqer", COLUMNS,
                  note=protocol + ("\n\n" + svd_note(cache["svd:"]) if "svd:" in cache else ""))


def svd_note(s: dict) -> str:
    return (f"SVD of a {s['shape'][0]}×{s['shape'][1]} error matrix (MXINT4 block 16 error of a Gaussian weight, "
            f"L²QER scale with log-normal channel magnitudes), rank {s['rank']}, float64: full "
            f"{s['full_seconds']:.1f} s, randomized (oversample {s['oversample']}, {s['power_iters']} power iterations) "
            f"{s['rand_seconds']:.2f} s ({s['full_seconds'] / s['rand_seconds']:.0f}× faster); scaled residual "
            f"‖S(E−AB)‖_F randomized / full = {s['residual_ratio']:.6f}; captured scaled energy ‖S·AB‖²_F "
            f"randomized / full = {s['energy_ratio']:.4f}. Timings: 1 thread on a shared 2-core machine under "
            f"contention from other jobs, measured back to back in one process.")


def svd_part() -> dict:
    from lowbit.methods.config import LQERConfig, RTNConfig
    from lowbit.methods.lqer import error_factors
    from lowbit.methods.rtn import rtn_quantize
    from lowbit.methods.stats import LayerStats

    torch.set_num_threads(1)  # gentle on the shared machine; both solvers get the same single thread
    g = torch.Generator().manual_seed(0)
    out_f, in_f, k = 11008, 4096, 32
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    E = (W - rtn_quantize(W, RTNConfig(bits=4, format="mxint", block_size=16)).dequantize()).T.double()
    s = torch.exp(torch.randn(in_f, generator=g))
    st = LayerStats(act_mean_abs_max=s)
    res = {"shape": [in_f, out_f], "rank": k}
    sn = s.double().clamp(min=1e-4)
    sn = sn / torch.sqrt(sn.min() * sn.max())
    for mode in ("randomized", "full"):
        cfg = LQERConfig(rank=k, scale="act-mean", svd=mode)
        t0 = time.perf_counter()
        A, B = error_factors(E, st, cfg)
        res[f"{mode[:4]}_seconds"] = time.perf_counter() - t0
        res[f"{mode[:4]}_residual"] = float((sn[:, None] * (E - A @ B)).norm())
        res[f"{mode[:4]}_energy"] = float((sn[:, None] * (A @ B)).square().sum())
        res["oversample"], res["power_iters"] = cfg.oversample, cfg.power_iters
        print(mode, res, flush=True)
    res["residual_ratio"] = res["rand_residual"] / res["full_residual"]
    res["energy_ratio"] = res["rand_energy"] / res["full_energy"]
    return res


def protocol_note(a, cache: dict) -> str:
    fp = cache.get(fp32_key(), {})
    return (f"Model {a.model or 'reference (5.5M-param LLaMA)'}. Perplexity: WikiText-2 raw test, GPTQ protocol, seqlen "
                f"{fp.get('seqlen')}, first {a.ppl_windows} windows; KL(fp32 ‖ quantized) nats/token on the first "
                f"{a.kl_windows} windows. Calibration: {a.calib_samples} C4 windows (seqlen {fp.get('seqlen')}), batch 8, "
                f"sequential block by block (statistics of block i taken after blocks < i are quantized); L²QER's "
                f"s = max over the {-(-a.calib_samples // 8)} batches of per-batch mean|x|. Every quantized decoder linear (lm_head and "
                f"embeddings stay fp32). bits_per_weight counts every stored bit (codes, scales, zeros, exponents, "
                f"factors with their scales/exponents) over the quantized weights. LQER = SVD of E; L²QER = SVD of "
                f"S·E (act-mean); rank fixed per layer; randomized SVD (auto) except where rank ≥ min(in,out)/4 − 16. "
                f"Quantized factors: A quantized, B refitted to it (refit) then quantized. Activation rows: per-token "
                f"MXINT block 16 of every quantized linear's input and of both low-rank intermediates; attention "
                f"matmuls not quantized. quantize_seconds: calibration + method, 1 thread, shared 2-core machine.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["ablation", "int8", "gptq", "act", "svd", "all"])
    ap.add_argument("--ppl-windows", type=int, default=128)
    ap.add_argument("--kl-windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--model", default=None, help="model directory (default: the cached reference model)")
    a = ap.parse_args()

    global RESULTS
    if a.out:
        RESULTS = Path(a.out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    from lowbit.reference import reference_path

    ref = Path(a.model) if a.model else reference_path()
    # the model directory's name (reference-<config hash>) is in every row's key: rows of another model are never reused
    PROTOCOL.update(model=ref.resolve().name, ppl=a.ppl_windows, kl=a.kl_windows, calib=a.calib_samples)
    cache = load_cache()
    save = lambda: atomic_write_text(cache_path(), json.dumps(cache, indent=1))  # noqa: E731
    if a.part in ("svd", "all") and "svd:" not in cache:
        cache["svd:"] = svd_part()
        save()
    todo = [r for r in runs(a.part) if key(r) not in cache]
    if todo or (fp32_key() not in cache and a.part != "svd"):
        from lowbit.jobs import calibration_data, eval_job
        from lowbit.io.native import load_model
        from lowbit.methods import parse_method_config
        from lowbit.pipeline.calibrate import quantize_model
        from lowbit.recipe import make_recipe

        torch.set_num_threads(1)
        if not (ref / "config.json").exists():
            raise SystemExit(f"{ref} has no model: build the reference first (lowbit reference build)")
        base, tok = load_model(str(ref))
        recipe = make_recipe({"calibration": {"n_samples": a.calib_samples}})
        calib = calibration_data(recipe, tok, base, a.data)
        ev = dict(tokenizer=tok, base_model=base, data=a.data, max_windows=a.ppl_windows,
                  kl_windows=a.kl_windows, progress=False)
        if fp32_key() not in cache:
            r = eval_job(str(ref), model=base, **{k: v for k, v in ev.items() if k != "base_model"})
            cache[fp32_key()] = dict(part="reference", weights="fp32", correction="none", rank=0, acts="A32",
                                 bits_per_weight=32.0, ppl=r["ppl"], kl=0.0, top1_agreement=1.0, quantize_seconds=0.0,
                                 n_windows=r["n_windows"], seqlen=r["seqlen"])
            save()
        for r in todo:
            model = copy.deepcopy(base)
            cfg = parse_method_config(r["cfg"])
            res = quantize_model(model, cfg, calib, batch_size=8, progress=False, measure_error=False)
            e = eval_job("", model=model, **ev)
            row = {k: v for k, v in r.items() if k != "cfg"}
            row.update(bits_per_weight=res.bits_per_weight, ppl=e["ppl"], kl=e["kl"],
                       top1_agreement=e["top1_agreement"], quantize_seconds=res.seconds)
            cache[key(r)] = row
            save()
            print(json.dumps(row, ensure_ascii=False), flush=True)
            write_tables(cache, protocol_note(a, cache))
            del model
    if a.part != "svd" or fp32_key() in cache:
        write_tables(cache, protocol_note(a, cache))


if __name__ == "__main__":
    main()
