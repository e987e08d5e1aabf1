"""UDFC bench: data-free channel pruning + quantization with closed-form compensation.

    python bench/udfc.py [--part cnn|lm|all] [--lm-windows 256] [--kl-windows 64]

(a) cnn: a small ResNet-style CNN with BatchNorm, trained here on scikit-learn's digits (fixed seed,
    a few seconds), then 10/30/50% channel pruning × {8, 6, 4}-bit per-channel symmetric RTN weights ×
    {none, merge (Neuron Merging), udfc}: top-1 test accuracy. The compression sees no data.
(b) lm: the reference LLaMA, 10/20/30% MLP channel pruning × {none, UDFC data-free, UDFC data-light}
    (plus 0% and 30% with 4-bit MLP weights): WikiText-2 test perplexity (first --lm-windows windows) and KL(fp32‖pruned) (first --kl-windows).
Writes bench/results/udfc.{md,json} (the parts run; the other part's rows are kept from the last run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.prune.cnn import prune_cnn
from lowbit.prune.config import PruneConfig

RESULTS = Path(__file__).parent / "results"


class Block(nn.Module):
    """ResNet basic block: conv1 (prunable, compensated in conv2), conv2 meets the shortcut (skipped)."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class DigitsResNet(nn.Module):
    def __init__(self, width: int = 32, hidden: int = 64, blocks: int = 2):
        super().__init__()
        self.stem1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn_s1 = nn.BatchNorm2d(width)
        self.relu_s1 = nn.ReLU()
        self.stem2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_s2 = nn.BatchNorm2d(width)
        self.relu_s2 = nn.ReLU()
        self.blocks = nn.Sequential(*[Block(width, hidden) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.relu_s2(self.bn_s2(self.stem2(self.relu_s1(self.bn_s1(self.stem1(x))))))
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


def digits_data(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.3, random_state=seed, stratify=d.target)
    return X[idx_tr], y[idx_tr], X[idx_te], y[idx_te]


def train_cnn(seed: int = 0, epochs: int = 15) -> tuple[nn.Module, tuple]:
    Xtr, ytr, Xte, yte = digits_data(seed)
    torch.manual_seed(seed)
    model = DigitsResNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            b = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(Xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), (Xte, yte)


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.eval()(X).argmax(1) == y).double().mean())


COMPS = ("none", "merge", "udfc")


def cnn_part(seed: int = 0, epochs: int = 8) -> tuple[list[dict], str]:
    """One row per (criterion, ratio, bits): top-1 of each compensation side by side."""
    t0 = time.perf_counter()
    model, (Xte, yte) = train_cnn(seed, epochs)
    train_s = time.perf_counter() - t0
    fp32 = accuracy(model, Xte, yte)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for criterion in ("l2", "recon"):
        for ratio in (0.0, 0.1, 0.3, 0.5):
            if ratio == 0.0 and criterion == "recon":
                continue  # nothing pruned: the criterion does not matter
            for bits in (8, 6, 4):
                row = {"part": "cnn", "criterion": criterion, "ratio": ratio, "bits": bits, "fp32": fp32}
                for c in COMPS:
                    cfg = PruneConfig(ratio=ratio, bits=bits, compensation=c, criterion=criterion)
                    pruned, rep = prune_cnn(model, cfg)
                    row[c] = accuracy(pruned, Xte, yte)
                row["params"] = rep["parameters"]
                row["recovered"] = ((row["udfc"] - row["none"]) / (fp32 - row["none"])
                                    if fp32 - row["none"] > 0.005 else None)
                rows.append(row)
    note = (f"CNN: DigitsResNet (stem conv-BN-ReLU ×2, 2 residual basic blocks width 32 / hidden 64, "
            f"{n_params} parameters) trained {epochs} epochs on sklearn digits (1257 train / 540 test, seed {seed}, "
            f"{train_s:.0f} s on a shared CPU); fp32 top-1 {fp32:.4f}. Prunable chains: stem1 → stem2 and each "
            "block's conv1 → conv2 (channels feeding the residual adds are skipped). Every conv/linear is "
            "quantized per-channel symmetric RTN at `bits`. Columns none / merge / udfc: top-1 test accuracy "
            "with no compensation, Neuron Merging (BN-folded cosine partner, threshold 0.1), UDFC (family "
            "scale, data-free BN-Gaussian moments, bias re-fitted). No data is used by any compression. "
            "recovered = (udfc − none) / (fp32 − none), shown when none loses more than 0.5 points.")
    return rows, note


