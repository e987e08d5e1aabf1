"""QAT layers against independent references: the custom backwards against autograd through a naive
fake-quant implementation (float64), and the shared quantizer core against lowbit's PTQ grid (bit-exact)."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.quant_primitives import affine_qparams, affine_quantize, expand_group_param
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods.config import RTNConfig
from lowbit.methods.rtn import rtn_quantize
from lowbit.qat import grid
from lowbit.qat.l4q import L4QFunction, L4QLinear, lsq_grad_scale
from lowbit.qat.lora import LoRALinear
from lowbit.qat.lr_qat import LRQATFunction, LRQATLinear


def ste_round(t):
    return t + (torch.round(t) - t).detach()


def naive_l4q(x, W0, A, B, s, b, scale, bits, gs, g):
    """L4Q by autograd: LSQ+ fake quant w̃ = round(clamp((W_c − b)/s)), W_q = w̃·s + b, with the same fp16 /
    integer-offset snap as straight-through estimators and LSQ's gradient scale as x·g + (x − x·g).detach()."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    sg = s * g + (s - s * g).detach()  # value s, gradient scaled by g (LSQ's grad_scale)
    bg = b * g + (b - b * g).detach()
    s_q = sg + (grid.snap_scale(s.detach()) - sg).detach()
    beta = torch.round(b.detach() / s_q.detach()).clamp(qn + 1, -qn)
    b_q = bg + (s_q.detach() * beta - bg).detach()
    Wc = W0 + scale * (B @ A) if A is not None else W0
    S, Bq = grid.expand(s_q, Wc.shape, gs), grid.expand(b_q, Wc.shape, gs)
    w = (Wc - Bq) / S
    Wq = ste_round(w.clamp(qn, qp)) * S + Bq
    return x @ Wq.T


def _l4q_inputs(bits=3, gs=8, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 5, 32, generator=g, **d)
    W0 = torch.randn(16, 32, generator=g, **d) * 0.1
    A = torch.randn(r, 32, generator=g, **d) * 0.3
    B = torch.randn(16, r, generator=g, **d) * 0.3
    s = grid.l4q_init_scale(W0, bits, gs).to(torch.float64) * 0.7  # shrunk: some weights clip
    b = torch.randn(s.shape, generator=g, **d) * s * 1.5  # offsets of a step or two
    return x, W0, A, B, s, b


@pytest.mark.parametrize("full", [False, True])
def test_l4q_backward_matches_autograd(full):
    bits, gs, scale = 3, 8, 0.5
    x, W0, A, B, s, b = _l4q_inputs(bits, gs)
    if full:
        A = B = None
    g = lsq_grad_scale(bits, gs, W0.shape)
    grads = []
    for fn in (lambda *t: L4QFunction.apply(*t, scale, bits, gs, g), lambda *t: naive_l4q(*t, scale, bits, gs, g)):
        ts = [t.clone().requires_grad_(True) if t is not None else None for t in (x, W0, A, B, s, b)]
        y = fn(*ts)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        (y * gy).sum().backward()
        grads.append([t.grad for t in ts if t is not None])
    (mine, ref) = grads
    names = ["x", "W0", "A", "B", "s", "b"] if not full else ["x", "W0", "s", "b"]
    for n, a, r in zip(names, mine, ref):
        assert a is not None and r is not None, n
        rel = float((a - r).norm() / r.norm().clamp_min(1e-30))
        assert rel < 1e-10, (n, rel)
    # the test must exercise all three LSQ regions and non-trivial gradients
    assert all(float(r.norm()) > 0 for r in ref)
    w = (W0 + (0 if full else scale * B @ A) - grid.expand(b, W0.shape, gs)) / grid.expand(s, W0.shape, gs)
    assert (w < -4).any() and (w > 3).any() and ((w > -4) & (w < 3)).any()


def naive_lrqat(x, phi0, A, B, s, z0, scale, bits, gs):
    s_q = s + (grid.snap_scale(s.detach()) - s).detach()
    Z0 = grid.expand(z0.to(phi0.dtype), phi0.shape, gs)
    q = torch.clamp(ste_round(phi0 + scale * (A @ B)) + Z0, 0, 2**bits - 1)
    return x @ ((q - Z0) * grid.expand(s_q, phi0.shape, gs)).T


