"""Calibration text: where it comes from, and how a chat model sees it.

Sources (`CalibrationConfig.dataset`):
* `c4`: the packaged C4 validation documents set aside for calibration (`lowbit.data.c4_split("calib")`);
* `wikitext2-valid`: the WikiText-2 validation split;
* `text`: a UTF-8 file (`path`), one document;
* `jsonl`: a local file (`path`) of conversations, one JSON object per line: {"messages": [{"role",
  "content"}, ...]} or Alpaca's {"instruction", "input", "output"};
* `hf:NAME[:SPLIT]` (online): a dataset of the Hugging Face hub read with `datasets.load_dataset`; its
  rows give a conversation (a `messages` column) or a document (a `text` column). The first
  HF_ROWS_PER_WINDOW × n_samples rows are read.

Chat models are run on text wrapped in their chat template, whose special tokens (`<|im_start|>`, role
headers) carry activations that plain prose never produces, and those are where outliers live. With
`chat: true` every example goes through the tokenizer's own template (`apply_chat_template`): a
conversation as it is, and a plain document as a two-turn conversation, its first quarter of words the user
turn and the rest the assistant's reply (a rule with no invented prompt); a text file or WikiText is split
into paragraphs (blank lines) first, each one a document. Windows then start where a conversation starts
(as a chat model's inputs do): window i is a seeded-random conversation from its first token, continued
EOS-joined by the next conversations of a seeded order when it is shorter than the window. Without
`chat`, a conversation is its contents joined by blank lines and the windows are cut the GPTQ way
(`data.calibration_windows`: a random window of a random long document).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lowbit import data as corpora
from lowbit.errors import LowbitError
from lowbit.eval.protocol import DEFAULT_SEQLEN

HF_ROWS_PER_WINDOW = 4
LOCAL_DATASETS = ("c4", "wikitext2-valid", "text", "jsonl")


def check_dataset(name: str) -> str:
    """A valid `dataset` value (pydantic validator and CLI share it)."""
    if name in LOCAL_DATASETS:
        return name
    if name.startswith("hf:") and len(name) > 3 and all(name[3:].split(":", 1)):
        return name
    raise ValueError(f"calibration dataset {name!r}: choose {', '.join(LOCAL_DATASETS)} or hf:NAME[:SPLIT]")


def conversation(obj: Any) -> list[dict]:
    """The messages of one example: {"messages": [...]} or {"instruction", "input", "output"}."""
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        msgs = obj["messages"]
    elif isinstance(obj, dict) and "instruction" in obj and "output" in obj:
        prompt = str(obj["instruction"]) + (f"\n\n{obj['input']}" if obj.get("input") else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(obj["output"])}]
    else:
        raise ValueError("expected {'messages': [...]} or {'instruction', 'input', 'output'}")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs string 'role' and 'content'")
    return msgs


def as_conversation(doc: str) -> list[dict]:
    """A plain document as a user turn (its first quarter of words) and the assistant's reply (the rest)."""
    words = doc.split(" ")
    k = max(1, len(words) // 4)
    return [{"role": "user", "content": " ".join(words[:k])}, {"role": "assistant", "content": " ".join(words[k:])}]


def render(tokenizer: Any, messages: list[dict], chat: bool) -> str:
    if not chat:
        return "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                          "calibrate without chat (drop --calib-chat / calibration.chat)")


def _jsonl(path: str) -> list[list[dict]]:
    out = []
    for n, line in enumerate(corpora.text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(conversation(json.loads(line)))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise LowbitError(f"{path}:{n}: not a conversation ({e})") from None
    if not out:
        raise LowbitError(f"{path} holds no conversations")
    return out


def _hub(name: str, rows: int) -> list[str | list[dict]]:
    repo, _, split = name[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise LowbitError("calibration from the hub needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(repo, split=split or "train", streaming=True)
        head = list(ds.take(rows)) if hasattr(ds, "take") else list(ds)[:rows]
    except Exception as e:  # offline, unknown name, gated repo: one clear line
        raise LowbitError(f"cannot read calibration dataset {repo!r} (split {split or 'train'}) from the hub: "
                          f"{type(e).__name__}: {e}; use a local --calib-dataset (c4, text, jsonl)") from None
    out: list[str | list[dict]] = []
    for i, row in enumerate(head):
        if isinstance(row.get("messages"), list):
            try:
                out.append(conversation(row))
            except ValueError as e:
                raise LowbitError(f"{repo} row {i}: {e}") from None
        elif isinstance(row.get("text"), str):
            out.append(row["text"])
        else:
            raise LowbitError(f"{repo} row {i} has neither a 'messages' nor a 'text' column ({sorted(row)})")
    if not out:
        raise LowbitError(f"calibration dataset {repo!r} (split {split or 'train'}) is empty")
    return out


def calibration_documents(cfg, tokenizer: Any, data: str | None = None) -> list[str]:
    """The texts the windows are cut from, rendered (with `cfg.chat`) through the chat template."""
    if cfg.chat:
        check_chat_template(tokenizer)
    if cfg.dataset == "c4":
        examples: list = corpora.c4_split("calib", data)
    elif cfg.dataset == "wikitext2-valid":
        examples = _paragraphs(corpora.wikitext2_valid_text(data), cfg.chat)
    elif cfg.dataset in ("text", "jsonl"):
        if not cfg.path:
            raise LowbitError(f"calibration dataset {cfg.dataset!r} needs calibration.path (or --calib-file)")
        examples = _paragraphs(corpora.text_file(cfg.path), cfg.chat) if cfg.dataset == "text" else _jsonl(cfg.path)
    else:
        examples = _hub(cfg.dataset, HF_ROWS_PER_WINDOW * cfg.n_samples)
    out = []
    for ex in examples:
        if isinstance(ex, str):
            out.append(render(tokenizer, as_conversation(ex), True) if cfg.chat and ex else ex)
        else:
            out.append(render(tokenizer, ex, cfg.chat))
    return out


def _paragraphs(text: str, chat: bool) -> list[str]:
    """One document, or with chat its paragraphs (each becomes a conversation)."""
    if not chat:
        return [text]
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def conversation_windows(tokenizer: Any, docs: list[str], n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Windows that start at a conversation's first token: window i takes a seeded-random conversation and,
    when it is shorter than `seqlen`, the conversations after it in a seeded order, EOS-joined."""
    import random

    encoded = [ids for ids in corpora.encode_batch(tokenizer, [d for d in docs if d]) if ids]
    total = sum(map(len, encoded)) + len(encoded)
    if total < seqlen:
        raise LowbitError(f"calibration conversations hold {total} tokens; need at least {seqlen} for one window")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rng = random.Random(seed)
    order = list(range(len(encoded)))
    rng.shuffle(order)
    where = {c: k for k, c in enumerate(order)}
    out = []
    for _ in range(n_samples):
        k = where[rng.randrange(len(encoded))]
        ids: list[int] = []
        while len(ids) < seqlen:
            ids += encoded[order[k % len(order)]] + eos
            k += 1
        out.append(ids[:seqlen])
    return torch.tensor(out, dtype=torch.long)


def calibration_windows(cfg, tokenizer: Any, seqlen: int, data: str | None = None) -> torch.Tensor:
    """[n_samples, seqlen] token ids for `cfg` (a `CalibrationConfig`)."""
    docs = calibration_documents(cfg, tokenizer, data)
    if cfg.chat:
        return conversation_windows(tokenizer, docs, cfg.n_samples, seqlen, cfg.seed)
    return corpora.calibration_windows(tokenizer, docs, cfg.n_samples, seqlen, cfg.seed)


class CalibrationConfig(BaseModel):
    """Where calibration windows come from (GPTQ recipe: random windows of random documents)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "c4"  # c4 | wikitext2-valid | text | jsonl | hf:NAME[:SPLIT] (lowbit.calibration)
    path: str | None = None  # for dataset text / jsonl
    chat: bool = False  # render every example through the tokenizer's chat template
    n_samples: int = Field(128, ge=1)
    seqlen: int | None = Field(DEFAULT_SEQLEN, ge=8)  # None: min(2048, the model's max positions)
    seed: int = 0

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return check_dataset(v)
