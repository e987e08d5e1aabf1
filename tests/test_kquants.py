"""K-quant blocks (`formats.kquants`) against gguf-py's independent decoder, the importance-weighted fit,
and the Q4_K_M GGUF export read back by transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import kquants as K

gguf = pytest.importorskip("gguf")


def _ref_decode(data: torch.Tensor, qtype: str) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(data.numpy(), getattr(gguf.GGMLQuantizationType, qtype)).copy())


def _weights(seed=0, rows=24, cols=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    W[1] = 0  # an all-zero row
    W[2, :256] = 0.75  # a constant super-block
    W[3] = W[3].abs()  # all positive: the offset must stay ≤ 0
    W[4, 7] = 40.0  # one outlier
    return W


@pytest.mark.parametrize("qtype", list(K.BLOCKS))
def test_blocks_decode_as_gguf_decodes_them(qtype):
    W = _weights()
    data = K.encode(W, qtype)
    n, nbytes = K.BLOCKS[qtype]
    assert data.dtype == torch.uint8 and data.shape == (24, 512 // n * nbytes)
    ours = K.decode(data, qtype, 512)
    assert torch.equal(ours, _ref_decode(data, qtype).reshape(24, 512))
    assert torch.equal(ours[1], torch.zeros(512))
    snr = -10 * torch.log10((ours - W).square().sum() / W.square().sum())
    floor = {"Q2_K": 10.0, "Q3_K": 16.0, "Q4_0": 21.0, "Q4_K": 19.0, "Q5_K": 25.0, "Q5_0": 24.0, "Q5_1": 25.0,
             "Q6_K": 30.0, "Q8_0": 38.0}[qtype]  # dB on these rows
    assert snr > floor, f"{qtype}: SQNR {snr:.1f} dB"


def test_more_bits_never_raise_the_error():
    W = _weights(1)
    err = {t: float((K.decode(K.encode(W, t), t, 512) - W).square().sum()) for t in K.BLOCKS}
    assert err["Q2_K"] > err["Q3_K"] > err["Q4_K"] > err["Q5_0"] > err["Q6_K"] > err["Q8_0"]
    assert err["Q4_0"] > err["Q5_0"]
    assert err["Q4_K"] > err["Q5_K"] > err["Q6_K"] and err["Q5_0"] > err["Q5_1"]


def test_fit_is_no_worse_than_the_reference_quantizer():
    """gguf-py's own Q5_0 / Q8_0 quantizers (ggml's reference rounding): our search is at least as good."""
    from gguf.quants import quantize

    W = _weights(2)
    for qtype in ("Q4_0", "Q5_0", "Q8_0"):
        ref = _ref_decode(torch.from_numpy(quantize(W.numpy(), getattr(gguf.GGMLQuantizationType, qtype))), qtype)
        ours = K.decode(K.encode(W, qtype), qtype, 512)
        assert (ours - W).square().sum() <= (ref.reshape(W.shape) - W).square().sum() * (1 + 1e-6)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q5_1"])
def test_importance_lowers_the_weighted_error(qtype):
    """With a skewed importance per column, the fit made for it has a lower Σ imp·(w − ŵ)² than the default."""
    W = _weights(3)
    g = torch.Generator().manual_seed(9)
    imp = torch.rand(512, generator=g) ** 8 * 100
    plain = K.decode(K.encode(W, qtype), qtype, 512)
    weighted = K.decode(K.encode(W, qtype, imp), qtype, 512)
    e = lambda Wq: float((imp * (Wq - W).square()).sum())  # noqa: E731
    assert e(weighted) < e(plain)


def test_affine_fit_brute_force():
    """fit_affine's candidates include the min-max grid, and its result is a least-squares optimum for its
    codes: no (scale, offset) perturbation lowers the weighted error for the same codes."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 32, generator=g)
    w = torch.rand(50, 32, generator=g) + 0.1
    s, b = K.fit_affine(x, w, 15)
    L = torch.round((x - b[:, None]) / s[:, None]).clamp(0, 15)
    err = (w * (s[:, None] * L + b[:, None] - x) ** 2).sum(-1)
    lo = x.amin(-1).clamp(max=0)
    mm = (x.amax(-1) - lo) / 15
    Lm = torch.round((x - lo[:, None]) / mm[:, None]).clamp(0, 15)
    err_mm = (w * (mm[:, None] * Lm + lo[:, None] - x) ** 2).sum(-1)
    assert bool((err <= err_mm * (1 + 1e-5)).all()) and bool((b <= 0).all())


