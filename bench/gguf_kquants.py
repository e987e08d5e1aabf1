"""GGUF K-quant mixes of the reference model: nearest rounding, an importance matrix, and GPTQ codes against
the block scales; each read back by transformers' GGUF loader and run by llama.cpp, both under the shared
protocol.

    python bench/gguf_kquants.py [--profile quick|full] [--mixes Q4_K_M Q4_K_S Q3_K_M Q2_K]

For each mix: `lowbit export REF -f gguf --gguf-type MIX [--imatrix | --gptq]` (the imatrix / Hessians from
the profile's calibration windows), then
* `AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")` (gguf-py dequantizes the blocks: an
  independent reader) evaluated with lowbit's protocol against the fp model: ppl, KL, top-1;
* llama.cpp (llama-cpp-python, `lowbit.eval.llama_cpp`) on the same windows: its ppl and KL against the
  same fp model, when the package is installed.
Bits per weight: the decoder linears' blocks as stored (SmolLM2's 576-wide rows cannot hold 256-weight
super-blocks and fall back to Q4_0 / Q5_0, as llama.cpp does; only ffn_down is K-quant). Results:
bench/results/gguf-kquants.json with provenance.
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
    ap.add_argument("--mixes", nargs="+", default=["Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"])
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
    calib = calibration_data(recipe, tok, base)
    imatrix = collect_imatrix(base, calib)
    imatrix_s = time.perf_counter() - t0
    import importlib.util

    from lowbit.eval.llama_cpp import LlamaCppLM

    have_cpp = importlib.util.find_spec("llama_cpp") is not None
    rows = {}
    for mix in args.mixes:
        for codes in ("nearest", "imatrix", "gptq"):
            name = mix if codes == "nearest" else f"{mix}-{codes}"
            out = Path(f"/tmp/lowbit-gguf-{name}")
            t0 = time.perf_counter()
            s = export_gguf_kquants(ref, out, mix, imatrix=imatrix if codes == "imatrix" else None,
                                    gptq=calib if codes == "gptq" else None, overwrite=True, model=base)
            export_s = time.perf_counter() - t0
            m = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
            ev = eval_job(name, model=m, tokenizer=tok, base_model=base, base_key=model_key(str(ref)),
                          windows=windows, protocol=proto, progress=False)
            del m
            row = {"mix": mix, "codes": codes, "bits_per_weight": s["bits_per_weight"], "types": s["types"],
                   "ppl": ev["ppl"], "kl": ev["kl"], "top1_agreement": ev["top1_agreement"],
                   "export_seconds": round(export_s, 1), "file_mb": round((out / "model.gguf").stat().st_size / 2**20, 1)}
            if have_cpp:
                rt = LlamaCppLM(out / "model.gguf", n_ctx=windows.shape[1])
                try:
                    t0 = time.perf_counter()
                    cpp = eval_job(f"{name}-llama.cpp", model=rt, tokenizer=tok, base_model=base,
                                   base_key=model_key(str(ref)), windows=windows,
                                   protocol=proto, progress=False)
                    row |= {"llama_cpp_ppl": cpp["ppl"], "llama_cpp_kl": cpp["kl"],
                            "llama_cpp_vs_ours_ppl": cpp["ppl"] / ev["ppl"] - 1,
                            "llama_cpp_eval_seconds": round(time.perf_counter() - t0, 1)}
                finally:
                    rt.close()
            rows[name] = row
            print(f"[gguf] {name}: {s['bits_per_weight']:.3f} bits/weight, ppl {ev['ppl']:.3f}, KL {ev['kl']:.4f}"
                  + (f", llama.cpp ppl {row['llama_cpp_ppl']:.3f} KL {row['llama_cpp_kl']:.4f}" if "llama_cpp_ppl" in row else "")
                  + f" ({s['types']})", flush=True)
    res = {"profile": args.profile, "imatrix_seconds": round(imatrix_s, 1),
           "imatrix_windows": [proto.calib_samples, proto.calib_seqlen], "runs": rows,
           "reader": "transformers from_pretrained(gguf_file=) (gguf-py dequantization); llama.cpp via "
                     "llama-cpp-python" + ("" if have_cpp else " (not installed: no llama.cpp columns)"),
           "provenance": provenance(ref, proto)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
