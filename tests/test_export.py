"""Exporters, each checked by loading the result with the other tool (transformers, compressed-tensors, peft)
or, for GPTQ, against an independent dequantizer of the format written here from its definition."""

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.exporters import export
from lowbit.io.native import load_quantized
from lowbit.recipe import Recipe

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _quantize(src, out, quant: dict, overrides=(), ignore=(), calibration=None):
    from lowbit.jobs import quantize_job

    r = Recipe.model_validate({"quant": quant, "overrides": [{"pattern": p, "config": c} for p, c in overrides],
                               "ignore": list(ignore), "calibration": calibration or {}})
    quantize_job(str(src), out, r, progress=False)
    return out


@pytest.fixture(scope="module")
def outputs(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("lowbit_out")
    return {
        # mixed precision: 4-bit asymmetric groups of 32, layer 0's MLP 8-bit per channel, one layer kept fp
        "mixed": _quantize(tiny_model_dir, d / "mixed", {"method": "rtn", "bits": 4, "group_size": 32},
                           overrides=[(r"layers\.0\.mlp", {"bits": 8, "group_size": -1})],
                           ignore=[r"layers\.1\.self_attn\.o_proj"]),
        "sym": _quantize(tiny_model_dir, d / "sym", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}),
        # symmetric 4-bit groups of 64 (Q4_0 repeats each scale over 2 blocks), layer 0's MLP 8-bit (Q8_0)
        "sym48": _quantize(tiny_model_dir, d / "sym48", {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True},
                           overrides=[(r"layers\.0\.mlp", {"bits": 8, "group_size": 32})]),
        "w4a8": _quantize(tiny_model_dir, d / "w4a8", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True,
                                                        "act": {"bits": 8}}),
        # GPTQ act-order with dynamic groups: a real g_idx
        "gidx": _quantize(tiny_model_dir, d / "gidx", {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True,
                                                        "static_groups": False},
                          calibration={"n_samples": 8, "seqlen": 32}),
        "mx": _quantize(tiny_model_dir, d / "mx", {"method": "rtn", "format": "mxint", "bits": 4}),
        "lqer": _quantize(tiny_model_dir, d / "lqer", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True,
                                                        "lqer": {"rank": 4, "scale": "none"}}),
    }


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.double()


