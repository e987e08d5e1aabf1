"""1-D k-means speed and quality: lowbit's `kmeans_1d` (CLAQ's and SqueezeLLM's codebook fit) against
scikit-learn's KMeans as the CLAQ authors call it, on columns of the reference model's linears.

    python bench/kmeans_speed.py [--columns 48]

Writes bench/results/kmeans-speed.{json,md} with the provenance of the run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


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


if __name__ == "__main__":
    from lowbit.eval.protocol import provenance
    from lowbit.eval.report import write_results
    from lowbit.reference import build_reference

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--columns", type=int, default=48)
    a = ap.parse_args()
    ref = build_reference()
    rows = kmeans_speed(ref, a.columns)
    write_results(rows, RESULTS, "kmeans-speed", note=KMEANS_NOTE, provenance=provenance(ref))