def test_lrqat_backward_matches_autograd():
    bits, gs, scale = 3, 8, 0.25
    g = torch.Generator().manual_seed(2)
    d = dict(dtype=torch.float64)
    x = torch.randn(3, 4, 32, generator=g, **d)
    phi0 = torch.randn(16, 32, generator=g, **d) * 3
    A, B = torch.randn(16, 2, generator=g, **d), torch.randn(2, 32, generator=g, **d)
    s = torch.rand(16, 4, generator=g, **d) + 0.5
    z0 = torch.randint(2, 6, (16, 4), generator=g)
    grads = []
    for fn in (LRQATFunction.apply, naive_lrqat):
        ts = [t.clone().requires_grad_(True) for t in (x, A, B, s)]
        y = fn(ts[0], phi0, ts[1], ts[2], ts[3], z0, scale, bits, gs)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
        (y * gy).sum().backward()
        grads.append([t.grad for t in ts])
    for n, a, r in zip(["x", "A", "B", "s"], *grads):
        rel = float((a - r).norm() / r.norm())
        assert rel < 1e-10, (n, rel)
    # ∂L/∂s = Σ_group G ⊙ W_int (the paper's plain scale gradient), checked in closed form
    n = torch.clamp(torch.round(phi0 + scale * A @ B) + grid.expand(z0.double(), phi0.shape, gs), 0, 7) \
        - grid.expand(z0.double(), phi0.shape, gs)
    G = gy.reshape(-1, 16).T @ x.reshape(-1, 32)
    assert torch.allclose(grads[0][3], grid.group_sum(G * n, gs), rtol=1e-12, atol=1e-12)