def test_bad_input():
    with pytest.raises(LowbitError, match="multiple of 256"):
        K.encode(torch.randn(4, 576), "Q4_K")
    with pytest.raises(LowbitError, match="unknown ggml block type"):
        K.encode(torch.randn(4, 256), "Q7_K")
    bad = torch.randn(4, 256)
    bad[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        K.encode(bad, "Q6_K")
    with pytest.raises(LowbitError, match="do not hold"):
        K.decode(torch.zeros(4, 100, dtype=torch.uint8), "Q4_K", 256)


def test_mix_rules():
    from lowbit.exporters.gguf_kquants import block_type_for, use_more_bits

    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert block_type_for("model.layers.0.mlp.down_proj.weight", 1536, "Q4_K_M", 16, True) == "Q6_K"
    assert block_type_for("model.layers.2.mlp.down_proj.weight", 1536, "Q4_K_M", 16, True) == "Q4_K"
    assert block_type_for("model.layers.2.self_attn.q_proj.weight", 576, "Q4_K_M", 16, True) == "Q5_0"  # fallback
    assert block_type_for("model.embed_tokens.weight", 576, "Q4_K_M", 16, True) == "Q8_0"  # tied output
    assert block_type_for("model.embed_tokens.weight", 512, "Q4_K_M", 16, False) == "Q4_K"
    assert block_type_for("model.layers.3.mlp.up_proj.weight", 576, "Q5_K_S", 16, True) == "Q5_1"
    assert block_type_for("model.layers.4.self_attn.v_proj.weight", 512, "Q5_K_M", 16, True) == "Q6_K"
    # llama.cpp's llama_tensor_get_type for the 2- and 3-bit mixes and Q4_K_S (src/llama-quant.cpp)
    t = lambda name, mix, gqa=1: block_type_for(f"model.layers.{name}.weight", 512, mix, 32, True, gqa)  # noqa: E731
    assert [t("0.self_attn.v_proj", "Q2_K"), t("0.self_attn.v_proj", "Q2_K", gqa=4)] == ["Q3_K", "Q4_K"]
    assert [t("9.mlp.down_proj", "Q2_K"), t("9.self_attn.o_proj", "Q2_K"), t("9.mlp.up_proj", "Q2_K")] == \
        ["Q3_K", "Q3_K", "Q2_K"]
    assert [t(f"{i}.self_attn.v_proj", "Q3_K_M") for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert [t(f"{i}.mlp.down_proj", "Q3_K_M") for i in (1, 2)] == ["Q5_K", "Q4_K"]  # i < n/16 = 2
    assert [t("5.self_attn.o_proj", "Q3_K_M"), t("5.self_attn.q_proj", "Q3_K_M")] == ["Q4_K", "Q3_K"]
    assert {t(f"5.{m}", "Q3_K_L") for m in ("self_attn.v_proj", "mlp.down_proj", "self_attn.o_proj")} == {"Q5_K"}
    assert {t(f"5.{m}", "Q3_K_S") for m in ("self_attn.v_proj", "mlp.down_proj", "self_attn.o_proj")} == {"Q3_K"}
    assert [t(f"{i}.self_attn.v_proj", "Q4_K_S") for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [t(f"{i}.mlp.down_proj", "Q4_K_S") for i in (3, 4)] == ["Q5_K", "Q4_K"]  # i < n/8 = 4
    assert block_type_for("model.layers.0.mlp.up_proj.weight", 576, "Q3_K_S", 30, True) == "Q4_0"  # fallback
    assert block_type_for("model.embed_tokens.weight", 512, "Q2_K", 30, True) == "Q6_K"


def _layer_and_hessian(seed=5, rows=64, cols=512, n=2048):
    """A weight and a realistic H = 2XᵀX/N: correlated inputs with a spread of channel scales."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (0.1 * torch.randn(cols, cols, generator=g) + torch.eye(cols))
    X = X * (0.2 + 3 * torch.rand(cols, generator=g))
    return 0.05 * torch.randn(rows, cols, generator=g), 2 * X.T @ X / n


@pytest.mark.parametrize("qtype", list(K.BLOCKS))
def test_gptq_codes_lower_the_output_error_against_nearest_rounding(qtype):
    """GPTQ's sweep into ggml blocks: the layer output error tr(ΔHΔᵀ) (float64) is below that of nearest
    rounding under scales fitted the same way to the original W, and the stored blocks decode to exactly
    the values the sweep chose (ŵ = step·q − off of its own fits)."""
    from lowbit.methods.gptq_blocks import gptq_block_codes

    W, H = _layer_and_hessian()
    err = lambda Wq: float(((Wq - W).double() @ H.double() * (Wq - W).double()).sum())  # noqa: E731
    f0 = K.fit(W, qtype, H.diagonal() / 2)
    near = K.decode(K.pack(f0, f0.round(W)), qtype, W.shape[1])
    f, codes = gptq_block_codes(W, H, qtype)
    swept = K.decode(K.pack(f, codes), qtype, W.shape[1])
    assert err(swept) < 0.85 * err(near), (err(swept), err(near))
    values = f.per_element(f.step) * codes.float() - f.per_element(f.off)
    torch.testing.assert_close(swept, values, rtol=1e-6, atol=1e-6)


def test_gptq_codes_with_a_diagonal_hessian_are_nearest_rounding():
    """Known answer: with uncorrelated inputs (diagonal H) no error is fed forward, so every block is fitted
    to the original weights and the codes are the nearest ones: the same bytes as the plain encoder."""
    from lowbit.methods.gptq_blocks import gptq_block_codes

    W, _ = _layer_and_hessian(rows=16)
    H = torch.diag(torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.5)
    for qtype in ("Q4_K", "Q3_K", "Q4_0"):
        f, codes = gptq_block_codes(W, H, qtype, damp_percent=0.0)
        assert torch.equal(K.pack(f, codes), K.encode(W, qtype, H.diagonal() / 2)), qtype


@pytest.fixture(scope="module")
def wide_model(tiny_model_dir, tmp_path_factory):
    """A random 2-block Llama with 256-multiple widths (K-quant super-blocks fit) and the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("wide") / "model"
    model.save_pretrained(out)
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def test_q4_k_m_export_loads_in_transformers_with_our_weights(wide_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.exporters.gguf_kquants import collect_imatrix, export_gguf_kquants
    from lowbit.io.native import load_model

    model, _ = load_model(str(wide_model))
    windows = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    imatrix = collect_imatrix(model, windows)
    assert set(imatrix) >= {"model.layers.0.mlp.down_proj", "lm_head"} and imatrix["lm_head"].shape == (256,)
    summary = export_gguf_kquants(wide_model, tmp_path / "g", "Q4_K_M", imatrix=imatrix)
    assert summary["types"]["Q6_K"] >= 3 and summary["types"]["Q4_K"] >= 8 and summary["imatrix"]
    assert 4.5 < summary["bits_per_weight"] < 6.5625

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"), gguf_file="model.gguf",
                                                  dtype=torch.float32).eval()
    # the same weights, decoded by lowbit from the blocks it wrote
    ours = json.loads((tmp_path / "g" / "lowbit-gguf.json").read_text())["tensor_types"]
    state = model.state_dict()
    expect = {}
    for name, qtype in ours.items():
        W = state[name].float()
        key = "lm_head" if name == "model.embed_tokens.weight" else name.removesuffix(".weight")
        expect[name] = K.decode(K.encode(W, qtype, imatrix.get(key)), qtype, W.shape[1])
    got = loaded.state_dict()
    for name, W in expect.items():
        assert torch.equal(got[name], W), name
    ids = windows[:2]
    model.load_state_dict({**state, **expect}, strict=False)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_gptq_export_lowers_each_layers_output_error(wide_model, tmp_path):
    """The export with GPTQ codes: every quantized decoder layer, read back from the file by gguf-py, has
    a lower output error tr(ΔHΔᵀ) on the calibration windows than the imatrix export's nearest codes."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lowbit.exporters.gguf import _permute_rows, gguf_name
    from lowbit.exporters.gguf_kquants import collect_imatrix, export_gguf_kquants
    from lowbit.io.native import load_model
    from lowbit.pipeline.collect import collect_stats

    model, _ = load_model(str(wide_model))
    windows = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    a = export_gguf_kquants(wide_model, tmp_path / "near", "Q3_K_M", imatrix=collect_imatrix(model, windows), model=model)
    b = export_gguf_kquants(wide_model, tmp_path / "gptq", "Q3_K_M", gptq=windows, model=model)
    assert a["codes"] == "nearest" and b["codes"] == "gptq" and a["tensor_types"] == b["tensor_types"]
    read = lambda d: {t.name: t for t in GGUFReader(tmp_path / d / "model.gguf").tensors}  # noqa: E731
    near, swept = read("near"), read("gptq")
    names = [n.removesuffix(".weight") for n in b["tensor_types"] if n.startswith("model.layers.")]
    stats = collect_stats(model, names, windows)
    for name in names:
        key = gguf_name(f"{name}.weight")
        W = model.get_submodule(name).weight.detach().double()
        if key.endswith(("attn_q.weight", "attn_k.weight")):  # stored with llama.cpp's rotary row order
            W = torch.from_numpy(_permute_rows(W.numpy(), 4 if ".attn_q." in key else 2))
        H = stats[name].hessian.double()
        e = {}
        for label, t in (("near", near[key]), ("gptq", swept[key])):
            Wq = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).double().reshape(W.shape)
            e[label] = float(((Wq - W) @ H * (Wq - W)).sum())
        assert e["gptq"] < e["near"], (name, e)


def test_export_refuses_a_quantized_model_and_unknown_mix(tiny_model_dir, tmp_path):
    from lowbit.exporters.gguf_kquants import export_gguf_kquants

    from lowbit.jobs import quantize_job
    from lowbit.recipe import make_recipe

    with pytest.raises(LowbitError, match="unknown K-quant mix"):
        export_gguf_kquants(tiny_model_dir, tmp_path / "x", "Q3_K_XL")
    quantize_job(str(tiny_model_dir), tmp_path / "q", make_recipe({"quant": {"method": "rtn", "group_size": 32}}),
                 progress=False)
    with pytest.raises(LowbitError, match="is a lowbit output"):
        export_gguf_kquants(tmp_path / "q", tmp_path / "x", "Q4_K_M")
    from lowbit.exporters import export

    with pytest.raises(LowbitError, match="made from the unquantized model"):  # the CLI's route
        export(tmp_path / "q", "gguf", tmp_path / "x", gguf_type="Q4_K_M")
    assert not (tmp_path / "x").exists()


def test_cli_exports_q4_k_m_with_an_imatrix(wide_model, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    r = CliRunner().invoke(app, ["export", str(wide_model), "-f", "gguf", "--gguf-type", "Q4_K_M", "--imatrix",
                                 "--calib-samples", "2", "-o", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "g" / "lowbit-gguf.json").read_text())
    assert s["imatrix"] and s["mix"] == "Q4_K_M" and (tmp_path / "g" / "model.gguf").stat().st_size > 0
    r = CliRunner().invoke(app, ["export", str(wide_model), "-f", "gguf", "--gguf-type", "Q4_K_M",
                                 "-o", str(tmp_path / "g")])
    assert r.exit_code != 0 and "exists" in r.output
