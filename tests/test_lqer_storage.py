"""LQER: the authors' calibration statistic, quantized factor storage (+ B refit),
the two-GEMM kernel path, activation fake quantization (W4A8) and the rank rules."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods.config import ActQuantConfig, LQERConfig, RTNConfig
from lowbit.methods.lqer import diagonal_scale, factor_bits, lqer
from lowbit.methods.rtn import rtn_quantize
from lowbit.methods.stats import LayerStats, StatsAccumulator
from lowbit.nn.act_quant import fake_quantize_act
from lowbit.nn.quant_linear import QuantLinear

IN, OUT = 256, 192


def inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=torch.Generator().manual_seed(99)) / IN**0.5
    chan = torch.exp(0.5 * torch.randn(IN, generator=torch.Generator().manual_seed(98)))
    chan[:8] *= 20
    return (torch.randn(n, IN, generator=g) @ mix + 0.3 * torch.randn(n, IN, generator=g)) * chan


@pytest.fixture(scope="module")
def layer():
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.05
    qw = rtn_quantize(W, RTNConfig(bits=3, group_size=64))
    acc = StatsAccumulator(IN)
    Xc = inputs(2048, 1)
    for chunk in Xc.split(256):
        acc.add(chunk)
    return W, qw, acc.result(), inputs(1024, 2)


def scaled_err(W, q, st) -> float:
    s = diagonal_scale("act-mean", st, IN)
    return float((s[:, None] * (W.double() - q.dequantize().double()).T).norm())


def out_err(W, q, X) -> float:
    return float((X @ (W - q.dequantize()).T).norm() / (X @ W.T).norm())


# ---- 1. calibration statistic


def test_max_of_batch_means_known_answer():
    acc = StatsAccumulator(2, hessian=False)
    acc.add(torch.tensor([[1.0, -2.0], [3.0, 0.0]]))  # batch means |x|: [2, 1]
    acc.add(torch.tensor([[[0.0, 4.0]]]))  # [0, 4] (leading dims are tokens too)
    acc.add(torch.zeros(0, 2))  # an empty batch changes nothing
    acc.add(torch.tensor([[5.0, 1.0], [1.0, -1.0], [0.0, 1.0]]))  # [2, 1]
    st = acc.result()
    assert torch.equal(st.act_mean_abs_max, torch.tensor([2.0, 4.0]))
    assert torch.allclose(st.act_mean_abs, torch.tensor([10 / 6, 9 / 6]))  # global mean kept (AWQ)
    assert st.nsamples == 6
    # act-mean uses the max statistic: clamp, then s / √(min·max) = [2, 4] / √8
    s = diagonal_scale("act-mean", st, 2)
    assert torch.allclose(s, torch.tensor([2, 4], dtype=torch.float64) / 8**0.5, rtol=1e-12)
    with pytest.raises(LowbitError, match="max-over-batches"):
        diagonal_scale("act-mean", LayerStats(act_mean_abs=torch.ones(2)), 2)


# ---- 2. factor storage


@pytest.mark.parametrize("kind", ["fp16", "bf16", "int8", "mxint8"])
def test_factor_storage_counted_exact_and_round_trips(layer, kind):
    W, qw, st, Xh = layer
    k = 24  # not a multiple of the MXINT block: a short last block per row of A
    q = lqer(qw, W, st, LQERConfig(rank=k, factor_dtype=kind, svd="full"))
    lr = q.lowrank
    # counted: codes/values plus scales or exponents, by hand
    by_hand = {"fp16": 16 * k * (IN + OUT), "bf16": 16 * k * (IN + OUT),
               "int8": 8 * k * (IN + OUT) + 16 * (IN + k),
               "mxint8": 8 * k * (IN + OUT) + 8 * (IN * 2 + k * (OUT // 16))}[kind]
    extra = sum(q.storage().values()) - sum(qw.storage().values())
    assert extra == by_hand == factor_bits(kind, IN, OUT, k)
    # dequantize() is exactly base + (Â·B̂)ᵀ with Â, B̂ decoded independently from the stored tensors
    if kind == "int8":
        A = lr.A.double() * lr.a_scale.double()[:, None]
        B = lr.B.double() * lr.b_scale.double()[:, None]
        assert lr.a_scale.dtype == torch.float16 and int(lr.A.abs().max()) <= 127
    elif kind == "mxint8":
        def dec(c, e):  # element j of a row uses exponent e[row, j // 16]: x = m · 2^(e − 7)
            return c.double() * torch.exp2(e.double() - 7).repeat_interleave(16, dim=1)[:, :c.shape[1]]
        A, B = dec(lr.A, lr.a_scale), dec(lr.B, lr.b_scale)
        assert lr.a_scale.shape == (IN, 2) and lr.b_scale.shape == (k, OUT // 16)
    else:
        A, B = lr.A.double(), lr.B.double()
    ref = qw.dequantize().double() + (A @ B).T
    assert torch.allclose(q.dequantize().double(), ref, rtol=0, atol=1e-6)
    # quantized factors cost little accuracy: output error within 3% of fp16 factors
    f16 = lqer(qw, W, st, LQERConfig(rank=k, factor_dtype="fp16", svd="full"))
    assert out_err(W, q, Xh) < 1.03 * out_err(W, f16, Xh)
    # state round trip, bit-identical
    t, meta = q.to_state()
    back = QuantizedWeight.from_state(t, meta)
    assert torch.equal(back.dequantize(), q.dequantize()) and back.bits_per_weight() == q.bits_per_weight()


def test_corrupt_factor_scales_are_refused(layer):
    W, qw, st, _ = layer
    t, meta = lqer(qw, W, st, LQERConfig(rank=16, factor_dtype="mxint8")).to_state()
    t["lowrank.a_scale"] = t["lowrank.a_scale"][:-1]
    with pytest.raises(LowbitError, match="low-rank scales"):
        QuantizedWeight.from_state(t, meta)
    t2, meta2 = lqer(qw, W, st, LQERConfig(rank=16, factor_dtype="int8")).to_state()
    del t2["lowrank.b_scale"]
    with pytest.raises(LowbitError, match="corrupt"):
        QuantizedWeight.from_state(t2, meta2)


@pytest.mark.parametrize("kind", ["int8", "mxint8"])
def test_refit_of_b_is_not_worse(layer, kind):
    """B refitted to the stored Â (least squares in ‖S·‖) vs the authors' independent rounding."""
    W, qw, st, Xh = layer
    for k in (8, 32):
        cfg = LQERConfig(rank=k, factor_dtype=kind, svd="full")
        a = lqer(qw, W, st, cfg)
        b = lqer(qw, W, st, cfg.model_copy(update={"refit": False}))
        assert torch.equal(a.lowrank.A, b.lowrank.A)  # A is the same; only B differs
        assert scaled_err(W, a, st) <= scaled_err(W, b, st) * (1 + 1e-4), (k, kind)
        assert out_err(W, a, Xh) <= out_err(W, b, Xh) * 1.002, (k, kind)


