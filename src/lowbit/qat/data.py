"""Training text for QAT: fixed windows with a loss mask, and a batch order that is a pure function of
(seed, step) — so a resumed run, and every process of a data-parallel run, knows its batch without state.

Sources:
* `c4`: the C4 training documents of `lowbit.data` (indices 0–1499), EOS-joined; evaluation on the first
  windows of the held-out C4 documents (1800–1999), which nothing has trained on.
* `text`: a UTF-8 file; its last 5% (by characters) is held out for evaluation.
* `jsonl`: chat-style instruction data, one JSON object per line, either {"messages": [{"role", "content"},
  ...]} or Alpaca's {"instruction", "input", "output"}. Rendered with a plain "### User: / ### Assistant:"
  template (so the loss mask is exact); the loss covers assistant tokens only.
  Examples are packed EOS-joined into windows; the last 5% of examples are held out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from lowbit import data as corpora
from lowbit.calibration import conversation
from lowbit.errors import LowbitError

HOLDOUT = 0.05


@dataclass
class Windows:
    ids: torch.Tensor  # [n, seqlen] long
    mask: torch.Tensor  # [n, seqlen] bool: True where the token is a training target

    def __len__(self) -> int:
        return self.ids.shape[0]


def _cut(ids: torch.Tensor, mask: torch.Tensor, seqlen: int, what: str) -> Windows:
    n = ids.numel() // seqlen
    if n < 1:
        raise LowbitError(f"{what} has {ids.numel()} tokens; need at least {seqlen} for one window")
    return Windows(ids[: n * seqlen].view(n, seqlen), mask[: n * seqlen].view(n, seqlen))


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = corpora.token_stream(tokenizer, [t for t in texts if t])
    return ids


def _render(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text piece, trained?) pieces of one conversation; assistant turns are trained."""
    pieces = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError("each message needs string 'role' and 'content'")
        head = {"user": "### User:\n", "system": "### System:\n", "assistant": "### Assistant:\n"}.get(role)
        if head is None:
            raise ValueError(f"unknown role {role!r}")
        pieces.append((head, False))
        pieces.append((content + "\n\n", role == "assistant"))
    return pieces


def _encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in _render(tokenizer, messages):
        piece = corpora.encode(tokenizer, text)
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def _jsonl(tokenizer, path: str) -> tuple[list[list[int]], list[list[bool]]]:
    examples, masks = [], []
    for n, line in enumerate(corpora.text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids, mask = _encode_example(tokenizer, conversation(json.loads(line)))
        except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
            raise LowbitError(f"{path}:{n}: not a chat example ({e})") from None
        examples.append(ids)
        masks.append(mask)
    if not examples:
        raise LowbitError(f"{path} holds no examples")
    return examples, masks


def _pack(tokenizer, examples: list[list[int]], masks: list[list[bool]], seqlen: int, what: str) -> Windows:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    for e, m in zip(examples, masks):
        ids += e + ([eos] if eos is not None else [])
        mask += m + ([any(m)] if eos is not None else [])  # learn to stop after an answer
    w = _cut(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), seqlen, what)
    if not bool(w.mask[:, 1:].any()):
        raise LowbitError(f"{what}: no assistant tokens to train on")
    return w


def load_windows(tokenizer, dataset: str, seqlen: int, *, path: str | None = None, data: str | None = None,
                 eval_windows: int = 16) -> tuple[Windows, Windows]:
    """(training windows, evaluation windows) for a source; LowbitError on missing / empty / bad data."""
    if dataset == "c4":
        train = _stream(tokenizer, corpora.c4_split("train", data))
        held = _stream(tokenizer, corpora.c4_split("heldout", data))
        tr = _cut(train, torch.ones_like(train, dtype=torch.bool), seqlen, "C4 training text")
        ev = _cut(held, torch.ones_like(held, dtype=torch.bool), seqlen, "C4 held-out text")
    elif dataset == "text":
        text = corpora.text_file(path)
        split = int(len(text) * (1 - HOLDOUT))
        a, b = _stream(tokenizer, [text[:split]]), _stream(tokenizer, [text[split:]])
        tr = _cut(a, torch.ones_like(a, dtype=torch.bool), seqlen, f"training text {path}")
        ev = _cut(b, torch.ones_like(b, dtype=torch.bool), seqlen, f"held-out end of {path}")
    elif dataset == "jsonl":
        ex, masks = _jsonl(tokenizer, path)
        k = max(1, int(len(ex) * HOLDOUT)) if len(ex) > 1 else 0
        if k == 0:
            raise LowbitError(f"{path} needs at least 2 examples (one is held out for evaluation)")
        tr = _pack(tokenizer, ex[:-k], masks[:-k], seqlen, f"training examples of {path}")
        ev = _pack(tokenizer, ex[-k:], masks[-k:], seqlen, f"held-out examples of {path}")
    else:
        raise LowbitError(f"unknown training dataset {dataset!r}; choose c4, text or jsonl")
    return tr, Windows(ev.ids[:eval_windows], ev.mask[:eval_windows])


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Window indices of the global batch of `step`: epochs of seeded permutations, read in order."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[pos: pos + batch_size - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def target_count(w: Windows, idx: torch.Tensor) -> int:
    """Predicted tokens of the windows `idx` (targets are positions 1..seqlen−1)."""
    return int(w.mask[idx, 1:].sum())
