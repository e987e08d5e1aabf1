"""QuantizedWeight: honest bit accounting (known answers), exact state round trips, corrupt records.

Known answers count every stored bit: packed codes (padding words included), fp16 scales, asymmetric
zeros packed with `bits` bits in GPTQ's qzeros layout (one packed row of out_features zeros per
group), 8-bit MXINT exponents, int32 g_idx, outlier values (fp16) and positions (int32), low-rank
factors at their dtype. All equalities below are exact (`==` on floats that are exact dyadic
rationals, `torch.equal` on tensors).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import LowRank, MXIntGrid, Outliers, QuantizedWeight, UniformGrid
from lowbit.methods.config import GPTQConfig, RTNConfig
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.rtn import rtn_quantize



def _w(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def _hessian(cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return 2 * X.T @ X / X.shape[0]


# ------------------------------------------------------------------------------------------------
# bits per weight


def test_bpw_asym_g128_known_answer():
    qw = rtn_quantize(_w(256, 512), RTNConfig(bits=4, group_size=128, symmetric=False))
    assert qw.bits_per_weight() == 4 + (16 + 4) / 128 == 4.15625
    st = qw.storage()
    assert st["codes"] == 256 * 512 * 4
    assert st["scales"] == 256 * 4 * 16
    assert st["zeros"] == 256 * 4 * 4


def test_bpw_sym_g128_known_answer():
    qw = rtn_quantize(_w(256, 512), RTNConfig(bits=4, group_size=128, symmetric=True))
    assert qw.bits_per_weight() == 4 + 16 / 128
    assert "zeros" not in qw.storage()


def test_bpw_per_channel_and_per_tensor():
    qw = rtn_quantize(_w(256, 512), RTNConfig(bits=4, group_size=-1, symmetric=False))
    assert qw.bits_per_weight() == 4 + (16 + 4) / 512  # 256 4-bit zeros = 32 whole words
    qw = rtn_quantize(_w(256, 512), RTNConfig(bits=4, group_size=-1, symmetric=True))
    assert qw.bits_per_weight() == 4 + 16 / 512
    qw = rtn_quantize(_w(256, 512), RTNConfig(bits=4, group_size=0, symmetric=False))
    assert sum(qw.storage().values()) == 256 * 512 * 4 + 16 + 32  # one scale, one zero in one word


def test_bpw_3bit_counts_padding_words():
    # 80 columns × 3 bits = 240 bits → 8 words = 256 bits per row (16 padding bits);
    # 5 groups of 16: 5 fp16 scales per row; zeros: per group 64 × 3 = 192 bits = 6 words, no padding.
    qw = rtn_quantize(_w(64, 80), RTNConfig(bits=3, group_size=16, symmetric=False))
    st = qw.storage()
    assert st["codes"] == 64 * 8 * 32
    assert st["scales"] == 64 * 5 * 16
    assert st["zeros"] == 5 * 6 * 32
    assert qw.bits_per_weight() == (64 * 256 + 64 * 80 + 960) / (64 * 80) == 4.3875
    # 3-bit zeros for 10 rows = 30 bits → one padded word per group
    qw = rtn_quantize(_w(10, 80), RTNConfig(bits=3, group_size=16, symmetric=False))
    assert qw.storage()["zeros"] == 5 * 32


def test_bpw_mxint4_block16():
    qw = rtn_quantize(_w(256, 512), RTNConfig(bits=4, format="mxint", block_size=16, exp_bits=8))
    assert qw.bits_per_weight() == 4 + 8 / 16 == 4.5
    qw = rtn_quantize(_w(256, 512), RTNConfig(bits=8, format="mxint", block_size=32, exp_bits=8))
    assert qw.bits_per_weight() == 8 + 8 / 32


def test_bpw_act_order_g_idx():
    W, H = _w(256, 512), _hessian(512)
    dyn = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=128, act_order=True, static_groups=False))
    assert dyn.grid.g_idx is not None and dyn.grid.g_idx.dtype == torch.int32
    assert dyn.bits_per_weight() == 4.15625 + 32 * 512 / (256 * 512)
    static = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=128, act_order=True, static_groups=True))
    assert static.grid.g_idx is None and static.bits_per_weight() == 4.15625
    plain = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=128, act_order=False, static_groups=False))
    assert plain.grid.g_idx is None and plain.bits_per_weight() == 4.15625


def _with_extras(qw: QuantizedWeight, n_out=37, rank=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    rows, cols = qw.shape
    idx = torch.randperm(rows * cols, generator=g)[:n_out].to(torch.int32)
    vals = (torch.randn(n_out, generator=g) * 0.5).to(torch.float16)
    A = (torch.randn(cols, rank, generator=g) * 0.05).to(torch.float16)
    B = (torch.randn(rank, rows, generator=g) * 0.05).to(torch.float16)
    return QuantizedWeight(qw.shape, qw.dtype, qw.grid, qw.codes, Outliers(idx, vals), LowRank(A, B))


def test_outliers_and_lowrank_storage_and_semantics():
    base = rtn_quantize(_w(128, 256), RTNConfig(bits=4, group_size=128, symmetric=True))
    qw = _with_extras(base)
    st = qw.storage()
    # positions: 37 column indices of 8 bits (10 words) + 128 per-row counts of bit_length(max count) bits
    kb = int(torch.bincount(qw.outliers.index.long() // 256).max()).bit_length()
    pos = 10 * 32 + -(-128 * kb // 32) * 32
    assert st["outlier_values"] == 37 * 16 and st["outlier_index"] == pos
    assert st["lowrank"] == 8 * (256 + 128) * 16
    expect_bits = 128 * 256 * 4 + 128 * 2 * 16 + 37 * 16 + pos + 8 * 384 * 16
    assert qw.bits_per_weight() == expect_bits / (128 * 256)
    # dequantize: grid value, outliers replace, then + (A·B)ᵀ
    ref = base.dequantize().clone()
    ref.view(-1)[qw.outliers.index.long()] = qw.outliers.values.float()
    ref += (qw.lowrank.A.float() @ qw.lowrank.B.float()).T
    assert torch.equal(qw.dequantize(), ref)
    assert qw.dequantize(torch.float16).dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# state round trip


def _all_kinds():
    W = _w(96, 256, seed=7)
    W[3] = 0  # an all-zero row
    H = _hessian(256)
    H[5, :] = 0
    H[:, 5] = 0  # a dead input
    out = {}
    for bits in (2, 3, 4, 8):
        for sym in (False, True):
            for gs in (-1, 0, 64):
                out[f"rtn{bits}-{sym}-{gs}"] = rtn_quantize(W, RTNConfig(bits=bits, group_size=gs, symmetric=sym))
    out["mxint4"] = rtn_quantize(W, RTNConfig(bits=4, format="mxint", block_size=16))
    out["mxint8-b32"] = rtn_quantize(W, RTNConfig(bits=8, format="mxint", block_size=32))
    for ao in (False, True):
        for static in (False, True):
            out[f"gptq3-ao{ao}-st{static}"] = gptq_quantize(
                W, H, GPTQConfig(bits=3, group_size=64, act_order=ao, static_groups=static)
            )
    out["gptq4-sym-ch"] = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=-1, symmetric=True))
    out["extras-uniform"] = _with_extras(out["gptq3-aoTrue-stFalse"])
    out["extras-mxint"] = _with_extras(out["mxint4"])
    out["bf16-dtype"] = rtn_quantize(W.to(torch.bfloat16), RTNConfig(bits=4, group_size=64))
    return out


KINDS = _all_kinds()


def _roundtrip(qw):
    t, meta = qw.to_state()
    assert all(isinstance(v, torch.Tensor) and v.is_contiguous() for v in t.values())
    return QuantizedWeight.from_state({k: v.clone() for k, v in t.items()}, copy.deepcopy(meta))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_state_round_trip_is_exact(name):
    qw = KINDS[name]
    back = _roundtrip(qw)
    assert back.shape == qw.shape and back.dtype == qw.dtype
    assert back.codes.dtype == torch.uint8 and torch.equal(back.codes, qw.codes)
    assert type(back.grid) is type(qw.grid)
    g, h = qw.grid, back.grid
    if isinstance(g, UniformGrid):
        assert (h.bits, h.group_size, h.symmetric) == (g.bits, g.group_size, g.symmetric)
        assert torch.equal(h.scale, g.scale) and h.scale.dtype == torch.float16
        assert torch.equal(h.zero.to(torch.int32), g.zero.to(torch.int32))
        assert (h.g_idx is None) == (g.g_idx is None)
        if g.g_idx is not None:
            assert torch.equal(h.g_idx, g.g_idx)
    else:
        assert isinstance(g, MXIntGrid)
        assert (h.bits, h.block_size, h.exp_bits) == (g.bits, g.block_size, g.exp_bits)
        assert torch.equal(h.exponent, g.exponent)
    for part in ("outliers", "lowrank"):
        assert (getattr(back, part) is None) == (getattr(qw, part) is None)
    if qw.outliers is not None:
        assert torch.equal(back.outliers.index, qw.outliers.index)
        assert torch.equal(back.outliers.values, qw.outliers.values)
    if qw.lowrank is not None:
        assert torch.equal(back.lowrank.A, qw.lowrank.A) and torch.equal(back.lowrank.B, qw.lowrank.B)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert back.storage() == qw.storage()


def test_stored_tensors_match_the_storage_count():
    """storage() must be the size of what to_state() actually writes (every bit, no more)."""
    for name, qw in KINDS.items():
        t, _ = qw.to_state()
        stored = sum(v.numel() * v.element_size() * 8 for v in t.values())
        counted = sum(qw.storage().values())
        if isinstance(qw.grid, MXIntGrid):
            # exponents are held as int16 in the state but counted at exp_bits (8) each
            stored -= qw.grid.exponent.numel() * (16 - qw.grid.exp_bits)
        assert stored == counted, name


# ------------------------------------------------------------------------------------------------
# corrupt records


def _state(name="rtn4-False-64"):
    t, meta = KINDS[name].to_state()
    return dict(t), copy.deepcopy(meta)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda t, m: m.pop("shape"),
        lambda t, m: m.pop("grid"),
        lambda t, m: m["grid"].pop("bits"),
        lambda t, m: m["grid"].pop("kind"),
        lambda t, m: m["grid"].__setitem__("kind", "lut"),
        lambda t, m: m.pop("dtype"),
        lambda t, m: m.__setitem__("dtype", "float17"),
        lambda t, m: m.__setitem__("shape", ["a", 256]),
        lambda t, m: t.pop("qweight"),
        lambda t, m: t.pop("grid.scale"),
        lambda t, m: t.pop("grid.qzeros"),
        lambda t, m: m.__setitem__("shape", [95, 256]),  # rows disagree with qweight
        lambda t, m: m.__setitem__("shape", [96, 264]),  # 264·4 bits needs 33 words, 32 stored
    ],
)
def test_corrupt_meta_or_missing_tensor_raises(corrupt):
    t, m = _state()
    corrupt(t, m)
    with pytest.raises(LowbitError):
        QuantizedWeight.from_state(t, m)


@pytest.mark.parametrize(
    "name,corrupt",
    [
        # wrong column count: 190 columns are 3 groups of 64 (the last partial), the record has 4
        ("rtn4-False-64", lambda t, m: m.__setitem__("shape", [96, 190])),
        ("rtn4-False-64", lambda t, m: t.__setitem__("grid.scale", t["grid.scale"][:, :3].contiguous())),
        ("rtn4-False-64", lambda t, m: t.__setitem__("grid.scale", t["grid.scale"][:50].contiguous())),
        ("rtn4-False-64", lambda t, m: m["grid"].__setitem__("group_size", 128)),
        ("gptq3-aoTrue-stFalse", lambda t, m: t.__setitem__("grid.g_idx", t["grid.g_idx"][:-1].contiguous())),
        ("gptq3-aoTrue-stFalse", lambda t, m: t.__setitem__("grid.g_idx", t["grid.g_idx"] + 4)),
        ("mxint4", lambda t, m: t.__setitem__("grid.exponent", t["grid.exponent"][:, :-1].contiguous())),
        ("mxint4", lambda t, m: m["grid"].__setitem__("block_size", 32)),
        ("extras-uniform", lambda t, m: t.__setitem__("lowrank.B", t["lowrank.B"][:, :-1].contiguous())),
        ("extras-uniform", lambda t, m: m["outliers"].__setitem__("n", m["outliers"]["n"] + 1)),
        ("extras-uniform", lambda t, m: t.__setitem__("outliers.row_counts.0", t["outliers.row_counts.0"] * 0)),
        ("extras-uniform", lambda t, m: t.__setitem__("outliers.cols.0", t["outliers.cols.0"][:-1].contiguous())),
        ("extras-uniform", lambda t, m: t.__setitem__("outliers.values", t["outliers.values"][:-1].contiguous())),
    ],
)
def test_inconsistent_shapes_raise_at_load(name, corrupt):
    """A record whose tensors do not fit its shape must fail at load with LowbitError, not later with
    a RuntimeError (or silently) inside dequantize."""
    t, m = _state(name)
    corrupt(t, m)
    with pytest.raises(LowbitError):
        QuantizedWeight.from_state(t, m).dequantize()


def test_codes_shape_mismatch_raises():
    qw = KINDS["rtn4-False-64"]
    with pytest.raises(LowbitError):
        QuantizedWeight((96, 128), qw.dtype, qw.grid, qw.codes)
