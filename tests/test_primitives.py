"""Quantization primitives against independent float64 numpy references.

Uniform affine grids follow the GPTQ reference `quant.py` (IST-DASLab/gptq `Quantizer.find_params`):
min/max include 0; symmetric: xmax = max(|xmin|, xmax), xmin = −xmax only where xmin < 0, zero
= 2^(b−1); an all-zero group gets [−1, 1]; scale = (xmax − xmin)/(2^b − 1), here rounded to fp16
before the codes are chosen; zero = round(−xmin/scale); q = clamp(round(w/s) + z, 0, 2^b − 1).

Exactness policy. The reference works in float64, the implementation in float32. Both round to the
same fp16 scale and to the same integer codes except where the exact value sits on a rounding
boundary (an fp16 midpoint for the scale, a half-integer for codes and zeros); there a float32 and a
float64 computation may legitimately land on different sides. The comparison therefore demands exact
equality everywhere except at *certified ties* (the float64 value lies within 2^-20 relative of the
boundary), requires each tie disagreement to be a one-step difference, and caps the fraction of
ties (observed: 0). Dequantized values are compared with exact equality (`==`): (q − z)·s with an
fp16 s and |q − z| < 256 is exact in float32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.quant_primitives import (
    affine_dequantize,
    affine_qparams,
    affine_quantize,
    expand_group_param,
    fake_quantize_affine,
    fake_quantize_mxint,
    mxint_dequantize,
    mxint_quantize,
)
from lowbit.methods.config import RTNConfig
from lowbit.methods.rtn import rtn_quantize

TIE_REL = 2.0**-20  # a float64 value this close (relative) to a rounding boundary is a certified tie
MAX_TIE_FRACTION = 1e-3



# ------------------------------------------------------------------------------------------------
# Independent float64 reference of the GPTQ min-max grid


def _groups_np(w: np.ndarray, group_size: int) -> np.ndarray:
    rows, cols = w.shape
    if group_size == 0:
        return w.reshape(1, 1, rows * cols)
    g = cols if group_size == -1 else group_size
    return w.reshape(rows, cols // g, g)


def _fp16_tie(v: np.ndarray) -> np.ndarray:
    """True where float64 v lies within TIE_REL of a midpoint between two adjacent fp16 values."""
    v = np.asarray(v, dtype=np.float64)
    h = v.astype(np.float16)
    up = np.nextafter(h, np.float16(np.inf)).astype(np.float64)
    dn = np.nextafter(h, np.float16(-np.inf)).astype(np.float64)
    hf = h.astype(np.float64)
    mid = np.where(v >= hf, (hf + up) / 2, (hf + dn) / 2)
    return np.abs(v - mid) <= TIE_REL * np.abs(v)


def _half_tie(x: np.ndarray) -> np.ndarray:
    """True where x lies within TIE_REL (relative, at least 2^-30 absolute) of a half-integer."""
    return np.abs(np.abs(x - np.floor(x)) - 0.5) <= np.maximum(TIE_REL * np.abs(x), 2.0**-30)


def ref_qparams(w: np.ndarray, bits: int, sym: bool, group_size: int):
    """(scale as exact float64 before fp16 rounding, xmin, xmax) per group [R, G]."""
    maxq = 2**bits - 1
    wg = _groups_np(w.astype(np.float64), group_size)
    xmin = np.minimum(wg.min(axis=-1), 0.0)
    xmax = np.maximum(wg.max(axis=-1), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = np.where(dead, -1.0, xmin)
    xmax = np.where(dead, 1.0, xmax)
    return (xmax - xmin) / maxq, xmin, xmax


def _expand(p: np.ndarray, shape, group_size: int) -> np.ndarray:
    rows, cols = shape
    if group_size == 0:
        return np.broadcast_to(p, (rows, cols))
    g = cols if group_size == -1 else group_size
    return np.repeat(p, g, axis=1)


def compare_affine(w: torch.Tensor, bits: int, sym: bool, group_size: int):
    """Check affine_qparams / affine_quantize / affine_dequantize against the float64 reference.

    Returns the number of certified ties that were exercised (scale, zero, codes).
    """
    maxq = 2**bits - 1
    wn = w.double().numpy()
    scale, zero = affine_qparams(w, bits, sym, group_size)
    assert scale.dtype == torch.float16 and zero.dtype == torch.int32
    s64, xmin, _ = ref_qparams(wn, bits, sym, group_size)
    assert tuple(scale.shape) == s64.shape == tuple(zero.shape)

    # scale: the fp16 rounding of the exact value, except at certified fp16 midpoints
    ref_s16 = s64.astype(np.float16)
    got_s = scale.numpy()
    bad = got_s != ref_s16
    ties = int(bad.sum())
    if bad.any():
        assert _fp16_tie(s64[bad]).all(), f"scale differs away from an fp16 tie: {s64[bad]} {got_s[bad]}"
        # the other neighbour of the midpoint
        assert (np.abs(got_s[bad].astype(np.float64) - s64[bad]) <= np.abs(ref_s16[bad] - s64[bad]) * 1.001 + 1e-30).all()
    s = got_s.astype(np.float64)  # identical to ref_s16 except at certified ties

    # zero point
    if sym:
        ref_z = np.full(s.shape, 2 ** (bits - 1), dtype=np.float64)
        assert (zero.numpy() == ref_z).all()
    else:
        raw = -xmin / s
        ref_z = np.clip(np.round(raw), 0, maxq)
        zbad = zero.numpy() != ref_z
        if zbad.any():
            assert _half_tie(raw[zbad]).all()
            assert (np.abs(zero.numpy()[zbad] - ref_z[zbad]) == 1).all()
            ties += int(zbad.sum())
        ref_z = zero.numpy().astype(np.float64)

    # codes and dequantized values
    S, Z = _expand(s, wn.shape, group_size), _expand(ref_z, wn.shape, group_size)
    ratio = wn / S
    ref_q = np.clip(np.round(ratio) + Z, 0, maxq)
    ref_deq = (ref_q - Z) * S
    se = expand_group_param(scale, w.shape, group_size)
    ze = expand_group_param(zero, w.shape, group_size)
    q = affine_quantize(w, se, ze, bits)
    assert q.dtype == torch.uint8
    qn = q.numpy().astype(np.float64)
    qbad = qn != ref_q
    if qbad.any():
        assert _half_tie(ratio[qbad]).all(), "code differs from round-to-nearest away from a tie"
        assert (np.abs(qn[qbad] - ref_q[qbad]) == 1).all()
        ties += int(qbad.sum())
    assert ties <= MAX_TIE_FRACTION * w.numel() + 2
    deq = affine_dequantize(q, se, ze)
    assert deq.dtype == torch.float32
    ref_deq_got = (qn - Z) * S  # exact (|q − z| < 2^8, s has 11 significant bits)
    assert (deq.double().numpy() == ref_deq_got).all()
    assert (deq.double().numpy()[~qbad] == ref_deq[~qbad]).all()
    # fake quantization is exactly quantize→dequantize
    assert torch.equal(fake_quantize_affine(w, bits, sym, group_size), deq)
    return ties


def _weights(rows=64, cols=512, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    if outliers:
        idx = torch.randint(0, rows * cols, (rows * cols // 200,), generator=g)
        w.view(-1)[idx] *= 8
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 0, 128, 32])
def test_affine_matches_float64_reference(bits, sym, group_size):
    w = _weights(seed=bits * 10 + group_size % 7 + sym)
    compare_affine(w, bits, sym, group_size)


def test_affine_reference_special_groups():
    """All-positive, all-negative, all-zero, single-nonzero and constant groups (per group of 8)."""
    rows = [
        [0.0] * 8,  # dead → [−1, 1]
        [0.5, 0.25, 1.0, 0.125, 0.75, 0.3, 0.6, 0.9],  # all positive: min clamps to 0
        [-0.5, -0.25, -1.0, -0.125, -0.75, -0.3, -0.6, -0.9],  # all negative: max clamps to 0
        [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0],
        [0.2] * 8,
        [-7.0, 1e-3, 2.0, -0.01, 5.0, 0.0, -3.0, 6.5],
    ]
    w = torch.tensor(rows, dtype=torch.float32).repeat(1, 2)  # 16 columns, groups of 8
    for bits in (2, 3, 4, 8):
        for sym in (False, True):
            compare_affine(w, bits, sym, 8)


def test_all_zero_group_range_is_minus_one_to_one():
    w = torch.zeros(3, 8)
    w[2] = torch.linspace(-1, 1, 8)
    for sym in (False, True):
        scale, zero = affine_qparams(w, 4, sym, 8)
        assert scale[0, 0].item() == np.float16(2 / 15)
        assert zero[0, 0].item() == 8  # asym: round(1 / fp16(2/15)) = round(7.5018) = 8; sym: 2^3
        assert torch.equal(fake_quantize_affine(w, 4, sym, 8)[0], torch.zeros(8))


def test_symmetric_all_nonnegative_group_is_gptq_quirk():
    """GPTQ's quant.py keeps xmin = 0 for an all-nonnegative group under sym: scale = xmax/maxq with
    zero 2^(b−1), so the upper half of the grid only reaches (2^(b−1) − 1)/(2^b − 1)·xmax and large
    values clip. Faithful to the reference (documented, not a bug of this port)."""
    w = torch.tensor([[0.0, 0.1, 0.5, 1.0]])
    scale, zero = affine_qparams(w, 4, True, -1)
    assert scale.item() == np.float16(1 / 15) and zero.item() == 8
    wq = fake_quantize_affine(w, 4, True, -1)
    assert wq[0, 3].item() == pytest.approx(7 * float(np.float16(1 / 15)), rel=0, abs=0)


def test_symmetric_scale_is_two_absmax_over_maxq():
    w = torch.tensor([[-0.75, 0.25, 0.5, 0.0], [0.3, -0.1, 0.9, -0.9]])
    scale, zero = affine_qparams(w, 4, True, -1)
    assert scale[:, 0].tolist() == [float(np.float16(1.5 / 15)), float(np.float16(1.8 / 15))]
    assert zero[:, 0].tolist() == [8, 8]


def test_scale_is_fp16_and_dequantize_uses_the_stored_scale():
    """Codes are fitted to the fp16 scale: a float32 scale would give different codes here."""
    w = _weights(rows=32, cols=256, seed=3)
    for sym in (False, True):
        cfg = RTNConfig(bits=4, group_size=128, symmetric=sym)
        qw = rtn_quantize(w, cfg)
        grid = qw.grid
        assert grid.scale.dtype == torch.float16
        s = grid.scale.double().repeat_interleave(128, 1)
        z = grid.zero.double().repeat_interleave(128, 1)
        expect = (qw.codes.double() - z) * s
        assert torch.equal(qw.dequantize().double(), expect)
        # every dequantized value lies on its group's grid, codes in [0, 15]
        assert int(qw.codes.max()) <= 15
        k = qw.dequantize().double() / s + z
        assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= 15
        # round-to-nearest: error ≤ s·(1/2 + maxq·2^-10) (fp16 scale rounding can clip the edge slightly)
        err = (w.double() - qw.dequantize().double()).abs()
        assert (err <= s * (0.5 + 15 * 2**-10) + 1e-12).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_rtn_codes_in_range_and_on_grid(bits):
    w = _weights(rows=16, cols=256, seed=bits)
    for gs in (-1, 0, 64):
        for sym in (False, True):
            qw = rtn_quantize(w, RTNConfig(bits=bits, group_size=gs, symmetric=sym))
            assert qw.codes.dtype == torch.uint8
            assert 0 <= int(qw.codes.min()) and int(qw.codes.max()) <= 2**bits - 1
            s = expand_group_param(qw.grid.scale, w.shape, gs).double()
            z = expand_group_param(qw.grid.zero, w.shape, gs).double()
            k = qw.dequantize().double() / s + z
            assert torch.equal(k, k.round())
            assert torch.equal(qw.dequantize(), fake_quantize_affine(w, bits, sym, gs))


def _sqnr_db(w: torch.Tensor, wq: torch.Tensor) -> float:
    return 10 * math.log10(float(w.double().square().sum() / (w.double() - wq.double()).square().sum()))


# Measured on 256×1024 N(0, 1) weights, g128 (seed 0): asym 2-bit 5.94, 3-bit 13.30, 4-bit 19.92,
# 8-bit 44.52 dB; sym 5.17 / 12.46 / 19.08 / 43.69 dB. Floors below keep ≈ 0.7–1.2 dB of margin.
# (4-bit per tensor / per channel / g128 / g32, asym: 15.24 / 18.00 / 19.92 / 21.84 dB.)
SQNR_FLOORS = {2: 4.5, 3: 11.5, 4: 18.0, 8: 42.5}


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_sqnr_monotone_and_floors(sym):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    sq = {b: _sqnr_db(w, fake_quantize_affine(w, b, sym, 128)) for b in (2, 3, 4, 8)}
    assert sq[2] < sq[3] < sq[4] < sq[8]
    for b, floor in SQNR_FLOORS.items():
        assert sq[b] >= floor, (b, sq[b])
    # ≈ 6 dB per bit in the high-resolution regime
    assert 20 <= sq[8] - sq[4] <= 28
    # finer granularity never hurts on this data: per-tensor < per-channel < g128 < g32 (4-bit)
    gran = [_sqnr_db(w, fake_quantize_affine(w, 4, sym, g)) for g in (0, -1, 128, 32)]
    assert gran == sorted(gran)


def test_invalid_inputs_raise_lowbit_error():
    w = torch.randn(8, 96)
    with pytest.raises(LowbitError):
        affine_qparams(w, 4, False, -2)
    for bits in (0, 1, 9, 16):
        with pytest.raises(LowbitError):
            affine_qparams(w, bits, False, -1)
    with pytest.raises(LowbitError):
        mxint_quantize(w, 4, 0)
    for bits in (1, 9):
        with pytest.raises(LowbitError):
            mxint_quantize(w, bits, 16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        wb = w.clone()
        wb[3, 5] = bad
        with pytest.raises(LowbitError):
            rtn_quantize(wb, RTNConfig(bits=4, group_size=32))
        with pytest.raises(LowbitError):
            rtn_quantize(wb, RTNConfig(bits=4, format="mxint", block_size=16))
    with pytest.raises(LowbitError):
        rtn_quantize(w[0], RTNConfig(bits=4, group_size=32))  # 1-D


# ------------------------------------------------------------------------------------------------
# MXINT: the LQER authors' block_fp rule, directly in float64


def ref_mxint(x: np.ndarray, bits: int, block: int, exp_bits: int = 8):
    x = x.astype(np.float64)
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(amax))
    lo, hi = -(2 ** (exp_bits - 1) - 1), 2 ** (exp_bits - 1)
    e = np.clip(e, lo, hi)  # log2(0) = −inf → lo
    mag = np.clip(np.round(np.abs(xb) * 2.0 ** (bits - 1) / 2.0**e), 0, 2 ** (bits - 1) - 1)
    m = np.sign(xb) * mag
    deq = m * 2.0**e / 2.0 ** (bits - 1)
    return m.reshape(x.shape), e[..., 0], deq.reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("block", [16, 32])
def test_mxint_matches_float64_reference(bits, block):
    g = torch.Generator().manual_seed(bits * 100 + block)
    x = torch.randn(3, 32, 128, generator=g) * torch.logspace(-6, 2, 128)  # batch dims, many scales
    x[0, 0, :block] = 0  # all-zero block
    x[0, 1, :block] = 2.0 ** torch.randint(-8, 8, (block,), generator=g).float()  # exact powers of two
    x[0, 2, :block] = torch.round(x[0, 2, :block] * 8) / 8  # values on half-step boundaries
    m, e = mxint_quantize(x, bits, block)
    rm, re, rdeq = ref_mxint(x.numpy(), bits, block)
    assert m.dtype == torch.int8 and m.shape == x.shape
    assert e.shape == (3, 32, 128 // block)
    assert (e.numpy() == re).all()
    assert (m.numpy() == rm).all()
    deq = mxint_dequantize(m, e, bits, block)
    assert (deq.double().numpy() == rdeq).all()  # exact: m·2^k is representable
    assert torch.equal(fake_quantize_mxint(x, bits, block), deq)


def test_mxint_exponent_clamp_and_tiny_values():
    """Exponent clamps to [−127, 128] with 8-bit exponents; values far below 2^-127 round to 0
    (authors' rule evaluated exactly)."""
    x = torch.zeros(4, 16)
    x[1, 0] = 1e-40  # subnormal float32: e = ceil(log2) = −133 → clamp −127 → |x|·2^130 = 0.14 → 0
    x[2, 0] = 2.0**-127
    x[2, 1] = 2.0**-129  # same block: mag = round(2^-129 · 2^3 / 2^-127) = round(2) = 2 (4-bit)
    x[3, :] = 3e38
    for bits in (4, 8):
        m, e = mxint_quantize(x, bits, 16)
        rm, re, rdeq = ref_mxint(x.numpy(), bits, 16)
        assert (e.numpy() == re).all() and (m.numpy() == rm).all(), (bits, m, rm)
        assert (mxint_dequantize(m, e, bits, 16).double().numpy() == rdeq).all()
    assert e[:, 0].tolist() == [-127, -127, -127, 128]


def test_mxint_known_answers():
    # A block with max exactly 1.0: e = 0, |1.0|·2^3 = 8 clamps to 7 → 0.875 (MXINT4).
    x = torch.tensor([[1.0, 0.5, -0.25, 0.0625] + [0.0] * 12])
    m, e = mxint_quantize(x, 4, 16)
    assert e.tolist() == [[0]]
    assert m[0, :4].tolist() == [7, 4, -2, 0]  # 0.0625·8 = 0.5 → round-half-even 0
    assert fake_quantize_mxint(x, 4, 16)[0, :4].tolist() == [0.875, 0.5, -0.25, 0.0]
    # max 1.5: e = 1, step 2^(1−3) = 0.25
    x = torch.tensor([[1.5, -1.1, 0.3, 0.125] + [0.0] * 12])
    m, e = mxint_quantize(x, 4, 16)
    assert e.tolist() == [[1]] and m[0, :4].tolist() == [6, -4, 1, 0]
    # MXINT8: max 1.0 → 127/128
    assert fake_quantize_mxint(torch.tensor([[1.0] + [0.0] * 15]), 8, 16)[0, 0].item() == 127 / 128
    # all-zero block: exponent at the clamp floor, codes 0, output exactly 0
    m, e = mxint_quantize(torch.zeros(2, 32), 4, 16)
    assert e.tolist() == [[-127, -127]] * 2 and not m.any()
    assert torch.equal(fake_quantize_mxint(torch.zeros(2, 32), 4, 16), torch.zeros(2, 32))


def test_mxint_sqnr_8bit_far_above_4bit():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))
    s4 = _sqnr_db(w, fake_quantize_mxint(w, 4, 16))
    s8 = _sqnr_db(w, fake_quantize_mxint(w, 8, 16))
    # measured (seed 1): MXINT4 b16 18.65 dB, MXINT8 b16 42.82 dB
    assert 17.5 <= s4 <= 20.0
    assert s8 >= 41.5 and s8 - s4 >= 22
    # RTN through the method entry point gives the same weights
    qw = rtn_quantize(w, RTNConfig(bits=4, format="mxint", block_size=16))
    assert torch.equal(qw.dequantize(), fake_quantize_mxint(w, 4, 16))


