"""The Python API on the reference model: quantize in memory, evaluate against the original, save, export.

    python examples/python_api.py [--bits 3] [--out out/api-gptq3]

Runs in a few minutes on 2 CPU cores (quick protocol: 32 calibration windows, 16 evaluation windows).
"""

import argparse
import copy

import lowbit
from lowbit.eval.protocol import get_protocol
from lowbit.reference import build_reference


def main(bits: int = 3, out: str = "out/api-gptq3", profile: str = "quick", windows: int | None = None) -> dict:
    ref = build_reference()
    base, tok = lowbit.load(ref)
    proto = get_protocol(profile, windows=windows)
    recipe = {"quant": {"method": "gptq", "bits": bits, "group_size": 128},
              "calibration": proto.calibration()}
    q = lowbit.quantize(copy.deepcopy(base), recipe, tokenizer=tok)  # the copy is changed in place
    ev = lowbit.evaluate(q.model, base=base, tokenizer=tok, profile=profile, windows=windows)
    print(f"GPTQ w{bits} g128: {q.summary['bits_per_weight']:.3f} bits/weight, ppl {ev['ppl']:.2f}, "
          f"KL {ev['kl']:.4f}, top-1 {ev['top1_agreement']:.3f}")
    q.save(out, overwrite=True, source=str(ref))
    lowbit.export(out, "gptq", out + "-gptq", overwrite=True)
    return ev


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--out", default="out/api-gptq3")
    a = ap.parse_args()
    main(a.bits, a.out)
