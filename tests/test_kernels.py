"""CPU kernels against the reference `QuantizedWeight.dequantize()` (the definition of the weight)."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import LowRank, QuantizedWeight
from lowbit.kernels import cpu, dispatch, lut_native
from lowbit.methods import parse_method_config, quantize_weight
from lowbit.nn.quant_linear import QuantLinear, set_backend


def _qw(bits, group_size, symmetric, shape=(48, 256), seed=0, method="rtn", **kw) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g) * 0.05
    cfg = parse_method_config({"method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric, **kw})
    return quantize_weight(W, None, cfg)


def _step(qw) -> torch.Tensor:
    """Per-element grid step s broadcast to [out, in]."""
    from lowbit.formats.quant_primitives import expand_group_param

    return expand_group_param(qw.grid.scale.float(), qw.shape, qw.grid.group_size)


INT4_CASES = [(4, 128, False), (4, 32, True), (4, -1, False), (4, 0, True), (3, 64, False), (2, 256, True)]


@pytest.mark.parametrize("bits,gs,sym", INT4_CASES)
def test_int4_fp32_operands_are_bit_exact(bits, gs, sym):
    # In fp32 the mapping s' = s, z' = (8 − z)·s is exact, so the op's weight is the reference bit for bit.
    qw = _qw(bits, gs, sym)
    assert cpu.int4_reason(qw) is None
    p = cpu.prepare_int4(qw, torch.float32)
    assert torch.equal(cpu.int4_dequantize(p, qw.shape[1]), qw.dequantize())
    x = torch.randn(5, qw.shape[1], generator=torch.Generator().manual_seed(1))
    ref = x.double() @ qw.dequantize().double().T
    err = (cpu.int4_mm(x, p).double() - ref).norm() / ref.norm()
    assert err < 1e-6


@pytest.mark.parametrize("bits,gs,sym", INT4_CASES)
def test_int4_bf16_within_rounding_of_scales(bits, gs, sym):
    # bf16 keeps 8 significant bits: s' and z' each move ≤ 2^-9 relative, the output ≤ 2^-9 relative;
    # with |q − 8| ≤ 8, |8 − z| ≤ 8 and |ŵ| ≤ 15·s the sum stays below s/16 per element.
    qw = _qw(bits, gs, sym)
    p = cpu.prepare_int4(qw, torch.bfloat16)
    Wk = cpu.int4_dequantize(p, qw.shape[1]).float()
    assert ((Wk - qw.dequantize()).abs() <= _step(qw) / 16).all()


def test_int8_per_channel_sym_and_asym():
    for sym in (True, False):
        qw = _qw(8, -1, sym)
        assert dispatch.kernel_for(qw) == "int8"
        x = torch.randn(3, qw.shape[1], generator=torch.Generator().manual_seed(2))
        ref = x.double() @ qw.dequantize().double().T
        y32 = cpu.int8_mm(x, cpu.prepare_int8(qw, torch.float32)).double()
        assert (y32 - ref).norm() / ref.norm() < 1e-6
        yb = cpu.int8_mm(x.bfloat16(), cpu.prepare_int8(qw, torch.bfloat16)).double()
        # bf16 activations + bf16 scales: a few 2^-9 relative roundings
        assert (yb - ref).norm() / ref.norm() < 2e-2


def test_no_kernel_for_what_it_cannot_run_exactly():
    assert cpu.int4_reason(_qw(4, 16, False)) is not None  # group 16 not offered by the op
    assert cpu.int4_reason(_qw(4, 128, False, shape=(40, 256))) is not None  # N % 16
    assert cpu.int8_reason(_qw(8, 128, False)) is not None  # grouped int8
    mx = quantize_weight(torch.randn(32, 64), None, parse_method_config({"method": "rtn", "format": "mxint", "bits": 4}))
    assert dispatch.kernel_for(mx) is None
    gptq_dyn = _qw(4, 32, False)
    gptq_dyn.grid.g_idx = torch.arange(256, dtype=torch.int32) // 32
    assert dispatch.kernel_for(gptq_dyn) is None


@pytest.mark.parametrize("with_lowrank", [False, True])
def test_quant_linear_dispatch(with_lowrank):
    qw = _qw(4, 128, False)
    if with_lowrank:
        g = torch.Generator().manual_seed(3)
        qw.lowrank = LowRank(torch.randn(256, 8, generator=g) * 0.01, torch.randn(8, 48, generator=g) * 0.01)
    bias = torch.randn(48)
    m = QuantLinear(qw, bias)
    x = torch.randn(2, 4, 256, generator=torch.Generator().manual_seed(4))
    ref = (x.double() @ qw.dequantize().double().T + bias.double())
    # auto + fp32 activations: the reference path, bit-identical to F.linear on the dequantized weight
    y32 = m(x)
    assert getattr(m, "_kernel_state", None) is None
    if with_lowrank:  # the reference runs the low-rank term as its own branch: fp32 rounding apart
        assert (y32.double() - ref).norm() / ref.norm() < 1e-6
    else:
        assert torch.equal(y32, torch.nn.functional.linear(x, qw.dequantize(), bias))
    # auto + bf16 activations: the int4 kernel (+ the low-rank branch as two GEMMs)
    yb = m(x.bfloat16())
    assert m._kernel_state[1] == "int4"
    assert (yb.double() - ref).norm() / ref.norm() < 2e-2
    # kernel backend with fp32 activations: cast to bf16 for the op, output back in fp32
    set_backend(m, "kernel")
    yk = m(x)
    assert yk.dtype == torch.float32 and (yk.double() - ref).norm() / ref.norm() < 2e-2
    set_backend(m, "reference")
    assert torch.equal(m(x), y32)
    with pytest.raises(LowbitError, match="unknown backend"):
        set_backend(m, "cuda")


@pytest.mark.parametrize("axis", ["column", "row"])
def test_lut_matches_codebook_reference(axis):
    from lowbit.formats.codebook import make_codebook_grid
    from lowbit.kernels import lut

    g = torch.Generator().manual_seed(5)
    rows, cols = 64, 96
    n_vec = cols if axis == "column" else rows
    vec_bits = torch.where(torch.rand(n_vec, generator=g) < 0.5, 2, 3).to(torch.uint8)  # mixed widths
    luts = torch.randn(n_vec, 8, generator=g).sort(dim=1).values * 0.05
    grid = make_codebook_grid(axis, vec_bits, luts, 16)
    limit = (2 ** vec_bits.long())[None, :] if axis == "column" else (2 ** vec_bits.long())[:, None]
    codes = (torch.rand(rows, cols, generator=g) * limit).floor().to(torch.uint8)
    qw = QuantizedWeight((rows, cols), torch.float32, grid, codes)
    assert dispatch.kernel_for(qw) == "lut"
    p = lut.prepare_lut(qw, torch.bfloat16)
    # the rebuilt weight is the reference rounded to bf16, entry for entry
    assert torch.equal(lut.lut_dequantize_rows(p, 0, rows), qw.dequantize().bfloat16())
    x = torch.randn(3, cols, generator=g)
    ref = x.double() @ qw.dequantize().double().T
    y32 = lut.lut_mm(x, lut.prepare_lut(qw, torch.float32)).double()
    assert (y32 - ref).norm() / ref.norm() < 1e-6
    m = QuantLinear(qw)
    yb = m(x.bfloat16())
    # auto picks the LUT path only when its native matvec exists; else the cached reference runs
    native = lut_native.library() is not None
    assert (getattr(m, "_kernel_state", None) is not None) == native
    assert (yb.double() - ref).norm() / ref.norm() < 2e-2
    m.backend = "kernel"
    yk = m(x.bfloat16())
    assert m._kernel_state[1] == "lut" and (yk.double() - ref).norm() / ref.norm() < 2e-2


def _codebook_layer(axis, rows, cols, seed, widths=(2, 3, 4)):
    from lowbit.formats.codebook import make_codebook_grid

    g = torch.Generator().manual_seed(seed)
    n_vec = cols if axis == "column" else rows
    vec_bits = torch.tensor(widths)[torch.randint(0, len(widths), (n_vec,), generator=g)].to(torch.uint8)
    luts = torch.randn(n_vec, 2 ** max(widths), generator=g).sort(dim=1).values * 0.05
    grid = make_codebook_grid(axis, vec_bits, luts, 16)
    limit = (2 ** vec_bits.long())[None, :] if axis == "column" else (2 ** vec_bits.long())[:, None]
    codes = (torch.rand(rows, cols, generator=g) * limit).floor().to(torch.uint8)
    return QuantizedWeight((rows, cols), torch.float32, grid, codes)


needs_native_lut = pytest.mark.skipif(lut_native.library() is None, reason="no C compiler for the native LUT kernel")


@needs_native_lut
@pytest.mark.parametrize("axis", ["column", "row"])
@pytest.mark.parametrize("shape", [(50, 100), (64, 576), (1536, 96)])
def test_native_lut_matvec_matches_float64(axis, shape):
    """The native matvec (rows not a multiple of its 16-row blocks, columns not a multiple of its 16-lane
    vectors, mixed 2/3/4-bit widths) against dequantize-then-matmul in float64, for 1 and 5 activation rows;
    the blocked codes still rebuild the exact weight for larger batches."""
    from lowbit.kernels import lut

    qw = _codebook_layer(axis, *shape, seed=sum(shape))
    p = lut.prepare_lut(qw, torch.float32)
    assert p.table16 is not None and p.blocked == (axis == "column")
    W = qw.dequantize().double()
    for m in (1, 5):
        x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m))
        y = lut.lut_mm(x, p)
        ref = x.double() @ W.T
        assert y.shape == (m, shape[0]) and float((y.double() - ref).norm() / ref.norm()) < 1e-6
    assert torch.equal(lut.lut_dequantize_rows(p, 0, shape[0]).double(), W)  # the path batches > 64 take
    x = torch.randn(lut.NATIVE_MAX_ROWS + 1, shape[1])
    torch.testing.assert_close(lut.lut_mm(x, p), x @ W.float().T, rtol=1e-5, atol=1e-5)


@needs_native_lut
@pytest.mark.parametrize("shape", [(50, 96), (64, 576)])
def test_native_additive_matvec_matches_float64(shape):
    """AQLM codes (2x8 g8, and J·M not a multiple of the 16-lane gather): the native matvec against
    dequantize-then-matmul in float64; larger batches rebuild exactly `dequantize()`."""
    from lowbit.formats.additive import AdditiveGrid
    from lowbit.kernels import lut

    g = torch.Generator().manual_seed(shape[0])
    rows, cols = shape
    grid = AdditiveGrid(2, 8, 8, (0.1 * torch.randn(2, 256, 8, generator=g)).half(), (torch.rand(rows, generator=g) + 0.5).half())
    qw = QuantizedWeight(shape, torch.float32, grid, torch.randint(0, 256, (rows, cols // 8, 2), generator=g, dtype=torch.uint8))
    assert dispatch.kernel_for(qw) == "lut"
    p = lut.prepare_lut(qw, torch.float32)
    W = qw.dequantize().double()
    for m in (1, 3):
        x = torch.randn(m, cols, generator=g)
        y = lut.lut_mm(x, p)
        assert float((y.double() - x.double() @ W.T).norm() / (x.double() @ W.T).norm()) < 1e-6
    assert torch.equal(lut.lut_dequantize_rows(p, 0, rows).double(), W)
    m = QuantLinear(qw)
    m.backend = "kernel"
    x = torch.randn(2, cols, generator=g)
    yk = m(x.bfloat16())
    assert m._kernel_state[1] == "lut" and float((yk.double() - x.double() @ W.T).norm() / (x.double() @ W.T).norm()) < 2e-2


def test_native_lut_without_a_compiler_falls_back(monkeypatch):
    """No compiler: one warning, `library()` is None, and the LUT layer runs the torch path, still exact."""
    from lowbit.kernels import lut

    monkeypatch.setattr(lut_native, "_state", {})
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(lut_native, "_build", lambda cc: (_ for _ in ()).throw(OSError(f"{cc}: not found")))
    with pytest.warns(RuntimeWarning, match="native LUT kernel is unavailable"):
        assert lut_native.library() is None
    qw = _codebook_layer("column", 40, 64, seed=3)
    p = lut.prepare_lut(qw, torch.float32)
    assert p.table16 is None and not p.blocked
    x = torch.randn(1, 64)
    assert float((lut.lut_mm(x, p).double() - x.double() @ qw.dequantize().double().T).norm()) < 1e-5


def test_generate_matches_hf_greedy_and_cli(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.jobs import quantize_job
    from lowbit.inference.generate import generate, load_for_inference
    from lowbit.recipe import Recipe

    out = tmp_path / "q"
    quantize_job(str(tiny_model_dir), out, Recipe.model_validate({"quant": {"method": "rtn", "bits": 4, "group_size": 32}}),
                 progress=False)
    model, tok, counts = load_for_inference(out, "reference")
    assert counts == {"reference": 14}
    pieces = []
    res = generate(model, tok, "To be, or not", 8, stream=pieces.append)
    ids = tok("To be, or not", return_tensors="pt").input_ids
    hf = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    # our KV-cache loop is greedy decoding: the same tokens as transformers' generate
    assert tok.decode(hf[: res["new_tokens"]], skip_special_tokens=True) == res["text"] == "".join(pieces)
    assert res["decode_tokens_per_s"] > 0 and res["weights_mb"]["dequantized_cache"] > 0
    kmodel, _, kcounts = load_for_inference(out, "kernel")
    assert kcounts == {"int4": 14} and next(kmodel.parameters()).dtype == torch.bfloat16
    r = CliRunner().invoke(app, ["generate", str(out), "--prompt", "To be", "--max-new-tokens", "4"])
    assert r.exit_code == 0 and "tokens/s" in r.output, r.output
    r = CliRunner().invoke(app, ["generate", str(out), "--prompt", "x", "--backend", "gpu"])
    assert r.exit_code == 2 and "unknown backend" in r.output
