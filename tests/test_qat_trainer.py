"""The QAT trainer end to end on the tiny model: learning, exact export, resume after a kill, data-parallel
equivalence, chat data, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.errors import LowbitError
from lowbit.io.native import load_quantized
from lowbit.methods.config import RTNConfig
from lowbit.methods.rtn import rtn_quantize
from lowbit.qat.config import L4QConfig, TrainConfig
from lowbit.qat.trainer import evaluate, train
from lowbit.qat.data import load_windows

# The first 80k characters of tinyshakespeare (~30k tokens): tokenizing all of it costs 1.5 s per run.
TEXT = ""  # set by the small_text fixture


@pytest.fixture(scope="module", autouse=True)
def small_text(shakespeare_text):
    global TEXT
    TEXT = shakespeare_text
    return TEXT


def tcfg(**kw) -> TrainConfig:
    base = dict(steps=6, lr=5e-3, lr_quant=1e-4, batch_size=4, seqlen=64, dataset="text", data_path=TEXT,
                eval_windows=8, checkpoint_every=0, seed=0)
    return TrainConfig(**{**base, **kw})


L4Q3 = L4QConfig(bits=3, group_size=32, rank=4)


def test_l4q_training_reduces_heldout_loss_and_exports_exactly(tiny_model_dir, tmp_path):
    out = tmp_path / "l4q"
    # 2 bits: enough damage that recovering it is clearly measurable (3.887 → 3.865 nats; fp32: 3.824)
    s = train(str(tiny_model_dir), out, L4QConfig(bits=2, group_size=32, rank=4),
              tcfg(steps=30, eval_every=30, lr_quant=1e-4), progress=False)
    assert s["eval_nll"] < s["initial_eval_nll"] - 0.01, s
    assert s["bits_per_weight"] == pytest.approx(2 + (16 + 2) / 32)
    model, qweights, info = load_quantized(out)
    assert info["quantization_config"]["method"] == "l4q" and len(qweights) == 14
    # the saved model reproduces the training model's held-out loss (same W_q; GEMM order may differ)
    from lowbit.io.native import load_model

    _, tok = load_model(str(tiny_model_dir))
    _, ev = load_windows(tok, "text", 64, path=TEXT, eval_windows=8)
    assert evaluate(model, ev, "ce", None)["eval_nll"] == pytest.approx(s["eval_nll"], rel=1e-5)
    # training moved codes away from the step-0 model (RTN on the L4Q_init grid)
    from lowbit.formats.quant_primitives import affine_quantize, expand_group_param
    from lowbit.qat.grid import l4q_init_scale

    base, _ = load_model(str(tiny_model_dir))
    W = base.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    S = expand_group_param(l4q_init_scale(W, 2, 32).half(), W.shape, 32)
    codes0 = affine_quantize(W, S, torch.full(S.shape, 2, dtype=torch.int32), 2)
    moved = (qweights["model.layers.0.mlp.down_proj"].codes != codes0).float().mean()
    assert 0 < float(moved) < 0.5


def test_zero_steps_from_rtn_grid_exports_rtn(tiny_model_dir, tmp_path):
    out = tmp_path / "z"
    train(str(tiny_model_dir), out, L4QConfig(bits=3, group_size=32, init_from="rtn"), tcfg(steps=0),
          progress=False)
    model, qweights, _ = load_quantized(out)
    from lowbit.io.native import load_model

    base, _ = load_model(str(tiny_model_dir))
    for name, qw in qweights.items():
        ref = rtn_quantize(base.get_submodule(name).weight.detach(), RTNConfig(bits=3, group_size=32))
        assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.grid.scale, ref.grid.scale), name
        assert torch.equal(qw.grid.zero, ref.grid.zero), name


class Killed(Exception):
    pass


def test_resume_after_kill_is_bit_identical(tiny_model_dir, tmp_path):
    cfg = tcfg(steps=6, checkpoint_every=2)
    full = tmp_path / "full"
    train(str(tiny_model_dir), full, L4Q3, cfg, progress=False)

    def kill(step, rec):
        if step == 3:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(str(tiny_model_dir), out, L4Q3, cfg, progress=False, on_step=kill)
    assert not out.exists() and (tmp_path / ".resumed.qat-partial" / "state.json").is_file()
    s = train(str(tiny_model_dir), out, L4Q3, cfg, progress=False)
    assert s["resumed_from_step"] == 2
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (tmp_path / ".resumed.qat-partial").exists()
    # a different setting refuses the old checkpoint instead of mixing runs
    with pytest.raises(Killed):
        train(str(tiny_model_dir), tmp_path / "x", L4Q3, cfg, progress=False, on_step=kill)
    with pytest.raises(LowbitError, match="different training settings"):
        train(str(tiny_model_dir), tmp_path / "x", L4Q3, tcfg(steps=6, checkpoint_every=2, lr=1e-3), progress=False)


def test_data_parallel_two_processes_equal_single_process(tiny_model_dir, tmp_path):
    from lowbit.qat.distributed import spawn

    cfg = tcfg(steps=4, batch_size=4)
    single = train(str(tiny_model_dir), tmp_path / "one", L4Q3, cfg, progress=False)
    # fork: the children inherit the imported modules (spawn would re-import transformers, ~10 s each)
    spawn(2, train, str(tiny_model_dir), tmp_path / "two", L4Q3, cfg, progress=False, threads=1,
          start_method="fork")
    two = json.loads((tmp_path / "two" / "lowbit.json").read_text())
    assert two["summary"]["processes"] == 2
    l1 = [h["loss"] for h in json.loads((tmp_path / "one" / "lowbit.json").read_text())["history"]]
    l2 = [h["loss"] for h in two["history"]]
    assert l1 == pytest.approx(l2, rel=1e-5, abs=0)
    assert two["summary"]["eval_nll"] == pytest.approx(single["eval_nll"], rel=1e-5)
    _, q1, _ = load_quantized(tmp_path / "one")
    _, q2, _ = load_quantized(tmp_path / "two")
    flips = sum(int((q1[n].codes != q2[n].codes).sum()) for n in q1)
    total = sum(q.codes.numel() for q in q1.values())
    assert flips <= 1e-3 * total, (flips, total)  # only weights sitting on a rounding boundary may differ


def test_chat_jsonl_qlora_and_cli(tiny_model_dir, tmp_path):
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                          {"role": "assistant", "content": f"Word {i}: thou art the {i}th."}]} for i in range(60)]
    rows += [{"instruction": "Greet.", "input": "", "output": "Good morrow."}] * 20
    f.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "ql"
    res = CliRunner().invoke(app, ["finetune", str(tiny_model_dir), "-o", str(out), "--method", "qlora",
                                   "--init-from", "rtn", "--bits", "3", "--group-size", "32", "--steps", "3",
                                   "--seqlen", "64", "--dataset", "jsonl", "--data-file", str(f), "--quiet"])
    assert res.exit_code == 0, res.output
    _, qweights, _ = load_quantized(out)
    qw = qweights["model.layers.0.self_attn.q_proj"]
    assert qw.lowrank is not None and qw.lowrank.A.shape == (64, 4)
    # the adapter costs 16·r·(in + out)/(in·out) on top of the 3-bit grid
    assert qw.bits_per_weight() == pytest.approx(3 + 19 / 32 + 16 * 4 * 128 / 64**2)


@pytest.mark.parametrize("args,needle", [
    (["--bits", "1"], "bit width"),
    (["--group-size", "-3"], "group size"),
    (["--method", "awq"], "unknown finetune method"),
    (["--dataset", "text"], "needs a file"),
    (["--dataset", "text", "--data-file", "/nonexistent.txt"], "does not exist"),
    (["--seqlen", "4096"], "positions"),
    (["--batch-size", "3", "--micro-batch", "2"], "does not divide"),
    (["--method", "qlora", "--adapter-dtype", "int4"], "adapter_dtype"),
])
def test_bad_input_is_one_clean_line(tiny_model_dir, tmp_path, args, needle):
    out = tmp_path / "bad"
    base = ["finetune", str(tiny_model_dir), "-o", str(out), "--steps", "1", "--seqlen", "64", "--quiet",
            "--dataset", "text", "--data-file", TEXT]
    if "--dataset" in args:
        base = base[:-4]
    res = CliRunner().invoke(app, base + args)
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("lowbit: error:") and needle in res.output, res.output
    assert not out.exists()


def test_bad_files_are_clean_errors(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n{"foo": 1}\n')
    for ds, f, needle in (("text", empty, "empty"), ("jsonl", bad, "not a chat example")):
        with pytest.raises(LowbitError, match=needle):
            train(str(tiny_model_dir), tmp_path / "o", L4Q3, tcfg(dataset=ds, data_path=str(f)), progress=False)
    with pytest.raises(LowbitError, match="does not exist"):
        train(str(tmp_path / "nomodel"), tmp_path / "o", L4Q3, tcfg(), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(LowbitError, match="exists"):
        train(str(tiny_model_dir), tmp_path / "exists", L4Q3, tcfg(), progress=False)
