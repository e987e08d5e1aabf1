"""Shared pytest fixtures."""

from pathlib import Path

import pytest
import torch

# Tiny models on 2 shared cores: one intra-op thread is 5-10x faster than two fighting threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained LLaMA (HF format + tokenizer), built once per test session (~10 s)."""
    from lowbit.reference import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)
