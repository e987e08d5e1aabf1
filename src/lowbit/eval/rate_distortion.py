"""Rate–distortion reference for weight quantizers: how far a quantizer's mean squared error sits above
the Shannon bound of a Gaussian source at the same rate.

For a memoryless Gaussian source of variance σ², the distortion–rate function under squared error is

    D*(R) = σ² · 2^(−2R)                                    (Shannon; R in bits per sample)

so SQNR*(R) = 10·log10(σ²/D*) = 20·log10(2)·R ≈ 6.02·R dB. A quantizer that reaches MSE D at rate R
(bits per weight with *every* stored bit counted: codes, scales, zeros, codebooks, low-rank factors)
sits gap = 10·log10(D / D*(R)) dB above the bound. Reference gaps for a Gaussian:

* fixed-rate scalar quantization, Lloyd–Max (the best 2^b-level quantizer): 1.62 / 2.74 / 3.45 / 3.86 dB at
  b = 1..4, tending to 10·log10(√3·π/2) ≈ 4.35 dB at high rate (Panter–Dite);
* entropy-coded uniform scalar quantization: 10·log10(π·e/6) ≈ 1.53 dB at high rate (the space-filling
  loss of a scalar cell); closing it needs vector quantization.

For a non-Gaussian source of the same variance D*(R) is not a bound but an upper bound on the true D(R)
(the Gaussian is the hardest source for its variance), so model weights may in principle show a negative
gap; structure across the matrix (per-channel scales, low rank) is exactly what side information exploits.
"""

from __future__ import annotations

import math

import numpy as np

# MSE of the Lloyd–Max quantizer with 2^b levels for a unit-variance Gaussian (Max 1960, Table; reproduced
# to 4 digits by `lloyd_max_gaussian`).
LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}

PANTER_DITE_GAP_DB = 10 * math.log10(math.sqrt(3) * math.pi / 2)  # ≈ 4.35 dB: fixed-rate scalar, high rate
ENTROPY_CODED_GAP_DB = 10 * math.log10(math.pi * math.e / 6)  # ≈ 1.53 dB: entropy-coded uniform, high rate
DB_PER_BIT = 20 * math.log10(2)  # ≈ 6.02 dB of SQNR per bit on the bound


def gaussian_rd_bound(variance: float, rate: float) -> float:
    """D*(R) = σ²·2^(−2R): the least MSE of any code at R bits per sample for a Gaussian of variance σ²."""
    if variance < 0 or rate < 0:
        raise ValueError(f"variance {variance} and rate {rate} must be non-negative")
    return variance * 2.0 ** (-2.0 * rate)


def sqnr_db(mse: float, variance: float) -> float:
    """Signal-to-quantization-noise ratio 10·log10(σ²/D) in dB (inf for an exact reconstruction)."""
    return math.inf if mse == 0 else 10 * math.log10(variance / mse)


def gap_db(mse: float, variance: float, rate: float) -> float:
    """10·log10(D / D*(R)): dB above the Gaussian rate–distortion bound (= SQNR*(R) − SQNR)."""
    return -math.inf if mse == 0 else 10 * math.log10(mse / gaussian_rd_bound(variance, rate))


def rd_point(W, W_hat, rate: float) -> dict:
    """Distortion numbers of one reconstruction at `rate` bits per weight, in float64:
    mse (per weight), variance σ² (of W about its mean), sqnr_db, d_star, gap_db, sse, n."""
    import torch

    Wd = torch.as_tensor(W).double()
    sse = float((Wd - torch.as_tensor(W_hat).double()).square().sum())
    n = Wd.numel()
    var = float(Wd.var(unbiased=False))
    mse = sse / n
    return dict(rate=float(rate), mse=mse, variance=var, mse_rel=mse / var, sqnr_db=sqnr_db(mse, var),
                d_star=gaussian_rd_bound(var, rate), gap_db=gap_db(mse, var, rate), sse=sse, n=n)


def aggregate(points: list[dict]) -> dict:
    """Size-weighted aggregate of per-layer `rd_point`s: R = Σ bits / Σ n, D = Σ SSE / Σ n,
    σ² = Σ n·σ² / Σ n, D* = Σ n·D*_l / Σ n (each layer's bound at its own rate), gap = 10·log10(D / D*)."""
    n = sum(p["n"] for p in points)
    sse = sum(p["sse"] for p in points)
    var = sum(p["n"] * p["variance"] for p in points) / n
    d_star = sum(p["n"] * p["d_star"] for p in points) / n
    rate = sum(p["n"] * p["rate"] for p in points) / n
    mse = sse / n
    return dict(rate=rate, mse=mse, variance=var, mse_rel=mse / var, sqnr_db=sqnr_db(mse, var), d_star=d_star,
                gap_db=math.inf if d_star == 0 else 10 * math.log10(mse / d_star), sse=sse, n=n)


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.square(x)) / math.sqrt(2 * math.pi)  # 0 at ±inf


