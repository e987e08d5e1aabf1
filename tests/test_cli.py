"""The command line end to end on the tiny model: real runs, and every bad input of the spine issue
giving one clear line and a non-zero exit with nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowbit.cli import app
from helpers import tree_hash, assert_clean_error

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])






GPTQ_ARGS = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples", "8",
             "--calib-seqlen", "64", "--quiet"]


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "q"
    before = tree_hash(tiny_model_dir)
    res = run("quantize", tiny_model_dir, "-o", out, *GPTQ_ARGS)
    assert res.exit_code == 0, res.output
    assert tree_hash(tiny_model_dir) == before, "the input model directory was modified"
    return out


def test_quantize_writes_native_format(quantized):
    cfg = json.loads((quantized / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["method"] == "gptq"
    # 4-bit codes + fp16 scale + 4-bit zero per 32 columns: 4 + 20/32 bits per weight (act-order with
    # static groups, the default, stores no g_idx).
    assert qc["bits_per_weight"] == pytest.approx(4 + 20 / 32, abs=1e-9)
    assert qc["config"]["act_order"] and qc["config"]["static_groups"]
    assert not any(p.name.startswith(".") for p in quantized.parent.iterdir()), "checkpoint or temp dir left behind"


def test_eval_quantized_against_base(quantized, tiny_model_dir):
    res = run("eval", quantized, "--base", tiny_model_dir, "--seqlen", "64", "--max-windows", "16", "--json",
              "--quiet")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["n_windows"] == r["kl_windows"] == 16 and r["seqlen"] == 64
    assert r["protocol"]["profile"] == "custom" and r["protocol"]["windows"] == 16
    base = json.loads(run("eval", tiny_model_dir, "--seqlen", "64", "--max-windows", "16", "--json", "--quiet").stdout)
    # 4-bit g32 damage on a tiny model: visible but small.
    assert base["ppl"] < r["ppl"] < 1.5 * base["ppl"]
    assert 0 < r["kl"] < 0.5


def test_recipe_file_and_flag_override(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant: {method: rtn, bits: 3, group_size: 32}\nignore: ['.*down_proj']\n")
    out = tmp_path / "q"
    res = run("quantize", tiny_model_dir, "-o", out, "--recipe", recipe, "--bits", "4", "--quiet")
    assert res.exit_code == 0, res.output
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert layers and all(m["grid"]["bits"] == 4 for m in layers.values())
    assert not any("down_proj" in n for n in layers)


# ---- bad input: one line, exit 2, nothing written


def test_missing_model_path(tmp_path):
    assert_clean_error(run("quantize", tmp_path / "nope", "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_not_a_model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "readme.txt").write_text("hi")
    assert_clean_error(run("quantize", tmp_path / "m", "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bits", ["1", "9", "16"])
def test_unsupported_bits(tiny_model_dir, tmp_path, bits):
    assert_clean_error(run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--bits", bits), "bit")
    assert not (tmp_path / "o").exists()


def test_group_size_not_dividing_makes_a_partial_last_group(tiny_model_dir, tmp_path):
    # 64- and 128-wide inputs in groups of 48: ⌈64/48⌉ = 2 and ⌈128/48⌉ = 3 groups, the last partial.
    res = run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--method", "rtn", "--group-size", "48", "--quiet")
    assert res.exit_code == 0, res.output
    from lowbit.io.native import load_quantized

    _, qweights, _ = load_quantized(tmp_path / "o")
    for name, qw in qweights.items():
        assert qw.grid.scale.shape == (qw.shape[0], -(-qw.shape[1] // 48)), name


def test_nan_weights(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    sd = load_file(bad / "model.safetensors")
    k = next(k for k in sd if k.endswith("mlp.up_proj.weight"))
    sd[k][3, 5] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    res = run("quantize", bad, "-o", tmp_path / "o", "--method", "rtn", "--group-size", "32", "--quiet")
    assert_clean_error(res, "NaN", "up_proj")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,reason", [("", "is empty"), ("only a few words here.", "need at least 65")])
def test_bad_calibration_text(tiny_model_dir, tmp_path, text, reason):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    res = run("quantize", tiny_model_dir, "-o", tmp_path / "o", *GPTQ_ARGS, "--calib-dataset", "text",
              "--calib-file", calib)
    assert_clean_error(res, reason)
    assert not (tmp_path / "o").exists()


def test_existing_output_refused_then_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--group-size", "32", "--quiet")
    assert_clean_error(res, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    res = run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--group-size", "32", "--quiet", "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_invalid_recipe(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant: {method: gptq, bits: 4, no_such_key: 1}\n")
    assert_clean_error(run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--recipe", recipe), "no_such_key")


def test_corrupted_saved_file(quantized, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    f = bad / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert_clean_error(run("eval", bad, "--seqlen", "64", "--max-windows", "2"))
    f.write_bytes(bytes(raw[: len(raw) // 3]))
    assert_clean_error(run("eval", bad, "--seqlen", "64", "--max-windows", "2"))


def test_help_everywhere():
    for cmd in ([], ["quantize"], ["eval"], ["reference"], ["reference", "build"], ["demo"]):
        res = run(*cmd, "--help")
        assert res.exit_code == 0 and "Usage" in res.output


def test_reloaded_logits_identical(quantized):
    from lowbit.io.native import load_model

    m1, tok = load_model(str(quantized))
    m2, _ = load_model(str(quantized))
    ids = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