def lm_part(profile: str, data: str | None) -> tuple[list[dict], str]:
    from lowbit import data as datasets
    from lowbit.eval.evaluate import base_result, evaluate
    from lowbit.eval.protocol import get_protocol, model_key
    from lowbit.io.native import load_model
    from lowbit.eval.evaluate import base_outputs, protocol_windows
    from lowbit.prune.hf import prune_hf
    from lowbit.reference import build_reference

    path = build_reference()
    proto = get_protocol(profile)
    base, tok = load_model(path)
    windows = protocol_windows(tok, proto, data)
    cache = base_outputs(base, model_key(path), windows, proto)
    calib = datasets.calibration_windows(tok, datasets.c4_split("calib", data), proto.calib_samples,
                                         proto.calib_seqlen, proto.calib_seed)
    fp = base_result(cache)
    rows = [{"part": "lm", "ratio": 0.0, "bits": 32, "compensation": "fp32", "statistics": "—", "ppl": fp.ppl, "kl": 0.0,
             "top1_agreement": 1.0, "params": sum(p.numel() for p in base.parameters())}]
    runs = (("none", "none", False), ("udfc", "data-free", False), ("udfc", "data-light", True))
    for ratio, bits in ((0.1, None), (0.2, None), (0.3, None), (0.0, 4), (0.2, 4)):
        for comp_name, stats, light in runs:
            if ratio == 0.0 and comp_name != "none":
                continue  # nothing pruned: nothing to compensate
            cfg = PruneConfig(ratio=ratio, bits=bits, compensation=comp_name, data_light=light)
            t0 = time.perf_counter()
            model, rep, _ = prune_hf(base, cfg, calib if light else None)
            secs = time.perf_counter() - t0
            ev = evaluate(model, windows, cache, batch_size=proto.batch_size)
            rows.append({"part": "lm", "ratio": ratio, "bits": bits or 32, "compensation": comp_name,
                         "statistics": stats if comp_name == "udfc" else "—", "ppl": ev.ppl, "kl": ev.kl,
                         "top1_agreement": ev.top1_agreement, "params": rep["parameters"], "seconds": round(secs, 2)})
            print(rows[-1], flush=True)
    note = (f"LM: the reference model SmolLM2-135M-Instruct ({path.name}), every MLP pruned by the same ratio "
            f"(L2 norm of the gate/up rows); bits 32: fp32 weights; bits 4: the MLP linears (gate, up, down) "
            f"per-channel symmetric 4-bit RTN, attention fp32, kept gate/up quantization compensated in the same "
            f"objective. {proto.describe(fp.n_windows, fp.n_tokens)}. data-free: moments from the block's RMSNorm "
            f"applied to N(0, I) noise (8192 samples, no text); data-light: moments from the protocol's "
            f"{proto.calib_samples} × {proto.calib_seqlen}-token C4 calibration windows. seconds = pruning time on "
            "2 CPU cores.")
    return rows, note


CNN_COLS = ["criterion", "ratio", "bits", "fp32", "none", "merge", "udfc", "recovered", "params"]
LM_COLS = ["ratio", "bits", "compensation", "statistics", "ppl", "kl", "top1_agreement", "params", "seconds"]


def main() -> None:
    from lowbit.eval.report import results_table
    from lowbit.io.atomic import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("cnn", "lm", "all", "render"), default="all",
                    help="render: rewrite udfc.md from udfc.json without running anything")
    ap.add_argument("--profile", default="quick", choices=["quick", "full"], help="evaluation protocol (lm part)")
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    from lowbit.eval.protocol import get_protocol, provenance

    out = RESULTS / a.profile
    old = json.loads((out / "udfc.json").read_text()) if (out / "udfc.json").is_file() else {}
    parts = {p: (old.get(p, {}).get("rows", []), old.get(p, {}).get("note")) for p in ("cnn", "lm")}
    if a.part in ("cnn", "all"):
        parts["cnn"] = cnn_part()
    if a.part in ("lm", "all"):
        parts["lm"] = lm_part(a.profile, a.data)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# UDFC bench\n\nProduced by `python bench/udfc.py --part cnn|lm|all --profile {a.profile}`; each part "
          "keeps its rows until that part is run again.\n"]
    for p, cols, title in (("cnn", CNN_COLS, "(a) CNN on sklearn digits: top-1 test accuracy"),
                           ("lm", LM_COLS, "(b) Reference LM: MLP channel pruning")):
        rows, note = parts[p]
        if rows:
            md.append(f"## {title}\n\n{results_table(rows, cols)[0]}\n{note}\n")
            print(results_table(rows, cols)[0])
    from lowbit.reference import build_reference

    prov = provenance(build_reference(), get_protocol(a.profile))
    atomic_write_text(out / "udfc.json", json.dumps({**{p: {"rows": r, "note": n} for p, (r, n) in parts.items()},
                                                     "provenance": prov}, indent=1) + "\n")
    atomic_write_text(out / "udfc.md", "\n".join(md))


if __name__ == "__main__":
    main()