@pytest.mark.parametrize("std,bits", [(0.002, 8), (0.0005, 8), (1e-4, 4)])
def test_small_magnitude_weights_keep_min_max_quality(std, bits):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * std
    # scale-invariant: the same weights ×(0.02/std) reach 44.5 dB (8-bit) / 19.9 dB (4-bit)
    ref = _sqnr_db(w * (0.02 / std), fake_quantize_affine(w * (0.02 / std), bits, False, 128))
    assert _sqnr_db(w, fake_quantize_affine(w, bits, False, 128)) >= ref - 0.5


@pytest.mark.parametrize("group_size", [0, -1, 32, 48])
@pytest.mark.parametrize("with_g_idx", [False, True])
def test_grouped_quantize_in_row_chunks_equals_full_broadcast(group_size, with_g_idx, monkeypatch):
    """`affine_quantize_groups` walks the rows in chunks (here 3 rows of 80 per chunk, 10 rows: an uneven
    split); its codes equal `affine_quantize` with the parameters broadcast over the whole weight."""
    import lowbit.formats.quant_primitives as qp

    if with_g_idx and group_size <= 0:
        pytest.skip("g_idx goes with a positive group size")
    monkeypatch.setattr(qp, "_CHUNK_ELEMENTS", 3 * 80)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(10, 80, generator=g)
    scale, zero = qp.affine_qparams(w, 3, False, group_size)
    g_idx = torch.randperm(80, generator=g) // group_size if with_g_idx else None
    full = qp.affine_quantize(w, qp.expand_group_param(scale, w.shape, group_size, g_idx),
                              qp.expand_group_param(zero, w.shape, group_size, g_idx), 3)
    assert torch.equal(qp.affine_quantize_groups(w, scale, zero, 3, group_size, g_idx), full)