def test_grid_codes_are_affine_quantize():
    """The core's float32 codes equal `affine_quantize` on random scales/zeros, including clipping."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(32, 64, generator=g)
    scale, zero = affine_qparams(W * 0.6, 3, False, 16)  # a grid too narrow for W: clipping happens
    S, Z = expand_group_param(scale, W.shape, 16), expand_group_param(zero, W.shape, 16)
    ref = affine_quantize(W, S, Z, 3)
    mine = grid.codes(W, S.float(), Z.float(), 3)
    assert torch.equal(mine.to(torch.uint8), ref)
    assert (ref == 0).any() and (ref == 7).any()


def _trained_l4q(bits=3, gs=16, learn_offset=True):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(24, 64, generator=g) * 0.05
    s = grid.l4q_init_scale(W, bits, gs)
    layer = L4QLinear(W, None, s, torch.zeros_like(s), bits=bits, group_size=gs, rank=4, alpha=1.0,
                      learn_offset=learn_offset, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a state as after training: adapter, steps and offsets all moved
        layer.B.normal_(0, 0.05, generator=g)
        layer.s.mul_(1 + 0.2 * torch.rand(layer.s.shape, generator=g))
        if learn_offset:
            layer.b.copy_(layer.s * torch.randn(layer.s.shape, generator=g) * 1.3)
    return layer


@pytest.mark.parametrize("learn_offset", [True, False])
def test_l4q_export_is_bit_identical_to_training_forward(learn_offset):
    layer = _trained_l4q(learn_offset=learn_offset)
    qw = layer.export()
    assert torch.equal(qw.dequantize(), layer.quantized_weight())
    # and through the on-disk record
    t, meta = qw.to_state()
    assert torch.equal(QuantizedWeight.from_state(t, meta).dequantize(), layer.quantized_weight())
    # the layer's output is x·W_qᵀ with that same weight
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(layer(x), x @ qw.dequantize().T)
    assert qw.grid.symmetric == (not learn_offset)
    if learn_offset:
        assert (qw.grid.zero != 4).any()  # the learned offsets really moved the zero points


def test_l4q_zero_steps_equals_rtn_on_initial_steps():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(32, 128, generator=g) * 0.02
    bits, gs = 3, 32
    s = grid.l4q_init_scale(W, bits, gs)
    layer = L4QLinear(W, None, s, torch.zeros_like(s), bits=bits, group_size=gs, rank=4, alpha=1.0,
                      generator=torch.Generator().manual_seed(0))
    qw = layer.export()
    # RTN onto the L4Q_init grid: s from min/max (fp16), symmetric zero 2^(n−1), no clipping
    s16 = s.half()
    S = expand_group_param(s16, W.shape, gs)
    Z = torch.full_like(S, 4, dtype=torch.int32)
    rtn_codes = affine_quantize(W, S, Z, bits)
    assert torch.equal(qw.codes, rtn_codes) and torch.equal(qw.grid.scale, s16)
    assert torch.equal(qw.dequantize(), (rtn_codes.int() - Z).float() * S.float())
    assert (rtn_codes == 0).any() and not (rtn_codes == 0).all()


def test_l4q_from_rtn_grid_equals_rtn_quantize():
    """init_from=rtn: step 0 exports exactly `rtn_quantize` (codes, fp16 scales, integer zeros)."""
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(8)) * 0.03
    ref = rtn_quantize(W, RTNConfig(bits=3, group_size=16))
    s = ref.grid.scale.float()
    layer = L4QLinear(W, None, s, grid.zero_to_offset(ref.grid.zero, s, 3), bits=3, group_size=16, rank=2,
                      alpha=1.0)
    qw = layer.export()
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.grid.zero, ref.grid.zero)
    assert torch.equal(qw.grid.scale, ref.grid.scale)
    assert torch.equal(qw.dequantize(), ref.dequantize())


def test_lrqat_step0_is_rtn_and_export_bit_identical():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(9)) * 0.03
    for sym in (False, True):
        ref = rtn_quantize(W, RTNConfig(bits=3, group_size=16, symmetric=sym))
        s0 = ref.grid.scale.float()
        phi0 = W / grid.expand(s0, W.shape, 16)
        layer = LRQATLinear(phi0, s0, ref.grid.zero, None, bits=3, group_size=16, symmetric=sym, rank=2,
                            alpha=1.0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(layer.export().dequantize(), ref.dequantize())
        with torch.no_grad():
            layer.A.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
            layer.s.mul_(1.1)
        qw = layer.export()
        assert torch.equal(qw.dequantize(), layer.quantized_weight())
        assert not torch.equal(qw.codes, ref.codes)
        x = torch.randn(2, 64)
        assert torch.equal(layer(x), x @ qw.dequantize().T)


def test_lrqat_fixed8_and_int_storage():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(10)) * 0.03
    ref = rtn_quantize(W, RTNConfig(bits=4, group_size=16, symmetric=True))
    s0 = ref.grid.scale.float()
    phi0 = W / grid.expand(s0, W.shape, 16)
    layer = LRQATLinear(phi0, s0, ref.grid.zero, None, bits=4, group_size=16, symmetric=True, rank=2, alpha=1.0,
                        phi="fixed8")
    assert layer.phi0.dtype == torch.int8
    # Q4.4 keeps 1/16 of a step: the decoded Φ₀ is within 1/32 of W/s₀ clipped to the grid [−8, 7]
    assert float((layer._phi0() - phi0.clamp(-8, 7)).abs().max()) <= 1 / 32 + 1e-6
    assert (phi0 > 7).any()  # the clip is exercised (lowbit's symmetric max sits at +7.5 steps)
    with pytest.raises(LowbitError, match="symmetric"):
        LRQATLinear(phi0, s0, ref.grid.zero, None, bits=4, group_size=16, symmetric=False, rank=2, alpha=1.0,
                    phi="fixed8")
    li = LRQATLinear(phi0, s0, ref.grid.zero, None, bits=4, group_size=16, symmetric=True, rank=2, alpha=1.0,
                     phi="int")
    assert torch.equal(li.export().dequantize(), ref.dequantize())


def test_qlora_export_lowrank_counted_and_close():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(11)) * 0.03
    base = rtn_quantize(W, RTNConfig(bits=3, group_size=16))
    layer = LoRALinear.on_quantized(base, None, rank=4, alpha=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    qw = layer.export()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_train, y_export = layer(x), x @ qw.dequantize().T
    # export differs from training only by the fp16 rounding of the factors
    assert float((y_train - y_export).norm() / y_train.norm()) < 1e-3
    assert qw.bits_per_weight() == pytest.approx(base.bits_per_weight() + 16 * 4 * (64 + 32) / (64 * 32))


def test_qlora_int8_adapter_export():
    """int8 adapter: codes + fp16 per-row scales counted; the exported delta is the float64 adapter to
    within int8 rounding (each element off by at most half a step of its row's scale)."""
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(11)) * 0.03
    base = rtn_quantize(W, RTNConfig(bits=3, group_size=16))
    layer = LoRALinear.on_quantized(base, None, rank=4, alpha=1.0, factor_kind="int8",
                                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    qw = layer.export()
    assert qw.lowrank.kind == "int8" and qw.lowrank.A.dtype == torch.int8
    A, B = layer.A.detach().double().T, layer.scale * layer.B.detach().double().T  # [in, r], [r, out]
    A8, B8 = qw.lowrank.factors()
    assert float((A8.double() - A).abs().max()) <= float(A.abs().max()) / 127 / 2 * 1.01
    delta = (A @ B).T
    assert float((qw.lowrank.delta().double() - delta).norm() / delta.norm()) < 2e-2
    extra = (8 * 4 * (64 + 32) + 16 * (64 + 4)) / (64 * 32)
    assert qw.bits_per_weight() == pytest.approx(base.bits_per_weight() + extra)
    with pytest.raises(ValueError, match="int8"):
        LoRALinear.on_quantized(base, None, rank=4, alpha=1.0, factor_kind="int4")


def test_bad_grid_settings_raise_lowbit_error():
    W = torch.randn(8, 48)
    with pytest.raises(LowbitError, match="group size"):
        grid.l4q_init_scale(W, 4, -3)
    with pytest.raises(LowbitError, match="bit width"):
        grid.l4q_init_scale(W, 1, 16)
