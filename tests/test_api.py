"""The Python API on the toy model: every call, its equivalence with the CLI's job, and its errors."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval.protocol import get_protocol

TINY = dict(profile="quick", seqlen=64, windows=4)


def test_import_exposes_the_api():
    r = subprocess.run([sys.executable, "-c", "import lowbit; lowbit.quantize, lowbit.load, lowbit.evaluate, "
                        "lowbit.export; import sys; print('torch' in sys.modules)"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError):
        lowbit.no_such_thing  # noqa: B018


def test_quantize_in_memory_equals_the_cli_job(tiny_model_dir, tmp_path):
    from lowbit.io.native import load_quantized
    from lowbit.jobs import quantize_job
    from lowbit.recipe import make_recipe

    recipe = {"quant": {"method": "gptq", "bits": 3, "group_size": 32}, "calibration": {"n_samples": 8, "seqlen": 64}}
    base, tok = lowbit.load(tiny_model_dir)
    q = lowbit.quantize(copy.deepcopy(base), recipe, tokenizer=tok)
    assert q.summary["bits_per_weight"] == pytest.approx(3 + 19 / 32) and q.summary["n_layers"] == len(q.qweights)
    quantize_job(str(tiny_model_dir), tmp_path / "cli", make_recipe(recipe), progress=False)
    _, cli_q, _ = load_quantized(tmp_path / "cli")
    assert q.qweights.keys() == cli_q.keys()
    assert all(torch.equal(q.qweights[k].codes, cli_q[k].codes) for k in cli_q)  # the same job, in memory
    # saved by the API, loaded back: the same logits as the in-memory model
    q.save(tmp_path / "api", source=str(tiny_model_dir))
    loaded, _ = lowbit.load(tmp_path / "api")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q.model(ids).logits)
    ev = lowbit.evaluate(q.model, base=base, tokenizer=tok, **TINY)
    direct = lowbit.evaluate(tmp_path / "api", base=tiny_model_dir, **TINY)
    assert ev["ppl"] == pytest.approx(direct["ppl"], rel=1e-6) and ev["kl"] == pytest.approx(direct["kl"], rel=1e-6)
    assert ev["protocol"] == get_protocol(**TINY).model_dump()
    out = lowbit.export(tmp_path / "api", "dequantized", tmp_path / "deq")
    assert (out / "config.json").is_file()
    with pytest.raises(LowbitError, match="already quantized"):
        lowbit.quantize(q.model, recipe, tokenizer=tok)


def test_recipe_forms_and_calibration_forms(tiny_model_dir, tmp_path):
    from lowbit.methods.config import RTNConfig

    base, tok = lowbit.load(tiny_model_dir)
    a = lowbit.quantize(copy.deepcopy(base), RTNConfig(bits=4, group_size=32))
    b = lowbit.quantize(copy.deepcopy(base), {"method": "rtn", "bits": 4, "group_size": 32})
    (tmp_path / "r.yaml").write_text("quant: {method: rtn, bits: 4, group_size: 32}\n")
    c = lowbit.quantize(tiny_model_dir, tmp_path / "r.yaml")
    assert all(torch.equal(a.qweights[k].codes, b.qweights[k].codes) and torch.equal(a.qweights[k].codes,
               c.qweights[k].codes) for k in a.qweights)
    text = "To be, or not to be, that is the question. " * 200
    g = lowbit.quantize(copy.deepcopy(base), {"quant": {"method": "gptq", "bits": 4, "group_size": 32},
                                             "calibration": {"n_samples": 4, "seqlen": 32}},
                        calibration=text, tokenizer=tok)
    assert g.summary["calibration_windows"] == [4, 32]
    windows = torch.randint(0, 512, (3, 16))
    w = lowbit.quantize(copy.deepcopy(base), {"method": "gptq", "bits": 4, "group_size": 32}, calibration=windows)
    assert w.summary["calibration_windows"] == [3, 16]
    with pytest.raises(LowbitError, match="calibration"):
        lowbit.quantize(copy.deepcopy(base), {"method": "gptq"})  # GPTQ without data or tokenizer
    with pytest.raises(LowbitError, match="a recipe is"):
        lowbit.quantize(copy.deepcopy(base), 42)
    with pytest.raises(LowbitError, match="tokenizer"):
        lowbit.evaluate(base)


def test_plain_torch_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10))
    x = torch.randn(32, 64)
    q = lowbit.quantize(net, {"method": "gptq", "bits": 4, "group_size": 32}, calibration=x)
    assert set(q.qweights) == {"0", "2"} and q.summary["bits_per_weight"] > 4


def test_example_script_runs(monkeypatch, tiny_model_dir, tmp_path):
    import importlib.util

    import lowbit.reference as reference

    monkeypatch.setattr(reference, "build_reference", lambda **kw: tiny_model_dir)
    spec = importlib.util.spec_from_file_location("python_api", "examples/python_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "build_reference", lambda: tiny_model_dir)
    ev = mod.main(bits=4, out=str(tmp_path / "ex"), windows=4)
    assert ev["kl"] > 0 and (tmp_path / "ex-gptq" / "quantize_config.json").is_file()
