"""LQER / L²QER against the invariants of the paper and the notes (research-lqer-claq.md §1.10)."""

from __future__ import annotations

import pytest
import torch

from lowbit.methods.config import LQERConfig, RTNConfig
from lowbit.methods.lqer import error_factors, lqer
from lowbit.methods.rtn import rtn_quantize
from lowbit.methods.stats import StatsAccumulator

IN, OUT = 256, 192


def inputs(n: int, seed: int, outliers: float = 20.0) -> torch.Tensor:
    """Correlated activations with log-normal channel scales and 8 outlier channels (×`outliers`)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=torch.Generator().manual_seed(99)) / IN**0.5
    chan = torch.exp(0.5 * torch.randn(IN, generator=torch.Generator().manual_seed(98)))
    chan[:8] *= outliers
    return (torch.randn(n, IN, generator=g) @ mix + 0.3 * torch.randn(n, IN, generator=g)) * chan


def stats_of(X: torch.Tensor):
    acc = StatsAccumulator(IN)
    for chunk in X.split(512):
        acc.add(chunk)
    return acc.result()


@pytest.fixture(scope="module")
def layer():
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.05
    qw = rtn_quantize(W, RTNConfig(bits=4, format="mxint", block_size=16))
    Xc, Xh = inputs(4096, 1), inputs(2048, 2)
    return W, qw, Xc, Xh, stats_of(Xc)


def out_err(W, qw, X) -> float:
    return float((X @ (W - qw.dequantize()).T).norm() / (X @ W.T).norm())


@pytest.mark.parametrize("scale", ["none", "act-mean", "act-rms", "exact"])
def test_full_rank_reproduces_w(layer, scale):
    W, qw, _, _, st = layer
    q = lqer(qw, W, st, LQERConfig(rank=min(IN, OUT), scale=scale, svd="full", factor_dtype="fp32"))
    rel = float((q.dequantize() - W).norm() / W.norm())
    assert rel < 1e-5, rel  # float32 storage of A and B; exact in float64 (see next test)


def test_eckart_young_identity_float64(layer):
    """‖S(E − AB)‖²_F equals the sum of the discarded squared singular values of S·E."""
    W, qw, _, _, st = layer
    E = (W.double() - qw.dequantize().double()).T
    cfg = LQERConfig(rank=16, scale="act-mean", svd="full")
    A, B = error_factors(E, st, cfg)
    s = st.act_mean_abs_max.double().clamp(min=1e-4)
    s = s / torch.sqrt(s.min() * s.max())
    sig = torch.linalg.svdvals(s[:, None] * E)
    lhs = (s[:, None] * (E - A @ B)).square().sum()
    assert torch.allclose(lhs, sig[16:].square().sum(), rtol=1e-10)


def test_constant_scale_is_plain_lqer_and_scale_invariant(layer):
    W, qw, _, _, st = layer
    E = (W.double() - qw.dequantize().double()).T
    cfg = LQERConfig(rank=16, svd="full")
    A0, B0 = error_factors(E, st, cfg.model_copy(update={"scale": "none"}))
    flat = type(st)(hessian=None, act_mean_abs_max=torch.full((IN,), 3.7), nsamples=1)
    A1, B1 = error_factors(E, flat, cfg.model_copy(update={"scale": "act-mean"}))
    assert torch.allclose(A0 @ B0, A1 @ B1, atol=1e-12)
    # scaling the statistic by a constant leaves A·B unchanged (float64 statistic: a float32 product
    # would perturb s by ~1e-7 relative, which the nearly flat error spectrum amplifies)
    s64 = st.act_mean_abs_max.double()
    st1 = type(st)(hessian=None, act_mean_abs_max=s64, nsamples=1)
    st2 = type(st)(hessian=None, act_mean_abs_max=s64 * 17.0, nsamples=1)
    Aa, Ba = error_factors(E, st1, cfg.model_copy(update={"scale": "act-mean"}))
    Ab, Bb = error_factors(E, st2, cfg.model_copy(update={"scale": "act-mean"}))
    assert float((Aa @ Ba - Ab @ Bb).norm() / (Aa @ Ba).norm()) < 1e-9


def test_output_error_ordering_on_outlier_channels(layer):
    """Held-out inputs: L²QER < LQER < no correction; exact R^½ ≤ diagonal scales on calibration inputs."""
    W, qw, Xc, Xh, st = layer
    cfg = LQERConfig(rank=16, svd="full")
    none = out_err(W, qw, Xh)
    plain = out_err(W, lqer(qw, W, st, cfg.model_copy(update={"scale": "none"})), Xh)
    l2 = out_err(W, lqer(qw, W, st, cfg.model_copy(update={"scale": "act-mean"})), Xh)
    assert l2 < 0.9 * plain < 0.9 * none, (none, plain, l2)
    calib = {s: out_err(W, lqer(qw, W, st, cfg.model_copy(update={"scale": s, "factor_dtype": "fp32"})), Xc)
             for s in ("none", "act-mean", "act-rms", "exact")}
    assert calib["exact"] <= min(calib["act-mean"], calib["act-rms"]) * (1 + 1e-4), calib


def test_randomized_svd_within_one_percent_of_full(layer):
    W, qw, _, Xh, st = layer
    for rank in (8, 32):
        full = out_err(W, lqer(qw, W, st, LQERConfig(rank=rank, svd="full")), Xh)
        rand = out_err(W, lqer(qw, W, st, LQERConfig(rank=rank, svd="randomized")), Xh)
        assert abs(rand - full) / full < 0.01, (rank, full, rand)


def test_deterministic_and_counted(layer):
    W, qw, _, _, st = layer
    cfg = LQERConfig(rank=8, svd="randomized", seed=3)
    a, b = lqer(qw, W, st, cfg), lqer(qw, W, st, cfg)
    assert torch.equal(a.lowrank.A, b.lowrank.A) and torch.equal(a.lowrank.B, b.lowrank.B)
    # fp16 factors: 16·k·(in + out) extra bits on top of the base grid
    extra = a.bits_per_weight() - qw.bits_per_weight()
    assert extra == pytest.approx(16 * 8 * (IN + OUT) / (IN * OUT), abs=1e-12)
    # and the state round trip keeps them
    from lowbit.formats.quantized_weight import QuantizedWeight

    t, meta = a.to_state()
    assert torch.equal(QuantizedWeight.from_state(t, meta).dequantize(), a.dequantize())


def test_more_rank_never_hurts_in_the_scaled_norm(layer):
    W, qw, _, _, st = layer
    E = (W.double() - qw.dequantize().double()).T
    s = st.act_mean_abs_max.double().clamp(min=1e-4)
    errs = []
    for k in (4, 8, 16, 32, 64):
        A, B = error_factors(E, st, LQERConfig(rank=k, scale="act-mean", svd="full"))
        errs.append(float((s[:, None] * (E - A @ B)).norm()))
    assert all(x > y for x, y in zip(errs, errs[1:])), errs


def test_pipeline_cli_and_native_format(tiny_model_dir, tmp_path):
    """`--lqer-rank` on top of 3-bit RTN: smaller output error than RTN alone on calibration inputs,
    factors counted in bits and kept through save/load (identical logits)."""
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.native import load_model

    common = ["quantize", str(tiny_model_dir), "--method", "rtn", "--bits", "3", "--group-size", "32",
              "--calib-samples", "8", "--calib-seqlen", "64", "--quiet"]
    r = CliRunner()
    assert r.invoke(app, common + ["-o", str(tmp_path / "rtn")]).exit_code == 0
    res = r.invoke(app, common + ["-o", str(tmp_path / "lq"), "--lqer-rank", "8", "--lqer-scale", "act-mean"])
    assert res.exit_code == 0, res.output
    info = {n: json.loads((tmp_path / n / "lowbit.json").read_text()) for n in ("rtn", "lq")}
    layers = {n: {l["name"]: l for l in info[n]["layers"]} for n in info}
    for name, l in layers["lq"].items():
        out, inn = l["shape"]
        # fp16 A [in, 8] and B [8, out] on top of the same grid
        assert l["bits_per_weight"] == pytest.approx(layers["rtn"][name]["bits_per_weight"] + 16 * 8 * (inn + out) / (inn * out))
    base, tok = load_model(str(tiny_model_dir))
    q_rtn, _ = load_model(str(tmp_path / "rtn"))
    q_lq, _ = load_model(str(tmp_path / "lq"))
    q_lq2, _ = load_model(str(tmp_path / "lq"))
    ids = torch.randint(0, tok.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = base(ids).logits
        e_rtn = float((q_rtn(ids).logits - ref).norm() / ref.norm())
        e_lq = float((q_lq(ids).logits - ref).norm() / ref.norm())
        assert torch.equal(q_lq(ids).logits, q_lq2(ids).logits)
    assert e_lq < 0.8 * e_rtn, (e_rtn, e_lq)
