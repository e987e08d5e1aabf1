"""Shared pytest fixtures."""

from pathlib import Path

import pytest
import torch

# Tiny models on 2 shared cores: one intra-op thread is 5-10x faster than two fighting threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """lowbit's cache (base-model outputs, sensitivity tables) in a per-session directory: tests never
    read or fill the user's ~/.cache/lowbit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("lowbit-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained LLaMA (HF format + tokenizer), built once per test session (~10 s)."""
    from lowbit.toy import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def shakespeare_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first 80k characters of tinyshakespeare (~30k tokens) as a text file: training data for the
    QAT tests (tokenizing all of it costs 1.5 s per run)."""
    from lowbit.data import TINYSHAKESPEARE, corpus_text

    p = tmp_path_factory.mktemp("qat-text") / "shakespeare-80k.txt"
    p.write_text(corpus_text(TINYSHAKESPEARE)[:80_000])
    return str(p)
