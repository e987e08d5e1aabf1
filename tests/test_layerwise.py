"""Layer-by-layer quantization (`lowbit.io.lazy`, `io.streamed`): one decoder block in memory at a time,
the checkpoint's dtype kept, the same quantized layers as loading the whole model, resumable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit.jobs as jobs
from lowbit.errors import LowbitError
from lowbit.io import lazy
from lowbit.io.native import load_quantized
from lowbit.io.streamed import write_safetensors
from lowbit.pipeline import calibrate
from lowbit.recipe import make_recipe

from test_architectures import build, logits, windows

GPTQ = make_recipe({"quant": {"method": "gptq", "bits": 4, "group_size": 32}}, source="test")


@pytest.fixture
def checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """An HF directory of a tiny random model in a given dtype (tokenizer files from the toy model; the
    calibration windows are random ids of the tiny vocabulary)."""
    calib = windows()
    monkeypatch.setattr(jobs, "calibration_data", lambda *a, **k: calib)

    def make(arch: str, dtype: torch.dtype):
        src = tmp_path / f"{arch}-{str(dtype)[6:]}"
        build(arch).to(dtype).save_pretrained(src)
        for f in tiny_model_dir.glob("tokenizer*"):
            shutil.copy(f, src / f.name)
        return src
    return make


def _quantize(src, out, load):
    return jobs.quantize_job(str(src), out, GPTQ, load=load, progress=False)


def test_float32_model_gives_the_identical_file(checkpoint, tmp_path):
    src = checkpoint("llama", torch.float32)
    s = _quantize(src, tmp_path / "layers", "layers")
    _quantize(src, tmp_path / "whole", "whole")
    assert s["load"] == "layers"
    a, b = load_file(tmp_path / "layers" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qa = json.loads((tmp_path / "layers" / "config.json").read_text())["quantization_config"]
    qb = json.loads((tmp_path / "whole" / "config.json").read_text())["quantization_config"]
    assert qa["layers"] == qb["layers"] and qa["bits_per_weight"] == qb["bits_per_weight"]
    x = windows(2, seed=3)
    assert torch.equal(logits(load_quantized(tmp_path / "layers")[0], x), logits(load_quantized(tmp_path / "whole")[0], x))


@pytest.mark.parametrize("arch", ["llama", "mixtral", "gemma3_text"])
def test_bf16_checkpoint_keeps_its_dtype_and_the_same_codes(arch, checkpoint, tmp_path):
    """Mixtral's checkpoint stores each expert as block_sparse_moe.experts.E.w1/w3/w2 (what transformers
    converts on load): read per expert. Quantized fields are those of the whole-model float32 run; the
    tensors kept in full precision stay bf16 (the whole run upcasts them)."""
    src = checkpoint(arch, torch.bfloat16)
    _quantize(src, tmp_path / "layers", "layers")
    _quantize(src, tmp_path / "whole", "whole")
    a, b = load_file(tmp_path / "layers" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys()
    layers = json.loads((tmp_path / "layers" / "config.json").read_text())["quantization_config"]["layers"]
    for k in a:
        if any(k.startswith(n + ".") and not k.endswith(".bias") for n in layers):
            assert torch.equal(a[k], b[k]), k  # codes, scales, zeros
        else:
            assert a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k].to(torch.bfloat16)), k
    model, _, _ = load_quantized(tmp_path / "layers")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    x = windows(2, seed=3)
    ref = logits(load_quantized(tmp_path / "whole")[0], x)
    assert (logits(model, x) - ref).norm() / ref.norm() < 0.02  # bf16 arithmetic against float32


def test_one_block_in_memory_at_a_time(checkpoint, tmp_path, monkeypatch):
    src = checkpoint("llama", torch.bfloat16)
    seen = []
    real = calibrate._quantize_block

    def spy(model, block, idx, *a, **k):
        stack = model.model.layers
        seen.append([not any(p.is_meta for p in b.parameters()) for b in stack])
        return real(model, block, idx, *a, **k)

    monkeypatch.setattr(calibrate, "_quantize_block", spy)
    _quantize(src, tmp_path / "q", "layers")
    assert seen == [[True, False], [False, True]]


def test_killed_layerwise_run_resumes_to_the_same_output(checkpoint, tmp_path, monkeypatch):
    src = checkpoint("llama", torch.bfloat16)
    _quantize(src, tmp_path / "ref", "layers")
    real = calibrate._Checkpoint.save_block

    def crash(self, i, *a, **k):
        real(self, i, *a, **k)
        if i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(calibrate._Checkpoint, "save_block", crash)
    with pytest.raises(KeyboardInterrupt):
        _quantize(src, tmp_path / "q", "layers")
    monkeypatch.setattr(calibrate._Checkpoint, "save_block", real)
    s = _quantize(src, tmp_path / "q", "layers")
    assert s["resumed_blocks"] == 1
    a, b = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_writer_matches_the_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    parts = [{"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16)},
             {"c": torch.randint(0, 255, (4, 4), generator=g, dtype=torch.uint8), "d": torch.tensor(3.5),
              "e": torch.ones(2, 3, dtype=torch.bool), "f": torch.arange(5, dtype=torch.int32)}]
    write_safetensors(tmp_path / "ours.safetensors", lambda: iter(parts), {"format": "pt"})
    save_file({k: v for p in parts for k, v in p.items()}, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    ours, lib = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "lib.safetensors")
    assert ours.keys() == lib.keys() and all(torch.equal(ours[k], lib[k]) and ours[k].dtype == lib[k].dtype
                                             for k in ours)
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    changing = iter([parts, [parts[1], parts[0]]])
    with pytest.raises(LowbitError, match="changed between the two passes"):
        write_safetensors(tmp_path / "bad.safetensors", lambda: iter(next(changing)))


def test_bad_checkpoints_and_recipes_are_refused(checkpoint, tmp_path):
    src = checkpoint("llama", torch.float32)
    t = load_file(src / "model.safetensors")
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="no tensor model.layers.1.mlp.down_proj.weight"):
        _quantize(src, tmp_path / "q", "layers")
    assert not (tmp_path / "q").exists()
    pruned = make_recipe({"quant": {"method": "rtn", "bits": 4}, "prune": {"ratio": 0.1}}, source="test")
    with pytest.raises(LowbitError, match="prune stage works on the whole model"):
        jobs.quantize_job(str(src), tmp_path / "p", pruned, load="layers", progress=False)
    assert jobs.layerwise_blocker(str(src), GPTQ) is None
    (src / "model.safetensors").unlink()
    assert "no safetensors" in jobs.layerwise_blocker(str(src), GPTQ)
    with pytest.raises(LowbitError, match="must be one of"):
        jobs.quantize_job(str(src), tmp_path / "q", GPTQ, load="lazy")
    with pytest.raises(LowbitError, match="no safetensors"):
        lazy.TensorSource(src)


def test_lrq_layer_by_layer_gives_the_identical_file(checkpoint, tmp_path):
    """Block reconstruction needs only the current float block (its outputs are the target): loaded one
    block at a time it writes exactly what the whole-model run writes."""
    src = checkpoint("llama", torch.float32)
    lrq = make_recipe({"quant": {"method": "lrq", "bits": 3, "iters": 4, "rank": 2}}, source="test")
    s = jobs.quantize_job(str(src), tmp_path / "layers", lrq, load="layers", progress=False)
    jobs.quantize_job(str(src), tmp_path / "whole", lrq, load="whole", progress=False)
    assert s["load"] == "layers"
    a, b = load_file(tmp_path / "layers" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