def _xphi(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), np.nan_to_num(x) * _phi(x), 0.0)  # x·φ(x) → 0 at ±inf


def lloyd_max_gaussian(bits: int, iters: int = 20000, tol: float = 1e-13) -> tuple[np.ndarray, float]:
    """(levels, MSE) of the Lloyd–Max quantizer with 2^bits levels for N(0, 1), by Lloyd's iteration on
    the density itself (closed-form cell integrals, no sampling):

        centroid of [a, b]:  c = (φ(a) − φ(b)) / (Φ(b) − Φ(a))
        ∫_a^b (x − c)² φ = P(1 + c²) + aφ(a) − bφ(b) − 2c(φ(a) − φ(b)),   P = Φ(b) − Φ(a).
    """
    import torch

    def _Phi(x: np.ndarray) -> np.ndarray:  # the N(0, 1) CDF, exact at ±inf
        return torch.special.ndtr(torch.as_tensor(x, dtype=torch.float64)).numpy()

    k = 2**bits
    c = np.linspace(-2.0, 2.0, k) * (1 if k > 1 else 0)
    for _ in range(iters):
        edges = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
        a, b = edges[:-1], edges[1:]
        P = _Phi(b) - _Phi(a)
        new = (_phi(a) - _phi(b)) / P
        done = np.max(np.abs(new - c)) < tol
        c = new
        if done:
            break
    edges = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
    a, b = edges[:-1], edges[1:]
    P = _Phi(b) - _Phi(a)
    fa, fb = _phi(a), _phi(b)
    mse = float(np.sum(P * (1 + c**2) + _xphi(a) - _xphi(b) - 2 * c * (fa - fb)))
    return c, mse


# ---- the quantizer families of the reference (method configs as plain dicts; `bench/rd.py` and the tests)


def families(have_hqq: bool = False) -> dict[str, callable]:
    """label -> (bits -> method config dict). CLAQ with an identity Hessian has no error feedback (U is
    diagonal), so it is exactly an independent k-means codebook per input column; `fit="block"` fits a
    block's columns in one batch, the same numbers then."""
    f = {
        "RTN per-channel": lambda b: {"method": "rtn", "bits": b, "group_size": -1},
        "RTN g128": lambda b: {"method": "rtn", "bits": b, "group_size": 128},
        "RTN g64": lambda b: {"method": "rtn", "bits": b, "group_size": 64},
        "RTN g32": lambda b: {"method": "rtn", "bits": b, "group_size": 32},
        "MXINT b16": lambda b: {"method": "rtn", "format": "mxint", "bits": b, "block_size": 16},
        "k-means/column cb16": lambda b: {"method": "claq", "bits": b, "codebook_bits": 16, "fit": "block"},
        "k-means/column cb8": lambda b: {"method": "claq", "bits": b, "codebook_bits": 8, "fit": "block"},
        "k-means/row (SqueezeLLM, unweighted)": lambda b: {"method": "squeezellm", "bits": b, "weighting": "none"},
    }
    if have_hqq:
        f["HQQ g64"] = lambda b: {"method": "hqq", "bits": b, "group_size": 64}
    f["RTN g128 + LQER r32 fp16"] = lambda b: {"method": "rtn", "bits": b, "group_size": 128,
                                             "lqer": {"rank": 32, "scale": "none", "factor_dtype": "fp16"}}
    # additive vector codes: b codebooks of 256 8-vectors = b code bits per weight (2x8, 3x8, 4x8 g8); 8
    # rounds (the default 4 leaves ~0.1 dB: the objective still falls ~0.02 dB per round after the 5th)
    f["AQLM bx8 g8"] = lambda b: {"method": "aqlm", "num_codebooks": b, "nbits_per_codebook": 8, "in_group_size": 8,
                                  "rounds": 8}
    return f


def hqq_registered() -> bool:
    from lowbit import methods

    return "hqq" in methods.method_names()


def quantize_point(W, cfg: dict) -> tuple[dict, object]:
    """Quantize W [out, in] with the method config dict `cfg` (identity Hessian where the method needs
    one: GPTQ/CLAQ then have no error feedback) and return (rd_point at its bits_per_weight, QuantizedWeight)."""
    import torch

    from lowbit.methods import LayerStats, needs_calibration, parse_method_config, quantize_weight

    config = parse_method_config(cfg)
    stats = None
    if needs_calibration(config):
        if getattr(config.lqer, "scale", "none") != "none":
            raise ValueError("an activation-scaled LQER needs real activations, not an identity Hessian")
        stats = LayerStats(hessian=torch.eye(W.shape[1], dtype=torch.float32))
    qw = quantize_weight(W, stats, config)
    return rd_point(W, qw.dequantize(), qw.bits_per_weight()), qw
