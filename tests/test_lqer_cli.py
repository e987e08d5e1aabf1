"""LQER end to end on the tiny model: quantized factors + W4A8 through the CLI and the native format,
and `lowbit plot spectrum`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.methods.config import ActQuantConfig
from lowbit.nn.quant_linear import QuantLinear


def test_w4a8_with_mxint8_factors_saved_and_loaded(tiny_model_dir, tmp_path):
    from lowbit.io.native import load_model, load_quantized

    common = ["quantize", str(tiny_model_dir), "--method", "rtn", "--format", "mxint", "--bits", "4",
              "--calib-samples", "8", "--calib-seqlen", "64", "--quiet", "--lqer-rank", "8",
              "--lqer-factors", "mxint8"]
    r = CliRunner()
    res = r.invoke(app, common + ["-o", str(tmp_path / "a8"), "--act-bits", "8"])
    assert res.exit_code == 0, res.output
    assert r.invoke(app, common + ["-o", str(tmp_path / "a16")]).exit_code == 0
    layers = json.loads((tmp_path / "a8" / "config.json").read_text())["quantization_config"]["layers"]
    for name, meta in layers.items():
        assert meta["act"] == {"format": "mxint", "bits": 8, "block_size": 16, "exp_bits": 8}
        assert meta["lowrank"] == {"kind": "mxint8", "block_size": 16, "exp_bits": 8}
    m8, qws, _ = load_quantized(tmp_path / "a8")
    mods = [m for m in m8.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.act == ActQuantConfig(bits=8) for m in mods)
    # bits: 4-bit codes + one 8-bit exponent per 16 + rank-8 MXINT8 factors (codes + 8-bit exponents)
    for name, q in qws.items():
        out, inn = q.shape
        assert q.bits_per_weight() == pytest.approx(
            4.5 + (8 * 8 * (inn + out) + 8 * (inn * 1 + 8 * (out // 16))) / (inn * out))
    m16, _ = load_model(str(tmp_path / "a16"))
    m8b, _ = load_model(str(tmp_path / "a8"))
    base, tok = load_model(str(tiny_model_dir))
    ids = torch.randint(0, tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        l8, l8b, l16, ref = m8(ids).logits, m8b(ids).logits, m16(ids).logits, base(ids).logits
    assert torch.equal(l8, l8b)  # a loaded W4A8 model runs with its activation format, deterministically
    d = float((l8 - l16).norm() / l16.norm())
    assert 0 < d < 0.05, d  # MXINT8 activations: a small, non-zero change
    e8, e16 = (float((x - ref).norm() / ref.norm()) for x in (l8, l16))
    assert e8 < 1.5 * e16, (e8, e16)


def test_bad_lqer_and_act_flags_error_cleanly(tiny_model_dir, tmp_path):
    r = CliRunner()
    base = ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--method", "rtn", "--quiet"]
    for extra, msg in ((["--act-bits", "9"], "act"), (["--lqer-factors", "int4"], "factor_dtype"),
                       (["--lqer-energy", "1.5"], "rank_energy")):
        res = r.invoke(app, base + extra)
        assert res.exit_code == 2 and msg in res.output, (extra, res.output)
        assert not (tmp_path / "x").exists()


def test_plot_spectrum_png(tiny_model_dir, tmp_path):
    r = CliRunner()
    out = tmp_path / "fig.png"
    res = r.invoke(app, ["plot", "spectrum", str(tiny_model_dir), "-o", str(out), "--layers", r"layers\.0\.mlp",
                         "--bits", "3", "--group-size", "32", "--calib-samples", "4"])
    assert res.exit_code == 0, res.output
    assert "3 layers" in res.output
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image

    img = matplotlib.image.imread(str(out))
    assert img.ndim == 3 and img.shape[0] > 300 and img.std() > 0.01  # decodes, and is not blank
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # no temporary left behind
    for args, msg in (([r"--layers", "nomatch"], "no quantizable layer"), (["--layers", "("], "invalid"),
                      (["--bits", "1"], "bit width"), (["--group-size", "-3"], "group size")):
        res = r.invoke(app, ["plot", "spectrum", str(tiny_model_dir), "-o", str(tmp_path / "bad.png"),
                             "--calib-samples", "2", *args])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
        assert not (tmp_path / "bad.png").exists()
    res = r.invoke(app, ["plot", "spectrum", str(tmp_path / "missing"), "-o", str(tmp_path / "bad.png")])
    assert res.exit_code == 2 and "does not exist" in res.output
