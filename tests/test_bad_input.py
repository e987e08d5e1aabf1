"""Bad input as a new user meets it: damaged files, hostile recipes, an offline hub, killed runs, non-finite
weights. Each case fails in one line that names the file or setting, writes nothing half-done and never hangs;
runs that succeed are reproducible to the byte."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers import assert_clean_error
from lowbit.cli import app
from lowbit.errors import LowbitError
from lowbit.patterns import compile_pattern
from lowbit.pipeline import calibrate

runner = CliRunner()
GPTQ = ["--method", "gptq", "--bits", "3", "--group-size", "32", "--calib-samples", "8", "--calib-seqlen", "64",
        "--quiet"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _truncate(path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


@pytest.mark.parametrize("load", ["layers", "whole"])
def test_truncated_input_weights_name_the_file(tiny_model_dir, tmp_path, load):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    _truncate(src / "model.safetensors")
    res = run("quantize", src, "-o", tmp_path / "o", "--method", "rtn", "--load", load, "--quiet")
    assert_clean_error(res, "model.safetensors", "damaged or partially copied")
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()
    assert_clean_error(run("eval", src, "--max-windows", "1"), "model.safetensors")


def test_truncated_shard_index_names_the_file(tiny_model_dir, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    names = list(load_file(src / "model.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model.safetensors"
                                                                               for n in names}})[:50])
    res = run("quantize", src, "-o", tmp_path / "o", "--method", "rtn", "--quiet")
    assert_clean_error(res, "model.safetensors.index.json", "not valid JSON")


@pytest.mark.parametrize("name", ["lowbit.json", "config.json", "model.safetensors"])
def test_truncated_lowbit_output_names_the_file(tiny_model_dir, tmp_path, name):
    out = tmp_path / "q"
    assert run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--quiet").exit_code == 0
    _truncate(out / name)
    res = run("eval", out, "--max-windows", "1")
    assert_clean_error(res, name)
    assert "Traceback" not in res.output


def test_catastrophic_pattern_cannot_hang_a_run(tiny_model_dir, tmp_path):
    # Python's re needs ~2^n steps for this pattern on a name of n characters that has no 'x' at its end.
    name = "model.layers.12.self_attn.q_proj." * 4
    t = time.perf_counter()
    assert compile_pattern("(.*.*)*x").search(name) is None
    assert compile_pattern("(a|aa)*$b").search("a" * 5000) is None
    assert time.perf_counter() - t < 0.5
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant: {method: rtn, bits: 4, group_size: 32}\n"
                      "overrides:\n  - {pattern: '(.*.*)*x', config: {bits: 3}}\n")
    t = time.perf_counter()
    with pytest.warns(UserWarning, match="matched no layer"):
        res = run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--recipe", recipe, "--quiet")
    assert res.exit_code == 0, res.output
    assert time.perf_counter() - t < 60


@pytest.mark.parametrize("pattern,why", [(r"(a)\1", "backreferences"), ("(?=q_proj)", "lookarounds"),
                                         ("(unclosed", "missing )")])
def test_patterns_outside_the_linear_time_subset_are_refused(tiny_model_dir, tmp_path, pattern, why):
    with pytest.raises(LowbitError, match="invalid layer pattern"):
        compile_pattern(pattern)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"quant: {{method: rtn, bits: 4}}\nignore: [{json.dumps(pattern)}]\n")
    res = run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--recipe", recipe, "--quiet")
    assert_clean_error(res, "ignore", why if why == "missing )" else "RE2 syntax")


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    from lowbit.io import native

    monkeypatch.setattr(native, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    t = time.perf_counter()
    with pytest.raises(LowbitError, match="hub is unreachable"):
        native.load_model("no_such_model_dir")
    with pytest.raises(LowbitError, match="does not exist"):
        native.load_model(str(tmp_path / "not" / "here"))
    assert time.perf_counter() - t < 5


def test_hub_reachable_respects_offline_mode(monkeypatch):
    import huggingface_hub.constants as hc

    from lowbit.io.native import hub_reachable

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    t = time.perf_counter()
    assert hub_reachable() is False and time.perf_counter() - t < 0.1


def _weights(out):
    return load_file(out / "model.safetensors")


def _same_files(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()


def test_same_seed_gives_identical_files_and_a_killed_run_resumes_to_them(tiny_model_dir, tmp_path, monkeypatch):
    ref, again, killed = tmp_path / "ref", tmp_path / "again", tmp_path / "killed"
    assert run("quantize", tiny_model_dir, "-o", ref, *GPTQ).exit_code == 0
    assert run("quantize", tiny_model_dir, "-o", again, *GPTQ).exit_code == 0
    _same_files(ref, again)

    n_blocks = json.loads((ref / "config.json").read_text())["num_hidden_layers"]
    assert n_blocks >= 2
    kill_after = random.Random(0).randrange(n_blocks - 1)  # any block but the last (the toy has 2: block 0)
    real = calibrate._Checkpoint.save_block

    def killed_after(self, i, *a, **k):
        real(self, i, *a, **k)
        if i == kill_after:
            raise KeyboardInterrupt  # what Ctrl-C or a SIGTERM handler raises between two blocks

    monkeypatch.setattr(calibrate._Checkpoint, "save_block", killed_after)
    res = run("quantize", tiny_model_dir, "-o", killed, *GPTQ)
    assert res.exit_code != 0 and not killed.exists()  # nothing half-done at the output path
    monkeypatch.setattr(calibrate._Checkpoint, "save_block", real)
    assert run("quantize", tiny_model_dir, "-o", killed, *GPTQ).exit_code == 0
    assert json.loads((killed / "lowbit.json").read_text())["summary"]["resumed_blocks"] == kill_after + 1
    _same_files(ref, killed)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_by_every_entry(tiny_model_dir, tmp_path, value):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    sd = load_file(bad / "model.safetensors")
    k = next(k for k in sd if k.endswith("self_attn.v_proj.weight"))
    sd[k][1, 2] = value
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    before = (bad / "model.safetensors").read_bytes()
    for load in ("layers", "whole"):
        res = run("quantize", bad, "-o", tmp_path / "o", "--method", "rtn", "--load", load, "--quiet")
        assert_clean_error(res, "NaN/inf", "v_proj")
    assert_clean_error(run("quantize", bad, "-o", tmp_path / "o", *GPTQ), "NaN/inf")
    assert not (tmp_path / "o").exists()
    assert (bad / "model.safetensors").read_bytes() == before  # the input is never modified
