"""Data-parallel calibration (`lowbit.pipeline.parallel`): two gloo processes, each with its range of the
calibration batches, write exactly the file one process writes."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import lowbit.jobs as jobs
from lowbit.errors import LowbitError
from lowbit.methods import StatsAccumulator
from lowbit.pipeline.parallel import Parallel
from lowbit.qat.distributed import World, spawn
from lowbit.recipe import make_recipe

from test_architectures import build, windows

GPTQ = make_recipe({"quant": {"method": "gptq", "bits": 3, "group_size": 32}}, source="test")


def test_shard_is_a_contiguous_range_of_whole_batches():
    for n, bs, size in [(16, 8, 2), (17, 4, 2), (5, 2, 3), (128, 8, 4), (3, 8, 2)]:
        ranges = [Parallel(World(r, size)).shard(n, bs) for r in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % bs == 0 or lo == n for lo, _ in ranges)  # (an empty range is refused by the pipeline)
        sizes = [-(-(hi - lo) // bs) for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1


def _checkpoint(tmp_path, tiny_model_dir, arch, dtype):
    src = tmp_path / f"{arch}-src"
    build(arch).to(dtype).save_pretrained(src)
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, src / f.name)
    return src


def _job(src, out, load):
    jobs.quantize_job(str(src), out, GPTQ, load=load, progress=False)


@pytest.mark.parametrize("arch,dtype,load", [("llama", torch.float32, "whole"), ("llama", torch.bfloat16, "layers"),
                                             ("mixtral", torch.float32, "layers")])
def test_two_processes_write_the_single_process_file(arch, dtype, load, tmp_path, tiny_model_dir, monkeypatch):
    calib = windows(24)  # 3 batches of 8: ranks get 2 and 1 (uneven on purpose)
    monkeypatch.setattr(jobs, "calibration_data", lambda *a, **k: calib)
    src = _checkpoint(tmp_path, tiny_model_dir, arch, dtype)
    _job(src, tmp_path / "one", load)
    # fork: the children inherit the patched calibration data and the imported modules
    spawn(2, _job, src, tmp_path / "two", load, threads=1, start_method="fork")
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".two.partial").exists()


def test_chained_statistics_equal_one_accumulator():
    """The chain's additions are one process's additions in batch order: bit-identical H and mean|x|."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(37, 24, generator=g) * (1 + i) for i in range(5)]
    ref = StatsAccumulator(24)
    for x in xs:
        ref.add(x)
    acc = StatsAccumulator(24)
    for x in xs[:3]:  # "rank 0"
        acc.add(x)
    nxt = StatsAccumulator(24)  # "rank 1" starts from rank 0's state (what _recv fills in)
    nxt.n, nxt.H, nxt.mean_abs, nxt.mean_abs_max = acc.n, acc.H.clone(), acc.mean_abs.clone(), acc.mean_abs_max.clone()
    for x in xs[3:]:
        nxt.add(x)
    r, c = ref.result(), nxt.result()
    assert torch.equal(r.hessian, c.hessian) and torch.equal(r.act_mean_abs, c.act_mean_abs)
    assert torch.equal(r.act_mean_abs_max, c.act_mean_abs_max) and r.nsamples == c.nsamples


def test_fewer_batches_than_processes_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    calib = windows(8)  # one batch for two processes
    monkeypatch.setattr(jobs, "calibration_data", lambda *a, **k: calib)
    src = _checkpoint(tmp_path, tiny_model_dir, "llama", torch.float32)
    with pytest.raises(LowbitError, match="fewer batches than the 2 processes"):
        spawn(2, _job, src, tmp_path / "two", "layers", threads=1, start_method="fork")
