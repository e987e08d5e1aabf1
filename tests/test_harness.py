"""lm-evaluation-harness on lowbit models (`lowbit.eval.harness`, `lowbit eval --tasks`)."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit.eval.harness as harness


def test_local_task_examples_are_deterministic_and_honest():
    docs = harness.c4_continuation_docs()
    assert len(docs) > 100 and docs == harness.c4_continuation_docs()
    from lowbit import data as corpora

    texts = [d.split() for d in corpora.c4_split("heldout")]
    n = harness.CONTEXT_WORDS + harness.CHOICE_WORDS
    by_context = {" ".join(w[:harness.CONTEXT_WORDS]): w for w in texts if len(w) >= n}
    labels = [d["label"] for d in docs]
    assert sorted(set(labels)) == list(range(harness.N_CHOICES))  # the true slot rotates
    for d in docs[:20]:
        w = by_context[d["context"]]
        assert d["choices"][d["label"]] == " ".join(w[harness.CONTEXT_WORDS:n])  # the true continuation
        assert len(d["choices"]) == harness.N_CHOICES and len(set(d["choices"])) == harness.N_CHOICES


@pytest.fixture()
def small_task(monkeypatch):
    """The local task with spans short enough for the tiny model's 64 positions."""
    monkeypatch.setattr(harness, "CONTEXT_WORDS", 8)
    monkeypatch.setattr(harness, "CHOICE_WORDS", 3)


def _loglik(model, tok, context: str, choice: str) -> float:
    """Σ log p(continuation tokens | context), tokenized as lm-eval does: whole string, context prefix cut."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_accuracy_matches_a_direct_loglikelihood_argmax(tiny_model_dir, small_task):
    pytest.importorskip("lm_eval")
    from lowbit.io.native import load_model

    model, tok = load_model(str(tiny_model_dir))
    res = harness.run_tasks(model, tok, [harness.LOCAL_TASK], limit=24, batch_size=4)[harness.LOCAL_TASK]
    docs = harness.c4_continuation_docs()[:24]
    hits = [max(range(4), key=lambda k: _loglik(model, tok, d["context"], d["choices"][k])) == d["label"]
            for d in docs]
    assert res["sample_len"] == 24
    assert res["acc"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)
    assert 0 <= res["acc_norm"] <= 1 and res["acc_stderr"] > 0


def test_eval_cli_runs_tasks_on_a_quantized_model(tiny_model_dir, tmp_path, small_task):
    pytest.importorskip("lm_eval")
    from typer.testing import CliRunner

    from lowbit.cli import app

    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "-o", str(out), "--method", "rtn", "--bits", "4",
                                 "--group-size", "32", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["eval", str(out), "--profile", "quick", "--max-windows", "2", "--seqlen", "32",
                                 "--tasks", harness.LOCAL_TASK, "--task-limit", "8", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    t = res["tasks"][harness.LOCAL_TASK]
    assert t["sample_len"] == 8 and 0 <= t["acc"] <= 1 and res["kl"] is not None


def test_unknown_task_and_missing_package_are_clear_errors(tiny_model_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    from lowbit.errors import LowbitError
    from lowbit.io.native import load_model

    model, tok = load_model(str(tiny_model_dir))
    with pytest.raises(LowbitError, match="no tasks given"):
        harness.run_tasks(model, tok, [])
    with pytest.raises(LowbitError, match="lm-eval could not run no_such_task"):
        harness.run_tasks(model, tok, ["no_such_task"], limit=2)
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(LowbitError, match="pip install lm-eval"):
        harness.run_tasks(model, tok, [harness.LOCAL_TASK])


def test_compare_reports_task_accuracy_for_every_row(tiny_model_dir, tmp_path, small_task):
    pytest.importorskip("lm_eval")
    from lowbit.compare import run_compare
    from lowbit.eval.protocol import get_protocol
    from lowbit.recipe import make_recipe

    proto = get_protocol("quick", seqlen=32, windows=2, calib_samples=4, calib_seqlen=32)
    named = [("rtn4", make_recipe({"quant": {"method": "rtn", "bits": 4, "group_size": 32}}))]
    res = run_compare(str(tiny_model_dir), named, tmp_path / "cmp", proto, progress=False,
                      tasks=[harness.LOCAL_TASK], task_limit=8)
    col = f"task:{harness.LOCAL_TASK}"
    assert 0 <= res["rows"][0][col] <= 1 and 0 <= res["baseline"][col] <= 1
    assert res["rows"][0]["lm_eval"][harness.LOCAL_TASK]["sample_len"] == 8
    head = next(line for line in (tmp_path / "cmp" / "report.md").read_text().splitlines() if line.startswith("| recipe"))
    assert f"| top-1 | {harness.LOCAL_TASK} acc |" in head
    # the same call again reuses both rows; without tasks, the earlier runs do not match the evaluation
    again = run_compare(str(tiny_model_dir), named, tmp_path / "cmp", proto, progress=False,
                        tasks=[harness.LOCAL_TASK], task_limit=8)
    assert again["rows"][0]["resumed"] and again["rows"][0][col] == res["rows"][0][col]
    plain = run_compare(str(tiny_model_dir), named, tmp_path / "cmp", proto, progress=False)
    assert not plain["rows"][0]["resumed"] and col not in plain["rows"][0]


def test_task_flags_parse():
    assert harness.parse_tasks(" a, b ,,", None) == (["a", "b"], None)
    assert harness.parse_tasks(None, 8.0) == (None, 8) and harness.parse_tasks(",", 0.25) == (None, 0.25)
