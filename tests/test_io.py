"""Native format: exact round trips, atomic saves, and a clear LowbitError for every kind of damage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.errors import LowbitError
from lowbit.io import native
from lowbit.io.atomic import atomic_dir
from lowbit.io.native import is_quantized_dir, load_model, load_quantized, save_quantized
from lowbit.methods.config import RTNConfig
from lowbit.methods.rtn import rtn_quantize
from lowbit.models.swap import swap_in

# Cycled over the layers so one model exercises every grid kind.
GRIDS = [RTNConfig(bits=4, group_size=32), RTNConfig(bits=3, group_size=32, symmetric=True),
         RTNConfig(bits=8, group_size=-1), RTNConfig(bits=4, format="mxint", block_size=16)]
VOCAB = 96



def tiny_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def quantize_all(model: nn.Module, lm_head: bool = True) -> dict:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (lm_head or n != "lm_head")]
    return {n: rtn_quantize(model.get_submodule(n).weight.detach(), GRIDS[i % len(GRIDS)])
            for i, n in enumerate(names)}


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(24).remainder(VOCAB).reshape(2, 12)
    with torch.inference_mode():
        return model(input_ids=ids).logits


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama(tied=False)
    qw = quantize_all(model)
    out = save_quantized(model, qw, tmp_path / "out", recipe={"quant": GRIDS[0].model_dump()})
    return out, qw


def rewrite_weights(out: Path, edit) -> None:
    """Edit model.safetensors and re-sign it, so the structural check (not the checksum) must catch it."""
    f = out / native.WEIGHTS
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
    info = json.loads((out / native.INFO).read_text())
    info["sha256"][native.WEIGHTS] = native.file_sha256(f)
    (out / native.INFO).write_text(json.dumps(info))


# ------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("tied, quant_head, swap_first",
                         [(False, True, False), (True, False, True), (True, True, False)])
def test_round_trip_is_bit_identical(tmp_path, tied, quant_head, swap_first):
    model = tiny_llama(tied)
    qw = quantize_all(model, lm_head=quant_head)
    if swap_first:  # the pipeline saves a model that already runs QuantLinears
        swap_in(model, qw)
    out = save_quantized(model, qw, tmp_path / "q", recipe={"quant": GRIDS[0].model_dump()})
    if not swap_first:
        swap_in(model, qw)
    expected = logits(model)

    loaded, qw2, info = load_quantized(out)
    assert torch.equal(logits(loaded), expected)
    assert not loaded.training and loaded._lowbit_quantized
    assert set(qw2) == set(qw)
    for name, q in qw.items():
        (t1, m1), (t2, m2) = q.to_state(), qw2[name].to_state()
        assert m1 == m2 and t1.keys() == t2.keys()
        assert all(torch.equal(t1[k], t2[k]) for k in t1)
        assert torch.equal(q.codes, qw2[name].codes)
    if tied and not quant_head:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    stored = load_file(str(out / native.WEIGHTS))
    assert "lm_head.weight" not in stored  # tied: saved once; quantized: stored as qweight/grid.*
    assert "model.layers.0.self_attn.q_proj.qweight" in stored
    assert "model.layers.0.self_attn.q_proj.weight" not in stored

    qc = info["quantization_config"]
    n = sum(q.shape[0] * q.shape[1] for q in qw.values())
    assert qc["total_quantized_params"] == n
    assert qc["bits_per_weight"] == pytest.approx(sum(sum(q.storage().values()) for q in qw.values()) / n)
    assert qc["method"] == "rtn" and qc["layers"].keys() == qw.keys()


def test_source_dir_untouched_and_tokenizer_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src = tmp_path / "src"
    tiny_llama(tied=True).save_pretrained(src)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(src)
    before = tree_hash(src)

    model, tokenizer = load_model(src)
    assert tokenizer is not None
    qw = quantize_all(model)
    out = save_quantized(model, qw, tmp_path / "out", tokenizer=src, extra={"source_model": str(src), "seed": 0})
    assert tree_hash(src) == before
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / native.INFO).read_text())["source_model"] == str(src)
    loaded, tok2 = load_model(out)
    assert loaded._lowbit_quantized and tok2("w1 w2")["input_ids"] == tokenizer("w1 w2")["input_ids"]
    assert is_quantized_dir(out) and not is_quantized_dir(src)
    for target in (src, tmp_path):  # the input itself, or a directory holding it
        with pytest.raises(LowbitError, match="input model directory"):
            save_quantized(model, qw, target, tokenizer=src, overwrite=True)
    assert tree_hash(src) == before


# -------------------------------------------------------------------------------------- atomic saves

def test_existing_output_refused_then_replaced(saved):
    out, qw = saved
    model = tiny_llama(tied=False)
    with pytest.raises(LowbitError, match="exists; pass --overwrite"):
        save_quantized(model, qw, out, recipe={"run": 2})
    assert json.loads((out / native.INFO).read_text())["recipe"] != {"run": 2}
    save_quantized(model, qw, out, recipe={"run": 2}, overwrite=True)
    assert json.loads((out / native.INFO).read_text())["recipe"] == {"run": 2}
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temp or old dirs left behind
    load_quantized(out)


@pytest.mark.parametrize("existing", [False, True])
def test_crash_mid_save_leaves_nothing(tmp_path, monkeypatch, existing, saved):
    out, qw = saved
    target = out if existing else tmp_path / "fresh"
    before = tree_hash(out)

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(native, "file_sha256", boom)  # after model.safetensors and config.json are written
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(tiny_llama(tied=False), qw, target, overwrite=True)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert tree_hash(out) == before


def test_atomic_dir_refuses_existing(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(LowbitError, match="exists"):
        with atomic_dir(tmp_path / "x", overwrite=False):
            pass


# -------------------------------------------------------------------------------------------- damage

def test_flipped_byte_detected(saved):
    out, _ = saved
    f = out / native.WEIGHTS
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="model.safetensors.*sha256"):
        load_quantized(out)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_file(saved, verify):
    out, _ = saved
    f = out / native.WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LowbitError, match="model.safetensors"):
        load_quantized(out, verify=verify)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.norm.weight"), "missing tensor model.norm.weight"),
    (lambda t: t.pop("model.layers.0.mlp.up_proj.grid.scale"), "corrupt quantized weight record"),
    (lambda t: t.update({"model.norm.weight": torch.ones(3)}), "wrong shape"),
    (lambda t: t.update({"model.layers.1.mlp.down_proj.qweight": t["model.layers.1.mlp.down_proj.qweight"][:5]}),
     "model.layers.1.mlp.down_proj"),
    (lambda t: t.update({"model.layers.0.mlp.gate_proj.grid.scale": torch.ones(2, 2, dtype=torch.float16)}),
     "gate_proj"),
    (lambda t: t.update({"stray.tensor": torch.ones(2)}), "unexpected tensor stray.tensor"),
])
def test_damaged_tensors(saved, edit, message):
    out, _ = saved
    rewrite_weights(out, edit)
    with pytest.raises(LowbitError, match=message):
        load_quantized(out)


def test_bad_config(saved):
    out, _ = saved
    cfg = out / native.CONFIG
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    with pytest.raises(LowbitError, match="not valid JSON"):
        load_quantized(out, verify=False)
    d = json.loads(text)
    del d["quantization_config"]
    cfg.write_text(json.dumps(d))
    with pytest.raises(LowbitError, match="not a lowbit output"):
        load_quantized(out, verify=False)
    cfg.unlink()
    with pytest.raises(LowbitError, match="not a model directory"):
        load_quantized(out)
    assert not is_quantized_dir(out)


def test_load_model_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(LowbitError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="not a model directory"):
        load_model(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LowbitError, match="not a model directory"):
        load_model(tmp_path / "file.txt")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(LowbitError, match="hub"):
        load_model("no-such-org/no-such-model")
