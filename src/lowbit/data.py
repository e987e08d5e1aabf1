"""Text corpora and the token windows cut from them.

Where a corpus file comes from, first found wins:
1. the data directory (`data_dir`: an explicit `--data`, else $LOWBIT_DATA, else `../shared/data` next to
   the repository or the working directory), plain or gzipped (`NAME.gz`);
2. the copies that ship inside the package (`lowbit/corpora/`, gzipped): WikiText-2 raw test, the 2000
   local C4 validation documents and tiny-shakespeare, so a fresh clone runs the demo and the tests with
   no data folder and no network. Every known file is checked against its sha256 when read;
3. the Hugging Face hub (`datasets`), for people with a network who point lowbit at no copy.

The WikiText-2 test text follows the GPTQ protocol exactly so perplexities are comparable with the
papers, and the 2000 C4 documents are split by index so that calibration and held-out evaluation never
share a document.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError

ENV_DATA = "LOWBIT_DATA"
WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT2_VALID_TOKENIZED = "wikitext-2/valid.txt"
C4_JSONL = "c4/c4-validation-2k.jsonl"
TINYSHAKESPEARE = "tinyshakespeare/input.txt"
WIKITEXT2_TEST_CHARS = 1_294_336  # length of the GPTQ-protocol text; a cheap integrity check
PACKAGED = Path(__file__).resolve().parent / "corpora"
# sha256 of the decompressed bytes: a damaged copy (shared folder or package) fails loudly, not subtly.
SHA256 = {
    WIKITEXT2_TEST: "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    C4_JSONL: "86d6fb3b4c5e682c7d158e454b4b60ad58c6458856775443b634290a45ae5dfe",
    TINYSHAKESPEARE: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}

# Fixed split of the 2000 local C4 documents by index. C4_TRAIN trains the tiny test model's
# neighbours (never the calibration or held-out documents); quantizers calibrate on C4_CALIB;
# C4_HELDOUT is an evaluation set no calibration has seen.
C4_N_DOCS = 2000
C4_TRAIN = range(0, 1500)
C4_CALIB = range(1500, 1800)
C4_HELDOUT = range(1800, 2000)
C4_SPLITS = {"train": C4_TRAIN, "calib": C4_CALIB, "heldout": C4_HELDOUT}

_HUB_C4_FILE = "en/c4-validation.00000-of-00008.json.gz"


def _shared_dir() -> Path | None:
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: `explicit`, else $LOWBIT_DATA, else ../shared/data next to the repo or cwd,
    else the corpora shipped with the package."""
    if explicit is not None or os.environ.get(ENV_DATA):
        path = Path(explicit if explicit is not None else os.environ[ENV_DATA]).expanduser()
        if not path.is_dir():
            source = "given data directory" if explicit is not None else f"${ENV_DATA}"
            raise LowbitError(f"{source} {path} is not a directory; point it at a folder holding "
                              "wikitext-2-raw/, c4/, tinyshakespeare/ (or unset it to use the packaged copies)")
        return path
    return _shared_dir() or PACKAGED


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise LowbitError(f"cannot read {path}: {err}") from None


