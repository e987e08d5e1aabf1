"""Chat-template calibration against plain-text calibration, on the reference chat model.

    python bench/chat_calib.py [--profile quick|full] [--bits 3] [--group-size 128] [--method gptq]

SmolLM2-135M-Instruct is quantized twice with the same method and the same C4 calibration documents:
once on the plain text (`calibration.chat: false`, the GPTQ recipe) and once with every document rendered
through the model's chat template (`chat: true`, `lowbit.calibration`). Both are evaluated against the fp
model on two window sets of the profile's size and length:

* the shared protocol's WikiText-2 test windows (plain prose);
* chat windows: the held-out C4 documents (never used for calibration), each rendered through the chat
  template the same way, EOS-joined and cut into consecutive windows — text as a chat model sees it.

Results: bench/results/chat-calib.json (with provenance). The question it answers: does calibrating on
the template (whose special tokens bring activations plain prose never produces) lower the KL where the
model is used, and what does it cost on plain text?
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def chat_windows(tokenizer, seqlen: int, n: int) -> torch.Tensor:
    from lowbit import data as corpora
    from lowbit.calibration import as_conversation, render

    docs = [render(tokenizer, as_conversation(d), True) for d in corpora.c4_split("heldout") if d]
    ids = corpora.token_stream(tokenizer, docs)
    n = min(n, ids.numel() // seqlen)
    return ids[: n * seqlen].view(n, seqlen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", choices=["quick", "full"])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chat-calib.json")
    args = ap.parse_args()

    import lowbit
    from lowbit.eval.evaluate import protocol_windows
    from lowbit.eval.protocol import get_protocol, model_key, provenance
    from lowbit.io.atomic import atomic_write_text
    from lowbit.jobs import eval_job
    from lowbit.reference import build_reference

    ref = build_reference()
    proto = get_protocol(args.profile)
    base, tok = lowbit.load(ref)
    windows = {"wikitext2": protocol_windows(tok, proto), "chat": chat_windows(tok, proto.seqlen, proto.windows)}
    key = model_key(str(ref))
    rows = {}
    for chat in (False, True):
        name = "c4-chat" if chat else "c4"
        model, _ = lowbit.load(ref)
        recipe = {"quant": {"method": args.method, "bits": args.bits, "group_size": args.group_size},
                  "calibration": {"dataset": "c4", "chat": chat, "n_samples": proto.calib_samples,
                                  "seqlen": proto.calib_seqlen, "seed": proto.calib_seed}}
        t0 = time.perf_counter()
        q = lowbit.quantize(model, recipe, tokenizer=tok, progress=True)
        row = {"calibration": name, "bits_per_weight": q.summary["bits_per_weight"],
               "quantize_seconds": round(time.perf_counter() - t0, 1)}
        for wname, w in windows.items():
            ev = eval_job(name, model=q.model, tokenizer=tok, base_model=base, base_key=key, windows=w,
                          protocol=proto, progress=False)
            row[wname] = {"ppl": ev["ppl"], "kl": ev["kl"], "top1_agreement": ev["top1_agreement"],
                          "windows": list(w.shape)}
        rows[name] = row
        print(f"[chat-calib] {name}: " + ", ".join(f"{k} KL {row[k]['kl']:.4f} ppl {row[k]['ppl']:.2f}"
                                                   for k in windows), flush=True)
        del model, q
    out = {"method": args.method, "bits": args.bits, "group_size": args.group_size, "profile": args.profile,
           "runs": rows,
           "provenance": provenance(ref, proto, chat_windows={"source": "C4 held-out documents, chat template",
                                                              "shape": list(windows["chat"].shape)})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
