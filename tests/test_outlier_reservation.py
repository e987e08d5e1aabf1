"""Outlier reservation (methods.outliers) for RTN and GPTQ: selection against a brute-force reference,
exact counts, bits counted by hand, the grid fitted without the reserved entries, GPTQ with reserved
entries against an unblocked float64 sweep, f = 0 identical to the plain code, LQER on top, storage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

from lowbit.errors import LowbitError
from lowbit.formats import packing
from lowbit.formats.quant_primitives import affine_qparams
from lowbit.formats.quantized_weight import Outliers, QuantizedWeight
from lowbit.formats.sparse_positions import decode_positions, encode_positions
from lowbit.methods import parse_method_config, quantize_weight
from lowbit.methods.column_grids import UniformColumnGrid
from lowbit.methods.config import GPTQConfig, LQERConfig, RTNConfig
from lowbit.methods.gptq import gptq_quantize, gptq_sweep, inverse_cholesky_upper, prepare_hessian
from lowbit.methods.outliers import RULES, outlier_scores, reserve_mask, reserved_count
from lowbit.methods.rtn import rtn_quantize
from lowbit.methods.stats import LayerStats

ROWS, COLS = 64, 256


def student_t(rows=ROWS, cols=COLS, seed=0, df=3.0):
    g = torch.Generator().manual_seed(seed)
    # Student-t by its definition: N(0,1) / sqrt(χ²_df / df), heavy tails for small df
    z = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi2 = torch.randn(rows, cols, int(df), generator=g, dtype=torch.float64).square().sum(-1)
    return (0.02 * z / (chi2 / df).sqrt()).float()


def inputs(n=1024, d=COLS, seed=1):
    g = torch.Generator().manual_seed(seed)
    M = torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    c = torch.exp(0.5 * torch.randn(d, generator=g, dtype=torch.float64))
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ M) * c


W = student_t()
X = inputs()
H = (2 * X.T @ X / X.shape[0]).float()


def out_err(Wq: torch.Tensor) -> float:
    """tr(Δ H Δᵀ): the layer-output error GPTQ minimises."""
    D = (W - Wq).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def mask_of(qw: QuantizedWeight) -> torch.Tensor:
    m = torch.zeros(qw.shape, dtype=torch.bool)
    m.view(-1)[qw.outliers.index.long()] = True
    return m


# ------------------------------------------------------------------------------------------------
# selection


def _brute_scores(Wt: torch.Tensor, gs: int, rule: str) -> torch.Tensor:
    """Loop over (row, group) in float64: the rules written out from their definitions."""
    rows, cols = Wt.shape
    g = cols if gs == -1 else gs
    S = torch.zeros(rows, cols, dtype=torch.float64)
    Wd = Wt.double()
    for r in range(rows):
        for c0 in range(0, cols, g):
            v = Wd[r, c0 : c0 + g]
            if rule == "group-z":
                sd = v.std(correction=0)
                S[r, c0 : c0 + g] = (v - v.mean()).abs() / sd if sd > 0 else 0
            elif rule == "magnitude":
                S[r, c0 : c0 + g] = (v - v.mean()).abs() / Wd.std(correction=0)
            else:  # range: drop of (max(hi,0) − min(lo,0))² when peeling this and the more extreme ones
                order = sorted(range(g), key=lambda i: (float(v[i]), i))
                lo0, hi0 = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
                vals = [float(v[i]) for i in order]
                top_gain, bot_gain = [], []
                for j in range(g):  # j-th largest / smallest
                    hi, hin = max(vals[g - 1 - j], 0), max(vals[g - 2 - j], 0) if j < g - 1 else 0.0
                    top_gain.append((hi - lo0) ** 2 - (hin - lo0) ** 2)
                    lo, lon = min(vals[j], 0), min(vals[j + 1], 0) if j < g - 1 else 0.0
                    bot_gain.append((hi0 - lo) ** 2 - (hi0 - lon) ** 2)
                for j in range(1, g):  # never more than a more extreme entry of the same side
                    top_gain[j] = min(top_gain[j], top_gain[j - 1])
                    bot_gain[j] = min(bot_gain[j], bot_gain[j - 1])
                for pos, i in enumerate(order):
                    S[r, c0 + i] = top_gain[g - 1 - pos] if pos >= g // 2 else bot_gain[pos]
    return S


@pytest.mark.parametrize("rule", RULES)
def test_selection_matches_brute_force_and_exact_count(rule):
    Wt = student_t(6, 32, seed=3)
    Wt[2, 5] = Wt[2, 9] = 0.5  # a tie: the lower flat index must win
    for gs in (8, -1):
        S = outlier_scores(Wt, gs, rule)
        assert torch.allclose(S, _brute_scores(Wt, gs, rule), rtol=1e-9, atol=1e-15)
        for f in (0.01, 0.05, 0.2):
            k = reserved_count(f, Wt.numel())
            m = reserve_mask(Wt, f, gs, rule)
            assert int(m.sum()) == k == int(f * Wt.numel() + 0.5)
            # the k best by score, ties to the lower flat index: brute force over all entries
            best = sorted(range(Wt.numel()), key=lambda i: (-float(S.view(-1)[i]), i))[:k]
            assert sorted(torch.nonzero(m.view(-1))[:, 0].tolist()) == sorted(best)
    m = reserve_mask(Wt, 1 / 192, 8, "group-z")  # one entry: of the tie, the lower flat index
    assert m.sum() == 1 and (not m[2, 9] or m[2, 5])
    with pytest.raises(LowbitError):
        reserve_mask(Wt, 0.5, 8)


# ------------------------------------------------------------------------------------------------
# RTN with OR


@pytest.mark.parametrize("gs,sym", [(128, False), (-1, False), (64, True), (0, False)])
def test_rtn_or_exact_outliers_grid_excludes_them_and_lower_error(gs, sym):
    f = 0.01
    qw = rtn_quantize(W, RTNConfig(bits=3, group_size=gs, symmetric=sym, outliers=f))
    plain = rtn_quantize(W, RTNConfig(bits=3, group_size=gs, symmetric=sym))
    m = mask_of(qw)
    assert int(m.sum()) == round(f * W.numel()) == qw.outliers.index.numel()
    deq = qw.dequantize()
    assert torch.equal(deq[m], W[m].half().float())  # reserved: bit-exact fp16
    # grid range = min-max of the kept entries (and 0), by an independent masked reduction
    Wk = W.double()
    g = COLS if gs == -1 else gs
    shape = (1, 1, -1) if gs == 0 else (ROWS, -1, g)
    hi = torch.where(m, -torch.inf, Wk).reshape(shape).amax(-1).clamp(min=0)
    lo = torch.where(m, torch.inf, Wk).reshape(shape).amin(-1).clamp(max=0)
    if sym:
        hi = torch.maximum(hi, -lo)
        lo = torch.where(lo < 0, -hi, lo)
    assert torch.equal(qw.grid.scale, ((hi - lo) / 7).to(torch.float16))
    assert (qw.grid.scale <= plain.grid.scale).all() and (qw.grid.scale < plain.grid.scale).any()
    # kept entries: the ordinary RTN of the kept entries on that grid
    e_or, e_plain = (W - deq).square().sum(), (W - plain.dequantize()).square().sum()
    assert e_or < 0.8 * e_plain, (gs, float(e_or), float(e_plain))


def _position_bits(m: torch.Tensor) -> int:
    n, cb = int(m.sum()), (m.shape[1] - 1).bit_length()
    kb = max(1, int(m.sum(1).max()).bit_length())
    planes = [8] * (cb // 8) + ([cb % 8] if cb % 8 else [])
    return sum(packing.packed_words(n, w) * 32 for w in planes) + packing.packed_words(m.shape[0], kb) * 32


def test_bits_per_weight_by_hand():
    for gs, sym in ((128, False), (64, True)):
        qw = rtn_quantize(W, RTNConfig(bits=3, group_size=gs, symmetric=sym, outliers=0.005))
        m = mask_of(qw)
        G = COLS // gs
        bits = ROWS * -(-COLS * 3 // 32) * 32 + ROWS * G * 16  # codes + fp16 scales
        bits += 0 if sym else G * -(-ROWS * 3 // 32) * 32  # packed zeros
        bits += 16 * int(m.sum()) + _position_bits(m)  # fp16 values + 8-bit column + per-row counts
        assert qw.bits_per_weight() == bits / W.numel()
        t, _ = qw.to_state()
        assert sum(v.numel() * v.element_size() * 8 for v in t.values()) == bits  # counted = stored
    # the compact positions beat a flat int32 index here: 8 + counts vs 32 bits per outlier
    assert qw.storage()["outlier_index"] < 32 * qw.outliers.index.numel()


# ------------------------------------------------------------------------------------------------
# GPTQ with OR


def _reference_or_sweep(Wt, Ht, mask, bits, gs, damp=0.01):
    """Unblocked float64 GPTQ, no act-order, static groups from the masked W: reserved entries take
    their current value rounded to fp16, error feedback from every column."""
    Wd, Hd, _ = prepare_hessian(Wt.double(), Ht.double(), False, damp)
    scale, zero = affine_qparams(Wd.masked_fill(mask, 0), bits, False, gs)
    U = inverse_cholesky_upper(Hd)
    codes = torch.zeros(Wd.shape, dtype=torch.uint8)
    out = torch.zeros(Wd.shape, dtype=torch.float16)
    for j in range(Wd.shape[1]):
        s, z = scale[:, j // gs].double(), zero[:, j // gs].double()
        w = Wd[:, j]
        q = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
        wq = (q - z) * s
        wq[mask[:, j]] = w[mask[:, j]].half().double()
        out[mask[:, j], j] = w[mask[:, j]].half()
        codes[:, j] = q.to(torch.uint8)
        err = (w - wq) / U[j, j]
        Wd[:, j + 1 :] -= torch.outer(err, U[j, j + 1 :])
    return codes, out


def test_gptq_or_matches_unblocked_reference():
    Wt, Ht = W[:, :128], H[:128, :128]
    cfg = GPTQConfig(bits=3, group_size=32, act_order=False, block_size=32, outliers=0.02)
    qw = gptq_quantize(Wt, Ht, cfg, dtype=torch.float64)
    m = mask_of(qw)
    assert torch.equal(m, reserve_mask(prepare_hessian(Wt, Ht, False, 0.01)[0], 0.02, 32, cfg.outlier_rule))
    codes, vals = _reference_or_sweep(Wt, Ht, m, 3, 32)
    kept = ~m
    assert float((qw.codes[kept] != codes[kept]).float().mean()) < 1e-3
    # the stored outlier = the error-fed weight at its turn (not the original W), in fp16
    close = (qw.outliers.values.float() - vals[m].float()).abs() <= 1e-3 * vals[m].float().abs() + 1e-7
    assert float(close.float().mean()) > 0.99


@pytest.mark.parametrize("act_order,static", [(True, True), (False, True), (True, False)])
def test_gptq_or_lower_output_error(act_order, static):
    for bits, gs in ((3, 128), (2, 64)):
        base = dict(bits=bits, group_size=gs, act_order=act_order, static_groups=static)
        plain = gptq_quantize(W, H, GPTQConfig(**base))
        qw = gptq_quantize(W, H, GPTQConfig(**base, outliers=0.01))
        m = mask_of(qw)
        assert int(m.sum()) == round(0.01 * W.numel())
        assert torch.equal(qw.dequantize()[m], qw.outliers.values.float())
        e_or, e_plain = out_err(qw.dequantize()), out_err(plain.dequantize())
        assert e_or < 0.85 * e_plain, (bits, gs, e_or, e_plain)
        if static:  # the static grid never spans a reserved entry: scales shrink
            assert (qw.grid.scale <= plain.grid.scale).all()
        else:
            assert qw.grid.g_idx is not None and (qw.grid.g_idx == plain.grid.g_idx).all()


def test_fraction_zero_is_the_plain_code():
    """f = 0: codes and grid bit-identical to the sweep without any OR wrapper (the code before OR)."""
    for cfg in (GPTQConfig(bits=3, group_size=64), GPTQConfig(bits=4, group_size=64, static_groups=False)):
        Wf, Hp, perm = prepare_hessian(W, H, cfg.act_order, cfg.damp_percent)
        inv = torch.argsort(perm)
        grid = UniformColumnGrid(Wf[:, inv], cfg.bits, cfg.symmetric, cfg.group_size, cfg.static_groups, perm)
        codes, _ = gptq_sweep(Wf, inverse_cholesky_upper(Hp), grid, cfg.block_size)
        g = grid.finish(perm)
        qw = gptq_quantize(W, H, cfg.model_copy(update={"outliers": 0.0}))
        assert qw.outliers is None and torch.equal(qw.codes, codes[:, inv])
        assert torch.equal(qw.grid.scale, g.scale) and torch.equal(qw.grid.zero, g.zero)
    r0 = rtn_quantize(W, RTNConfig(bits=3, outliers=0.0))
    ref_s, ref_z = affine_qparams(W, 3, False, 128)
    assert r0.outliers is None and torch.equal(r0.grid.scale, ref_s) and torch.equal(r0.grid.zero, ref_z)


def test_lqer_on_top_never_worse_and_keeps_outliers():
    a = X.abs().mean(0).float()
    stats = LayerStats(hessian=H, act_mean_abs=a, nsamples=X.shape[0], act_mean_abs_max=a)
    base = quantize_weight(W, stats, GPTQConfig(bits=2, group_size=64, outliers=0.005))
    for scale in ("none", "act-mean"):
        lq = quantize_weight(W, stats, GPTQConfig(bits=2, group_size=64, outliers=0.005,
                                                  lqer=LQERConfig(rank=8, scale=scale)))
        assert torch.equal(lq.outliers.index, base.outliers.index) and torch.equal(lq.codes, base.codes)
        e_base, e_lq = (W - base.dequantize()).norm(), (W - lq.dequantize()).norm()
        if scale == "none":  # truncated SVD of E: the Frobenius error can only fall
            assert e_lq < e_base
        assert out_err(lq.dequantize()) < out_err(base.dequantize())
        assert lq.bits_per_weight() == base.bits_per_weight() + 8 * (ROWS + COLS) * 16 / W.numel()


# ------------------------------------------------------------------------------------------------
# storage


def test_native_round_trip_and_old_layout():
    qw = gptq_quantize(W, H, GPTQConfig(bits=3, group_size=64, outliers=0.01))
    t, meta = qw.to_state()
    back = QuantizedWeight.from_state(load(save(t)), json.loads(json.dumps(meta)))
    assert torch.equal(back.outliers.index, qw.outliers.index) and torch.equal(back.outliers.values, qw.outliers.values)
    assert torch.equal(back.dequantize(), qw.dequantize()) and back.storage() == qw.storage()
    # records written before the compact layout (flat int32 index, no outlier meta) still load
    old = {k: v for k, v in t.items() if not k.startswith("outliers.")}
    old["outliers.index"], old["outliers.values"] = qw.outliers.index.clone(), qw.outliers.values.clone()
    legacy = QuantizedWeight.from_state(old, {k: v for k, v in meta.items() if k != "outliers"})
    assert torch.equal(legacy.dequantize(), qw.dequantize())
    bad = dict(t)
    bad["outliers.cols.0"] = bad["outliers.cols.0"][:-1].contiguous()
    with pytest.raises(LowbitError):
        QuantizedWeight.from_state(bad, meta)


def test_cli_refusals_are_clean(tmp_path):
    """`lowbit quantize --outliers` where OR does not apply: one clear line, exit 2, nothing written
    (validated before the model is even opened)."""
    from typer.testing import CliRunner

    from lowbit.cli import app

    for bad, says in ((["--method", "rtn", "--format", "mxint", "--outliers", "0.01"], "MXINT"),
                      (["--method", "claq", "--outliers", "0.01"], "--claq-outliers"),
                      (["--method", "squeezellm", "--outliers", "0.01"], "outlier reservation"),
                      (["--method", "gptq", "--outliers", "0.5"], "outliers")):
        r = CliRunner().invoke(app, ["quantize", str(tmp_path / "no-model"), "-o", str(tmp_path / "x"), *bad])
        assert r.exit_code == 2 and says in r.output and not (tmp_path / "x").exists(), (bad, r.output)


def test_wide_positions_round_trip():
    """Column widths above 8 bits are split into 8-bit planes: 17-bit columns (3 planes), big counts."""
    g = torch.Generator().manual_seed(0)
    for shape, n in (((3, 70000), 5000), ((40, 300), 1), ((5, 2), 10), ((4, 9), 0)):
        idx = torch.randperm(shape[0] * shape[1], generator=g)[:n].sort().values.to(torch.int32)
        t, meta = encode_positions(idx, shape)
        assert torch.equal(decode_positions(t, meta, shape), idx)
    with pytest.raises(LowbitError):
        encode_positions(torch.tensor([3, 3], dtype=torch.int32), (2, 4))
    assert parse_method_config({"method": "gptq", "outliers": 0.01}).outliers == 0.01
    assert Outliers(torch.tensor([5, 1], dtype=torch.int32), torch.tensor([1.0, 2.0]).half()).index.tolist() == [1, 5]
