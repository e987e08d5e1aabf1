"""An independent check of the UDFC bench's uncompensated rows: zero (rather than remove) the 10 % of each
MLP's channels with the smallest ‖gate row‖² + ‖up row‖² of the reference model and print WikiText-2
perplexity on the first 4 quick-protocol windows, with the model's own loss (no lowbit evaluation code).

    python bench/prune_zero_check.py [--ratio 0.1] [--windows 4]

Seen on 2026-12-04: fp 30.96, zeroed 10 % 4428 — magnitude pruning of MLP channels alone breaks SmolLM2.
"""

from __future__ import annotations

import argparse
import math

import torch

from lowbit.eval.evaluate import protocol_windows
from lowbit.eval.protocol import get_protocol
from lowbit.io.native import load_model
from lowbit.reference import build_reference


def ppl(model, windows) -> float:
    nll = n = 0.0
    with torch.no_grad():
        for x in windows:
            x = x.view(1, -1)
            nll += model(x, labels=x).loss.item() * (x.numel() - 1)
            n += x.numel() - 1
    return math.exp(nll / n)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args()
    model, tok = load_model(build_reference())
    model.eval()
    windows = protocol_windows(tok, get_protocol("quick"), None)[: a.windows]
    print(f"fp: {ppl(model, windows):.2f}")
    for layer in model.model.layers:
        mlp = layer.mlp
        score = mlp.gate_proj.weight.norm(dim=1) ** 2 + mlp.up_proj.weight.norm(dim=1) ** 2
        idx = score.argsort()[: int(a.ratio * score.numel())]
        mlp.gate_proj.weight.data[idx] = 0
        mlp.up_proj.weight.data[idx] = 0
        mlp.down_proj.weight.data[:, idx] = 0
    print(f"{100 * a.ratio:.0f} % of MLP channels zeroed by gate/up norm: {ppl(model, windows):.2f}")
