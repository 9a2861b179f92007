"""The model card of an aapo-trl run, and the recipe it embeds: pure functions and the trainer mixin.

A low module: it imports neither :mod:`aapo_trl.train` nor :mod:`aapo_trl.trainers` (the trainers import
:class:`ModelCardMixin` from here), so the layers read top-down: ``model_card`` <- ``trainers`` <- ``train`` <-
``hub`` (pushing, the ``aapo-trl push`` command). :mod:`aapo_trl.hub` re-exports every public name below, so
``from aapo_trl.hub import build_model_card`` keeps working.

TRL's card names TRL's trainer and cites GRPO; ours

* names the algorithm (AAPO, ZAPO, GPG or GRPO, and GRESO when its filter was on) with its knobs,
* cites its paper (AAPO: arXiv 2505.14264; ZAPO: by title, an anonymous submission under double-blind
  review, so no author list or preprint id; GPG, GRPO and GRESO: their arXiv ids),
* embeds the recipe the run used (``recipe.yaml`` in the output folder, uploaded with the model), and
* when an evaluation of the checkpoint exists (``eval_results.json`` in the output folder, a JSON object
  ``{benchmark: pass@1}``), renders it as a Markdown table and as ``model-index`` metadata.

Everything that decides what the card says is a pure function (:func:`build_model_card`,
:func:`render_recipe`, :func:`eval_results_table`, ...); :class:`ModelCardMixin` only gathers the trainer's
state and writes the files. It is mixed in *before* the trainer class::

    class AAPOTrainer(ModelCardMixin, AdvantageTrainerMixin, GRPOTrainer): ...

and overrides TRL's ``_BaseTrainer.create_model_card`` (trl 1.16.0), which ``transformers.Trainer.push_to_hub``
and ``GRPOTrainer._save_checkpoint`` call on the main process before every upload.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import textwrap
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

logger = logging.getLogger(__name__)

RECIPE_FILENAME = "recipe.yaml"
"""The recipe a run used, written into its output folder (and uploaded with the model)."""
EVAL_RESULTS_FILENAME = "eval_results.json"
"""An evaluation of the checkpoint in the output folder: a JSON object ``{benchmark: pass@1}``."""
MODEL_CARD_FILENAME = "README.md"

#: Keys never written into a recipe or a card (credentials). ``env`` entries whose name contains one of
#: :data:`SECRET_ENV_MARKERS` are redacted too.
SECRET_FIELDS = frozenset({"hub_token", "push_to_hub_token", "token", "api_key"})
SECRET_ENV_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
REDACTED = "<redacted>"

#: Model names that stand for local, unpublished weights (see :mod:`aapo_trl.models`).
LOCAL_MODEL_ALIASES = frozenset({"embedded", "smollm2", "tiny"})


# ---------------------------------------------------------------------------------------------------
# The papers
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paper:
    """What the card says about an algorithm's paper."""

    name: str
    """Short name (``"AAPO"``)."""
    long_name: str
    title: str
    summary: str
    citation: str
    """BibTeX entry."""
    arxiv_id: str | None = None
    note: str | None = None
    """Said in place of an arXiv link when there is none."""
    code_url: str | None = None

    @property
    def url(self) -> str | None:
        return f"https://arxiv.org/abs/{self.arxiv_id}" if self.arxiv_id else None

    def reference(self) -> str:
        """``[title](https://arxiv.org/abs/id) (arXiv:id)``, or the italic title with its note."""
        if self.arxiv_id:
            return f"[{self.title}]({self.url}) (arXiv:{self.arxiv_id})"
        return f"*{self.title}*" + (f" ({self.note})" if self.note else "")


