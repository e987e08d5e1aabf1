"""GPTQ against an independent float64 OBS reference (no Cholesky trick, no lazy batches).

The reference keeps the full inverse Hessian Hinv of the damped, dead-fixed, permuted H and, for each
column j in sweep order,

    q_j = Q(w_j);  err = (w_j − q_j) / Hinv[j, j];  W[:, j+1:] −= err ⊗ Hinv[j, j+1:];
    Hinv ← Hinv − Hinv[:, j] Hinv[j, :] / Hinv[j, j]          (eliminate j: the OBS recurrence)

which equals the paper's Cholesky formulation in exact arithmetic (row j of the upper Cholesky factor
of H⁻¹ is the eliminated Hinv row j divided by √Hinv[j, j]).

Dynamic groups. The GPTQ reference code (and `gptq_sweep`) fits a group's min/max from the
*block-level* W: the copy updated by all previous lazy blocks but not by earlier columns of the current
block. That equals "the current W" exactly when every group start is a block start (group_size a
multiple of block_size, e.g. 128 or 256 with blocks of 128): then every column before the group start
belongs to an earlier block. For other group sizes (32, 64, 96 with blocks of 128, or 128 with blocks
of 100) the reference below mimics the block-level read by snapshotting W at each block start; a
control test shows the two reads really differ there.

Exactness. Both sides compute in float64 except the grid parameters: `affine_qparams` takes min/max and
the scale in float32 before rounding the scale to fp16, the reference in float64. They can land on
different fp16 neighbours only when the exact scale is within ~2^-22 (relative) of an fp16 midpoint, or
on different zeros at a half-integer. So every stored (scale, zero) is compared with the reference's;
a disagreement is allowed only at a *certified tie* (the float64 value within 2^-20 relative of the
rounding boundary), and since it changes every later code of that row (rows are independent in GPTQ),
that row is compared only up to the sweep column where the disagreeing group starts. Everything else —
all codes, all parameters, all dequantized values — must be identical (exact `==`), and tied rows must be
rare (≤ 2%). Observed: one tied row in 48 (case, bits) combinations tried while writing this. A code tie (w/s within 1e-8 of a half-integer; the
float64 arithmetic of the two sides differs by ~1e-13) would be handled the same way; never observed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods.config import GPTQConfig, RTNConfig
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.rtn import rtn_quantize

TIE_REL = 2.0**-20
CODE_TIE = 1e-8
MAX_TIED_ROW_FRACTION = 0.02



# ------------------------------------------------------------------------------------------------
# the independent reference


def _fp16_tie(v):
    h = v.astype(np.float16)
    hf = h.astype(np.float64)
    up = np.nextafter(h, np.float16(np.inf)).astype(np.float64)
    dn = np.nextafter(h, np.float16(-np.inf)).astype(np.float64)
    mid = np.where(v >= hf, (hf + up) / 2, (hf + dn) / 2)
    return np.abs(v - mid) <= TIE_REL * np.abs(v)


def _half_tie(x, rel):
    return np.abs(np.abs(x - np.floor(x)) - 0.5) <= np.maximum(rel * np.abs(x), 1e-12)


def ref_params(Wg: np.ndarray, bits: int, sym: bool):
    """GPTQ quant.py find_params on rows of Wg (all its columns form one group), fp16-rounded scale.

    Returns (scale, zero, tie) with one entry per row of Wg (per-tensor: Wg is one flattened row)."""
    maxq = 2**bits - 1
    xmin = np.minimum(Wg.min(axis=1), 0.0)
    xmax = np.maximum(Wg.max(axis=1), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(dead, -1.0, xmin), np.where(dead, 1.0, xmax)
    s64 = (xmax - xmin) / maxq
    s = s64.astype(np.float16).astype(np.float64)
    tie = _fp16_tie(s64)
    if sym:
        z = np.full_like(s, 2 ** (bits - 1))
    else:
        raw = -xmin / s
        z = np.clip(np.round(raw), 0, maxq)
        tie |= _half_tie(raw, TIE_REL)
    return s, z, tie


def ref_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, sym: bool, group_size: int, act_order: bool,
             static_groups: bool = False, damp: float = 0.01, block_size: int = 128,
             group_read: str = "block", channel_params_before_dead_fix: bool = False):
    """Plain OBS GPTQ in float64. Returns dict with codes/deq in ORIGINAL column order, sweep perm,
    per-row first tie column (sweep order; cols if none) and the loss Σ (w − q)²/Hinv_jj / 2."""
    W0 = W.double().numpy().copy()
    Hn = H.double().numpy().copy()
    rows, cols = W0.shape
    maxq = 2**bits - 1
    Wd = W0.copy()
    dead = np.diag(Hn) == 0
    Hn[dead, dead] = 1
    Wd[:, dead] = 0
    perm = np.argsort(-np.diag(Hn), kind="stable") if act_order else np.arange(cols)
    first_tie = np.full(rows, cols)  # code ties only; parameter ties are judged in compare()

    # static parameters (per channel, per tensor, static groups), in original column order
    dynamic = group_size > 0 and not static_groups
    col_params = None
    if not dynamic:
        src = W0 if channel_params_before_dead_fix and group_size <= 0 else Wd
        if group_size == 0:
            s, z, t = ref_params(src.reshape(1, -1), bits, sym)
            S, Z = np.full((rows, cols), s[0]), np.full((rows, cols), z[0])
            params = [s[:, None], z[:, None], t[:, None]]  # [1, 1] each
        else:
            g = cols if group_size == -1 else group_size
            S, Z = np.empty((rows, cols)), np.empty((rows, cols))
            params = []
            for c0 in range(0, cols, g):
                s, z, t = ref_params(src[:, c0 : c0 + g], bits, sym)
                S[:, c0 : c0 + g], Z[:, c0 : c0 + g] = s[:, None], z[:, None]
                params.append((s, z, t))
            params = [np.stack(x, axis=1) for x in zip(*params)]
        col_params = (S[:, perm], Z[:, perm])  # sweep order
        group_start = np.zeros(params[0].shape[1], dtype=int)  # static: used from the first column on
    else:
        ng = -(-cols // group_size)  # a partial last group when group_size does not divide cols
        params = [np.empty((rows, ng)) for _ in range(2)] + [np.empty((rows, ng), bool)]
        group_start = np.arange(ng) * group_size

    Wp = Wd[:, perm].copy()
    Hp = Hn[np.ix_(perm, perm)]
    Hp[np.diag_indices(cols)] += damp * np.mean(np.diag(Hp))
    Hinv = np.linalg.inv(Hp)
    Hinv = (Hinv + Hinv.T) / 2
    codes = np.empty((rows, cols))
    deq = np.empty((rows, cols))
    loss = 0.0
    snap = Wp
    for j in range(cols):
        if j % block_size == 0:
            snap = Wp.copy()  # block-level W: all earlier blocks' errors applied
        if dynamic and j % group_size == 0:
            src = snap if group_read == "block" else Wp
            s, z, t = ref_params(src[:, j : j + group_size], bits, sym)
            for p, v in zip(params, (s, z, t)):
                p[:, j // group_size] = v
        if col_params is not None:
            s, z = col_params[0][:, j], col_params[1][:, j]
        w = Wp[:, j].copy()
        ratio = w / s
        first_tie[_half_tie(ratio, CODE_TIE) & (first_tie > j)] = j
        q = np.clip(np.round(ratio) + z, 0, maxq)
        wq = (q - z) * s
        codes[:, j], deq[:, j] = q, wq
        d = Hinv[j, j]
        err = (w - wq) / d
        loss += float(np.sum((w - wq) ** 2) / d / 2)
        Wp[:, j + 1 :] -= np.outer(err, Hinv[j, j + 1 :])
        Wp[:, j] = wq
        Hinv[j + 1 :, j + 1 :] -= np.outer(Hinv[j + 1 :, j], Hinv[j, j + 1 :]) / d
    inv = np.argsort(perm)
    return {"codes": codes[:, inv], "deq": deq[:, inv], "perm": perm, "first_tie": first_tie, "loss": loss,
            "scale": params[0], "zero": params[1], "param_tie": params[2], "group_start": group_start}


def compare(qw, ref, loss=None):
    """Exact agreement on every parameter and every (row, column) swept before the row's first
    certified tie."""
    rows, cols = qw.shape
    perm, first_tie = ref["perm"], ref["first_tie"].copy()
    # stored parameters vs the reference's; disagreements only at certified ties
    scale = qw.grid.scale.double().numpy()
    zero = qw.grid.zero.double().numpy()
    assert scale.shape == ref["scale"].shape and zero.shape == ref["zero"].shape
    diff = (scale != ref["scale"]) | (zero != ref["zero"])
    if diff.shape[0] == 1:  # per tensor: one parameter pair for every row
        diff = np.repeat(diff, rows, axis=0)
        tie = np.repeat(ref["param_tie"], rows, axis=0)
    else:
        tie = ref["param_tie"]
    for r in np.nonzero(diff.any(axis=1))[0]:
        # the first disagreeing group in sweep order; later groups of this row legitimately differ
        order = np.argsort(ref["group_start"], kind="stable")
        g = order[np.nonzero(diff[r, order])[0][0]]
        assert tie[r, g], f"row {r} group {g}: scale {scale[r, g]} vs {ref['scale'][r, g]} not at a tie"
        first_tie[r] = min(first_tie[r], ref["group_start"][g])
    valid_sweep = np.arange(cols)[None, :] < first_tie[:, None]
    valid = np.empty_like(valid_sweep)
    valid[:, perm] = valid_sweep  # original column order
    tied_rows = int((first_tie < cols).sum())
    assert tied_rows <= MAX_TIED_ROW_FRACTION * rows + 1, f"{tied_rows} rows hit certified ties"
    codes = qw.codes.numpy().astype(np.float64)
    mism = (codes != ref["codes"]) & valid
    assert not mism.any(), f"{int(mism.sum())} code mismatches away from ties (rows {np.unique(np.nonzero(mism)[0])[:10]})"
    deq = qw.dequantize().double().numpy()
    assert (deq[valid] == ref["deq"][valid]).all()
    if loss is not None and tied_rows == 0:
        assert loss == pytest.approx(ref["loss"], rel=1e-9)
    return tied_rows


# ------------------------------------------------------------------------------------------------
# data: correlated inputs with outlier channels, a few dead inputs


def make_inputs(n, d, seed, dead=(), mixing_seed=1234, rank=16):
    """X = (Z·M + Y·A)·diag(c): dense mixing M = I + N(0, 1/d), a shared rank-16 component Y·A (LLM
    activations are strongly correlated), per-channel scales c with d/64 outlier channels ×12, and
    optionally dead (always-zero) channels. M, A, c are fixed by mixing_seed, so calibration and held-out
    sets share the distribution; `seed` draws the samples."""
    gm = torch.Generator().manual_seed(mixing_seed)
    M = torch.eye(d) + torch.randn(d, d, generator=gm) / d**0.5
    A = torch.randn(rank, d, generator=gm)
    chan = torch.ones(d)
    chan[torch.randperm(d, generator=gm)[: max(1, d // 64)]] = 12.0  # outlier channels
    chan *= torch.exp(0.5 * torch.randn(d, generator=gm))
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ M.double()
    X += torch.randn(n, rank, generator=g, dtype=torch.float64) @ A.double()
    X *= chan.double()
    X[:, list(dead)] = 0
    return X


def hessian(X):
    return (2 * X.T @ X / X.shape[0]).to(torch.float32)


def make_weight(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[:, :: max(1, cols // 16)] *= 3  # some heavy input columns
    return W


DEAD = (5, 77, 200)
X_CAL = make_inputs(4096, 512, seed=0, dead=DEAD)
H512 = hessian(X_CAL)
W512 = make_weight(96, 512, seed=1)

# (group_size, static_groups, block_size): every group start is a block start unless noted
EXACT_CASES = [
    (-1, False, 128),  # per channel
    (0, False, 128),  # per tensor
    (128, True, 128),  # static groups
    (128, False, 128),  # dynamic, group = block
    (256, False, 128),  # dynamic, group = 2 blocks: starts 0, 256 are block starts
]
BLOCK_READ_CASES = [
    (64, False, 128),  # two group starts per block: 64 reads the block-level W
    (32, False, 128),
    (128, False, 96),  # group starts 128, 256, 384 fall inside blocks of 96
]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: f"g{c[0]}{'s' if c[1] else ''}-B{c[2]}")
def test_gptq_matches_obs_reference(case, act_order):
    gs, static, B = case
    # asymmetric 4-bit without act-order, symmetric 3-bit with it (both grids, both orders per case)
    for bits, sym in ([(4, False)] if not act_order else [(3, True)]):
        cfg = GPTQConfig(bits=bits, group_size=gs, symmetric=sym, act_order=act_order,
                         static_groups=static, block_size=B)
        qw, loss = gptq_quantize(W512, H512, cfg, dtype=torch.float64, return_loss=True)
        ref = ref_gptq(W512, H512, bits, sym, gs, act_order, static, block_size=B)
        compare(qw, ref, loss)
        if gs > 0 and not static:
            # group starts coincide with block starts: the pure OBS "current W" read is the same thing
            cur = ref_gptq(W512, H512, bits, sym, gs, act_order, static, block_size=B, group_read="current")
            assert np.array_equal(cur["codes"], ref["codes"])
        # dead inputs: weight zeroed, so it dequantizes to exactly 0
        assert (qw.dequantize()[:, list(DEAD)] == 0).all()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("case", BLOCK_READ_CASES, ids=lambda c: f"g{c[0]}-B{c[2]}")
def test_gptq_dynamic_groups_read_block_level_w(case, act_order):
    gs, static, B = case
    W, H = (W512[:, :384], H512[:384, :384]) if gs == 128 else (W512, H512)
    for bits, sym in ([(4, False)] if act_order else [(2, False)]):
        cfg = GPTQConfig(bits=bits, group_size=gs, symmetric=sym, act_order=act_order, block_size=B, static_groups=False)
        qw, loss = gptq_quantize(W, H, cfg, dtype=torch.float64, return_loss=True)
        ref = ref_gptq(W, H, bits, sym, gs, act_order, False, block_size=B, group_read="block")
        compare(qw, ref, loss)
        # control: the in-block-updated ("current W") read is a genuinely different algorithm here
        cur = ref_gptq(W, H, bits, sym, gs, act_order, False, block_size=B, group_read="current")
        assert (cur["codes"] != ref["codes"]).mean() > 0.01


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static", [True, False])
def test_gptq_partial_last_group_matches_obs_reference(static, act_order):
    # 480 inputs in groups of 128: three full groups and one of 96 (SmolLM2's 576 = 4·128 + 64 alike).
    # The reference slices the last group short (W[:, c0:c0+g] past the end), fits its own min-max, and
    # sweeps it like any other group; blocks of 128 keep every group start a block start.
    W, H = W512[:, :480], H512[:480, :480]
    for bits, sym in ([(4, False), (3, True)] if static else [(3, False)]):
        cfg = GPTQConfig(bits=bits, group_size=128, symmetric=sym, act_order=act_order, static_groups=static)
        qw, loss = gptq_quantize(W, H, cfg, dtype=torch.float64, return_loss=True)
        assert qw.grid.scale.shape == (96, 4)
        compare(qw, ref_gptq(W, H, bits, sym, 128, act_order, static), loss)
        g_idx = 32 / 96 if act_order and not static else 0  # int32 per input column, over 96 rows
        assert qw.bits_per_weight() == pytest.approx(bits + 4 * 16 / 480 + (0 if sym else 4 * bits / 480) + g_idx)
        if act_order and not static:  # g_idx: the partial group's columns point at group 3
            assert int((qw.grid.g_idx == 3).sum()) == 96


def test_gptq_block_size_not_dividing_columns():
    W, H = W512[:, :384], H512[:384, :384]
    for gs in (-1, 128):
        cfg = GPTQConfig(bits=4, group_size=gs, act_order=gs > 0, block_size=256, static_groups=False)  # blocks 0..256, 256..384
        qw, loss = gptq_quantize(W, H, cfg, dtype=torch.float64, return_loss=True)
        compare(qw, ref_gptq(W, H, 4, False, gs, gs > 0, block_size=256), loss)


def test_gptq_all_inputs_dead_gives_zero_weight():
    W = W512[:8, :64]
    H = torch.zeros(64, 64)
    qw = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=32, static_groups=False), dtype=torch.float64)
    compare(qw, ref_gptq(W, H, 4, False, 32, True))
    assert torch.equal(qw.dequantize(), torch.zeros(8, 64))


@pytest.mark.xfail(strict=True, reason=(
    "Deviation from IST-DASLab/gptq: the reference fits per-channel params with "
    "quantizer.find_params(W) BEFORE zeroing dead columns (W[:, dead] = 0); lowbit fits them after. "
    "Lowbit's choice gives a tighter grid; reported to the lead, not silently accepted."))
def test_gptq_per_channel_params_like_reference_with_dead_columns():
    W = W512.clone()
    W[:, list(DEAD)] = 0.5  # dead inputs carrying the row maximum
    cfg = GPTQConfig(bits=4, group_size=-1, act_order=True, static_groups=False)
    qw = gptq_quantize(W, H512, cfg, dtype=torch.float64)
    compare(qw, ref_gptq(W, H512, 4, False, -1, True, channel_params_before_dead_fix=True))


# ------------------------------------------------------------------------------------------------
# float32 default, act-order bookkeeping, quality, errors, determinism


def test_float32_default_agrees_with_float64():
    """float32 rounding flips a code only at near-ties, and a flip re-routes the rest of that row's
    sweep, so disagreement comes as whole row tails. Measured on this layer with 2 torch threads:
    g128 act-order 4-bit 99.957% (1 row), per channel 100%, g32 3-bit 99.933% (1 row); with 1 thread
    (as run here) 100% in all three. Layer output error equal to within 0.02% relative."""
    W, H = W512, H512
    X_test = make_inputs(2048, 512, seed=7, dead=DEAD)
    for gs, ao, bits in ((128, True, 4), (-1, False, 4), (32, True, 3)):
        cfg = GPTQConfig(bits=bits, group_size=gs, act_order=ao, static_groups=False)
        q32 = gptq_quantize(W, H, cfg)
        q64 = gptq_quantize(W, H, cfg, dtype=torch.float64)
        agree = (q32.codes == q64.codes).double().mean().item()
        assert agree >= 0.999, agree
        assert int((q32.codes != q64.codes).any(dim=1).sum()) <= 2
        e32, e64 = _layer_err(X_test, W, q32.dequantize()), _layer_err(X_test, W, q64.dequantize())
        assert abs(e32 - e64) <= 0.01 * e64


def test_act_order_g_idx_only_for_dynamic_groups():
    W, H = W512, H512
    for gs, static, ao, expect in ((128, False, True, True), (128, True, True, False),
                                   (128, False, False, False), (-1, False, True, False),
                                   (0, False, True, False)):
        qw = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=gs, static_groups=static, act_order=ao))
        assert (qw.grid.g_idx is not None) == expect, (gs, static, ao)
    qw = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=128, act_order=True, static_groups=False), dtype=torch.float64)
    ref = ref_gptq(W, H, 4, False, 128, True)
    # g_idx[c] = (sweep position of original column c) // group size
    inv = np.argsort(ref["perm"])
    assert np.array_equal(qw.grid.g_idx.numpy(), inv // 128)
    assert not np.array_equal(ref["perm"], np.arange(512))  # act-order really permuted
    compare(qw, ref)  # dequantize (through g_idx) == the sweep's dequantized weights


def _layer_err(X, W, Wq):
    X = X.double()
    return float((X @ (W.double() - Wq.double()).T).norm() / (X @ W.double().T).norm())


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("gs", [-1, 128])
def test_gptq_beats_rtn_on_held_out_inputs(bits, gs):
    d, rows = 512, 128
    W = make_weight(rows, d, seed=11)
    H = hessian(make_inputs(2048, d, seed=21))
    X_test = make_inputs(2048, d, seed=99)  # held out: same mixing and outlier channels, new samples
    rtn = _layer_err(X_test, W, rtn_quantize(W, RTNConfig(bits=bits, group_size=gs)).dequantize())
    res = {}
    for ao in (False, True):
        qw = gptq_quantize(W, H, GPTQConfig(bits=bits, group_size=gs, act_order=ao, static_groups=False))
        res[ao] = _layer_err(X_test, W, qw.dequantize())
    # measured, GPTQ/RTN output-error ratio (act-order off / on): 4-bit per channel 0.314 / 0.249,
    # g128 0.315 / 0.246; 3-bit per channel 0.314 / 0.250, g128 0.318 / 0.241 (RTN errors 0.201, 0.141,
    # 0.428, 0.304). Bounds leave > 40% margin. (With nearly uncorrelated inputs the gain vanishes:
    # ratio ≈ 0.95–1.02, as expected when H is close to diagonal.)
    assert res[False] <= 0.45 * rtn, (rtn, res)
    assert res[True] <= 0.45 * rtn, (rtn, res)
    assert res[True] <= res[False], res  # act-order helps with outlier channels


@pytest.mark.parametrize("make_bad", [
    lambda H: H.fill_diagonal_(-1.0),
    lambda H: H.__setitem__((3, 3), -50.0),
    lambda H: H.__setitem__((3, 4), float("nan")),
    lambda H: H.__setitem__((0, 0), float("inf")),
    lambda H: H.copy_(-H),
    lambda H: H.copy_(torch.ones_like(H) * 2 - torch.eye(H.shape[0])),  # rank-deficient-ish, indefinite
], ids=["neg-diag", "one-neg-diag", "nan", "inf", "negative-definite", "indefinite"])
def test_bad_hessian_raises(make_bad):
    H = H512[:64, :64].clone()
    make_bad(H)
    for ao in (False, True):
        with pytest.raises(LowbitError):
            gptq_quantize(W512[:16, :64], H, GPTQConfig(bits=4, group_size=32, act_order=ao, static_groups=False))


def test_bad_inputs_raise():
    W, H = W512[:16, :64], H512[:64, :64]
    with pytest.raises(LowbitError):
        gptq_quantize(W, H[:32, :32], GPTQConfig(bits=4, group_size=32, static_groups=False))
    with pytest.raises(LowbitError):
        gptq_quantize(W, None, GPTQConfig(bits=4, group_size=32, static_groups=False))
    Wn = W.clone()
    Wn[2, 3] = float("nan")
    with pytest.raises(LowbitError):
        gptq_quantize(Wn, H, GPTQConfig(bits=4, group_size=32, static_groups=False))


def test_deterministic():
    cfg = GPTQConfig(bits=3, group_size=64, act_order=True, static_groups=False)
    a = gptq_quantize(W512, H512, cfg)
    b = gptq_quantize(W512, H512, cfg)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.grid.scale, b.grid.scale) and torch.equal(a.grid.zero, b.grid.zero)
    assert torch.equal(a.grid.g_idx, b.grid.g_idx)
    assert torch.equal(a.dequantize(), b.dequantize())


def test_inputs_not_modified():
    W, H = W512.clone(), H512.clone()
    gptq_quantize(W, H, GPTQConfig(bits=4, group_size=128, static_groups=False))
    assert torch.equal(W, W512) and torch.equal(H, H512)
