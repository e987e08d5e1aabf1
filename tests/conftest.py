"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained LLaMA (HF format + tokenizer), built once per test session (~10 s)."""
    from lowbit.reference import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)
