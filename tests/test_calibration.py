"""Calibration sources and chat-template rendering (`lowbit.calibration`)."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import calibration as cal
from lowbit.errors import LowbitError
from lowbit.recipe import CalibrationConfig, make_recipe

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


@pytest.fixture()
def chat_tok(tiny_model_dir):
    from lowbit.io.native import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir), False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def _ids(tok, s):
    return tok.convert_tokens_to_ids(s)


def test_chat_rendering_puts_the_template_tokens_in_the_windows(chat_tok, tmp_path):
    f = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * 20},
                          {"role": "assistant", "content": f"answer {i} " * 40}]} for i in range(6)]
    rows.append({"instruction": "say hi", "input": "", "output": "hi " * 30})
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = CalibrationConfig(dataset="jsonl", path=str(f), chat=True, n_samples=4, seqlen=32, seed=1)
    docs = cal.calibration_documents(cfg, chat_tok)
    assert docs[0] == chat_tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert docs[-1].startswith("<|im_start|>user\nsay hi<|im_end|>\n<|im_start|>assistant\nhi hi")
    w = cal.calibration_windows(cfg, chat_tok, 32)
    assert w.shape == (4, 32) and w.dtype == torch.long
    assert bool((w[:, 0] == _ids(chat_tok, "<|im_start|>")).all())  # chat windows start at a conversation
    # the template's special tokens are single ids in the windows (not spelled out as text pieces)
    stream = cal.corpora.token_stream(chat_tok, docs)
    assert int((stream == _ids(chat_tok, "<|im_start|>")).sum()) == 2 * len(rows)
    assert torch.equal(w, cal.calibration_windows(cfg, chat_tok, 32))  # deterministic for a seed
    plain = cal.calibration_documents(cfg.model_copy(update={"chat": False}), chat_tok)
    assert "<|im_start|>" not in plain[0] and plain[0].startswith("question 0")


def test_conversation_windows_continue_into_the_next_conversations(chat_tok):
    docs = [chat_tok.apply_chat_template([{"role": "user", "content": f"q{i}"}], tokenize=False) for i in range(5)]
    w = cal.conversation_windows(chat_tok, docs, 6, 40, seed=3)
    start, eos = _ids(chat_tok, "<|im_start|>"), chat_tok.eos_token_id
    for row in w.tolist():
        assert row[0] == start and row.count(start) >= 2  # short conversations: several per window
        if eos is not None:
            assert eos in row
    assert torch.equal(w, cal.conversation_windows(chat_tok, docs, 6, 40, seed=3))
    with pytest.raises(LowbitError, match="need at least 4000"):
        cal.conversation_windows(chat_tok, docs, 1, 4000, seed=0)


def test_plain_documents_become_two_turns():
    conv = cal.as_conversation("one two three four five six seven eight")
    assert conv == [{"role": "user", "content": "one two"},
                    {"role": "assistant", "content": "three four five six seven eight"}]
    assert cal.as_conversation("single")[0]["content"] == "single"


def test_c4_with_chat(chat_tok):
    cfg = CalibrationConfig(dataset="c4", chat=True, n_samples=3, seqlen=64)
    docs = cal.calibration_documents(cfg, chat_tok)
    assert all(d.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in d for d in docs)


def test_bad_inputs_are_clear_errors(chat_tok, tiny_model_dir, tmp_path):
    from lowbit.io.native import load_tokenizer

    with pytest.raises(LowbitError, match="no chat template"):
        cal.calibration_documents(CalibrationConfig(chat=True), load_tokenizer(str(tiny_model_dir), False))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n{"text": 3}\n')
    with pytest.raises(LowbitError, match=r"bad.jsonl:2: not a conversation"):
        cal.calibration_documents(CalibrationConfig(dataset="jsonl", path=str(bad)), chat_tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LowbitError, match="is empty|no conversations"):
        cal.calibration_documents(CalibrationConfig(dataset="jsonl", path=str(empty)), chat_tok)
    with pytest.raises(LowbitError, match="needs calibration.path"):
        cal.calibration_documents(CalibrationConfig(dataset="jsonl"), chat_tok)
    for name in ("wiki", "hf:", "hf::train"):
        with pytest.raises(LowbitError, match="calibration dataset"):
            make_recipe({"calibration": {"dataset": name}})


class _Stream(list):
    def take(self, n):
        return self[:n]


def test_hub_dataset_rows(monkeypatch, chat_tok):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake_load(repo, split, streaming):
        seen.update(repo=repo, split=split, streaming=streaming)
        return _Stream([{"messages": [{"role": "user", "content": "hello " * 30},
                                      {"role": "assistant", "content": "world " * 60}]}] * 50)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = CalibrationConfig(dataset="hf:org/chats:train_sft", chat=True, n_samples=5, seqlen=16)
    docs = cal.calibration_documents(cfg, chat_tok)
    assert seen == {"repo": "org/chats", "split": "train_sft", "streaming": True}
    assert len(docs) == cal.HF_ROWS_PER_WINDOW * 5 and docs[0].startswith("<|im_start|>user\nhello")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _Stream([{"id": 1}]))
    with pytest.raises(LowbitError, match="neither a 'messages' nor a 'text' column"):
        cal.calibration_documents(cfg, chat_tok)

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LowbitError, match="cannot read calibration dataset 'org/chats'.*no network"):
        cal.calibration_documents(cfg, chat_tok)


def test_cli_flags_reach_the_recipe(tiny_model_dir, tmp_path, monkeypatch):
    """`--calib-chat --calib-dataset jsonl --calib-file F` end in the recipe that quantize_job runs."""
    from typer.testing import CliRunner

    import lowbit.cli as cli
    import lowbit.jobs as jobs

    got = {}

    def fake_job(model, out, recipe, **kw):
        got["c"] = recipe.calibration
        return {"rank": 1}

    monkeypatch.setattr(jobs, "quantize_job", fake_job)
    f = tmp_path / "c.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    res = CliRunner().invoke(cli.app, ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--calib-chat",
                                       "--calib-dataset", "jsonl", "--calib-file", str(f)])
    assert res.exit_code == 0, res.output
    assert got["c"].chat and got["c"].dataset == "jsonl" and got["c"].path == str(f)
