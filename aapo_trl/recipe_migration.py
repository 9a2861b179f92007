"""Recipes written for TRL 0.16-era scripts (open-r1, the AAPO authors' code) read as aapo-trl recipes.

    aapo-trl migrate-recipe OLD.yaml [--algorithm aapo]      # prints the translated recipe and its notes

:func:`migrate_recipe` maps a recipe's fields (a dict, as read from its YAML) to the fields of TRL 1.16 and
aapo-trl, and says for every field it touches what it did and why (:class:`MigrationNote`). A field is
*renamed* to the name that now holds the same setting, *dropped* when nothing in TRL 1.16 / aapo-trl reads it
(the note says what it did in its own code), or *set* when the old code's effective value differs from
aapo-trl's default; a recipe that cannot be read faithfully raises :class:`RecipeMigrationError` naming the
field. ``aapo-trl train --config OLD.yaml`` runs the same translation and prints the same notes, so an old
recipe runs unchanged.

*Legacy* recipes are recognised by a field that TRL 1.16 / transformers 5 no longer know
(:data:`LEGACY_MARKERS`: ``torch_dtype``, ``warmup_ratio``, ``overwrite_output_dir`` ...): every open-r1 and
AAPO recipe has some. Only in such recipes are the reward defaults of those scripts made explicit (open-r1's
and open-rs's cosine reward counts characters and gives 0.0 to a short wrong answer), so a recipe written for
aapo-trl keeps aapo-trl's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class RecipeMigrationError(ValueError):
    """A recipe field that has no faithful reading in TRL 1.16 / aapo-trl."""


@dataclass(frozen=True)
class MigrationNote:
    """What happened to one field of an old recipe, and why."""

    field: str
    action: str  # "renamed to X", "dropped", "set to X"
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.action} -- {self.reason}"


LEGACY_MARKERS = (
    "torch_dtype", "warmup_ratio", "overwrite_output_dir", "padding_free", "vllm_device", "vllm_enforce_eager",
    "vllm_max_model_len", "dataset_configs", "num_processes", "callbacks", "benchmarks",
)
"""Fields of TRL 0.16-era recipes that TRL 1.16 / transformers 5 do not know: a recipe with one is legacy."""

RENAMES: dict[str, tuple[str, str]] = {
    "torch_dtype": ("dtype", "TRL's ModelConfig calls the model's dtype `dtype` (transformers 4.56 renamed "
                             "from_pretrained's torch_dtype)"),
    "vllm_max_model_len": ("vllm_max_model_length", "TRL 1.16's name for the vLLM context window (colocate mode; "
                                                    "a vLLM server takes `trl vllm-serve --max_model_len`)"),
    "vllm_guided_decoding_regex": ("vllm_structured_outputs_regex", "TRL 1.16's name for the regex that "
                                                                    "constrains vLLM's sampling"),
    "wandb_log_unique_prompts": ("log_unique_prompts", "TRL 1.16's name"),
    "hub_model_revision": ("hub_revision", "the Hub branch pushes go to; transformers' TrainingArguments name"),
    "dataset_split": ("dataset_train_split", "TRL's ScriptArguments name; dataset_split stays an alias"),
    "gradient_checkpointing": ("activation_checkpointing", "transformers 5.18's name (the old one is a deprecated "
                                                           "alias; aapo-trl maps it back on older transformers)"),
    "gradient_checkpointing_kwargs": ("activation_checkpointing_kwargs", "transformers 5.18's name (see "
                                                                         "gradient_checkpointing)"),
}
"""Old name -> (the name that holds the same setting now, why)."""

DROPS: dict[str, str] = {
    "overwrite_output_dir": "transformers 5 removed it; its Trainer never read it (only example scripts did). "
                            "aapo-trl writes into output_dir and resumes only when resume_from_checkpoint is set "
                            "(the old open-r1 / AAPO scripts resumed from the last checkpoint in output_dir)",
    "padding_free": "an SFT/DPO packing option that TRL's GRPOConfig has in neither 0.16 nor 1.16; GRPO pads "
                    "prompts and completions, as the authors' trainer did",
    "vllm_device": "TRL 1.16 runs vLLM as a server (`trl vllm-serve` on the GPUs you give it) or colocated with "
                   "each training process (vllm_mode: colocate); placement changes where, not what, is sampled",
    "vllm_enforce_eager": "TRL 1.16 has no such field (a vLLM server takes `trl vllm-serve --enforce_eager`); CUDA "
                          "graphs change speed and memory, not what is sampled",
    "num_processes": "an accelerate launch option: give `accelerate launch --num_processes N`",
    "callbacks": "open-r1's callbacks (push_to_hub_revision: push each checkpoint to a Hub branch and schedule "
                 "its benchmarks on open-r1's cluster) do not exist here; push_to_hub with hub_strategy pushes "
                 "checkpoints and `aapo-trl eval` evaluates them",
    "benchmarks": "open-r1 ran these lighteval benchmarks after pushing a checkpoint; here run `aapo-trl eval` on "
                  "the saved model",
    "push_to_hub_revision": "an option of open-r1's push_to_hub_revision callback (see callbacks)",
    "overwrite_hub_revision": "an option of open-r1's push_to_hub_revision callback (see callbacks)",
    "wandb_entity": "open-r1 exported it as WANDB_ENTITY; set that environment variable (or `env:` in the recipe)",
    "wandb_project": "open-r1 exported it as WANDB_PROJECT; set that environment variable (or `env:` in the recipe)",
    "wandb_run_group": "open-r1 exported it as WANDB_RUN_GROUP; set that environment variable (or `env:` in the "
                       "recipe)",
}
"""Fields nothing in TRL 1.16 / aapo-trl reads -> what they did in the old code and what replaces them."""

REWARD_RENAMES: dict[str, tuple[str, str]] = {
    "accuracy_lv35": ("accuracy", "the AAPO authors' accuracy_lv35 (open-r1/utils/rewards.py) is open-r1's "
                                  "math-verify accuracy with the bare gold answer boxed before parsing; aapo-trl's "
                                  "accuracy parses a bare gold the same way (rewards._gold_candidates)"),
}

OPEN_R1_REWARDS_NOT_HERE = (
    "reasoning_steps", "repetition_penalty", "length", "code", "ioi_code", "code_format", "binary_code", "cf_code",
    "soft_format",
)
"""open-r1 reward names with no aapo-trl equivalent: pass such a function from Python (reward_funcs=[...])."""

SIMPLERL_NAMES = ("simplelr_qwen_level3to5", "simplelr_abel_level3to5")

OPEN_R1_COSINE_DEFAULTS = {"cosine_length_unit": "characters", "cosine_min_value_wrong": 0.0}
"""What open-r1's and open-rs's scripts used when a recipe named the cosine reward without these fields:
len(content) in characters, and GRPOScriptArguments' default 0.0 (aapo-trl's defaults: tokens, -1.0)."""

CE_LOSS_OF = {"aapo": "aapo", "gpg": "gpg"}
"""The algorithms whose default loss is a CE loss without a KL term (aapo_trl.configs.CE_LOSS_TYPES)."""


def is_legacy(values: dict[str, Any]) -> bool:
    return any(key in values for key in LEGACY_MARKERS)


def migrate_recipe(values: dict[str, Any], algorithm: str = "aapo") -> tuple[dict[str, Any], list[MigrationNote]]:
    """``values`` (a recipe's fields) in TRL 1.16 / aapo-trl names, and one note per field changed.

    ``algorithm`` is the trainer the recipe will run (``aapo``, ``gpg``, ``grpo``, ``zapo``): ``beta`` reads
    differently under AAPO's loss. Raises :class:`RecipeMigrationError` for a field with no faithful reading.
    """
    values = dict(values)
    notes: list[MigrationNote] = []
    legacy = is_legacy(values)
    _dataset_configs(values, notes)
    for old, (new, reason) in RENAMES.items():
        _rename(values, notes, old, new, reason)
    _warmup_ratio(values, notes)
    for name, reason in DROPS.items():
        if name in values:
            value = values.pop(name)
            unused = " (use_vllm is false in this recipe: it had no effect)" if name.startswith("vllm_") and \
                values.get("use_vllm") is False else ""
            notes.append(MigrationNote(name, f"dropped (was {value!r})", reason + unused))
    _beta(values, notes, algorithm)
    _rewards(values, notes, legacy)
    if legacy:
        _simplerl_loader(values, notes)
    if "chat_template" in values:
        raise RecipeMigrationError(
            "chat_template: open-r1 set this Jinja template on the tokenizer; aapo-trl does not read it. Save the "
            "template with the tokenizer (tokenizer.chat_template, then save_pretrained) and point "
            "model_name_or_path at that folder, or remove the field."
        )
    return values, notes


def _rename(values: dict, notes: list, old: str, new: str, reason: str) -> None:
    if old not in values:
        return
    value = values[old]
    if new in values and values[new] != value:
        raise RecipeMigrationError(
            f"{old}={value!r} and {new}={values[new]!r}: {old} is the old name of {new}; keep one of them."
        )
    renamed = [(new if key == old else key, item) for key, item in values.items() if key != new]
    values.clear()
    values.update(renamed)  # in the old field's place
    notes.append(MigrationNote(old, f"renamed to {new}", reason))


def _dataset_configs(values: dict, notes: list) -> None:
    """Early open-r1 recipes list ``dataset_configs``; its script loaded the first one."""
    if "dataset_configs" not in values:
        return
    configs = values.pop("dataset_configs")
    configs = [configs] if isinstance(configs, str) else list(configs or [])
    if len(configs) > 1:
        raise RecipeMigrationError(
            f"dataset_configs={configs}: aapo-trl loads one configuration (dataset_config); join several datasets "
            "with '+' in dataset_name instead."
        )
    if not configs:
        notes.append(MigrationNote("dataset_configs", "dropped (empty)", "no configuration was named"))
        return
    if values.get("dataset_config", configs[0]) != configs[0]:
        raise RecipeMigrationError(
            f"dataset_configs={configs} and dataset_config={values['dataset_config']!r} disagree; keep one."
        )
    values["dataset_config"] = configs[0]
    notes.append(MigrationNote("dataset_configs", "renamed to dataset_config",
                               "TRL's ScriptArguments name; the list held one configuration"))


def _warmup_ratio(values: dict, notes: list) -> None:
    """transformers 5 folded ``warmup_ratio`` into ``warmup_steps`` (a float below 1 is a ratio of the total)."""
    if "warmup_ratio" not in values:
        return
    ratio = values.pop("warmup_ratio")
    steps = values.get("warmup_steps", 0) or 0
    if steps:  # transformers 4: warmup_steps > 0 overrides warmup_ratio
        notes.append(MigrationNote("warmup_ratio", f"dropped (was {ratio!r})",
                                   f"warmup_steps={steps!r} is set, and transformers 4 let it override warmup_ratio"))
        return
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise RecipeMigrationError(f"warmup_ratio={ratio!r}: a ratio of the total steps must be in [0, 1).")
    if ratio:
        values["warmup_steps"] = ratio
    notes.append(MigrationNote("warmup_ratio", f"renamed to warmup_steps ({ratio!r})" if ratio else "dropped (0)",
                               "transformers 5 reads a warmup_steps below 1 as a ratio of the total steps"))


def _beta(values: dict, notes: list, algorithm: str) -> None:
    """AAPO's CE loss (Eq. 4) has no KL term. In the authors' TRL 0.16 trainer, beta != 0 only made TRL build the
    reference model (`self.ref_model`, which their code sampled the reference responses from) and compute its
    per-token log-probs; their compute_loss never reads them. aapo-trl's AAPO builds its reference regardless."""
    beta = values.get("beta")
    loss_type = values.get("loss_type", CE_LOSS_OF.get(algorithm))
    if algorithm != "aapo" or loss_type != "aapo" or beta in (None, 0, 0.0):
        return
    values["beta"] = 0.0
    notes.append(MigrationNote(
        "beta", f"set to 0.0 (was {beta!r})",
        "AAPO's loss (Eq. 4) has no KL term: in the AAPO authors' TRL 0.16 trainer a nonzero beta only made TRL "
        "create the frozen reference model their trainer samples the reference responses from (and compute its "
        "log-probs, which their compute_loss never reads); aapo-trl's AAPO always has its reference. For a KL "
        "penalty, choose a TRL loss_type such as 'grpo' and keep beta",
    ))


def _rewards(values: dict, notes: list, legacy: bool) -> None:
    funcs = values.get("reward_funcs")
    if funcs is None:
        return
    funcs = [funcs] if isinstance(funcs, str) else list(funcs)
    missing = [name for name in funcs if name in OPEN_R1_REWARDS_NOT_HERE]
    if missing:
        raise RecipeMigrationError(
            f"reward_funcs: {missing} are open-r1 rewards aapo-trl does not have; pass such functions from Python "
            "(AAPOTrainer(reward_funcs=[...])) or choose registered ones (aapo_trl.rewards.REWARD_REGISTRY)."
        )
    for old, (new, reason) in REWARD_RENAMES.items():
        if old in funcs:
            funcs = [new if name == old else name for name in funcs]
            notes.append(MigrationNote(f"reward_funcs[{old}]", f"renamed to {new}", reason))
    values["reward_funcs"] = funcs
    if not legacy:
        return
    if "format" in funcs:
        notes.append(MigrationNote(
            "reward_funcs[format]", "kept",
            "aapo-trl's format is the AAPO authors' open-rs reward (1 when '\\n</think>\\n' occurs once), which "
            "their recipes mean; open-r1's own format reward (the whole completion matches <think>...</think>"
            "<answer>...</answer>) is registered as open_r1_format: name that one for an open-r1 recipe",
        ))
    if "cosine" in funcs:
        for name, value in OPEN_R1_COSINE_DEFAULTS.items():
            if name not in values:
                values[name] = value
                notes.append(MigrationNote(
                    name, f"set to {value!r}",
                    "what open-r1's and the AAPO authors' scripts used for the cosine reward when a recipe did not "
                    "set it (aapo-trl's default differs)",
                ))
    if "max_completion_len" in values:  # open-r1's soft_overlong_punishment argument
        length = values.pop("max_completion_len")
        if length != values.get("max_completion_length", length):
            raise RecipeMigrationError(
                f"max_completion_len={length} differs from max_completion_length={values['max_completion_length']}: "
                "aapo-trl's soft_overlong_punishment measures overlong completions against max_completion_length."
            )
        notes.append(MigrationNote("max_completion_len", "dropped",
                                   "soft_overlong_punishment reads max_completion_length, which has this value"))


def _simplerl_loader(values: dict, notes: list) -> None:
    """The AAPO authors' open-r1/AAPO.py loads the SimpleRL sets with its own loader (custom_loading_dataset)."""
    name = str(values.get("dataset_name", ""))
    if not any(part in name for part in SIMPLERL_NAMES):
        return
    for field, what in (("dataset_config", "configuration"), ("system_prompt", "system prompt")):
        if field in values:
            value = values.pop(field)
            notes.append(MigrationNote(
                field, f"dropped (was {value!r})",
                f"the AAPO authors' open-r1/AAPO.py ignores the {what} for the SimpleRL sets: it reads the "
                "dataset's own prompt, which aapo-trl's format for that set reproduces",
            ))
    if values.get("max_prompt_length") is not None:
        notes.append(MigrationNote(
            "max_prompt_length", "kept",
            "the authors' SimpleRL loader also dropped prompts longer than this many tokens before training; "
            "aapo-trl keeps them and truncates them on the left, as their TRL did for every other prompt",
        ))


def report_migration_notes(notes: list[MigrationNote], source: str) -> None:
    """One line on stderr per translated field (main process only: every process parses the same recipe)."""
    import os
    import sys

    if not notes or int(os.environ.get("RANK", "0")) != 0:
        return
    for note in notes:
        print(f"aapo-trl: {source}: {note}", file=sys.stderr)


def render_migrated(values: dict[str, Any], notes: list[MigrationNote], source: str) -> str:
    """The translated recipe as YAML, the notes as comments above it."""
    import yaml

    header = [f"# Translated from {source} by `aapo-trl migrate-recipe`."]
    header += [f"# {note}" for note in notes] or ["# Nothing to translate."]
    body = yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120)
    return "\n".join(header) + "\n" + body


def register_cli(subparsers) -> None:
    """``aapo-trl migrate-recipe OLD.yaml``: print the recipe in TRL 1.16 / aapo-trl fields with its notes."""
    parser = subparsers.add_parser(
        "migrate-recipe",
        help="translate a TRL 0.16-era recipe (open-r1, the AAPO authors') to aapo-trl's fields and print it",
    )
    parser.add_argument("recipe", help="the old recipe (YAML)")
    parser.add_argument("--algorithm", choices=["aapo", "gpg", "grpo", "zapo"], default="aapo",
                        help="the trainer it will run with (beta reads differently under AAPO's loss)")
    parser.set_defaults(handler=_command)


def _command(args, rest: list[str]) -> int:
    import sys

    import yaml

    if rest:
        raise SystemExit(f"aapo-trl migrate-recipe: unrecognised arguments: {' '.join(rest)}")
    with open(args.recipe) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"aapo-trl migrate-recipe: {args.recipe} must hold a YAML mapping")
    try:
        migrated, notes = migrate_recipe(values, args.algorithm)
    except RecipeMigrationError as error:
        print(f"aapo-trl migrate-recipe: {args.recipe}: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(render_migrated(migrated, notes, args.recipe))
    return 0
