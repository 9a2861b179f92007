"""Checks that run before any model is loaded or any completion generated.

Each error names the field, row or file at fault and says how to fix it: a multi-day run should fail
in its first second, not after the first rollout.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .rewards import REWARD_REGISTRY, GuardedReward, build_reward, check_reward_settings


def resolve_reward_funcs(reward_funcs, on_error: str = "error", settings=None):
    """Registry names become our reward functions; plain Python reward functions get a :class:`GuardedReward`.

    ``settings`` (the trainer's config): a name of a reward with parameters (``"cosine"``, ``"accuracy_zapo"``...)
    is built from its fields (``cosine_max_len``, ``correct_reward``...), and such a reward given as a function
    must have the values those fields state (else a ValueError names the fields).

    A string that is neither a registry name, a local folder nor a Hub id (``owner/name``: a reward
    model, loaded by TRL) is a typo: it raises with the known names. Reward models (``nn.Module``) and
    async functions are passed to TRL unchanged.
    """
    if reward_funcs is None:
        return None
    as_list = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    resolved = []
    for func in as_list:
        if isinstance(func, str):
            if func in REWARD_REGISTRY:
                func = build_reward(func, settings)
            elif "/" not in func and not os.path.isdir(func):
                raise ValueError(
                    f"unknown reward function {func!r}: known names are {sorted(REWARD_REGISTRY)} "
                    "(or pass a callable, a local reward-model folder or a Hub id owner/name)."
                )
        check_reward_settings(func.func if isinstance(func, GuardedReward) else func, settings)
        if _is_plain_callable(func) and not isinstance(func, GuardedReward):
            func = GuardedReward(func, on_error=on_error)
        resolved.append(func)
    return resolved if isinstance(reward_funcs, list) else resolved[0]


def _is_plain_callable(func: Any) -> bool:
    if isinstance(func, (str, nn.Module)) or not callable(func):
        return False
    return not (inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)))


def _column_names(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    try:  # an IterableDataset without features: look at its first row
        return list(next(iter(dataset)).keys())
    except StopIteration:
        return []


def validate_training_dataset(
    dataset, reward_funcs: Sequence[Callable] | None, label: str = "train_dataset", needs_prompt: bool = True
) -> None:
    """The dataset is non-empty and has ``prompt`` plus every column a reward function declares it reads."""
    if dataset is None:
        return
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{label} is empty: there is nothing to train on. Check the split, filters and max samples.")
    columns = _column_names(dataset)
    if columns == []:
        raise ValueError(f"{label} yields no rows: there is nothing to train on.")
    if needs_prompt and "prompt" not in columns:
        raise ValueError(
            f"{label} has no 'prompt' column (columns: {columns}). Map your question column to a 'prompt' "
            "(a string or a list of chat messages), e.g. with aapo_trl.data.load_prompt_dataset."
        )
    for func in reward_funcs or []:
        missing = [c for c in getattr(func, "required_columns", ()) if c not in columns]
        if missing:
            name = getattr(func, "__name__", type(func).__name__)
            raise ValueError(
                f"reward function {name!r} reads the column(s) {missing}, which {label} does not have "
                f"(columns: {columns}). Add the gold answers as a {missing[0]!r} column, or drop {name!r}."
            )


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What must agree for token ids to mean the same thing to two models."""
    import hashlib
    import json

    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {
        "vocab_size": len(vocab),
        "vocab_sha256": digest,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def validate_tokenizers_match(policy_tokenizer, reference_tokenizer, reference_label: str = "reference model") -> None:
    """The reference samples from the policy's prompt token ids, so both must tokenize identically."""
    policy, reference = tokenizer_fingerprint(policy_tokenizer), tokenizer_fingerprint(reference_tokenizer)
    differing = {key: (policy[key], reference[key]) for key in policy if policy[key] != reference[key]}
    if differing:
        details = ", ".join(f"{key}: policy {a!r} vs reference {b!r}" for key, (a, b) in differing.items())
        raise ValueError(
            f"the {reference_label}'s tokenizer differs from the policy's ({details}). AAPO feeds the policy's prompt "
            "token ids to the reference, so both must share one tokenizer: use a reference from the same model family "
            "(e.g. the policy's base checkpoint)."
        )
