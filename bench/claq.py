"""CLAQ on the reference model in the paper's settings (per channel, AP, OR) against GPTQ and a SqueezeLLM-style
baseline, plus the 1-D k-means speed comparison with scikit-learn.

    python bench/claq.py [--max-windows 128] [--kl-windows 32] [--only NAME ...] [--skip-kmeans | --kmeans-only]

Each of the two tables replaces its own section of bench/results/claq.md (and its key in claq.json); the
other sections of that file (the matched-bits tables, taken from `lowbit compare`) are left as they are.

Each quantization is its own `lowbit quantize` process (as `make demo`); evaluation happens here with the
fp32 model loaded once: WikiText-2 test perplexity on the first `max-windows` windows, KL(fp32 ‖ q) on the
first `kl-windows`. Bits per weight count everything stored (codes, scales, zeros, codebooks, code-width
index, outlier values and positions) over the quantized linears. Finished runs are cached in
WORK/rows/ (one file per run) so an interrupted bench resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.io.atomic import atomic_write_text

RESULTS = Path(__file__).parent / "results"
WORK = Path(os.environ.get("LOWBIT_CLAQ_WORK", "/tmp/lowbit-claq-bench"))

# name -> `lowbit quantize` flags
RUNS: dict[str, list[str]] = {
    "gptq-w4-pc": ["--method", "gptq", "--bits", "4", "--group-size", "-1"],
    "gptq-w3-pc": ["--method", "gptq", "--bits", "3", "--group-size", "-1"],
    "claq-w4": ["--method", "claq", "--bits", "4"],
    "claq-w3": ["--method", "claq", "--bits", "3"],
    "claq-w4-cb8": ["--method", "claq", "--bits", "4", "--codebook-bits", "8"],
    "claq-w3-cb8": ["--method", "claq", "--bits", "3", "--codebook-bits", "8"],
    "claq-ap3.1": ["--method", "claq", "--bits", "3", "--claq-target-bits", "3.1"],
    "claq-ap2.2": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.2"],
    "claq-ap2.1": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.1"],
    "claq-ap3.1-or": ["--method", "claq", "--bits", "3", "--claq-target-bits", "3.1", "--claq-outliers", "dynamic"],
    "claq-ap2.2-or": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.2", "--claq-outliers", "dynamic"],
    "claq-ap2.1-or": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.1", "--claq-outliers", "dynamic"],
    "claq-w2": ["--method", "claq", "--bits", "2"],
    # int8 codebook entries (per-column affine): the table costs half, bits match GPTQ g64 / g32
    "claq-ap2.1-cb8": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.1", "--codebook-bits", "8"],
    "claq-ap2.2-cb8": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.2", "--codebook-bits", "8"],
    "claq-w3-cb8-or": ["--method", "claq", "--bits", "3", "--codebook-bits", "8", "--claq-outliers", "dynamic"],
    "squeezellm-w4": ["--method", "squeezellm", "--bits", "4"],
    # the same with every block's codebooks fitted in one batch (not the paper's per-column refit)
    "claq-w3-block": ["--method", "claq", "--bits", "3", "--claq-fit", "block"],
    "claq-w4-block": ["--method", "claq", "--bits", "4", "--claq-fit", "block"],
    "claq-w3-cb8-block": ["--method", "claq", "--bits", "3", "--codebook-bits", "8", "--claq-fit", "block"],
    "claq-ap3.1-block": ["--method", "claq", "--bits", "3", "--claq-target-bits", "3.1", "--claq-fit", "block"],
    "claq-ap2.2-block": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.2", "--claq-fit", "block"],
    "claq-ap2.1-block": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.1", "--claq-fit", "block"],
    "claq-ap3.1-or-block": ["--method", "claq", "--bits", "3", "--claq-target-bits", "3.1", "--claq-outliers",
                            "dynamic", "--claq-fit", "block"],
    "claq-ap2.2-or-block": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.2", "--claq-outliers",
                            "dynamic", "--claq-fit", "block"],
    "claq-ap2.1-or-block": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.1", "--claq-outliers",
                            "dynamic", "--claq-fit", "block"],
    "squeezellm-w3": ["--method", "squeezellm", "--bits", "3"],
    # GPTQ at group sizes whose bits per weight bracket CLAQ's (codebooks cost 2^b·16/out per weight)
    "gptq-w4-g32": ["--method", "gptq", "--bits", "4", "--group-size", "32"],
    "gptq-w4-g64": ["--method", "gptq", "--bits", "4", "--group-size", "64"],
    "gptq-w3-g128": ["--method", "gptq", "--bits", "3", "--group-size", "128"],
    "gptq-w3-g64": ["--method", "gptq", "--bits", "3", "--group-size", "64"],
    "gptq-w3-g32": ["--method", "gptq", "--bits", "3", "--group-size", "32"],
    "gptq-w2-g64": ["--method", "gptq", "--bits", "2", "--group-size", "64"],
    "gptq-w2-g32": ["--method", "gptq", "--bits", "2", "--group-size", "32"],
    "gptq-w2-g16": ["--method", "gptq", "--bits", "2", "--group-size", "16"],
    # extensions beyond the paper (issue 4): one fp16 scale per output row, cheaper packed codebook entries
    "claq-w3-cb8-rms": ["--method", "claq", "--bits", "3", "--codebook-bits", "8", "--claq-row-scale", "rms"],
    "claq-w3-cb6": ["--method", "claq", "--bits", "3", "--codebook-bits", "6"],
    "claq-ap2.1-cb8-rms": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.1", "--codebook-bits", "8",
                           "--claq-row-scale", "rms"],
    "claq-ap2.05-cb8-rms": ["--method", "claq", "--bits", "2", "--claq-target-bits", "2.05", "--codebook-bits", "8",
                            "--claq-row-scale", "rms"],
}

COLUMNS = ["run", "bits_per_weight", "code_bits", "meta_bits", "outlier_bits", "ppl", "kl", "top1_agreement",
           "quantize_seconds", "method_seconds"]


def storage_breakdown(qweights) -> dict:
    n = sum(q.shape[0] * q.shape[1] for q in qweights.values())
    tot: dict[str, int] = {}
    for q in qweights.values():
        for k, v in q.storage().items():
            tot[k] = tot.get(k, 0) + v
    out = {k: v / n for k, v in tot.items()}
    return {"bits_per_weight": sum(out.values()), "code_bits": out.get("codes", 0.0),
            "outlier_bits": out.get("outlier_values", 0.0) + out.get("outlier_index", 0.0),
            "meta_bits": sum(v for k, v in out.items() if k not in ("codes", "outlier_values", "outlier_index")),
            "storage": out}


def model_runs(ref: Path, names: list[str], max_windows: int, kl_windows: int, data: str | None,
               cached_only: bool = False) -> list[dict]:
    from lowbit.io.native import load_model, load_quantized
    from lowbit.jobs import eval_job

    # one cache file per run: interrupted benches resume, and workers with disjoint --only lists can run
    # side by side
    cache_dir = WORK / "rows"
    cache_dir.mkdir(parents=True, exist_ok=True)

    def cached(key: str) -> dict | None:
        f = cache_dir / f"{key}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def store(key: str, row: dict) -> None:
        (cache_dir / f"{key}.json").write_text(json.dumps(row, indent=1))

    base_model, tok = load_model(str(ref))
    model_id = ref.name  # reference-<config hash>: rows of another reference model are never reused
    key = f"{model_id}-fp32-{max_windows}-{kl_windows}"
    if cached(key) is None:
        ev = eval_job(str(ref), model=base_model, tokenizer=tok, data=data, max_windows=max_windows, progress=False)
        store(key, {"run": "fp32", "bits_per_weight": 32.0, "ppl": ev["ppl"], "kl": 0.0, "top1_agreement": 1.0,
                    "protocol": {k: ev[k] for k in ("seqlen", "n_windows", "n_tokens")}})
    rows = [cached(key)]
    for name in names:
        key = f"{model_id}-{name}-{max_windows}-{kl_windows}"
        if cached(key) is not None:
            rows.append(cached(key))
            continue
        if cached_only:
            continue
        out = WORK / "models" / model_id / name
        cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(ref), "-o", str(out), *RUNS[name],
               "--overwrite", "--quiet"] + (["--data", data] if data else [])
        print(f"== {name}: {' '.join(RUNS[name])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"quantization failed: {' '.join(cmd)}")
        info = json.loads((out / "lowbit.json").read_text())
        qmodel, qweights, _ = load_quantized(out)
        ev = eval_job(str(out), model=qmodel, tokenizer=tok, base_model=base_model, data=data,
                      max_windows=max_windows, kl_windows=kl_windows, progress=False)
        row = {"run": name, **storage_breakdown(qweights), "ppl": ev["ppl"], "kl": ev["kl"],
               "top1_agreement": ev["top1_agreement"], "quantize_seconds": info["summary"]["quantize_seconds"],
               "method_seconds": sum(r["seconds"] for r in info["layers"]), "flags": " ".join(RUNS[name])}
        print({k: row[k] for k in COLUMNS}, flush=True)
        store(key, row)
        rows.append(row)
        del qmodel
    return rows


def kmeans_speed(ref: Path, n_cols: int = 48) -> list[dict]:
    """Per-column time and SSE: scikit-learn KMeans (as the CLAQ authors call it) vs ours, on columns of
    the reference model's linears (length = out_features), back to back in one process, one thread."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from lowbit.io.native import load_model
    from lowbit.methods.kmeans import kmeans_1d, kmeans_1d_optimal, sse

    model, _ = load_model(str(ref))
    torch.set_num_threads(1)
    layers = {n: m.weight.detach().float() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    by_len: dict[int, list[torch.Tensor]] = {}
    for name, w in layers.items():  # columns W[:, j]: the first n_cols of each layer, grouped by length
        by_len.setdefault(w.shape[0], []).append(w[:, :n_cols].T)
    rows = []
    for m_len, cols in sorted(by_len.items()):
        X = torch.cat(cols)[: 4 * n_cols * 2]  # a fixed sample of columns of this length
        for k in (4, 8, 16):
            # best of 3 for every timing (the machine is shared): sklearn over 3 thirds of the columns,
            # ours over 3 repeats; per column
            with threadpool_limits(1):
                centers, t_parts = [], []
                for part in X.double().numpy().reshape(3, -1, m_len):
                    t0 = time.perf_counter()
                    for x in part:
                        km = KMeans(n_clusters=k, random_state=10, n_init="auto").fit(x[:, None])
                        centers.append(np.sort(km.cluster_centers_[:, 0]))
                    t_parts.append((time.perf_counter() - t0) / part.shape[0])
                t_sk = min(t_parts)
            e_sk = sse(X, torch.tensor(np.stack(centers)).float())
            t_batch, t_single = float("inf"), float("inf")
            n_single = min(64, X.shape[0])
            for _ in range(3):
                t0 = time.perf_counter()
                r = kmeans_1d(X, k)  # every column of the sample in one batched call
                t_batch = min(t_batch, (time.perf_counter() - t0) / X.shape[0])
                t0 = time.perf_counter()
                for i in range(n_single):  # one column per call: CLAQ's faithful in-sweep regime
                    kmeans_1d(X[i : i + 1], k)
                t_single = min(t_single, (time.perf_counter() - t0) / n_single)
            e_ours = sse(X, r.centroids)
            e_opt = sse(X[:32], kmeans_1d_optimal(X[:32], k))
            ratio = e_ours / e_sk
            rows.append({"column_length": m_len, "k": k, "columns": X.shape[0],
                         "sklearn_ms_per_col": 1e3 * t_sk, "ours_batched_ms_per_col": 1e3 * t_batch,
                         "speedup_batched": t_sk / t_batch, "ours_single_ms_per_col": 1e3 * t_single,
                         "speedup_single": t_sk / t_single,
                         "sse_ours_over_sklearn_mean": float(ratio.mean()),
                         "cols_ours_worse_by_1pct": float((ratio > 1.01).double().mean()),
                         "sse_sklearn_over_optimal": float((e_sk[:32] / e_opt).mean()),
                         "sse_ours_over_optimal": float((e_ours[:32] / e_opt).mean())})
            print(rows[-1], flush=True)
    return rows


KMEANS_NOTE = ("k-means: scikit-learn KMeans(n_clusters=k, random_state=10, n_init='auto') per column (the CLAQ "
               "authors' call) vs lowbit's kmeans_1d (coarse-DP init + sorted prefix-sum Lloyd, sklearn's tol) on "
               "the same columns of the reference model (the first 48 columns of every linear, grouped by length), "
               "one thread each, back to back in one process; 'batched' fits all sampled columns in one call, "
               "'single' one column per call (CLAQ's in-sweep regime); every time is the best of 3 (sklearn: of 3 "
               "thirds of the columns). SSE ratios are means over columns; optimal = exact DP.")
MODELS_TITLE = "## The paper's settings (per channel, AP, OR, SqueezeLLM)"
KMEANS_TITLE = "## k-means speed"


def models_note(proto: dict, kl_windows: int) -> str:
    return (f"`python bench/claq.py`: each run its own `lowbit quantize` process on the reference model; WikiText-2 "
            f"raw test perplexity on the first {proto.get('n_windows')} windows of {proto.get('seqlen')} tokens "
            f"({proto.get('n_tokens')} tokens), KL(fp32 ‖ quantized) on the first {kl_windows}; calibration "
            f"128 × {proto.get('seqlen')} C4 windows. bits_per_weight = code_bits + meta_bits (scales/zeros or "
            "codebooks + code-width index) + outlier_bits (fp16 values + compact positions), over all quantized "
            "linears. quantize_seconds is the whole `lowbit quantize` pipeline (calibration forward passes "
            "included), method_seconds the quantizers alone.")


def write_section(title: str, table: str, note: str) -> None:
    """Replace the section headed `title` in results/claq.md (up to the next `## ` heading) with the table and
    its note, or append it: the other sections (e.g. the matched-bits tables taken from `lowbit compare`)
    stay as they are."""
    md = RESULTS / "claq.md"
    lines = md.read_text().rstrip("\n").split("\n") if md.exists() else []
    body = [title, "", *table.rstrip("\n").split("\n"), "", note, ""]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = body
    else:
        lines += ["", *body]
    atomic_write_text(md, "\n".join(lines).rstrip("\n") + "\n")
    print(table)


def update_json(**parts) -> None:
    path = RESULTS / "claq.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_text(path, json.dumps({**data, **parts}, indent=2, default=str) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-windows", type=int, default=128)
    ap.add_argument("--kl-windows", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None, help="run names (default: all)")
    ap.add_argument("--skip-kmeans", action="store_true")
    ap.add_argument("--kmeans-only", action="store_true", help="re-measure the k-means speed table only")
    ap.add_argument("--cached-only", action="store_true", help="tabulate finished runs only (no new runs)")
    ap.add_argument("--no-write", action="store_true", help="run (and cache) only; do not write results")
    ap.add_argument("--data", default=None)
    ap.add_argument("--extra-note", default="", help="appended to the note of the section(s) written")
    a = ap.parse_args()
    from lowbit.eval.report import results_table
    from lowbit.reference import reference_path

    WORK.mkdir(parents=True, exist_ok=True)
    ref = reference_path()
    if not (ref / "training.json").is_file():
        raise SystemExit(f"the reference model {ref} is not built; run `lowbit reference build` first")
    extra = f" {a.extra_note}" if a.extra_note else ""
    if not a.skip_kmeans:
        km_rows = kmeans_speed(ref)
        if not a.no_write:
            update_json(kmeans=km_rows)
            write_section(KMEANS_TITLE, results_table(km_rows, list(km_rows[0]))[0], KMEANS_NOTE + extra)
    if a.kmeans_only:
        return
    rows = model_runs(ref, a.only or list(RUNS), a.max_windows, a.kl_windows, a.data, a.cached_only)
    if not a.no_write:
        update_json(rows=rows)
        write_section(MODELS_TITLE, results_table(rows, COLUMNS)[0],
                      models_note(rows[0].get("protocol", {}), a.kl_windows) + extra)


if __name__ == "__main__":
    main()