PAPERS: dict[str, Paper] = {
    "aapo": Paper(
        name="AAPO",
        long_name="Advantage-Augmented Policy Optimization",
        title="AAPO: Enhancing the Reasoning Capabilities of LLMs with Advantage Margin",
        # The arXiv id is the one the authors' repository (github.com/JianxXiong/AAPO) gives for this title.
        arxiv_id="2505.14264",
        code_url="https://github.com/JianxXiong/AAPO",
        summary=(
            "AAPO samples a group of responses from the policy *and* from a frozen reference model (the initial "
            "policy) for every prompt, and adds the clipped margin between their rewards to GRPO's group-relative "
            "advantage, so that groups whose responses all get the same reward still carry a learning signal. It "
            "optimizes a cross-entropy loss weighted by this augmented advantage (no ratio, no clipping, no KL)."
        ),
        citation=textwrap.dedent("""\
            @misc{xiong2025aapo,
                title         = {{AAPO: Enhancing the Reasoning Capabilities of LLMs with Advantage Margin}},
                author        = {Jian Xiong and Jingbo Zhou and Jingyong Ye and Qiang Huang and Dejing Dou},
                year          = 2025,
                eprint        = {2505.14264},
                archivePrefix = {arXiv},
            }"""),
    ),
    "zapo": Paper(
        name="ZAPO",
        long_name="Zero-Advantage sample-augmented Policy Optimization",
        title=(
            "Useless, or Untapped? Unlocking the Full Value of Zero-Advantage Samples for Better Policy "
            "Optimization"
        ),
        note="anonymous submission under double-blind review; no author list or preprint id is public",
        summary=(
            "ZAPO keeps GRPO's clipped objective but gives zero-advantage groups an advantage of their own: an "
            "entropy reward (DAER) built from the prompt's semantic entropy and the response's token entropy, "
            "signed by whether the group was all right (easy) or all wrong (hard) and growing with training time; "
            "the other advantages are reshaped by the prompt's difficulty (TDAR). Prompts are filtered before "
            "rollout with GRESO."
        ),
        citation=textwrap.dedent("""\
            @misc{zapo,
                title  = {{Useless, or Untapped? Unlocking the Full Value of Zero-Advantage Samples for Better Policy Optimization}},
                author = {Anonymous},
                note   = {Submission under double-blind review},
            }"""),
    ),
    "gpg": Paper(
        name="GPG",
        long_name="Group Policy Gradient",
        title="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
        arxiv_id="2504.02546",
        summary=(
            "GPG optimizes the policy-gradient objective directly: a cross-entropy loss weighted by the group-"
            "relative advantage, rescaled by the share of groups with a non-zero advantage (no ratio, no clipping, "
            "no KL)."
        ),
        citation=textwrap.dedent("""\
            @misc{chu2025gpg,
                title         = {{GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning}},
                author        = {Xiangxiang Chu and Hailang Huang and Xiao Zhang and Fei Wei and Yong Wang},
                year          = 2025,
                eprint        = {2504.02546},
                archivePrefix = {arXiv},
            }"""),
    ),
    "grpo": Paper(
        name="GRPO",
        long_name="Group Relative Policy Optimization",
        title="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
        arxiv_id="2402.03300",
        summary=(
            "GRPO normalizes each response's reward by the mean and standard deviation of its group and optimizes "
            "PPO's clipped surrogate objective with these advantages, without a value model."
        ),
        citation=textwrap.dedent("""\
            @article{shao2024deepseekmath,
                title  = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
                author = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo},
                year   = 2024,
                eprint = {arXiv:2402.03300},
            }"""),
    ),
}

GRESO_PAPER = Paper(
    name="GRESO",
    long_name="GRPO with Efficient Selective Rollout",
    title="Act Only When It Pays: Efficient Reinforcement Learning for LLM Reasoning via Selective Rollouts",
    arxiv_id="2506.02177",
    summary=(
        "GRESO skips, before generation, prompts whose recent rollouts all had zero reward variance, with a "
        "probability that adapts to keep the share of such prompts near a target."
    ),
    citation=textwrap.dedent("""\
        @misc{zheng2025greso,
            title         = {{Act Only When It Pays: Efficient Reinforcement Learning for LLM Reasoning via Selective Rollouts}},
            author        = {Haizhong Zheng and Yang Zhou and Brian R. Bartoldson and Bhavya Kailkhura and Fan Lai and Jiawei Zhao and Beidi Chen},
            year          = 2025,
            eprint        = {2506.02177},
            archivePrefix = {arXiv},
        }"""),
)

TRL_CITATION = textwrap.dedent("""\
    @software{vonwerra2020trl,
        title   = {{TRL: Transformers Reinforcement Learning}},
        author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
        license = {Apache-2.0},
        url     = {https://github.com/huggingface/trl},
        year    = {2020}
    }""")


def paper_for(algorithm: str) -> Paper:
    """The :class:`Paper` of ``"aapo"``, ``"zapo"``, ``"gpg"`` or ``"grpo"`` (case-insensitive)."""
    key = str(algorithm).strip().lower()
    if key not in PAPERS:
        raise ValueError(f"unknown algorithm {algorithm!r}; model cards know {sorted(PAPERS)}")
    return PAPERS[key]


