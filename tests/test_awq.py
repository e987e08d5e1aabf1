"""AWQ (methods/awq.py) against brute-force searches on raw activations in float64, RTN / GPTQ identities,
and the in_scale plumbing: bits, QuantLinear and kernels, native save/load, LQER on top, exporters."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import packing
from lowbit.formats.quant_primitives import fake_quantize_affine
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods import parse_method_config, quantize_weight
from lowbit.methods.awq import awq_quantize, awq_search, clip_ratios, clip_search
from lowbit.methods.config import GPTQConfig, RTNConfig
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.rtn import rtn_quantize
from lowbit.methods.stats import StatsAccumulator
from lowbit.nn.quant_linear import QuantLinear

IN, OUT, GS = 64, 24, 16


def activations(n: int, inp: int, seed: int) -> torch.Tensor:
    """Correlated inputs with log-normal channel magnitudes and 4 outlier channels (what AWQ exploits)."""
    g = torch.Generator().manual_seed(seed)
    chan = torch.exp(0.8 * torch.randn(inp, generator=g))
    chan[:4] *= 15
    mix = torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g) / inp**0.5
    return (torch.randn(n, inp, generator=g) @ mix) * chan


def stats_of(X: torch.Tensor):
    acc = StatsAccumulator(X.shape[1])
    for chunk in X.split(256):
        acc.add(chunk)
    return acc.result()


@pytest.fixture(scope="module")
def layer():
    X = activations(1024, IN, 1)
    W = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(2)) * 0.05
    return W, X, stats_of(X)


def cfg(**kw):
    return parse_method_config({"method": "awq", "bits": 3, "group_size": GS, **kw})


def out_err(W, What, X) -> float:
    """‖X Wᵀ − X Ŵᵀ‖²_F in float64 on the raw activations."""
    return float((X.double() @ (W.double() - What.double()).T).square().sum())


def ref_scale(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """The authors' s = max(a^α, 1e-4) / √(max · min), rounded to the stored fp16, in float32."""
    s = a.double().pow(alpha).clamp(min=1e-4)
    return (s / (s.max() * s.min()).sqrt()).half().float()


def test_alpha_is_the_bruteforce_argmin(layer):
    W, X, st = layer
    c = cfg(clip=False)
    brute = []
    for k in range(20):
        s = ref_scale(st.act_mean_abs, k / 20)
        What = rtn_quantize(W * s, RTNConfig(bits=3, group_size=GS)).dequantize() / s
        brute.append(out_err(W, What, X))
    brute = torch.tensor(brute, dtype=torch.float64)
    alpha, s, errs, _ = awq_search(W, st, c, dtype=torch.float64)
    best = int(brute.argmin())
    assert sorted(brute.tolist())[1] > brute[best] * (1 + 1e-4)  # no near tie: the argmin is well defined
    assert alpha == best / 20 and best > 0
    # The H-based errors are the raw-X errors up to the factor N/2 (H = 2/N XᵀX, accumulated in float32).
    torch.testing.assert_close(errs * X.shape[0] / 2, brute, rtol=1e-5, atol=0)
    qw = awq_quantize(W, st, c)
    assert torch.equal(qw.in_scale.float(), ref_scale(st.act_mean_abs, alpha))
    assert out_err(W, qw.dequantize(), X) == pytest.approx(float(brute[best]), rel=1e-9)


def test_alpha_zero_is_rtn_and_gptq_bit_identical(layer):
    W, X, st = layer
    for base, ref in (("rtn", rtn_quantize(W, RTNConfig(bits=3, group_size=GS))),
                      ("gptq", gptq_quantize(W, st.hessian, GPTQConfig(bits=3, group_size=GS)))):
        qw = awq_quantize(W, st, cfg(n_grid=1, clip=False, base=base))  # α ∈ {0}: s ≡ 1
        assert qw.in_scale is None
        assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.dequantize(), ref.dequantize())
        assert torch.equal(qw.grid.scale, ref.grid.scale) and torch.equal(qw.grid.zero, ref.grid.zero)
        assert qw.storage() == ref.storage()
    # α = 0 is a candidate, so AWQ's output error is never above RTN's (without the clip search).
    rtn_err = out_err(W, rtn_quantize(W, RTNConfig(bits=3, group_size=GS)).dequantize(), X)
    awq_err = out_err(W, awq_quantize(W, st, cfg(clip=False)).dequantize(), X)
    assert awq_err < 0.9 * rtn_err