def text_file(path: str | Path, sha256: str | None = None) -> str:
    """A whole UTF-8 text file (gzip when it ends in .gz); LowbitError if it is missing, empty, not
    UTF-8, or (with `sha256`) not the expected bytes."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"text file {path} does not exist")
    raw = _read_bytes(path)
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise LowbitError(f"{path} is damaged (its sha256 is not the published file's); restore it or "
                          "delete it to fall back to the packaged copy")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LowbitError(f"text file {path} is not UTF-8 ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise LowbitError(f"text file {path} is empty")
    return text


def corpus_path(rel: str, data: str | Path | None = None) -> Path | None:
    """The first copy of corpus file `rel` (plain or .gz): data directory, then the packaged copies."""
    roots = [data_dir(data)]
    if roots[0] != PACKAGED:
        roots.append(PACKAGED)
    for root in roots:
        for name in (rel, rel + ".gz"):
            if (root / name).is_file():
                return root / name
    return None


def corpus_text(rel: str, data: str | Path | None = None) -> str:
    """The text of corpus file `rel` from `corpus_path`, checked against its known sha256."""
    path = corpus_path(rel, data)
    if path is None:
        raise LowbitError(f"corpus file {rel} found neither in {data_dir(data)} nor in the packaged corpora")
    return text_file(path, SHA256.get(rel))


def _local(rel: str, data: str | Path | None) -> tuple[Path | None, str]:
    """The local file if present, else None plus why (so a hub failure can explain both)."""
    try:
        path = corpus_path(rel, data)
    except LowbitError as err:
        return None, str(err)
    return (path, "") if path is not None else (None, f"{data_dir(data) / rel} does not exist")


def _hub_error(what: str, local_why: str, err: Exception) -> LowbitError:
    return LowbitError(f"{what}: {local_why}, and the hub download failed ({type(err).__name__}); "
                       f"set ${ENV_DATA} or pass --data to the shared data folder")


def wikitext2_test_text(data: str | Path | None = None) -> str:
    """WikiText-2 raw test text joined the GPTQ way (1,294,336 characters)."""
    path, why = _local(WIKITEXT2_TEST, data)
    if path is not None:
        raw = text_file(path, SHA256[WIKITEXT2_TEST])
        # Split on "\n" only: str.splitlines would also break on rare Unicode separators.
        parts = raw.split("\n")
        lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        rows = ["" if line == " \n" else line for line in lines]
    else:
        try:
            import datasets

            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as err:  # any hub/network failure becomes one clear line
            raise _hub_error("WikiText-2 test split not found", why, err) from err
    return "\n\n".join(rows)


def wikitext2_valid_text(data: str | Path | None = None) -> str:
    """Tokenized WikiText-2 valid (v1, with <unk> and @-@), used as reference-model training text."""
    path, why = _local(WIKITEXT2_VALID_TOKENIZED, data)
    if path is not None:
        return text_file(path)
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-v1", split="validation")["text"]
    except Exception as err:
        raise _hub_error("WikiText-2 valid split not found", why, err) from err
    return "".join(rows)


def c4_documents(data: str | Path | None = None) -> list[str]:
    """The first 2000 documents of the C4 (en) validation set."""
    path, why = _local(C4_JSONL, data)
    if path is None:
        try:
            import datasets

            ds = datasets.load_dataset("allenai/c4", data_files={"validation": _HUB_C4_FILE}, split="validation")
            return list(ds.select(range(C4_N_DOCS))["text"])
        except Exception as err:
            raise _hub_error("C4 documents not found", why, err) from err
    docs: list[str] = []
    for n, line in enumerate(text_file(path, SHA256[C4_JSONL]).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LowbitError(f"{path}:{n} is not a JSON object with a 'text' field") from None
    return docs


def c4_split(name: str, data: str | Path | None = None) -> list[str]:
    """C4 documents of one fixed split: 'train', 'calib' or 'heldout'."""
    if name not in C4_SPLITS:
        raise LowbitError(f"unknown C4 split {name!r}; choose one of {', '.join(C4_SPLITS)}")
    docs = c4_documents(data)
    if len(docs) < C4_N_DOCS:
        raise LowbitError(f"expected {C4_N_DOCS} C4 documents, found {len(docs)}")
    return [docs[i] for i in C4_SPLITS[name]]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens, in one call to the Rust tokenizer."""
    # The backend call skips the per-call Python overhead and the "longer than model_max_length"
    # warning that the wrapper prints for a whole corpus.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def token_stream(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """All documents as one 1-D id tensor with EOS between them (so windows see document ends)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for i, doc_ids in enumerate(encode_batch(tokenizer, docs)):
        if i:
            ids.extend(eos)
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer: Any, docs: list[str], n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n_samples` windows of `seqlen` tokens, the GPTQ way: a random window of a random long document.

    A document qualifies when it has more than `seqlen` tokens. When fewer than `n_samples` documents
    qualify, the windows come from the EOS-joined stream of all documents instead, so short-document
    corpora still give diverse windows. Deterministic for a seed; touches no global RNG.
    """
    if n_samples < 1:
        raise LowbitError(f"n_samples must be at least 1, got {n_samples}")
    if seqlen < 1:
        raise LowbitError(f"seqlen must be at least 1, got {seqlen}")
    rng = random.Random(seed)
    encoded = encode_batch(tokenizer, [d for d in docs if d])
    long_docs = [ids for ids in encoded if len(ids) > seqlen]
    if len(long_docs) >= n_samples:
        starts = []
        for _ in range(n_samples):
            ids = long_docs[rng.randrange(len(long_docs))]
            start = rng.randint(0, len(ids) - seqlen - 1)
            starts.append(torch.tensor(ids[start:start + seqlen], dtype=torch.long))
        return torch.stack(starts)
    stream = token_stream(tokenizer, [d for d in docs if d])
    if stream.numel() < seqlen + 1:
        raise LowbitError(f"calibration text has {stream.numel()} tokens; need at least {seqlen + 1} "
                          f"for windows of {seqlen}")
    starts_t = torch.tensor([rng.randint(0, stream.numel() - seqlen - 1) for _ in range(n_samples)])
    return stream[starts_t[:, None] + torch.arange(seqlen)]


def eval_windows(tokenizer: Any, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping `seqlen`-token windows of the whole text, remainder dropped: [n_windows, seqlen]."""
    if seqlen < 1:
        raise LowbitError(f"seqlen must be at least 1, got {seqlen}")
    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise LowbitError(f"text has {ids.numel()} tokens; need at least {seqlen} for one evaluation window")
    return ids[: n * seqlen].view(n, seqlen)