# ---------------------------------------------------------------------------------------------------
# Evaluation results
# ---------------------------------------------------------------------------------------------------


def read_eval_results(path: str | os.PathLike) -> dict[str, float] | None:
    """``{benchmark: pass@1}`` from an ``eval_results.json`` file, or ``None`` when there is no such file.

    The file is a JSON object mapping each benchmark to its pass@1, either a number or an object with a
    ``"pass@1"`` entry; entries that are neither (e.g. ``"model": "..."``) are ignored, and the
    benchmarks keep the file's order. A results record of ``aapo-trl eval`` (``{"benchmarks": {key:
    {"title": ..., "metrics": {"pass@1": ...}}}, ...}``) is read too, one row per benchmark title. Values are kept as written (a fraction or a percentage: the card
    shows them unchanged). A file that is not such an object raises ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} must hold a JSON object {{benchmark: pass@1}}, got {type(data).__name__}")
    if isinstance(data.get("benchmarks"), Mapping):  # a record of ``aapo-trl eval`` (evaluation/run.py)
        data = {
            (entry.get("title") or key if isinstance(entry, Mapping) else key): (
                entry.get("metrics", {}) if isinstance(entry, Mapping) else entry
            )
            for key, entry in data["benchmarks"].items()
        }
    results: dict[str, float] = {}
    for benchmark, value in data.items():
        if isinstance(value, Mapping):
            value = value.get("pass@1")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        results[str(benchmark)] = float(value)
    return results


def _format_score(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.1f}"


def eval_results_table(results: Mapping[str, float]) -> str:
    """A Markdown table ``| Benchmark | pass@1 |`` with an average row when there are several benchmarks."""
    if not results:
        return ""
    lines = ["| Benchmark | pass@1 |", "|---|---|"]
    lines += [f"| {benchmark} | {_format_score(value)} |" for benchmark, value in results.items()]
    if len(results) > 1:
        average = sum(results.values()) / len(results)
        lines.append(f"| **Average** | **{_format_score(average)}** |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------


def to_yaml_data(value: Any) -> Any:
    """A value as plain YAML data (enums by value, tuples as lists, paths as strings)."""
    if isinstance(value, enum.Enum):
        return to_yaml_data(value.value)
    if isinstance(value, Mapping):
        return {str(k): to_yaml_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_yaml_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_yaml_data(dataclasses.asdict(value))
    return str(value)


def redact(mapping: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``mapping`` with credentials replaced by :data:`REDACTED`, and whether anything was replaced."""
    redacted, changed = {}, False
    for key, value in mapping.items():
        if key in SECRET_FIELDS and value is not None:
            redacted[key], changed = REDACTED, True
        elif key == "env" and isinstance(value, Mapping):
            env = {}
            for name, item in value.items():
                secret = any(marker in str(name).upper() for marker in SECRET_ENV_MARKERS)
                env[name] = REDACTED if secret else item
                changed = changed or secret
            redacted[key] = env
        else:
            redacted[key] = value
    return redacted, changed


def _cli_keys(argv: Sequence[str]) -> list[str]:
    """The field names given on a command line (``--key value ...`` or ``--key=value``), in order, once."""
    keys: list[str] = []
    skip_next = False
    for token in argv:
        if skip_next:
            skip_next = False
            continue
        if not token.startswith("--") or len(token) == 2:
            continue
        key = token[2:].split("=", 1)[0].replace("-", "_")
        if key == "config":
            skip_next = "=" not in token
            continue
        if key not in keys:
            keys.append(key)
    return keys