def test_clip_choice_is_the_bruteforce_argmin(layer):
    W, X, st = layer
    c = cfg()
    ratios = [1 - i / 20 for i in range(10)]  # the authors' n_grid 20, max_shrink 0.5: 1.0 … 0.55
    torch.testing.assert_close(clip_ratios(c), torch.tensor(ratios, dtype=torch.float64))
    s = ref_scale(st.act_mean_abs, 0.5)
    Wp, Xp = W * s, X.double() / s.double()  # the scaled layer: inputs x/s
    Hp = 2 / X.shape[0] * Xp.T @ Xp
    max_val, best, _ = clip_search(Wp, Hp, c, dtype=torch.float64)
    G = IN // GS
    for r in range(OUT):
        for g in range(G):
            w = Wp[r, g * GS : (g + 1) * GS]
            xg = Xp[:, g * GS : (g + 1) * GS]
            e = []
            for ratio in ratios:
                m = w.abs().max() * torch.tensor(ratio, dtype=torch.float32)
                q = fake_quantize_affine(w.clamp(-m, m)[None], 3, False, GS)[0]
                e.append(float((xg @ (w - q).double()).square().sum()))
            e = torch.tensor(e)
            k = int(best[r, g])
            assert e[k] <= e.min() * (1 + 1e-9), (r, g, k, int(e.argmin()))
    assert (best > 0).any()  # some groups do clip
    # The clip search runs after the α search, on its W': the same s with or without it.
    qw_clip, qw_none = awq_quantize(W, st, cfg()), awq_quantize(W, st, cfg(clip=False))
    torch.testing.assert_close(qw_clip.in_scale, qw_none.in_scale, rtol=0, atol=0)


def test_gptq_base_is_gptq_on_the_scaled_layer(layer):
    W, X, st = layer
    c = cfg(base="gptq")
    alpha = awq_search(W, st, c)[0]
    s = ref_scale(st.act_mean_abs, alpha)
    D = torch.diag(1 / s.double())
    Hp = (D @ st.hessian.double() @ D).float()  # diag(1/s)·H·diag(1/s) in float64
    ref = gptq_quantize(W * s, Hp, GPTQConfig(bits=3, group_size=GS))
    qw = awq_quantize(W, st, c)
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.grid.scale, ref.grid.scale)
    torch.testing.assert_close(qw.dequantize(), ref.dequantize() / s, rtol=0, atol=0)
    # Change of variables: the layer's output error equals the scaled layer's, ‖XΔᵀ‖ = ‖(X/s)(Δ·diag s)ᵀ‖.
    Xs = X.double() / s.double()
    scaled = float((Xs @ (W * s - ref.dequantize()).double().T).square().sum())
    assert out_err(W, qw.dequantize(), X) == pytest.approx(scaled, rel=1e-6)  # Ŵ·s vs Q: fp32 rounding


def test_quantlinear_and_kernel_match_dequantize(layer):
    W, X, st = layer
    c = parse_method_config({"method": "awq", "bits": 3, "group_size": GS,
                             "lqer": {"rank": 4, "scale": "exact", "factor_dtype": "fp32"}})
    qw = quantize_weight(W, st, c)
    assert qw.in_scale is not None and qw.lowrank is not None
    bias = torch.randn(OUT, generator=torch.Generator().manual_seed(3))
    x = X[:64]
    ref = x.double() @ qw.dequantize().double().T + bias.double()
    y = QuantLinear(qw, bias)(x)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6
    # LQER composes: factors of the error of the deployed AWQ base; with the exact scale and fp32 factors
    # they minimise the calibration output error, so it can only drop.
    base = QuantizedWeight(qw.shape, qw.dtype, qw.grid, qw.codes, None, None, qw.in_scale)
    assert out_err(W, qw.dequantize(), X) < out_err(W, base.dequantize(), X)
    # The int4 kernel holds Q(W·diag s) and multiplies x/s (bf16: relative error ~1e-2).
    X2 = activations(256, 128, 4)
    W2 = torch.randn(32, 128, generator=torch.Generator().manual_seed(5)) * 0.05
    qw2 = awq_quantize(W2, stats_of(X2), parse_method_config({"method": "awq", "bits": 4, "group_size": 32}))
    assert float(qw2.in_scale.float().max() / qw2.in_scale.float().min()) > 4  # s far from 1: the test can fail
    lin = QuantLinear(qw2)
    lin.backend = "kernel"
    x2 = X2[:16]
    ref2 = x2.double() @ qw2.dequantize().double().T
    y2 = lin(x2.bfloat16())
    assert lin._kernel_state[1] == "int4"
    assert float((y2.double() - ref2).norm() / ref2.norm()) < 2e-2


