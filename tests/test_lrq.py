"""LRQ: the learned quantizer of one layer against independent references (RTN's grid, a brute-force L_p
clipping search, exact materialisation), and the block reconstruction on a tiny LLaMA (step 0 = RTN,
every block's loss falls, deterministic, resumable)."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods import LayerStats, parse_method_config, quantize_weight
from lowbit.methods.config import LRQConfig, RTNConfig
from lowbit.methods.lrq import LRQWeight, default_rank, lp_grid
from lowbit.methods.rtn import rtn_quantize
from lowbit.pipeline.calibrate import quantize_model
from test_pipeline import build, qw_equal, windows


def weight(rows=24, cols=200, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[3, 17] = 0.9  # an outlier: clipping has something to trade
    W[5] = W[5].abs()  # a one-signed row
    return W


@pytest.mark.parametrize("group_size", [-1, 64])  # 64 does not divide 200: a partial last group
@pytest.mark.parametrize("bits", [3, 4])
def test_start_is_rtn(bits, group_size):
    """Without clipping, the exponent starts at exactly 0, so Ŵ at step 0 is lowbit's RTN on the same grid."""
    W = weight()
    cfg = LRQConfig(bits=bits, group_size=group_size, clipping=False)
    q = LRQWeight(W, cfg)
    rtn = rtn_quantize(W, RTNConfig(bits=bits, group_size=group_size))
    assert torch.equal(q().detach(), rtn.dequantize())
    assert torch.equal(q.materialize().codes, rtn.codes)


def test_lp_clipping_search_brute_force():
    """The chosen range of every row minimises Σ|w − ŵ|^p over the 100 ratios (float64 per-row loop)."""
    W = weight(rows=8, cols=96)
    bits, p = 3, 2.4
    s, z = lp_grid(W, bits, -1, clipping=True, p=p, grid=100)
    maxq = 2**bits - 1

    def err(row, a):
        lo, hi = min(float(row.min()), 0.0) * a, max(float(row.max()), 0.0) * a
        sc = torch.tensor((hi - lo) / maxq).half().double().clamp(min=2.0**-24)
        zz = torch.round(-lo / sc).clamp(0, maxq)
        q = (torch.clamp(torch.round(row.double() / sc) + zz, 0, maxq) - zz) * sc
        return float((q - row.double()).abs().pow(p).sum()), float(sc), float(zz)

    for r in range(W.shape[0]):
        cands = [err(W[r], 1 - i / 100) for i in range(100)]
        best = min(c[0] for c in cands)
        mine = err(W[r], 1.0)[0]
        # the error of the chosen grid, recomputed in float64, is the brute-force minimum (to rounding)
        sc, zz = s[r, 0].double(), z[r, 0].double()
        q = (torch.clamp(torch.round(W[r].double() / sc) + zz, 0, maxq) - zz) * sc
        chosen = float((q - W[r].double()).abs().pow(p).sum())
        assert chosen <= best * (1 + 1e-5), (r, chosen, best)
        assert chosen <= mine * (1 + 1e-5)
    assert float(s[3, 0]) < float((W[3].max() - min(W[3].min(), 0)) / maxq)  # the outlier row was clipped


