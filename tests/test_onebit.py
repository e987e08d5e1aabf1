"""OneBit: SVID against a float64 SVD, the sign STE's surrogate gradient, the sign grid's bits and exact
round trip, the Post-LN layer in QuantLinear, the hidden-state KD term, and a KD run on the tiny model
whose export reproduces the trained model."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.nn.quant_linear import QuantLinear
from lowbit.qat.config import OneBitConfig
from lowbit.qat.onebit import OneBitLinear, _SignSTE, svid
from lowbit.qat.config import TrainConfig


def weight(rows=40, cols=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a magnitude with real rank-1 structure (row and column scales) times noise, as in LLM weights
    return torch.randn(rows, 1, generator=g).abs() * torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g)


def test_svid_is_the_best_rank1_fit_of_the_magnitude():
    W = weight()
    a, b = svid(W)
    assert bool((a >= 0).all() and (b >= 0).all())
    U, S, Vh = torch.linalg.svd(W.abs().double())
    best = S[0] * torch.outer(U[:, 0], Vh[0])
    ab = torch.outer(a, b).double()
    assert float((ab - best.abs()).norm() / best.norm()) < 1e-5
    # ‖W − sign(W)⊙abᵀ‖ = ‖|W| − abᵀ‖: SVID's error is the rank-1 error of |W|, below any single scale's
    signs = torch.where(W >= 0, 1.0, -1.0).double()
    err = float((W.double() - signs * ab).norm())
    assert err == pytest.approx(float((W.abs().double() - ab).norm()), rel=1e-9)
    c = W.abs().double().mean()  # the best single scale c·sign(W) (XNOR-style) is the mean |w|
    assert err < float((W.double() - signs * c).norm())


def test_sign_ste_gradient():
    w = torch.tensor([-2.0, -0.01, 0.0, 0.3, 1.5], requires_grad=True)
    y = _SignSTE.apply(w)
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    y.backward(torch.ones(5))
    assert torch.allclose(w.grad, 1.001 - torch.tanh(w.detach()) ** 2)


def test_sign_grid_bits_round_trip_and_dense_refusal():
    W = weight()
    layer = OneBitLinear(W, None)
    qw = layer.export(torch.float32)
    rows, cols = W.shape
    # 1 bit per weight packed in 32-bit words per row (72 columns: 3 words), h and g in fp16
    assert qw.bits_per_weight() == pytest.approx((rows * 96 + 16 * (rows + cols)) / (rows * cols))
    t, meta = qw.to_state()
    back = QuantizedWeight.from_state(t, meta)
    assert torch.equal(back.codes, qw.codes) and back.grid.post_norm and torch.equal(back.dequantize(), qw.dequantize())
    # Ŵ = h ⊙ sign(W) ⊙ g with the SVID factors (fp16)
    a, b = svid(W)
    ref = a.half().float()[:, None] * torch.where(W >= 0, 1.0, -1.0) * b.half().float()[None, :]
    assert torch.equal(qw.dequantize(), ref)
    bad = dict(t)
    bad["grid.col_scale"] = bad["grid.col_scale"][:-1]
    with pytest.raises(LowbitError, match="column scales"):
        QuantizedWeight.from_state(bad, meta)

    from lowbit.exporters.common import Source
    from lowbit.exporters.dequantized import dequantized_tensors

    src = Source.__new__(Source)
    src.qweights, src.state, src.config = {"model.layers.0.mlp.up_proj": qw}, {}, {}
    with pytest.raises(LowbitError, match="normalises its output"):
        dequantized_tensors(src, torch.float16)


def test_quant_linear_runs_the_post_norm_layer():
    W = weight()
    bias = torch.randn(W.shape[0])
    layer = OneBitLinear(W, bias)
    with torch.no_grad():  # move off the start, and to fp16-representable h, g (what is stored)
        layer.weight.add_(torch.randn(W.shape, generator=torch.Generator().manual_seed(4)) * 0.01)
        layer.h.copy_(layer.h.half().float())
        layer.g.copy_(layer.g.half().float())
    x = torch.randn(5, W.shape[1], generator=torch.Generator().manual_seed(5))
    ql = QuantLinear(layer.export(torch.float32), bias)
    y_ref = torch.nn.functional.layer_norm(x.double() @ ql.qweight.dequantize().double().T, (W.shape[0],)) + bias.double()
    assert float((ql(x).double() - y_ref).norm() / y_ref.norm()) < 1e-6
    assert float((layer(x).detach().double() - y_ref).norm() / y_ref.norm()) < 1e-6
    assert OneBitConfig().post_norm


def test_onebit_kd_run_learns_and_exports_the_trained_model(tiny_model_dir, tmp_path, shakespeare_text):
    from lowbit.io.native import load_model, load_quantized
    from lowbit.qat.data import load_windows
    from lowbit.qat.trainer import evaluate, train

    TEXT = shakespeare_text
    out = tmp_path / "onebit"
    cfg = TrainConfig(steps=30, lr=1e-2, batch_size=4, seqlen=64, dataset="text", data_path=TEXT, eval_windows=8,
                      checkpoint_every=0, seed=0, loss="kd", kd_hidden=1.0, eval_every=30)
    s = train(str(tiny_model_dir), out, OneBitConfig(), cfg, progress=False)
    assert s["eval_kl"] < 0.8 * s["initial_eval_kl"], s  # distillation recovers part of the 1-bit damage (0.549 -> 0.347 measured)
    model, qweights, info = load_quantized(out)
    assert all(q.grid.kind == "sign" for q in qweights.values()) and len(qweights) == 14
    _, tok = load_model(str(tiny_model_dir))
    _, ev = load_windows(tok, "text", 64, path=TEXT, eval_windows=8)
    # the saved model is the trained one, up to h and g rounded to fp16
    assert evaluate(model, ev, "ce", None)["eval_nll"] == pytest.approx(s["eval_nll"], rel=2e-3)
