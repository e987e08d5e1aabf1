"""Data loading: the GPTQ WikiText-2 protocol, the C4 split, and token windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lowbit import data
from lowbit.errors import LowbitError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub fallbacks fail as they would without a network, instead of trying it."""
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(datasets, "load_dataset", no_network)


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(data.ENV_DATA, raising=False)
    default = data.data_dir()
    assert data.corpus_path(data.WIKITEXT2_TEST, default) is not None  # plain, or .gz in the package
    assert data.data_dir(tmp_path) == tmp_path
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.data_dir(default) == default  # the explicit argument wins over the environment


def test_missing_data_dir_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path / "nowhere"))
    with pytest.raises(LowbitError, match=data.ENV_DATA):
        data.data_dir()
    with pytest.raises(LowbitError, match="not a directory"):
        data.data_dir(tmp_path / "nowhere")


def test_missing_corpus_without_network_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline) -> None:
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path))  # exists but holds no corpora
    monkeypatch.setattr(data, "PACKAGED", tmp_path / "no-package-copies")
    with pytest.raises(LowbitError, match="WikiText-2 test"):
        data.wikitext2_test_text()
    with pytest.raises(LowbitError, match="C4"):
        data.c4_documents()


def test_fresh_clone_reads_the_packaged_corpora(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline) -> None:
    """No ../shared, no $LOWBIT_DATA, no network: every corpus comes from lowbit/corpora, byte-identical
    to the published files (sha256-checked), and a data folder lacking a file falls back to them too."""
    shared = data.data_dir()
    monkeypatch.delenv(data.ENV_DATA, raising=False)
    monkeypatch.setattr(data, "_shared_dir", lambda: None)
    assert data.data_dir() == data.PACKAGED
    text = data.wikitext2_test_text()
    assert len(text) == data.WIKITEXT2_TEST_CHARS
    assert data.corpus_path(data.WIKITEXT2_TEST).suffix == ".gz"
    assert len(data.c4_documents()) == data.C4_N_DOCS
    assert data.corpus_text(data.TINYSHAKESPEARE).startswith("First Citizen:")
    if shared != data.PACKAGED:  # the same text as the shared folder's plain files
        assert text == data.wikitext2_test_text(shared)
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path))  # a data folder without the file: packaged copy
    assert data.wikitext2_test_text() == text


def test_damaged_corpus_copy_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import gzip

    (tmp_path / "wikitext-2-raw").mkdir()
    raw = data.text_file(data.PACKAGED / (data.WIKITEXT2_TEST + ".gz"))
    with gzip.open(tmp_path / (data.WIKITEXT2_TEST + ".gz"), "wt", encoding="utf-8") as f:
        f.write(raw.replace("Robert Boulter", "Robert Boulder"))
    with pytest.raises(LowbitError, match="damaged"):
        data.wikitext2_test_text(tmp_path)
    (tmp_path / (data.WIKITEXT2_TEST + ".gz")).write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(LowbitError, match="cannot read"):
        data.wikitext2_test_text(tmp_path)


def test_wikitext2_test_protocol() -> None:
    text = data.wikitext2_test_text()
    assert len(text) == data.WIKITEXT2_TEST_CHARS == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n")  # first row is " \n" -> ""
    assert text.endswith("Eddie Pelkey . \n\n\n")  # last row " \n" became "" after the "\n\n" join


def test_c4_split_is_fixed_and_disjoint() -> None:
    docs = data.c4_documents()
    assert len(docs) == data.C4_N_DOCS
    assert all(isinstance(d, str) and d for d in docs)
    train, calib, held = (data.c4_split(n) for n in ("train", "calib", "heldout"))
    assert (len(train), len(calib), len(held)) == (1500, 300, 200)
    assert train[0] == docs[0] and calib[0] == docs[1500] and held[-1] == docs[-1]
    assert set(data.C4_TRAIN).isdisjoint(data.C4_CALIB) and set(data.C4_CALIB).isdisjoint(data.C4_HELDOUT)
    with pytest.raises(LowbitError, match="unknown C4 split"):
        data.c4_split("test")


def test_text_file_errors(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="does not exist"):
        data.text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LowbitError, match="empty"):
        data.text_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LowbitError, match="UTF-8"):
        data.text_file(tmp_path / "latin1.txt")
    (tmp_path / "ok.txt").write_text("héllo\n", encoding="utf-8")
    assert data.text_file(tmp_path / "ok.txt") == "héllo\n"


def test_eval_windows(tokenizer) -> None:
    text = data.corpus_text(data.TINYSHAKESPEARE)[:20_000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    w = data.eval_windows(tokenizer, text, 64)
    assert w.dtype == torch.long and w.shape == (len(ids) // 64, 64)
    assert torch.equal(w.flatten(), torch.tensor(ids[: w.numel()]))  # contiguous, remainder dropped
    assert data.eval_windows(tokenizer, text, 64, max_windows=3).shape == (3, 64)
    with pytest.raises(LowbitError, match="one evaluation window"):
        data.eval_windows(tokenizer, "too short", 64)


def test_calibration_windows_from_long_documents(tokenizer) -> None:
    docs = data.c4_split("calib")
    a = data.calibration_windows(tokenizer, docs, n_samples=16, seqlen=64, seed=0)
    b = data.calibration_windows(tokenizer, docs, n_samples=16, seqlen=64, seed=0)
    c = data.calibration_windows(tokenizer, docs, n_samples=16, seqlen=64, seed=1)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != tokenizer.pad_token_id).all()
    # Every window is a contiguous piece of one document.
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    haystacks = [",".join(map(str, ids)) for ids in encoded]
    for row in a.tolist():
        needle = ",".join(map(str, row))
        assert any(needle in h for h in haystacks)


def test_calibration_windows_from_short_documents(tokenizer) -> None:
    docs = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind to suffer",
            "The slings and arrows of outrageous fortune."] * 4
    a = data.calibration_windows(tokenizer, docs, n_samples=5, seqlen=32, seed=3)
    assert a.shape == (5, 32)
    assert torch.equal(a, data.calibration_windows(tokenizer, docs, n_samples=5, seqlen=32, seed=3))
    assert not torch.equal(a, data.calibration_windows(tokenizer, docs, n_samples=5, seqlen=32, seed=4))
    assert (a == tokenizer.eos_token_id).any()  # windows cross document boundaries at EOS
    assert data.calibration_windows(tokenizer, docs, 3, 32, seed=0).sum() > 0  # never empty


def test_calibration_windows_errors(tokenizer) -> None:
    with pytest.raises(LowbitError, match="need at least"):
        data.calibration_windows(tokenizer, ["short text"], n_samples=2, seqlen=64, seed=0)
    with pytest.raises(LowbitError):
        data.calibration_windows(tokenizer, ["", ""], n_samples=2, seqlen=8, seed=0)
    with pytest.raises(LowbitError, match="n_samples"):
        data.calibration_windows(tokenizer, data.c4_split("calib")[:5], n_samples=0, seqlen=8, seed=0)