def _ours(path) -> torch.Tensor:
    return _logits(load_quantized(path)[0])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_compressed_tensors_symmetric_loads_in_transformers(outputs, tmp_path):
    out = export(outputs["sym"], "compressed-tensors", tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    # transformers + compressed-tensors decompress on CPU: fp32 scales make Ŵ, hence the logits, identical
    assert torch.equal(_logits(_hf(out)), _ours(outputs["sym"]))
    card = (out / "README.md").read_text()
    assert "Bits per weight (all metadata" in card and "compressed-tensors" in card


def test_compressed_tensors_asymmetric_mixed_decompresses_exactly(outputs, tmp_path):
    # transformers 5.x cannot load *asymmetric* pack-quantized checkpoints (its meta-device skeleton keeps
    # the zero point unpacked: llm-compressor #1618), so decompress with compressed-tensors' own API.
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out = export(outputs["mixed"], "compressed-tensors", tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    assert {(g["weights"]["num_bits"], g["weights"]["strategy"]) for g in groups.values()} == {(4, "group"), (8, "channel")}
    t = load_file(str(out / "model.safetensors"))
    _, qweights, _ = load_quantized(outputs["mixed"])
    state = {k: v for k, v in t.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    for g in groups.values():
        scheme = QuantizationScheme.model_validate({k: v for k, v in g.items() if k != "format"})
        for name in g["targets"]:
            sd = {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(name + ".")}
            w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            assert torch.equal(w, qweights[name].dequantize()), name
            state[f"{name}.weight"] = w
    assert set(qweights) == {n for g in groups.values() for n in g["targets"]}
    assert "model.layers.1.self_attn.o_proj" in cfg["quantization_config"]["ignore"]
    conf = AutoConfig.from_pretrained(str(out))
    del conf.quantization_config
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    assert torch.equal(_logits(model), _ours(outputs["mixed"]))


def _unpack_words(words: torch.Tensor, bits: int, axis_len: int) -> torch.Tensor:
    """The GPTQ definition for 32 % bits == 0: word i holds items i·(32/b) … , item j at bits [j·b, j·b+b)."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    items = [(w >> (bits * j)) & (2**bits - 1) for j in range(per)]
    return torch.stack(items, dim=1).reshape(w.shape[0] * per, *w.shape[1:])[:axis_len]


@pytest.mark.parametrize("which", ["sym", "gidx"])
def test_gptq_tensors_follow_the_format(outputs, tmp_path, which):
    from safetensors.torch import load_file

    out = export(outputs[which], "gptq", tmp_path / "gptq")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["checkpoint_format"]) == ("gptq", 4, 32, True, "gptq")
    assert qc["desc_act"] == (which == "gidx")
    t = load_file(str(out / "model.safetensors"))
    _, qweights, _ = load_quantized(outputs[which])
    for name, qw in qweights.items():
        out_f, in_f = qw.shape
        qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        assert qweight.shape == (in_f * 4 // 32, out_f) and qzeros.shape == (in_f // 32, out_f * 4 // 32)
        assert scales.dtype == torch.float16
        if which == "sym":
            assert torch.equal(g_idx, torch.arange(in_f, dtype=torch.int32) // 32)
        else:  # act-order with dynamic groups: the quantizer's own g_idx, a real permutation of groups
            assert torch.equal(g_idx, qw.grid.g_idx.to(torch.int32))
            assert not torch.equal(g_idx, torch.arange(in_f, dtype=torch.int32) // 32)
        q = _unpack_words(qweight, 4, in_f)  # [in, out]
        z = _unpack_words(qzeros.T, 4, out_f).T + 1  # v1: stored zero − 1
        assert (z == 8).all()  # symmetric 4-bit: zero 2^(b−1)
        W = ((q - z[g_idx.long()]).double() * scales[g_idx.long()].double()).T
        assert torch.equal(W.float(), qw.dequantize())


def test_gptq_refuses_mixed_settings_and_ct_refuses_g_idx(outputs, tmp_path):
    with pytest.raises(LowbitError, match="different .* settings.*compressed-tensors"):
        export(outputs["mixed"], "gptq", tmp_path / "g")
    with pytest.raises(LowbitError, match="g_idx.*--format gptq"):
        export(outputs["gidx"], "compressed-tensors", tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_peft_lora_adapter_on_exported_base(outputs, tmp_path):
    from peft import PeftModel

    out = export(outputs["lqer"], "compressed-tensors", tmp_path / "ct", lowrank_adapter=True)
    cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 4
    base = _hf(out)
    ref = _ours(outputs["lqer"])
    # the base alone is the grid only: visibly off; with the adapter, the quantized model (fp32 rounding apart)
    assert _rel(_logits(base), ref) > 1e-4
    model = PeftModel.from_pretrained(base, str(out / "lora_adapter")).eval()
    assert _rel(_logits(model), ref) < 1e-5
    # the adapter alone, on the dequantized grid-only base
    ad = export(outputs["lqer"], "peft-lora", tmp_path / "ad", base="base")
    deq = export(outputs["lqer"], "dequantized", tmp_path / "deq", dtype="float32", lowrank_adapter=True)
    model = PeftModel.from_pretrained(_hf(deq), str(ad)).eval()
    assert _rel(_logits(model), ref) < 1e-5


def test_lowrank_refused_without_adapter(outputs, tmp_path):
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(LowbitError, match="low-rank.*--lowrank-adapter"):
            export(outputs["lqer"], fmt, tmp_path / fmt)
    with pytest.raises(LowbitError, match="no low-rank"):
        export(outputs["sym"], "peft-lora", tmp_path / "p")


def test_dequantized_loads_in_transformers(outputs, tmp_path):
    out = export(outputs["lqer"], "dequantized", tmp_path / "d", dtype="float32")
    assert _rel(_logits(_hf(out)), _ours(outputs["lqer"])) < 1e-6
    assert "dequantized" in (out / "README.md").read_text()
    out16 = export(outputs["mixed"], "dequantized", tmp_path / "d16")
    m = _hf(out16)
    assert m.dtype == torch.float16
    assert _rel(_logits(m.float()), _ours(outputs["mixed"])) < 2e-3  # fp16 rounding of Ŵ and embeddings


def test_cli_export_and_clear_errors(outputs, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"ppl": 12.345, "seqlen": 64, "n_windows": 3, "kl": 0.0123, "kl_windows": 3,
                              "top1_agreement": 0.9}))
    r = CliRunner().invoke(app, ["export", str(outputs["sym"]), "--format", "gptq", "-o", str(tmp_path / "g"),
                                 "--eval-json", str(ev)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g" / "quantize_config.json").is_file()
    card = (tmp_path / "g" / "README.md").read_text()
    assert "perplexity 12.345" in card and "KL(base‖quantized) 0.01230" in card
    r = CliRunner().invoke(app, ["export", str(outputs["sym"]), "--format", "gptq", "-o", str(tmp_path / "g")])
    assert r.exit_code == 2 and "exists" in r.output
    r = CliRunner().invoke(app, ["export", str(outputs["sym"]), "--format", "onnx", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown export format" in r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nope"), "--format", "gptq", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "lowbit: error:" in r.output


def test_gguf_blocks_read_back_by_gguf_and_transformers(outputs, tmp_path):
    import gguf

    from lowbit.exporters.gguf import _LAYER, _permute_rows

    out = export(outputs["sym48"], "gguf", tmp_path / "gg")
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    _, qweights, _ = load_quantized(outputs["sym48"])
    n_head = 2
    for name, qw in qweights.items():
        blk, mod = name.split(".")[2], ".".join(name.split(".")[3:])
        t = tensors[f"blk.{blk}.{_LAYER[mod]}.weight"]
        want = "Q8_0" if ".0.mlp." in name else "Q4_0"
        assert t.tensor_type.name == want, name
        W = gguf.quants.dequantize(t.data, t.tensor_type)  # gguf's own reference dequantizer
        if mod in ("self_attn.q_proj", "self_attn.k_proj"):
            W = _permute_rows(qw.dequantize().numpy(), n_head) - W  # compare in llama.cpp's row order
            assert (W == 0).all(), name
        else:
            assert (torch.from_numpy(W) == qw.dequantize()).all(), name
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    assert torch.equal(_logits(m), _ours(outputs["sym48"]))  # transformers un-permutes Q/K itself


def test_gguf_refuses_grids_it_cannot_hold(outputs, tmp_path):
    with pytest.raises(LowbitError, match="cannot be stored exactly"):
        export(outputs["mixed"], "gguf", tmp_path / "a")  # asymmetric 4-bit (Q4_1's m not fp16) / 8-bit asym
    with pytest.raises(LowbitError, match="fits Q4_0, not Q8_0"):
        export(outputs["sym"], "gguf", tmp_path / "b", gguf_type="Q8_0")
    with pytest.raises(LowbitError, match="low-rank"):
        export(outputs["lqer"], "gguf", tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_grids_no_runtime_format_holds_go_dequantized(outputs, tmp_path):
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        with pytest.raises(LowbitError, match="mxint grid.*--format dequantized"):
            export(outputs["mx"], fmt, tmp_path / fmt)
    out = export(outputs["mx"], "dequantized", tmp_path / "d", dtype="float32")
    assert _rel(_logits(_hf(out)), _ours(outputs["mx"])) < 1e-6


def test_activation_quantization_is_refused_or_stated(outputs, tmp_path):
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        with pytest.raises(LowbitError, match="quantizes its input activations"):
            export(outputs["w4a8"], fmt, tmp_path / fmt)
    out = export(outputs["w4a8"], "dequantized", tmp_path / "d")
    assert "**Weight-only**" in (out / "README.md").read_text()
