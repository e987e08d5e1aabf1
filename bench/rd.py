"""Rate–distortion reference of lowbit's weight quantizers: MSE against the Gaussian bound D*(R) = σ²·2^(−2R).

    python bench/rd.py [--part gaussian|model|all] [--size 4096] [--seed 0] [--sample 1024] [--no-plot]

Sources: (a) an i.i.d. N(0, 1) matrix size×size (seeded), (b) every quantized linear of the reference model
(28 layers; σ² per layer; per-layer rows in results/rd-layers.json, the size-weighted aggregate in the
table). Quantizers at 2, 3, 4 bits: `lowbit.eval.rate_distortion.families()` (RTN per channel / g128 / g64 /
g32, MXINT block 16, per-column k-means codebooks (CLAQ with H = I), per-row k-means (SqueezeLLM
unweighted), HQQ g64 when `hqq` is registered, RTN g128 + LQER rank 32). R = `bits_per_weight()` (every
stored bit). MSE only, no model evaluation. Sanity check (not a row): GPTQ with H = I reproduces RTN
exactly on the Gaussian matrix (asserted).

The slow families (per-column / per-row k-means, HQQ) run on a seeded random `--sample` of the Gaussian
matrix's columns / rows (i.i.d. entries: unbiased MSE, same R); `--sample 0` quantizes all of it. AQLM
always quantizes the whole matrix: its codebooks are shared by all rows, so on a sample they would cost
more bits per weight than on the matrix (measured at 3 bits on 1024 rows: R 3.027, gap 3.03 dB).

Writes results/rd.{md,json} (a table per source), results/rd-layers.{md,json} (per layer) and
results/rd.png (SQNR vs R with the bound). Resumable: every finished (source, quantizer, bits) is kept in
results/.rd-runs.json (the reference model's source is its directory name); a rerun only computes what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lowbit.eval import rate_distortion as rd
from lowbit.eval.report import results_table, write_results
from lowbit.io.atomic import atomic_write_text

RESULTS = Path(__file__).parent / "results"
BITS = (2, 3, 4)
COLUMNS = ["source", "quantizer", "bits", "R (bpw)", "σ²", "MSE/σ²", "SQNR dB", "D*", "gap dB", "seconds"]


def cache_path() -> Path:
    return RESULTS / ".rd-runs.json"


def load_cache() -> dict:
    return json.loads(cache_path().read_text()) if cache_path().exists() else {}


def save_cache(cache: dict) -> None:
    atomic_write_text(cache_path(), json.dumps(cache, indent=1))


def key(source: str, cfg: dict) -> str:
    return json.dumps({"source": source, "cfg": cfg}, sort_keys=True)


def model_source() -> str:
    """Cache-key source of the reference-model rows: its directory name (reference-<config hash>), so rows
    of another reference model are never reused. The Gaussian rows do not depend on it."""
    from lowbit.reference import reference_path

    return reference_path().name


def gaussian_matrix(size: int, seed: int) -> torch.Tensor:
    return torch.randn(size, size, generator=torch.Generator().manual_seed(seed))


def sample_axis(label: str) -> str | None:
    """The slow families on the Gaussian matrix may run on a subset of their independent vectors: input
    columns for per-column codebooks, rows for per-row codebooks and HQQ (groups along a row). The entries
    are i.i.d., so the MSE stays unbiased and R is unchanged (per-vector metadata does not depend on how
    many vectors there are)."""
    if label.startswith("k-means/column"):
        return "columns"
    if label.startswith(("k-means/row", "HQQ")):
        return "rows"
    return None  # AQLM too: its codebooks are shared by the whole matrix, so a sample would change R


def gaussian_source(label: str, a) -> str:
    src = f"gaussian {a.size}x{a.size} seed {a.seed}"
    ax = sample_axis(label)
    return src if ax is None or not 0 < a.sample < a.size else f"{src} sample {a.sample} {ax}"


def gaussian_slice(W: torch.Tensor, label: str, a) -> torch.Tensor:
    ax = sample_axis(label)
    if ax is None or not 0 < a.sample < a.size:
        return W
    idx = torch.randperm(a.size, generator=torch.Generator().manual_seed(a.seed + 1))[: a.sample].sort().values
    return W[:, idx].contiguous() if ax == "columns" else W[idx].contiguous()


def model_layers() -> list[tuple[str, torch.Tensor]]:
    """(name, W [out, in]) of every layer the pipeline quantizes, in its order (adapter groups)."""
    from lowbit.io.native import load_model
    from lowbit.models.adapters import get_adapter, layer_weight
    from lowbit.reference import reference_path

    ref = reference_path()
    if not (ref / "config.json").exists():
        raise SystemExit(f"{ref} has no model: build the reference first (lowbit reference build)")
    model, _ = load_model(str(ref))
    ad = get_adapter(model)
    out = []
    for bname, block in ad.blocks(model):
        for group in ad.groups(model, bname, block):
            out += [(n, layer_weight(model.get_submodule(n)).detach().float().clone()) for n in group]
    return out


def table_row(source: str, label: str, bits: int, p: dict, seconds: float) -> dict:
    return {"source": source, "quantizer": label, "bits": bits, "R (bpw)": p["rate"], "σ²": p["variance"],
            "MSE/σ²": p["mse_rel"],
            "SQNR dB": p["sqnr_db"], "D*": p["d_star"], "gap dB": p["gap_db"], "seconds": seconds}


def sanity_gptq_identity(W: torch.Tensor, cache: dict) -> None:
    """GPTQ with H = I has a diagonal inverse-Hessian factor, so no error feedback: it must equal RTN."""
    from lowbit.methods import LayerStats, parse_method_config, quantize_weight

    k = f"sanity:gptq-identity:{tuple(W.shape)}"
    if cache.get(k) == "ok":
        return
    H = LayerStats(hessian=torch.eye(W.shape[1]))
    for b in BITS:
        g = quantize_weight(W, H, parse_method_config({"method": "gptq", "bits": b, "group_size": 128}))
        r = quantize_weight(W, None, parse_method_config({"method": "rtn", "bits": b, "group_size": 128}))
        assert torch.equal(g.codes, r.codes), f"GPTQ(H=I) codes differ from RTN at {b} bits"
        assert torch.equal(g.dequantize(), r.dequantize()), f"GPTQ(H=I) Ŵ differs from RTN at {b} bits"
        assert g.bits_per_weight() == r.bits_per_weight()
        print(f"sanity: GPTQ(H=I) == RTN g128 at {b} bits on {tuple(W.shape)}", flush=True)
    cache[k] = "ok"
    save_cache(cache)


def run_gaussian(fams: dict, a, cache: dict) -> None:
    W = gaussian_matrix(a.size, a.seed)
    for label, f in fams.items():
        for b in BITS:
            k = key(gaussian_source(label, a), f(b))
            if k in cache:
                continue
            t0 = time.perf_counter()
            try:
                p, _ = rd.quantize_point(gaussian_slice(W, label, a), f(b))
            except Exception as e:  # HQQ is being added by others and may still be incomplete; others must work
                if not label.startswith("HQQ"):
                    raise
                print(f"skip {label} {b}: {e!r}", flush=True)
                continue
            cache[k] = table_row("N(0,1)", label, b, p, time.perf_counter() - t0)
            save_cache(cache)
            print(json.dumps(cache[k], ensure_ascii=False), flush=True)
    sanity_gptq_identity(W, cache)


def run_model(fams: dict, cache: dict) -> None:
    layers, src = None, model_source()
    for label, f in fams.items():
        if label.startswith("AQLM"):  # minutes per layer on this CPU: the Gaussian part only
            continue
        for b in BITS:
            k = key(src, f(b))
            if k in cache:
                continue
            layers = layers or model_layers()
            t0 = time.perf_counter()
            pts = []
            try:
                for name, W in layers:
                    p, _ = rd.quantize_point(W, f(b))
                    pts.append({"layer": name, "shape": list(W.shape), **p})
            except Exception as e:
                if not label.startswith("HQQ"):
                    raise
                print(f"skip {label} {b}: {e!r}", flush=True)
                continue
            agg = rd.aggregate(pts)
            cache[k] = {**table_row("reference model (28 linears, size-weighted)", label, b, agg,
                                    time.perf_counter() - t0), "layers": pts}
            save_cache(cache)
            print(json.dumps({c: cache[k][c] for c in COLUMNS}, ensure_ascii=False), flush=True)


def note(a, have_hqq: bool) -> str:
    lm = ", ".join(f"{b} bit {rd.LLOYD_MAX_MSE[b]} ({10 * math.log10(rd.LLOYD_MAX_MSE[b] * 4**b):.2f} dB)"
                   for b in BITS)
    return (
        "Distortion D = mean squared error per weight; σ² = variance of the matrix (per layer for the model); "
        "R = bits_per_weight() with every stored bit counted (codes, scales, zeros, exponents, codebooks, "
        "low-rank factors). Gaussian rate–distortion bound D*(R) = σ²·2^(−2R); SQNR = 10·log10(σ²/D); "
        "gap = 10·log10(D/D*(R)) = 6.02·R − SQNR. References for a Gaussian source: a fixed-rate scalar "
        f"quantizer cannot beat Lloyd–Max (MSE/σ² at {lm} above the bound at the code rate), whose gap tends to "
        f"{rd.PANTER_DITE_GAP_DB:.2f} dB at high rate (Panter–Dite); entropy-coded uniform scalar quantization "
        f"tends to {rd.ENTROPY_CODED_GAP_DB:.2f} dB (πe/6); only vector quantization closes that. "
        f"Source N(0,1): one {a.size}×{a.size} matrix, seed {a.seed}; "
        + (f"the k-means/column rows quantize {a.sample} of its {a.size} columns, the k-means/row and HQQ rows "
           f"{a.sample} of its rows (a seeded random subset: the entries are i.i.d., so MSE is unbiased and R "
           "unchanged; the full matrix, `--sample 0`, measured once, gave MSE/σ² within 0.11% and gaps within "
           "0.005 dB of these); every other row the whole "
           "matrix. " if 0 < a.sample < a.size else "every entry quantized (no sampling). ")
        + "Source reference model: all 28 quantized decoder linears (256×256 attention, 768×256 / 256×768 MLP); "
        "the row is the size-weighted aggregate (R = Σbits/Σn, D = ΣSSE/Σn, σ² and D* = size-weighted means of "
        "the per-layer σ² and D*_l at each layer's own rate, gap = 10·log10(D/D*)); per-layer numbers in "
        "rd-layers.json. The weights are not Gaussian: for them D*(R) is the Gaussian reference of the same "
        "variance, an upper bound on the true D(R), so a negative gap would not violate anything. "
        "k-means/column = CLAQ with an identity Hessian (no error feedback, so exactly one k-means codebook per "
        "input column, 2^b entries in fp16 (cb16) or uint8 on a per-column affine grid (cb8)); k-means/row = "
        "SqueezeLLM with weighting none (one codebook per output row). RTN is asymmetric min-max. MXINT: 8-bit "
        "shared exponent per 16. LQER: SVD of the RTN g128 error, rank 32, no activation scale, fp16 factors "
        "(they cost 32·(in+out)·16/(in·out) bpw: 0.25 on 4096², 2.7–4 on the model's layers). "
        + ("HQQ g64: method hqq with its defaults (l_p error with p = 0.7, 20 half-quadratic iterations, fp16 "
           "scale and fp16 zero per group: b + 0.5 bpw); it minimises the l_p norm, not the MSE measured here. "
           if have_hqq else "HQQ: not registered in lowbit.methods at "
           "run time, no rows. ")
        + "Sanity check, not a row: GPTQ with H = I gives bit-identical codes and Ŵ to RTN g128 at 2/3/4 bits "
        "on the Gaussian matrix (asserted). seconds: quantization time of the row (all layers for the model), "
        "1 torch thread on a shared 2-core machine under contention from other jobs.")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in rows))
    fig, axes = plt.subplots(1, len(sources), figsize=(7 * len(sources), 5.5), squeeze=False)
    markers = "osD^v<>ph*XP"
    labels = list(dict.fromkeys(r["quantizer"] for r in rows))
    for ax, src in zip(axes[0], sources):
        sel = [r for r in rows if r["source"] == src]
        rmax = max(r["R (bpw)"] for r in sel) + 0.3
        x = torch.linspace(1.5, rmax, 50).tolist()
        ax.plot(x, [rd.DB_PER_BIT * v for v in x], "k-", lw=1.5, label="Gaussian D*(R): 6.02·R dB")
        ax.plot(x, [rd.DB_PER_BIT * v - rd.ENTROPY_CODED_GAP_DB for v in x], "k--", lw=0.8,
                label="−1.53 dB (entropy-coded uniform)")
        ax.plot(x, [rd.DB_PER_BIT * v - rd.PANTER_DITE_GAP_DB for v in x], "k:", lw=0.8,
                label="−4.35 dB (fixed-rate scalar, high rate)")
        ax.plot(list(BITS), [rd.DB_PER_BIT * b - 10 * math.log10(rd.LLOYD_MAX_MSE[b] * 4**b) for b in BITS],
                "kx", ms=9, label="Lloyd–Max (Gaussian, code bits only)")
        for i, lab in enumerate(labels):
            pts = sorted((r["R (bpw)"], r["SQNR dB"]) for r in sel if r["quantizer"] == lab)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], lw=0.8,
                        label=lab)
        ax.set_title(src)
        ax.set_xlabel("R: bits per weight (all metadata counted)")
        ax.set_ylabel("SQNR dB = 10·log10(σ²/MSE)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_all(cache: dict, fams: dict, a, have_hqq: bool) -> None:
    rows, layers, msrc = [], [], model_source()
    for gaussian in (True, False):
        for label, f in fams.items():
            for b in BITS:
                r = cache.get(key(gaussian_source(label, a) if gaussian else msrc, f(b)))
                if r is None:
                    continue
                rows.append({c: r[c] for c in COLUMNS})
                layers += [{"quantizer": label, "bits": b, **p} for p in r.get("layers", [])]
    if not rows:
        return
    text = note(a, have_hqq)
    from lowbit.eval.protocol import provenance

    write_results(rows, RESULTS, "rd", COLUMNS, note=text, provenance=provenance())
    # rd.md again, as one table per source (write_results' JSON keeps every row with its source)
    md = []
    for src in dict.fromkeys(r["source"] for r in rows):
        md.append(f"## {src}\n\n" + results_table([r for r in rows if r["source"] == src], COLUMNS[1:])[0])
    atomic_write_text(RESULTS / "rd.md", "\n".join(md) + f"\n{text}\n")
    if layers:
        write_results(layers, RESULTS, "rd-layers",
                      ["quantizer", "bits", "layer", "shape", "rate", "mse", "variance", "mse_rel", "sqnr_db",
                       "d_star", "gap_db"], note="Per-layer rows of the reference-model source of rd.md.")
    if not a.no_plot:
        plot(rows, RESULTS / "rd.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["gaussian", "model", "all"])
    ap.add_argument("--size", type=int, default=4096, help="the Gaussian matrix is size×size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=1024,
                    help="k-means and HQQ rows on the Gaussian matrix: this many of its columns/rows (0: all)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    a = ap.parse_args()

    global RESULTS
    if a.out:
        RESULTS = Path(a.out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # gentle on the shared machine
    have_hqq = rd.hqq_registered()
    fams = rd.families(have_hqq)
    cache = load_cache()
    t0 = time.perf_counter()
    if a.part in ("gaussian", "all"):
        run_gaussian(fams, a, cache)
    if a.part in ("model", "all"):
        run_model(fams, cache)
    write_all(cache, fams, a, have_hqq)
    print(f"rd bench: {time.perf_counter() - t0:.0f} s this run (cached rows not recomputed)", flush=True)


if __name__ == "__main__":
    main()