def test_bits_count_in_scale_exactly(layer):
    W, _, st = layer
    qw = awq_quantize(W, st, cfg())
    G = IN // GS
    expect = {"codes": OUT * packing.packed_words(IN, 3) * 32, "scales": OUT * G * 16,
              "zeros": G * packing.packed_words(OUT, 3) * 32, "in_scale": 16 * IN}
    assert qw.storage() == expect
    assert qw.bits_per_weight() == sum(expect.values()) / (OUT * IN)


def test_state_round_trip_and_corrupt_in_scale(layer):
    W, _, st = layer
    qw = awq_quantize(W, st, cfg())
    t, meta = qw.to_state()
    back = QuantizedWeight.from_state(t, meta)
    assert torch.equal(back.in_scale, qw.in_scale) and torch.equal(back.dequantize(), qw.dequantize())
    for bad in (qw.in_scale[:-1], -qw.in_scale, qw.in_scale.float()):
        with pytest.raises(LowbitError, match="in_scale"):
            QuantizedWeight.from_state({**t, "in_scale": bad}, meta)


def test_deterministic(layer):
    W, _, st = layer
    for base in ("rtn", "gptq"):
        a, b = (awq_quantize(W, st, cfg(base=base)).to_state()[0] for _ in range(2))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input(layer):
    W, _, st = layer
    with pytest.raises(LowbitError, match="calibration"):
        quantize_weight(W, None, cfg())
    from lowbit.methods.stats import LayerStats

    with pytest.raises(LowbitError, match="mean"):
        quantize_weight(W, LayerStats(hessian=st.hessian), cfg())
    with pytest.raises(LowbitError, match="activation scale"):
        quantize_weight(W, LayerStats(hessian=st.hessian, act_mean_abs=st.act_mean_abs[:-1]), cfg())
    with pytest.raises(LowbitError, match="NaN"):
        quantize_weight(W.clone().fill_(float("nan")), st, cfg())
    with pytest.raises(LowbitError, match="clip"):
        cfg(base="gptq", clip=True)
    with pytest.raises(LowbitError, match="clip"):
        cfg(group_size=0, clip=True)


# ---- end to end: pipeline, native save/load, exporters


@pytest.fixture(scope="module")
def awq_dir(tiny_model_dir, tmp_path_factory):
    from lowbit.jobs import quantize_job
    from lowbit.recipe import Recipe

    out = tmp_path_factory.mktemp("awq") / "out"
    r = Recipe.model_validate({"quant": {"method": "awq", "bits": 4, "group_size": 32},
                               # the authors' q/k exception, as a recipe override
                               "overrides": [{"pattern": r"self_attn\.(q|k)_proj", "config": {"clip": False}}],
                               "calibration": {"n_samples": 8, "seqlen": 32}})
    quantize_job(str(tiny_model_dir), out, r, progress=False)
    return out


def test_native_save_load(awq_dir):
    from lowbit.io.native import load_quantized

    model, qweights, info = load_quantized(awq_dir)
    assert info["quantization_config"]["method"] == "awq"
    scaled = [n for n, q in qweights.items() if q.in_scale is not None]
    assert scaled  # some layers chose α > 0
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(ids).logits
    # The loaded QuantLinears run Ŵ = dequantize(): swap in plain linears with those weights and compare.
    import copy

    ref = copy.deepcopy(model)
    from lowbit.nn.quant_linear import replace_module

    for n, q in qweights.items():
        lin = torch.nn.Linear(q.shape[1], q.shape[0], bias=False)
        lin.weight.data = q.dequantize()
        replace_module(ref, n, lin)
    with torch.no_grad():
        torch.testing.assert_close(y, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "gguf"])
def test_exporters_refuse_in_scale(awq_dir, tmp_path, fmt):
    from lowbit.exporters import export

    with pytest.raises(LowbitError, match="in_scale"):
        export(awq_dir, fmt, tmp_path / fmt)
    assert not (tmp_path / fmt).exists()


def test_dequantized_export_keeps_in_scale(awq_dir, tmp_path):
    from lowbit.exporters import export
    from lowbit.io.native import load_quantized
    from safetensors.torch import load_file

    out = export(awq_dir, "dequantized", tmp_path / "deq", dtype="float32")
    t = load_file(str(out / "model.safetensors"))
    for n, q in load_quantized(awq_dir)[1].items():
        assert torch.equal(t[f"{n}.weight"], q.dequantize())