def test_materialised_weight_is_the_trained_one():
    """After arbitrary parameter values: the stored QuantizedWeight decodes to exactly the forward's Ŵ,
    Ŵ/s₁ are integers in [−z, 2^b−1−z], codes in [0, 2^b−1]."""
    W = weight()
    q = LRQWeight(W, LRQConfig(bits=3, group_size=64, rank=5), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        q.L2.copy_(torch.randn(q.L2.shape, generator=g) * 0.3)
        q.r2.copy_(torch.randn(q.r2.shape, generator=g) * 0.1)
        q.c2.copy_(torch.randn(q.c2.shape, generator=g) * 0.1)
        q.log_s1.add_(torch.randn(q.log_s1.shape, generator=g) * 0.05)
    What = q().detach()
    qw = q.materialize()
    assert torch.equal(qw.dequantize(), What)
    assert int(qw.codes.max()) <= 7
    ints = q.integers().detach()
    assert torch.equal(ints, ints.round())
    assert not torch.equal(qw.codes, q.__class__(W, LRQConfig(bits=3, group_size=64, rank=5)).materialize().codes)
    assert qw.bits_per_weight() == rtn_quantize(W, RTNConfig(bits=3, group_size=64)).bits_per_weight()


def test_parameter_count_and_rank_rule():
    W = weight(rows=48, cols=200)
    q = LRQWeight(W, LRQConfig(rank=7))
    assert q.trainable() == 7 * (200 + 48) + 200 + 2 * 48  # r(C_in + C_out) + C_in + 2·C_out
    assert LRQWeight(W, LRQConfig(rank=0)).trainable() == 48 * 200 + 48  # FlexRound: S₂ and s₁
    assert default_rank((48, 200), LRQConfig()) == 12 and default_rank((48, 200), LRQConfig(rank=500)) == 48


def test_gradients_reach_every_parameter():
    W = weight()
    q = LRQWeight(W, LRQConfig(bits=3, rank=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q.L2.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x = torch.randn(16, W.shape[1], generator=torch.Generator().manual_seed(3))
    ((x @ (q() - W).T) ** 2).sum().backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_config_and_registry():
    cfg = parse_method_config({"method": "lrq", "bits": 3})
    assert isinstance(cfg, LRQConfig) and cfg.group_size == -1 and cfg.clip() and cfg.learning_rate() == 6e-4
    assert not LRQConfig(bits=4).clip() and LRQConfig(bits=4).learning_rate() == 9e-4
    with pytest.raises(LowbitError, match="symmetric"):
        parse_method_config({"method": "lrq", "symmetric": True})
    with pytest.raises(LowbitError, match="whole decoder block"):
        quantize_weight(weight(), LayerStats(hessian=torch.eye(200)), cfg)


def _lrq(iters, **kw):
    return LRQConfig(bits=3, group_size=32, iters=iters, clipping=False, rank=4, **kw)


def test_step_zero_is_rtn_and_every_block_improves():
    base = build("llama", layers=2)
    calib = windows(n=8)
    rtn = quantize_model(copy.deepcopy(base), RTNConfig(bits=3, group_size=32), None, progress=False)
    zero = quantize_model(copy.deepcopy(base), _lrq(0), calib, progress=False)
    assert all(qw_equal(zero.qweights[n], rtn.qweights[n]) for n in rtn.qweights)

    res = quantize_model(copy.deepcopy(base), _lrq(40, lr=5e-3), calib, progress=False)
    assert sorted(res.qweights) == sorted(rtn.qweights)
    for r in res.records:
        start, end = (float(v) for v in r.note.split(" after")[0].removeprefix("block loss ").split(" -> "))
        assert end < 0.9 * start, r.note  # measured over every calibration batch
    assert any(not torch.equal(res.qweights[n].codes, rtn.qweights[n].codes) for n in rtn.qweights)


def test_deterministic_and_resumable(tmp_path):
    base = build("llama", layers=3)
    calib = windows(n=6)
    cfg = _lrq(5, lr=5e-3)
    ref = quantize_model(copy.deepcopy(base), cfg, calib, progress=False)
    again = quantize_model(copy.deepcopy(base), cfg, calib, progress=False)
    assert all(qw_equal(again.qweights[n], ref.qweights[n]) for n in ref.qweights)

    def crash(rec):
        if rec.block == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(copy.deepcopy(base), cfg, calib, checkpoint_dir=tmp_path, on_layer=crash, progress=False)
    res = quantize_model(copy.deepcopy(base), cfg, calib, checkpoint_dir=tmp_path, progress=False)
    assert res.resumed_blocks == 2
    assert all(qw_equal(res.qweights[n], ref.qweights[n]) for n in ref.qweights)


def test_refuses_mixing_and_no_data():
    with pytest.raises(LowbitError, match="every quantized layer"):
        quantize_model(build("llama"), _lrq(1), windows(n=4), overrides=[("q_proj", {"method": "rtn"})],
                       progress=False)
    with pytest.raises(LowbitError, match="calibration data"):
        quantize_model(build("llama"), _lrq(1), None, progress=False)


def test_cli_quantize_lrq(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.native import load_quantized

    recipe = tmp_path / "lrq.yaml"
    recipe.write_text("quant: {method: lrq, bits: 4, iters: 3, rank: 2}\ncalibration: {n_samples: 4, seqlen: 32}\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "-o", str(out), "--recipe", str(recipe),
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    _, qweights, info = load_quantized(out)
    assert info["quantization_config"]["method"] == "lrq" and len(qweights) == 14
    assert all(q.grid.kind == "uniform" and q.grid.group_size == -1 and q.bits == 4 for q in qweights.values())


def test_per_token_int_activation_quantization():
    from lowbit.methods.config import ActQuantConfig
    from lowbit.nn.act_quant import fake_quantize_act

    x = torch.tensor([[-1.0, 0.0, 0.5, 3.0], [0.2, 0.4, 0.1, 0.3]])
    y = fake_quantize_act(x, ActQuantConfig(format="int", bits=8))
    # token 0: s = 4/255, z = round(255/4) = 64; token 1: the range widened to [0, 0.4], z = 0
    ref = []
    for row, lo, hi in ((x[0].double(), -1.0, 3.0), (x[1].double(), 0.0, 0.4)):
        s = (hi - lo) / 255
        z = round(-lo / s)
        ref.append((torch.clamp(torch.round(row / s) + z, 0, 255) - z) * s)
    assert torch.allclose(y.double(), torch.stack(ref), rtol=0, atol=1e-6) and y[0, 1] == 0
    assert float((y - x).abs().max()) <= 4 / 255 / 2 + 1e-6
    xg = x.clone().requires_grad_(True)  # straight-through: the gradient passes unchanged
    fake_quantize_act(xg, ActQuantConfig(format="int", bits=4)).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


def test_w4a8_reconstruction_trains_with_quantized_activations(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.native import load_quantized

    recipe = tmp_path / "w4a8.yaml"
    recipe.write_text("quant: {method: lrq, bits: 4, iters: 20, rank: 2, lr: 5.0e-3, act: {format: int, bits: 8}}\n"
                      "calibration: {n_samples: 4, seqlen: 32}\n")
    out = tmp_path / "w4a8"
    res = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "-o", str(out), "--recipe", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    model, qweights, info = load_quantized(out)
    layers = info["quantization_config"]["layers"]
    assert all(layers[n]["act"]["format"] == "int" and layers[n]["act"]["bits"] == 8 for n in qweights)
    assert all(model.get_submodule(n).act.format == "int" for n in qweights)
    import json

    notes = [r["note"] for r in json.loads((out / "lowbit.json").read_text())["layers"]]
    for note in notes:  # the block loss, activations quantized in the student, falls in every block
        start, end = (float(v) for v in note.split(" after")[0].removeprefix("block loss ").split(" -> "))
        assert end < start, note
