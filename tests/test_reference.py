"""The reference and tiny models: determinism, loading back, caching and atomic builds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from lowbit import data, reference
from lowbit.errors import LowbitError
from lowbit.reference import ReferenceConfig, build_reference, reference_path


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_tiny_loads_back_and_has_learned(tiny_model_dir: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"
    text = data.text_file(data.data_dir() / data.TINYSHAKESPEARE)
    sample = text[-5000:]
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample  # byte-level round trip
    vocab = model.config.vocab_size
    assert vocab == 512 and len(tok) <= vocab
    nll = math.log(reference.perplexity(model, data.eval_windows(tok, text[-100_000:], 64, max_windows=32)))
    assert nll < 0.75 * math.log(vocab), f"mean NLL {nll:.2f} is not clearly below ln({vocab})"
    report = json.loads((tiny_model_dir / "training.json").read_text())
    curve = [p["loss"] for p in report["loss_curve"]]
    assert len(curve) == report["config"]["steps"] and curve[-1] < curve[0] - 1.5
    # Every linear's input dim is divisible by the group sizes quantization tests will use.
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert module.in_features % 64 == 0, name


def test_tiny_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = reference.build_tiny(tmp_path / "again", seed=0)
    a, b = _state(tiny_model_dir), _state(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_seed_changes_initialization() -> None:
    tok = reference.train_tokenizer(["a small corpus for a small tokenizer " * 50], 300, 64)
    m0 = reference._make_model(reference.tiny_config(seed=0), tok)
    m1 = reference._make_model(reference.tiny_config(seed=1), tok)
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(m0.state_dict()[w], m1.state_dict()[w])


def test_build_tiny_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="not a previous build"):
        reference.build_tiny(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cache_key_follows_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = ReferenceConfig()
    assert base.key() == ReferenceConfig().key()
    assert base.key() != ReferenceConfig(steps=base.steps + 1).key()
    assert base.key() != ReferenceConfig(hidden_size=512, intermediate_size=1536).key()
    assert reference_path(base, tmp_path) == tmp_path / f"reference-{base.key()}"
    monkeypatch.setenv(reference.ENV_CACHE, str(tmp_path / "env"))
    assert reference_path().parent == tmp_path / "env"
    with pytest.raises(ValueError):
        ReferenceConfig(hiden_size=3)  # typos must not silently fall back to the default


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    """A miniature data directory with the layout of the shared one, so a reference build takes seconds."""
    text = data.text_file(data.data_dir() / data.TINYSHAKESPEARE)[:400_000]
    root = tmp_path / "data"
    for rel in (data.C4_JSONL, data.WIKITEXT2_VALID_TOKENIZED, data.WIKITEXT2_TEST):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    step = 150
    docs = [text[i * step:(i + 1) * step] for i in range(data.C4_N_DOCS)]
    (root / data.C4_JSONL).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / data.WIKITEXT2_VALID_TOKENIZED).write_text(text[300_000:350_000])
    (root / data.WIKITEXT2_TEST).write_text(text[350_000:])
    return root


def _small_config() -> ReferenceConfig:
    return ReferenceConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                           seqlen=32, batch_size=4, steps=5, warmup=2, eval_max_windows=4)


def test_interrupted_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_data: Path) -> None:
    cache = tmp_path / "cache"
    cfg = _small_config()
    real_train = reference._train

    def crash(model, stream, cfg, progress):
        real_train(model, stream, cfg.model_copy(update={"steps": 2}), progress)
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-training

    monkeypatch.setattr(reference, "_train", crash)
    with pytest.raises(KeyboardInterrupt):
        build_reference(cfg, cache_dir=cache, progress=False, data_path=small_data)
    assert list(cache.iterdir()) == []  # neither the entry nor its temporary sibling

    monkeypatch.setattr(reference, "_train", real_train)
    path = build_reference(cfg, cache_dir=cache, progress=False, data_path=small_data)
    assert path == reference_path(cfg, cache) and [p.name for p in cache.iterdir()] == [path.name]
    report = json.loads((path / "training.json").read_text())
    assert report["config"] == cfg.model_dump() and len(report["loss_curve"]) == cfg.steps
    assert report["eval"]["windows"] == 4 and math.isfinite(report["eval"]["perplexity"])
    model, tok = reference.load_reference(path)
    assert model.config.hidden_size == 32 and tok.eos_token_id == model.config.eos_token_id

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached build was rebuilt")

    monkeypatch.setattr(reference, "_train_and_save", must_not_train)
    assert build_reference(cfg, cache_dir=cache, progress=False, data_path=small_data) == path


def test_load_reference_missing(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="build_reference"):
        reference.load_reference(tmp_path)