def _header_comment(text: str) -> list[str]:
    """The comment lines at the top of a YAML text (up to the first non-comment line)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            lines.append(line)
        elif line.strip():
            break
    return lines


def _final_value(parsed: Sequence[Any], key: str) -> tuple[bool, Any]:
    for obj in parsed:
        if dataclasses.is_dataclass(obj) and key in {f.name for f in dataclasses.fields(obj)}:
            return True, to_yaml_data(getattr(obj, key))
    return False, None


def _dump(mapping: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(mapping), sort_keys=False, default_flow_style=None, allow_unicode=True, width=120)


def render_recipe(
    parsed: Sequence[Any], argv: Sequence[str], algorithm: str | None = None, *,
    defaults: Mapping[str, Any] | None = None,
) -> str:
    """The recipe a run used, as YAML text: what :func:`aapo_trl.train.parse_args` turned into ``parsed``.

    Args:
        parsed: The parsed dataclasses (script arguments, the algorithm's config, ``ModelConfig``).
        argv: The command line given to ``parse_args`` (``--config FILE`` and/or ``--field value``).
        algorithm: Named in a comment at the top (``# algorithm: aapo``).
        defaults: The fields a run without ``--config`` started from (:func:`aapo_trl.train.embedded_defaults`);
            required then. :func:`aapo_trl.train.render_recipe` (re-exported by :mod:`aapo_trl.hub`) passes them.

    With ``--config FILE`` and nothing else, the file's text is returned unchanged (its comments cite the
    paper table it reproduces). Fields given on the command line override the file: the result is then the
    file's header comment followed by every field of the file and of the command line, with the values
    the run used. Without ``--config``, ``defaults`` (the embedded default's fields) take the file's place. Credentials (``hub_token``, secret ``env`` entries) are always redacted.
    """
    argv = list(argv)
    header = [f"# algorithm: {algorithm}"] if algorithm else []
    overrides = _cli_keys(argv)
    if "--config" in argv or any(token.startswith("--config=") for token in argv):
        if "--config" in argv:
            path = argv[argv.index("--config") + 1]
        else:
            path = next(token.split("=", 1)[1] for token in argv if token.startswith("--config="))
        text = Path(path).read_text(encoding="utf-8")
        base = yaml.safe_load(text) or {}
        header += [f"# recipe: {path}"]
        base_header = _header_comment(text)
    else:
        if defaults is None:
            raise ValueError("render_recipe: argv has no --config, so `defaults` (the fields the run started from, "
                             "e.g. aapo_trl.train.embedded_defaults(algorithm)) is required")
        base = dict(defaults)
        text = None
        header += ["# recipe: the embedded default (aapo_trl.train.EMBEDDED_DEFAULTS)"]
        base_header = []
    redacted, had_secrets = redact(base)
    if text is not None and not overrides and not had_secrets:
        return "\n".join(header) + "\n" + text if header else text
    merged: dict[str, Any] = {}
    for key, value in redacted.items():
        known, final = _final_value(parsed, key)
        merged[key] = final if known and redacted[key] != REDACTED else to_yaml_data(value)
    for key in overrides:
        known, final = _final_value(parsed, key)
        if known:
            merged[key] = final
    merged, _ = redact(merged)
    lines = header + base_header
    if overrides:
        lines += textwrap.wrap(", ".join(overrides), width=110, initial_indent="# command-line overrides applied: ",
                               subsequent_indent="#   ", break_on_hyphens=False)
    return "\n".join(lines) + "\n" + _dump(merged)


def recipe_from_config(args: Any, exclude: Iterable[str] = ()) -> str:
    """A recipe from a config object alone (no recipe file known): the fields that differ from their defaults.

    For runs started from Python rather than from a recipe file. Fields derived in ``__post_init__`` or that
    only describe the machine are left out, and so are credentials.
    """
    skip = set(exclude) | SECRET_FIELDS | _DERIVED_FIELDS
    values = {}
    for field in dataclasses.fields(args):
        if not field.init or field.name in skip or field.name.startswith("_"):
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        value = getattr(args, field.name, None)
        if to_yaml_data(value) != to_yaml_data(default):
            values[field.name] = to_yaml_data(value)
    header = f"# {type(args).__name__} fields that differ from their defaults (the run was not started from a recipe file)"
    return header + "\n" + _dump(values)


# Filled in by TrainingArguments/GRPOConfig.__post_init__ or describing the machine, not the experiment.
_DERIVED_FIELDS = frozenset(
    {
        "accelerator_config",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "dataloader_pin_memory",
        "debug",
        "disable_tqdm",
        "generation_batch_size",
        "steps_per_generation",
        "logging_dir",
        "pad_to_multiple_of",
        "report_to",
        "local_rank",
        "deepspeed",
        "fsdp",
        "fsdp_config",
    }
)


def write_recipe(output_dir: str | os.PathLike, recipe_yaml: str) -> Path:
    """Write ``recipe.yaml`` into ``output_dir`` (created if needed); returns its path."""
    path = Path(output_dir) / RECIPE_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe_yaml if recipe_yaml.endswith("\n") else recipe_yaml + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _dataset_hub_ids(dataset_name: str | None) -> list[str]:
    """The Hub ids behind a registry name (``open-rs`` -> ``knoveleng/open-rs``); ``a+b`` gives both."""
    if not dataset_name:
        return []
    ids = []
    for part in str(dataset_name).split("+"):
        part = part.strip()
        if not part or part.lower() == "arithmetic" or Path(part).exists():
            continue
        try:
            from .data import get_dataset_spec

            ids.append(get_dataset_spec(part).hub_id)
        except (KeyError, ImportError):
            if part.count("/") == 1:
                ids.append(part)
    return list(dict.fromkeys(ids))


def _dataset_links(dataset_name: str | None) -> str:
    ids = _dataset_hub_ids(dataset_name)
    if ids:
        return " + ".join(f"[{i}](https://huggingface.co/datasets/{i})" for i in ids)
    return f"`{dataset_name}`" if dataset_name else ""


def hub_base_model(name_or_path: str | None) -> str | None:
    """A Hub model id worth linking as ``base_model``: not a local folder, not a local alias (``tiny``)."""
    if not name_or_path:
        return None
    name = str(name_or_path).strip()
    if name.lower() in LOCAL_MODEL_ALIASES or os.path.isdir(name) or name.count("/") != 1:
        return None
    return name


def _algorithm_details(algorithm: str, settings: Mapping[str, Any]) -> list[str]:
    """One bullet per knob of the algorithm that the card should show (values as the run used them)."""
    get = settings.get
    lines = []
    if algorithm == "aapo":
        if get("margin_clip", True):
            lines.append(
                f"advantage margin clipped to [{get('margin_clip_low', -0.2)}, {get('margin_clip_high', 0.28)}]"
            )
        else:
            lines.append("advantage margin not clipped (the paper's \"w/o clip\" ablation)")
        if get("ref_update_steps"):
            lines.append(f"reference model replaced by the policy every {get('ref_update_steps')} steps "
                         "(the paper's \"w reference update\" ablation)")
        else:
            lines.append("frozen reference model: the initial policy")
    elif algorithm == "zapo":
        lines.append(f"alpha = {get('alpha', 2.0)} (weight of hard groups, Eq. 10), "
                     f"TDAR beta = {get('tdar_beta', 5.0)} (Eq. 12)")
        off = [name for key, name in (("use_daer", "DAER"), ("use_tdar", "TDAR"),
                                      ("use_semantic_entropy", "semantic entropy"),
                                      ("use_token_entropy", "token entropy")) if get(key) is False]
        if off:
            lines.append("ablation: without " + ", ".join(off))
    if get("loss_type"):
        lines.append(f"loss: `{get('loss_type')}`")
    return lines


def _training_details(settings: Mapping[str, Any]) -> list[str]:
    get = settings.get
    lines = []
    rewards = get("reward_funcs")
    if rewards:
        weights = get("reward_weights") or [1.0] * len(rewards)
        pairs = ", ".join(f"`{name}` (weight {weight:g})" for name, weight in zip(rewards, weights))
        lines.append(f"rewards: {pairs}")
    if get("num_generations") is not None:
        lines.append(f"group size G = {get('num_generations')}")
    if get("per_device_train_batch_size") is not None:
        lines.append(f"per-device batch {get('per_device_train_batch_size')} completions, gradient accumulation "
                     f"{get('gradient_accumulation_steps', 1)}")
    if get("learning_rate") is not None:
        lines.append(f"learning rate {get('learning_rate'):g}")
    if get("max_completion_length") is not None:
        lines.append(f"max completion length {get('max_completion_length')} tokens, "
                     f"temperature {get('temperature', 1.0)}")
    steps = get("max_steps")
    if steps is not None and steps > 0:
        lines.append(f"{steps} optimizer step{'s' if steps != 1 else ''}")
    return lines


def build_model_card(
    algorithm: str,
    *,
    model_name: str,
    base_model: str | None = None,
    hub_model_id: str | None = None,
    dataset_name: str | None = None,
    tags: Iterable[str] = (),
    recipe_yaml: str | None = None,
    eval_results: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
    greso: bool = False,
) -> str:
    """The text of a model card (``README.md``: YAML metadata, then Markdown) for an aapo-trl run.

    Args:
        algorithm: ``"aapo"``, ``"zapo"``, ``"gpg"`` or ``"grpo"``.
        model_name: The name in the title (the repository's name).
        base_model: The Hub id of the model that was fine-tuned (``None`` for a local model).
        hub_model_id: Where the model lives on the Hub (``user/name``), for the usage snippet.
        dataset_name: A registry name (``open-rs``), a Hub id, or ``a+b`` for a mix.
        tags: Extra Hub tags (``aapo-trl``, the algorithm and ``grpo``/``trl`` are always added).
        recipe_yaml: The recipe the run used (:func:`render_recipe`); embedded as a YAML block.
        eval_results: ``{benchmark: pass@1}`` (:func:`read_eval_results`); a table when given and non-empty.
        settings: Flat field values of the run (its recipe/config), for the summary bullets.
        greso: Whether GRESO pre-rollout filtering was on (named and cited).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    algorithm = str(algorithm).strip().lower()
    paper = paper_for(algorithm)
    settings = dict(settings or {})
    repo_id = hub_model_id or model_name
    method = paper.name + (" + GRESO" if greso and algorithm != "zapo" else "")
    all_tags = list(dict.fromkeys(["aapo-trl", "trl", "grpo", algorithm, *(["greso"] if greso else []), *tags]))
    results = dict(eval_results or {})
    card_data = ModelCardData(
        base_model=base_model,
        datasets=_dataset_hub_ids(dataset_name) or None,
        library_name="transformers",
        model_name=model_name,
        tags=all_tags,
        eval_results=[
            EvalResult(task_type="text-generation", dataset_type=benchmark, dataset_name=benchmark,
                       metric_type="pass@1", metric_name="pass@1", metric_value=value)
            for benchmark, value in results.items()
        ] or None,
    )

    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local model"
    on = f" on {_dataset_links(dataset_name)}" if dataset_name else ""
    parts = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# Model Card for {model_name}",
        "",
        f"This model is a fine-tuned version of {source}{on}, trained with **{method}** "
        f"({paper.long_name}) using aapo-trl on top of [TRL](https://github.com/huggingface/trl).",
        "",
        "## Method",
        "",
        f"{paper.summary} Paper: {paper.reference()}."
        + (f" Authors' code: {paper.code_url}." if paper.code_url else ""),
    ]
    if greso:
        parts += ["", f"{GRESO_PAPER.summary} Paper: {GRESO_PAPER.reference()}."]
    details = _algorithm_details(algorithm, settings) + _training_details(settings)
    if details:
        parts += ["", *[f"- {line}" for line in details]]
    parts += [
        "",
        "## Quick start",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'question = "What is the sum of the first 10 positive odd numbers?"',
        f'generator = pipeline("text-generation", model="{repo_id}", device_map="auto")',
        'output = generator([{"role": "user", "content": question}], max_new_tokens=512, return_full_text=False)[0]',
        'print(output["generated_text"])',
        "```",
    ]
    if results:
        parts += [
            "",
            "## Evaluation",
            "",
            f"pass@1 of this checkpoint (from `{EVAL_RESULTS_FILENAME}`):",
            "",
            eval_results_table(results),
        ]
    parts += ["", "## Training procedure", ""]
    if recipe_yaml:
        parts += [
            f"The recipe this model was trained with (also uploaded as `{RECIPE_FILENAME}`):",
            "",
            "```yaml",
            recipe_yaml.rstrip("\n"),
            "```",
            "",
            "Reproduce it with",
            "",
            "```bash",
            f"aapo-trl train --algorithm {algorithm} --config {RECIPE_FILENAME}",
            "```",
        ]
    else:
        parts += ["The recipe of this run was not recorded."]
    parts += [
        "",
        "### Framework versions",
        "",
        f"- aapo-trl: {_package_version('aapo-trl')}",
        f"- TRL: {_package_version('trl')}",
        f"- Transformers: {_package_version('transformers')}",
        f"- PyTorch: {_package_version('torch')}",
        f"- Datasets: {_package_version('datasets')}",
        f"- Tokenizers: {_package_version('tokenizers')}",
        "",
        "## Citations",
        "",
        f"Cite {paper.name} as:",
        "",
        "```bibtex",
        paper.citation,
        "```",
    ]
    if greso:
        parts += ["", "Cite GRESO as:", "", "```bibtex", GRESO_PAPER.citation, "```"]
    parts += ["", "Cite TRL as:", "", "```bibtex", TRL_CITATION, "```", ""]
    text = "\n".join(parts)
    ModelCard(text)  # raises if the metadata block is not valid YAML
    return text


# ---------------------------------------------------------------------------------------------------
# The trainer mixin
# ---------------------------------------------------------------------------------------------------


def _settings_from(recipe_yaml: str | None, args: Any, reward_func_names: Sequence[str] | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args is not None and dataclasses.is_dataclass(args):
        for field in dataclasses.fields(args):
            if field.init and field.name not in SECRET_FIELDS:
                settings[field.name] = getattr(args, field.name, None)
    if recipe_yaml:
        try:
            recipe = yaml.safe_load(recipe_yaml)
        except yaml.YAMLError:
            recipe = None
        if isinstance(recipe, Mapping):
            for key in ("reward_funcs", "dataset_name", "model_name_or_path"):
                if key in recipe:
                    settings[key] = recipe[key]
    if "reward_funcs" not in settings and reward_func_names:
        settings["reward_funcs"] = list(reward_func_names)
    return settings


class ModelCardMixin:
    """Writes aapo-trl's model card (and ``recipe.yaml``) wherever TRL would write its own.

    Mix in first: ``class AAPOTrainer(ModelCardMixin, AdvantageTrainerMixin, GRPOTrainer)``. The algorithm is
    the trainer's ``_name`` (``"AAPO"``, ``"ZAPO"``, ``"GPG"``, ``"GRPO"``). Set :attr:`recipe_yaml` (e.g.
    ``trainer.recipe_yaml = aapo_trl.train.render_recipe(parsed, argv, algorithm)``) to embed the recipe; otherwise the
    output folder's ``recipe.yaml`` is used if there is one, else :func:`recipe_from_config` of the config.
    """

    recipe_yaml: str | None = None

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``README.md`` (and ``recipe.yaml`` when :attr:`recipe_yaml` is set) into ``output_dir``.

        Same signature as TRL's ``_BaseTrainer.create_model_card``; keyword arguments of transformers'
        ``Trainer.create_model_card`` (``language``, ``license``, ...) are accepted and ignored. Runs on the main
        process only.
        """
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe = self.recipe_yaml
        if recipe is not None:
            write_recipe(output_dir, recipe)
        elif (output_dir / RECIPE_FILENAME).is_file():
            recipe = (output_dir / RECIPE_FILENAME).read_text(encoding="utf-8")
        else:
            recipe = recipe_from_config(self.args)
        settings = _settings_from(recipe, self.args, getattr(self, "reward_func_names", None))

        if model_name is None:
            model_name = (self.args.hub_model_id or str(output_dir.resolve())).rstrip("/").split("/")[-1]
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in getattr(self, "_tag_names", []) if tag not in tags]
        base_model = self._card_base_model(settings)
        card = build_model_card(
            getattr(self, "_name", "grpo"),
            model_name=model_name,
            base_model=base_model,
            hub_model_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            dataset_name=dataset_name or settings.get("dataset_name"),
            tags=tags,
            recipe_yaml=recipe,
            eval_results=read_eval_results(output_dir / EVAL_RESULTS_FILENAME),
            settings=settings,
            greso=bool(getattr(self.args, "greso", False)),
        )
        (output_dir / MODEL_CARD_FILENAME).write_text(card, encoding="utf-8")

    def _card_base_model(self, settings: Mapping[str, Any]) -> str | None:
        """TRL's rule (the model config's id unless it is a local folder), then the recipe's model name."""
        model = getattr(self, "model", None)
        config = getattr(model, "config", None)
        candidates = [getattr(config, "_name_or_path", None), settings.get("model_name_or_path")]
        for candidate in candidates:
            base = hub_base_model(candidate)
            if base:
                return base
        return None


__all__ = [
    "EVAL_RESULTS_FILENAME",
    "GRESO_PAPER",
    "MODEL_CARD_FILENAME",
    "ModelCardMixin",
    "PAPERS",
    "Paper",
    "RECIPE_FILENAME",
    "REDACTED",
    "build_model_card",
    "eval_results_table",
    "hub_base_model",
    "paper_for",
    "read_eval_results",
    "recipe_from_config",
    "redact",
    "render_recipe",
    "to_yaml_data",
    "write_recipe",
]
