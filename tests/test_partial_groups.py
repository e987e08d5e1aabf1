"""A group size that does not divide the input dimension: the last group is partial, in every format,
method, kernel and exporter, and bits are counted for ⌈in/g⌉ groups.

The reference for a partial group is always the same: the partial group computed on its own, as a
layer whose columns are only that group (per channel), and the full groups as a layer of full groups.
GPTQ's partial group is checked against the float64 OBS reference in test_gptq.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import quant_primitives as qp
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.kernels import cpu
from lowbit.methods import parse_method_config, quantize_weight
from lowbit.methods.stats import StatsAccumulator


def _w(rows=32, cols=96, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def _split_rtn(W, bits, sym, g):
    """RTN of the full groups and of the partial group, each on its own."""
    full = W.shape[1] // g * g
    return torch.cat([qp.fake_quantize_affine(W[:, :full], bits, sym, g),
                      qp.fake_quantize_affine(W[:, full:], bits, sym, -1)], 1)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("cols,g", [(96, 64), (576, 128), (1536, 160), (40, 64)])
def test_rtn_partial_group_is_its_own_group(cols, g, sym):
    W = _w(cols=cols)
    scale, zero = qp.affine_qparams(W, 3, sym, g)
    assert scale.shape == zero.shape == (32, -(-cols // g)) == (32, qp.n_groups(cols, g))
    ref = _split_rtn(W, 3, sym, g) if cols > g else qp.fake_quantize_affine(W, 3, sym, -1)
    assert torch.equal(qp.fake_quantize_affine(W, 3, sym, g), ref)


def test_expand_group_param_and_pieces():
    p = torch.arange(3, dtype=torch.float32)[None].expand(2, 3)
    e = qp.expand_group_param(p, torch.Size([2, 10]), 4)
    assert e.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]] * 2
    pieces = qp.group_pieces(torch.arange(20.).reshape(2, 10), 4)
    assert [tuple(x.shape) for x in pieces] == [(2, 2, 4), (2, 1, 2)]
    assert torch.equal(qp.per_entry(lambda x: x, torch.arange(20.).reshape(2, 10), 4), torch.arange(20.).reshape(2, 10))


def test_mxint_short_last_block_is_exact():
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
    codes, e = qp.mxint_quantize(x, 4, 16)
    assert codes.shape == (4, 40) and e.shape == (4, 3)
    c8, e8 = qp.mxint_quantize(x[:, 32:], 4, 8)  # the short block alone is one block of 8
    assert torch.equal(codes[:, 32:], c8) and torch.equal(e[:, 2:], e8)
    assert torch.equal(qp.mxint_dequantize(codes, e, 4, 16)[:, 32:], qp.mxint_dequantize(c8, e8, 4, 8))


def _stats(W, seed=3):
    X = torch.randn(512, W.shape[1], generator=torch.Generator().manual_seed(seed))
    acc = StatsAccumulator(W.shape[1])
    acc.add(X)
    return acc.result()


@pytest.mark.parametrize("method,extra", [("rtn", {}), ("hqq", {}), ("gptq", {}), ("gptq", {"static_groups": False}),
                                          ("awq", {}), ("rtn", {"outliers": 0.01}), ("gptq", {"outliers": 0.01}),
                                          ("rtn", {"lqer": {"rank": 4, "scale": "act-mean"}})])
def test_every_uniform_method_counts_ceil_groups_and_round_trips(method, extra):
    W = _w(48, 576)
    cfg = parse_method_config({"method": method, "bits": 3, "group_size": 128, **extra})
    qw = quantize_weight(W, _stats(W), cfg)
    G = 5  # 4·128 + 64
    assert qw.grid.scale.shape == (48, G)
    st = qw.storage()
    assert st["scales"] == 48 * G * 16
    if not qw.grid.symmetric and not qw.grid.float_zero:
        assert st["zeros"] == G * 32 * -(-48 * 3 // 32)  # packed b-bit zeros: one row of words per group
    # the stored record loads back bit-identically (packing, check(), dequantize)
    t, meta = qw.to_state()
    back = QuantizedWeight.from_state(t, json.loads(json.dumps(meta)))
    assert torch.equal(back.dequantize(), qw.dequantize()) and back.bits_per_weight() == qw.bits_per_weight()


def test_awq_clip_search_on_a_partial_group_matches_the_group_alone():
    from lowbit.methods.awq import clip_search
    from lowbit.methods.config import AWQConfig

    W = _w(16, 96)
    X = torch.randn(256, 96, generator=torch.Generator().manual_seed(5))
    H = 2 * X.T @ X / 256
    cfg = AWQConfig(bits=3, group_size=64)
    mv, best, errs = clip_search(W, H, cfg)
    assert mv.shape == (16, 2) and errs.shape[1:] == (16, 2)
    mv_tail, best_tail, errs_tail = clip_search(W[:, 64:], H[64:, 64:], AWQConfig(bits=3, group_size=-1))
    assert torch.equal(best[:, 1:], best_tail) and torch.allclose(errs[:, :, 1:], errs_tail, rtol=1e-5)


def test_outlier_scores_of_a_partial_group_are_the_group_alone():
    from lowbit.methods.outliers import outlier_scores

    W = _w(8, 96)
    for rule in ("range", "group-z"):
        s = outlier_scores(W, 64, rule)
        assert torch.equal(s[:, 64:], outlier_scores(W[:, 64:], -1, rule))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_pads_the_partial_group(dtype):
    qw = quantize_weight(_w(48, 576), None, parse_method_config({"method": "rtn", "bits": 4, "group_size": 128}))
    assert cpu.int4_reason(qw) is None
    p = cpu.prepare_int4(qw, dtype)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2))
    ref = x.double() @ qw.dequantize().double().T
    y = cpu.int4_mm(x.to(dtype), p).double()
    assert (y - ref).norm() / ref.norm() < (1e-6 if dtype == torch.float32 else 2e-2)
    if dtype == torch.float32:
        assert torch.equal(cpu.int4_dequantize(p, 576), qw.dequantize())


def test_qat_grid_sums_and_init_on_a_partial_group():
    from lowbit.qat import grid

    W = _w(8, 96)
    s = grid.group_sum(W, 64)
    assert torch.allclose(s, torch.stack([W[:, :64].sum(1), W[:, 64:].sum(1)], 1))
    init = grid.l4q_init_scale(W, 4, 64)
    assert torch.equal(init[:, 1:], grid.l4q_init_scale(W[:, 64:], 4, -1))


# ---- exporters


@pytest.fixture(scope="module")
def partial(tiny_model_dir, tmp_path_factory):
    """The tiny model (inputs 64 and 128) with symmetric 4-bit groups of 96: 128-wide inputs get one group
    of 96 and one of 32; 64-wide inputs one group of 64."""
    from lowbit.jobs import quantize_job
    from lowbit.recipe import Recipe

    out = tmp_path_factory.mktemp("partial") / "q"
    quantize_job(str(tiny_model_dir), out, Recipe.model_validate(
        {"quant": {"method": "rtn", "bits": 4, "group_size": 96, "symmetric": True}}), progress=False)
    return out


def test_compressed_tensors_refuses_partial_groups_by_name(partial, tmp_path):
    from lowbit.exporters import export

    with pytest.raises(LowbitError, match=r"compressed-tensors: layer model.layers.0.self_attn.q_proj has 64 input "
                                          r"columns, which groups of 96 do not divide \(shape \[64, 64\]"):
        export(partial, "compressed-tensors", tmp_path / "ct")
    assert not any(tmp_path.iterdir())


def test_gptq_and_gguf_hold_partial_groups_exactly(partial, tmp_path):
    import gguf
    from safetensors.torch import load_file

    from lowbit.exporters import export
    from lowbit.exporters.gguf import _LAYER, _permute_rows
    from lowbit.io.native import load_quantized

    _, qweights, _ = load_quantized(partial)
    out = export(partial, "gptq", tmp_path / "gptq")
    t = load_file(str(out / "model.safetensors"))
    for name, qw in qweights.items():
        scales, g_idx = t[f"{name}.scales"], t[f"{name}.g_idx"].long()
        assert scales.shape[0] == -(-qw.shape[1] // 96) and int(g_idx.max()) == scales.shape[0] - 1
        # the format's own definition with this export's tensors (symmetric: zero 8)
        q = torch.stack([(t[f"{name}.qweight"].to(torch.int64) >> (4 * j)) & 15 for j in range(8)], 1)
        q = q.reshape(-1, qw.shape[0])[:qw.shape[1]]
        W = ((q - 8).double() * scales[g_idx].double()).T
        assert torch.equal(W.float(), qw.dequantize()), name
    out = export(partial, "gguf", tmp_path / "gg")
    tensors = {x.name: x for x in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    for name, qw in qweights.items():
        blk, mod = name.split(".")[2], ".".join(name.split(".")[3:])
        x = tensors[f"blk.{blk}.{_LAYER[mod]}.weight"]
        W = gguf.quants.dequantize(x.data, x.tensor_type)
        ref = qw.dequantize().numpy()
        if mod in ("self_attn.q_proj", "self_attn.k_proj"):
            ref = _permute_rows(ref, 2)
        assert (W == ref).all(), name
