"""Calibration activations on disk (`pipeline.offload`): the same quantized weights, resumable."""

from __future__ import annotations

import pytest
import torch

from lowbit.methods import GPTQConfig
from lowbit.pipeline import calibrate
from lowbit.pipeline.calibrate import quantize_model
from lowbit.pipeline.offload import DiskBatches, batches_bytes

from test_architectures import build, windows

GPTQ = GPTQConfig(bits=3, group_size=32)


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].dequantize(), b[k].dequantize()) for k in a)


def test_disk_batches_behave_like_the_list(tmp_path):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    d = DiskBatches(tmp_path / "acts")
    for x in xs:
        d.append(x)
    assert len(d) == 3 and all(torch.equal(a, b) for a, b in zip(d, xs)) and torch.equal(d[-1], xs[2])
    d[1] = xs[0] * 2
    assert torch.equal(d[1], xs[0] * 2) and d.nbytes == batches_bytes(xs) == 3 * 24 * 4
    with pytest.raises(IndexError):
        d[3] = xs[0]
    d.close()
    assert not (tmp_path / "acts").exists()


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_offloaded_activations_give_the_same_weights(arch, monkeypatch):
    seen = []
    real = calibrate._quantize_block

    def spy(model, block, idx, groups, configs, hidden, *a, **k):
        seen.append(type(hidden).__name__)
        return real(model, block, idx, groups, configs, hidden, *a, **k)

    ref = quantize_model(build(arch), GPTQ, windows(), progress=False, batch_size=4, offload_activations=False)
    monkeypatch.setattr(calibrate, "_quantize_block", spy)
    off = quantize_model(build(arch), GPTQ, windows(), progress=False, batch_size=4, offload_activations=True)
    assert seen == ["DiskBatches", "DiskBatches"] and _same(ref.qweights, off.qweights)
    monkeypatch.setattr(calibrate, "ACTIVATION_CAP_BYTES", 0)  # automatic: above the cap
    seen.clear()
    auto = quantize_model(build(arch), GPTQ, windows(), progress=False, batch_size=4)
    assert seen == ["DiskBatches", "DiskBatches"] and _same(ref.qweights, auto.qweights)


def test_offloaded_run_resumes(tmp_path, monkeypatch):
    ref = quantize_model(build("llama"), GPTQ, windows(), progress=False, batch_size=4, offload_activations=False)
    def crash(rec):  # the first layer of block 1: block 0 and block 1's inputs are saved
        if rec.block == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(build("llama"), GPTQ, windows(), progress=False, batch_size=4, offload_activations=True,
                       checkpoint_dir=tmp_path / "ck", on_layer=crash)
    res = quantize_model(build("llama"), GPTQ, windows(), progress=False, batch_size=4, offload_activations=True,
                         checkpoint_dir=tmp_path / "ck")
    assert res.resumed_blocks == 1 and _same(ref.qweights, res.qweights)
    assert not (tmp_path / "ck" / "activations").exists()