# ---- 3. kernel path


@pytest.mark.parametrize("kind", ["fp32", "mxint8"])
def test_two_gemm_path_matches_dequantize(layer, kind):
    W, qw, st, Xh = layer
    q = lqer(qw, W, st, LQERConfig(rank=16, factor_dtype=kind))
    bias = torch.randn(OUT, generator=torch.Generator().manual_seed(5))
    m = QuantLinear(q, bias)
    x = Xh[:64].reshape(4, 16, IN)
    y = m(x)
    ref = x.double() @ q.dequantize().double().T + bias.double()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6  # float32 GEMMs vs float64 reference
    # only the base weight is cached: Ŵ + (AB)ᵀ is never materialised
    assert torch.equal(m._cache, q.dequantize(lowrank=False))
    # A16 without a low-rank term: exactly F.linear on the dequantized weight, as before
    m0 = QuantLinear(qw, bias)
    assert torch.equal(m0(x), torch.nn.functional.linear(x, qw.dequantize(), bias))


# ---- 4. activation quantization


def test_per_token_mxint_fake_quant_known_answer():
    cfg = ActQuantConfig(bits=8, block_size=4)
    x = torch.tensor([[1.0, 0.3, -0.5, 0.0, 3.0, 0.1, -1.0, 2.0],
                      [0.01, 0.02, -0.03, 0.04, 0.0, 0.0, 0.0, 0.0]])
    # token 0 block 0: max 1 → e = 0, step 2^(0−7): 1 → 127/128 (top step clipped), 0.3 → 38/128
    # token 0 block 1: max 3 → e = 2, step 2^−5: 0.1 → 3/32; token 1 block 0: max .04 → e = −4, step 2^−11
    want = torch.tensor([[127 / 128, 38 / 128, -64 / 128, 0.0, 96 / 32, 3 / 32, -32 / 32, 64 / 32],
                         [20 / 2048, 41 / 2048, -61 / 2048, 82 / 2048, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(fake_quantize_act(x, cfg), want)
    # 6 bits: magnitudes 0..31, step 2^(e−5); a 6-wide row gets a short last block of 2
    y = fake_quantize_act(torch.tensor([[1.0, 0.3, -0.5, 0.0, 0.75, -0.2]]), ActQuantConfig(bits=6, block_size=4))
    assert torch.equal(y, torch.tensor([[31 / 32, 10 / 32, -16 / 32, 0.0, 24 / 32, -6 / 32]]))


def test_act_quant_layer_semantics(layer):
    """With `act`: y = Q(x̂·Ŵᵀ) ... exactly x̂·Ŵᵀ + Q(Q(x̂A)·B) with x̂ = Q(x); without: unchanged."""
    W, qw, st, Xh = layer
    q = lqer(qw, W, st, LQERConfig(rank=8, factor_dtype="mxint8"))
    act = ActQuantConfig(bits=8, block_size=16)
    x = Xh[:32]
    m = QuantLinear(q, None, act=act)
    A, B = q.lowrank.factors()
    xq = fake_quantize_act(x, act)
    ref = xq @ q.dequantize(lowrank=False).T + fake_quantize_act(fake_quantize_act(xq @ A, act) @ B, act)
    assert torch.equal(m(x), ref)
    plain = QuantLinear(q, None)(x)
    assert torch.equal(plain, x @ q.dequantize(lowrank=False).T + (x @ A) @ B)
    assert 0 < float((m(x) - plain).norm() / plain.norm()) < 0.02  # MXINT8 activations: small, not zero


# ---- 5. rank rules (brute force over ranks)


@pytest.mark.parametrize("scale", ["none", "act-mean"])
def test_rank_energy_is_the_least_rank_reaching_the_share(layer, scale):
    W, qw, st, _ = layer
    E = (W.double() - qw.dequantize().double()).T
    s = diagonal_scale(scale, st, IN)
    sig2 = torch.linalg.svdvals(E if s is None else s[:, None] * E).square()
    for tau in (0.05, 0.3, 0.5, 0.9):
        want = next(k for k in range(1, len(sig2) + 1) if sig2[:k].sum() >= tau * sig2.sum())
        q = lqer(qw, W, st, LQERConfig(scale=scale, rank_energy=tau, factor_dtype="fp32"))
        assert q.lowrank.A.shape[1] == want, (tau, want)
        if scale == "act-mean":  # and it reaches the share: the kept energy of S·E
            kept = 1 - (s[:, None] * (E - (q.lowrank.A.double() @ q.lowrank.B.double()))).square().sum() / sig2.sum()
            assert kept >= tau - 1e-5


@pytest.mark.parametrize("kind", ["fp16", "mxint8"])
def test_bit_budget_is_the_largest_rank_that_fits(layer, kind):
    W, qw, st, _ = layer
    cfg = LQERConfig(scale="none", factor_dtype=kind, svd="randomized", power_iters=0, oversample=0)
    bpw = {k: lqer(qw, W, st, cfg.model_copy(update={"rank": k})).bits_per_weight() for k in range(1, 41)}
    bpw[0] = qw.bits_per_weight()
    for target in (qw.bits_per_weight() - 0.01, bpw[1], bpw[7] + 1e-3, bpw[33] - 1e-3, 4.9):
        want = max((k for k, b in bpw.items() if b <= target), default=0)
        assert want < 40
        q = lqer(qw, W, st, cfg.model_copy(update={"target_bits": target}))
        got = 0 if q.lowrank is None else q.lowrank.A.shape[1]
        assert got == want, (target, got, want)
        assert q.bits_per_weight() <= target or (got == 0 and q.lowrank is None)  # base alone over budget


def test_rank_rules_are_exclusive():
    with pytest.raises(ValueError, match="at most one"):
        LQERConfig(rank_energy=0.5, target_bits=5.0)
