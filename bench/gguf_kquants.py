"""GGUF K-quant mixes of the reference model, with and without an importance matrix, read back through
transformers' GGUF loader and evaluated under the shared protocol.

    python bench/gguf_kquants.py [--profile quick|full] [--mixes Q4_K_M Q4_K_S]

For each mix: `lowbit export REF -f gguf --gguf-type MIX [--imatrix]` (the imatrix from the profile's
calibration windows), then `AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")` (gguf-py
dequantizes the blocks: an independent reader) evaluated with lowbit's protocol against the fp model.
Bits per weight: the decoder linears' blocks as stored (SmolLM2's 576-wide rows cannot hold 256-weight
super-blocks and fall back to Q5_0, as llama.cpp does; only ffn_down is K-quant). Results:
bench/results/gguf-kquants.json with provenance. llama.cpp itself (llama-cpp-python) is not run here: it
ships as a source distribution only, and this machine does not build it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", choices=["quick", "full"])
    ap.add_argument("--mixes", nargs="+", default=["Q4_K_M", "Q4_K_S"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf-kquants.json")
    args = ap.parse_args()

    import lowbit
    from lowbit.eval.evaluate import protocol_windows
    from lowbit.eval.protocol import get_protocol, model_key, provenance
    from lowbit.exporters.gguf_kquants import collect_imatrix, export_gguf_kquants
    from lowbit.io.atomic import atomic_write_text
    from lowbit.jobs import calibration_data, eval_job
    from lowbit.recipe import make_recipe
    from lowbit.reference import build_reference
    from transformers import AutoModelForCausalLM

    ref = build_reference()
    proto = get_protocol(args.profile)
    base, tok = lowbit.load(ref)
    windows = protocol_windows(tok, proto)
    t0 = time.perf_counter()
    recipe = make_recipe({"calibration": {"n_samples": proto.calib_samples, "seqlen": proto.calib_seqlen,
                                          "seed": proto.calib_seed}})
    imatrix = collect_imatrix(base, calibration_data(recipe, tok, base))
    imatrix_s = time.perf_counter() - t0
    rows = {}
    for mix in args.mixes:
        for use in (False, True):
            name = f"{mix}{'-imatrix' if use else ''}"
            out = Path(f"/tmp/lowbit-gguf-{name}")
            t0 = time.perf_counter()
            s = export_gguf_kquants(ref, out, mix, imatrix=imatrix if use else None, overwrite=True, model=base)
            export_s = time.perf_counter() - t0
            m = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
            ev = eval_job(name, model=m, tokenizer=tok, base_model=base, base_key=model_key(str(ref)),
                          windows=windows, protocol=proto, progress=False)
            rows[name] = {"mix": mix, "imatrix": use, "bits_per_weight": s["bits_per_weight"], "types": s["types"],
                          "ppl": ev["ppl"], "kl": ev["kl"], "top1_agreement": ev["top1_agreement"],
                          "export_seconds": round(export_s, 1), "file_mb": round((out / "model.gguf").stat().st_size / 2**20, 1)}
            print(f"[gguf] {name}: {s['bits_per_weight']:.3f} bits/weight, ppl {ev['ppl']:.3f}, KL {ev['kl']:.4f} "
                  f"({s['types']})", flush=True)
            del m
    res = {"profile": args.profile, "imatrix_seconds": round(imatrix_s, 1),
           "imatrix_windows": [proto.calib_samples, proto.calib_seqlen], "runs": rows,
           "reader": "transformers from_pretrained(gguf_file=) (gguf-py dequantization)",
           "provenance": provenance(ref, proto)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
