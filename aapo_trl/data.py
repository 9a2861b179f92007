"""Prompt datasets for AAPO/ZAPO training: the papers' datasets by name, and a built-in offline set.

Everything returned here is in TRL's *conversational* prompt format, ready for
``trl.GRPOTrainer``:

* ``prompt``   -- a list of messages: an optional ``{"role": "system", ...}`` followed by one
  ``{"role": "user", ...}`` (the recipe's wording wrapped around the question);
* ``solution`` -- the gold *final answer* as a string (``"14"``, ``"\\frac{1}{2}"``), which is what
  the reward functions compare a completion against; ``""`` when no gold answer could be
  extracted (the rewards then return ``None``: unscorable);
* ``row_id``   -- a stable integer: the row's index in the split as loaded, before any level
  filter, de-duplication or sub-sampling (GRESO keys its per-prompt history on it);
* ``level``    -- the difficulty label as a string (``"3"`` for MATH "Level 3" or SimpleRL's ``3``,
  ``"Hard"`` for open-rs, ``"add1"`` for the arithmetic set, ``""`` when the dataset has none);
* ``question`` -- the bare problem text, without the recipe's instructions.

The papers' datasets (see :data:`DATASET_SPECS`)
-----------------------------------------------
``open-rs`` (``knoveleng/open-rs``)
    AAPO's DeepSeek-R1-Distill-Qwen-1.5B run (AAPO paper Sec. 6.1 and App. C.2; Dang & Ngo 2025).
    Columns ``problem, solution, answer, level`` (``level`` is ``"Easy"``/``"Hard"``); the gold is
    ``answer`` (falling back to the last ``\\boxed{}`` of ``solution``). The system prompt is the
    one in the AAPO repository's ``open-rs/configs/AAPO.yaml`` (the open-rs ``recipes/grpo.yaml``
    prompt), and the user message is the bare ``problem``, as in ``make_conversation`` of
    ``open-rs/AAPO.py`` and open-rs's ``src/open_r1/grpo.py``.
``simplelr_qwen_level3to5`` / ``simplelr_abel_level3to5`` (``hkust-nlp/SimpleRL-Zoo-Data``)
    AAPO's Qwen2.5-Math-7B and Llama-3.2 runs (AAPO App. C.2; Zeng et al. 2025). MATH levels 3-5
    in two prompt formats (simpleRL-reason README: "simpler prompts (abel) and complex prompts
    (qwen)"). Columns ``question, gt_answer, level (int), subject, target, prompt, data_source,
    ability, reward_model, extra_info``; ``prompt[0]["content"]`` is the question already
    rendered into a text template. We rebuild that template as messages: for "qwen" the
    Qwen2.5-Math ``qwen-boxed`` template (system "You are a helpful assistant.", the user message
    is the question followed by "Please reason step by step, and put your final answer within
    \\boxed{}."), which renders to the same text under Qwen's chat template; for "abel" the
    ``abel`` template ("Question:\\n...\\nAnswer:\\nLet's think step by step.\\n") with no system
    message (AAPO App. C.2: "There is no extra system prompt added when training Llama series
    models"). The gold is ``gt_answer``. AAPO's own loader (``open-r1/AAPO.py``) feeds the
    pre-rendered string as a plain-text prompt and ignores its YAML ``system_prompt``; the
    upstream string is reported to contain a literal ``\\boxed{{}}`` (an unformatted template),
    which we do not reproduce.
``dapo-math-17k`` (``BytedTsinghua-SIA/DAPO-Math-17k``)
    ZAPO's training data (ZAPO App. B, following GRESO). verl schema: ``prompt`` is a list with one
    user message holding DAPO's instruction around the problem, the gold is
    ``reward_model["ground_truth"]`` (an integer as a string). The user message keeps DAPO's
    wording (:data:`DAPO_USER_TEMPLATE`, which asks for a final line ``Answer: N``, not
    ``\\boxed{}``); no system message. The Hub parquet repeats its ~17k problems many times, so
    rows are de-duplicated by question text by default (the first occurrence keeps its
    ``row_id``).
``math-lighteval`` (``DigitalLearningGmbH/MATH-lighteval``) and ``math-lighteval-level3to5``
    ZAPO's second training set ("Light-eval", 7.5k problems). Columns ``problem, level ("Level
    3"), type, solution``; the gold is the content of the last ``\\boxed{...}`` of ``solution``
    (balanced braces, see :func:`extract_last_boxed`). The user message is verl's
    ``examples/data_preprocess/lighteval_math.py`` wording (the script GRESO's
    ``train-scripts/generate_dataset.sh`` runs): the problem followed by "Let's think step by step
    and output the final answer within \\boxed{}.". ``math-lighteval-level3to5`` applies
    SimpleRL's "level3to5" filter (MATH Level 3-5) by default.

The built-in arithmetic set
---------------------------
:func:`make_arithmetic_dataset` procedurally generates small integer problems, from easiest to
hardest :data:`ARITHMETIC_LEVELS`. It needs no files or network and is where SmolLM2-135M-Instruct
measurably learns (1-digit arithmetic; benchmarks/README.md, "Why 1-digit arithmetic"). Because the model rarely writes
``\\boxed{}`` unprompted, each user message carries a short instruction and one worked example
(:data:`ARITHMETIC_USER_TEMPLATE`).

Nothing here touches the network at import time; only :func:`load_prompt_dataset` with a Hub name
(and no local path of that name) downloads.
"""

from __future__ import annotations

import dataclasses

import json
import logging
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "ARITHMETIC_LEVELS",
    "ARITHMETIC_NAME",
    "ARITHMETIC_PROMPT_STYLES",
    "ARITHMETIC_USER_TEMPLATE",
    "DAPO_PROMPT_PREFIX",
    "DAPO_PROMPT_SUFFIX",
    "DAPO_USER_TEMPLATE",
    "DATASET_SPECS",
    "DEFAULT_ARITHMETIC_LEVELS",
    "DatasetSpec",
    "MATH_LIGHTEVAL_USER_TEMPLATE",
    "OPEN_R1_SYSTEM_PROMPT",
    "OPEN_RS_SYSTEM_PROMPT",
    "QWEN_BOXED_INSTRUCTION",
    "SIMPLERL_ABEL_USER_TEMPLATE",
    "SIMPLERL_QWEN_SYSTEM_PROMPT",
    "SIMPLERL_QWEN_USER_TEMPLATE",
    "UnscorableRowsWarning",
    "arithmetic_level_size",
    "extract_last_boxed",
    "filter_levels",
    "get_dataset_spec",
    "load_dataset_mixture",
    "load_prompt_dataset",
    "make_arithmetic_dataset",
    "map_rows",
    "normalize_level",
    "validate_columns",
]

QUESTION_PLACEHOLDER = "{question}"

# --------------------------------------------------------------------------------------------
# The recipes' prompts
# --------------------------------------------------------------------------------------------

#: System prompt of AAPO's open-rs run (JianxXiong/AAPO ``open-rs/configs/AAPO.yaml``), which is
#: the open-rs recipe's (knoveleng/open-rs ``recipes/grpo.yaml``). Kept verbatim, including the
#: literal ``\boxed{{}}`` the YAML passes through (the model saw exactly this text).
OPEN_RS_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer, and put your final answer within \\boxed{{}} . The "
    "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. Note that respond by English, NOT use other languages."
)

#: The open-r1 system prompt set in AAPO's ``open-r1/configs/AAPO.yaml`` for the SimpleRL run.
#: AAPO's ``make_conversation_math35`` never uses it (the SimpleRL prompt is pre-rendered); it is
#: exported for completeness, not used as any recipe's default.
OPEN_R1_SYSTEM_PROMPT = (
    "You are a helpful AI Assistant, designed to provided well-reasoned and detailed responses. "
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "user with the answer. The reasoning process MUST BE enclosed within <think> and </think> tags."
)

#: The Qwen-math boxed instruction (Qwen2.5-Math evaluation templates, used by SimpleRL-Zoo).
QWEN_BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

#: System message of the ``qwen-boxed`` template that SimpleRL-Zoo's "qwen" data is rendered with.
SIMPLERL_QWEN_SYSTEM_PROMPT = "You are a helpful assistant."

#: User message of the ``qwen-boxed`` template: the question, a newline, the boxed instruction.
SIMPLERL_QWEN_USER_TEMPLATE = "{question}\n" + QWEN_BOXED_INSTRUCTION

#: The ``abel`` template of SimpleRL-Zoo's "abel" data (a plain-text prompt, no system message).
SIMPLERL_ABEL_USER_TEMPLATE = "Question:\n{question}\nAnswer:\nLet's think step by step.\n"

#: DAPO-Math-17k's instruction, verbatim from the dataset's ``prompt`` column.
DAPO_PROMPT_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_PROMPT_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
DAPO_USER_TEMPLATE = DAPO_PROMPT_PREFIX + "{question}" + DAPO_PROMPT_SUFFIX

#: verl ``examples/data_preprocess/lighteval_math.py``: the problem, a space, this instruction.
MATH_LIGHTEVAL_USER_TEMPLATE = (
    "{question} Let's think step by step and output the final answer within \\boxed{}."
)


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


class UnscorableRowsWarning(UserWarning):
    """Some rows have no extractable gold answer; their ``solution`` is ``""`` (reward: None)."""


_BOX_MACROS = ("\\boxed", "\\fbox")


def extract_last_boxed(text: Any) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    ``"... so $\\boxed{\\frac{1}{2}}$."`` gives ``"\\frac{1}{2}"``. The brace-less form
    ``\\boxed 5`` (found in a few MATH solutions) gives ``"5"`` (up to the next ``$``). Returns
    ``None`` when there is no box, the braces never close, or the box is empty. Same behaviour as
    the ``last_boxed_only_string`` + ``remove_boxed`` pair of the MATH/verl tooling.
    """
    if not isinstance(text, str):
        return None
    start, macro = max((text.rfind(m), m) for m in _BOX_MACROS)
    if start < 0:
        return None
    i = start + len(macro)
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        if i == start + len(macro):  # e.g. "\boxedx": another macro, not a box
            return None
        content = text[i:].split("$", 1)[0].strip()
        return content or None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1 : j].strip()
                return content or None
    return None  # unbalanced


_LEVEL_PATTERN = re.compile(r"level\s*(\d+)", re.IGNORECASE)


def normalize_level(value: Any) -> str:
    """A difficulty label as a comparable string: ``"Level 3"``, ``3`` and ``"3"`` all give ``"3"``.

    Other labels are kept as written (``"Hard"``, ``"add1"``, ``"Level ?"``); ``None`` gives ``""``.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    match = _LEVEL_PATTERN.fullmatch(text)
    return match.group(1) if match else text


def _level_key(value: Any) -> str:
    return normalize_level(value).lower()


def _first_user_content(prompt: Any) -> str | None:
    """Content of the first user message of a list of messages (verl / TRL conversational)."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, (list, tuple)):
        return None
    for message in prompt:
        if isinstance(message, Mapping) and message.get("role", "user") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


def _as_answer(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple)):  # verl sometimes stores a list of accepted answers
        value = value[0] if len(value) == 1 else None
        return _as_answer(value)
    text = str(value).strip()
    return text or None


# --------------------------------------------------------------------------------------------
# Per-dataset extractors
# --------------------------------------------------------------------------------------------


def _question_from_column(column: str) -> Callable[[Mapping[str, Any]], str | None]:
    def extract(row: Mapping[str, Any]) -> str | None:
        value = row.get(column)
        return value.strip() if isinstance(value, str) and value.strip() else None

    return extract


def _question_from_dapo_prompt(row: Mapping[str, Any]) -> str | None:
    content = _first_user_content(row.get("prompt"))
    if content is None:
        return None
    if content.startswith(DAPO_PROMPT_PREFIX):
        content = content[len(DAPO_PROMPT_PREFIX) :]
    if content.endswith(DAPO_PROMPT_SUFFIX):
        content = content[: -len(DAPO_PROMPT_SUFFIX)]
    content = content.strip()
    return content or None


def _answer_open_rs(row: Mapping[str, Any]) -> str | None:
    return _as_answer(row.get("answer")) or extract_last_boxed(row.get("solution"))


def _answer_simplerl(row: Mapping[str, Any]) -> str | None:
    answer = _as_answer(row.get("gt_answer"))
    if answer is None and isinstance(row.get("reward_model"), Mapping):
        answer = _as_answer(row["reward_model"].get("ground_truth"))
    return answer or _as_answer(row.get("target"))


def _answer_from_reward_model(row: Mapping[str, Any]) -> str | None:
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping):
        return None
    return _as_answer(reward_model.get("ground_truth"))


def _answer_math(row: Mapping[str, Any]) -> str | None:
    return extract_last_boxed(row.get("solution"))


def _sniff_simplerl_qwen(row: Mapping[str, Any]) -> bool:
    content = _first_user_content(row.get("prompt")) or ""
    return "<|im_start|>" in content or "\\boxed" in content


def _sniff_simplerl_abel(row: Mapping[str, Any]) -> bool:
    content = _first_user_content(row.get("prompt")) or ""
    return content.lstrip().startswith("Question:") and "<|im_start|>" not in content


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset becomes conversational prompts plus a gold ``solution``.

    Attributes:
        name: Registry name (also accepted: everything in ``aliases``).
        hub_id: Hugging Face Hub dataset id.
        description: One line, with the paper/repository it comes from.
        question_column: Column the question is read from (for messages columns, the first user
            message's content, with the recipe's wording stripped by ``question_fn``).
        answer_column: Column the gold answer is read from (``answer_fn`` may fall back on others).
        required_columns: Checked by :func:`validate_columns` before any mapping.
        schema_columns: Every column of the Hub schema; used to recognise a local file's format.
        question_fn: Row -> bare question text (``None`` if missing).
        answer_fn: Row -> gold final answer (``None`` if it cannot be extracted).
        system_prompt: Default system message (``None``: the recipe has no system message).
        user_template: Default user message; ``{question}`` is replaced by the question (plain
            replacement, so LaTeX braces elsewhere in the template need no escaping).
        level_column: Column with the difficulty label, if any.
        default_levels: Level filter applied when ``levels`` is not given (``None``: keep all).
        default_split: Split loaded when none is given.
        hub_data_dir: Folder inside the Hub repository holding the split files.
        hub_data_files: ``str.format`` pattern (``data_dir``, ``split``) of a split's file.
        deduplicate: De-duplicate rows by question text by default.
        sniff: Row -> whether this row looks like this format (breaks schema ties).
        source: Where the prompt and the column choices come from.
    """

    name: str
    hub_id: str
    description: str
    question_column: str
    answer_column: str
    required_columns: tuple[str, ...]
    schema_columns: tuple[str, ...]
    question_fn: Callable[[Mapping[str, Any]], str | None]
    answer_fn: Callable[[Mapping[str, Any]], str | None]
    system_prompt: str | None = None
    user_template: str = QUESTION_PLACEHOLDER
    level_column: str | None = None
    default_levels: tuple[Any, ...] | None = None
    default_split: str = "train"
    hub_data_dir: str | None = None
    hub_data_files: str | None = None
    deduplicate: bool = False
    aliases: tuple[str, ...] = ()
    sniff: Callable[[Mapping[str, Any]], bool] | None = None
    source: str = ""


_SIMPLERL_SCHEMA = (
    "question",
    "gt_answer",
    "level",
    "subject",
    "target",
    "prompt",
    "data_source",
    "ability",
    "reward_model",
    "extra_info",
)

_SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="open-rs",
        hub_id="knoveleng/open-rs",
        description="open-rs (7k, Dang & Ngo 2025): AAPO's DeepSeek-R1-Distill-Qwen-1.5B run",
        question_column="problem",
        answer_column="answer",
        required_columns=("problem", "answer"),
        schema_columns=("problem", "solution", "answer", "level"),
        question_fn=_question_from_column("problem"),
        answer_fn=_answer_open_rs,
        system_prompt=OPEN_RS_SYSTEM_PROMPT,
        level_column="level",
        aliases=("knoveleng/open-rs", "openrs"),
        source="JianxXiong/AAPO open-rs/configs/AAPO.yaml + open-rs/AAPO.py make_conversation",
    ),
    DatasetSpec(
        name="simplelr_qwen_level3to5",
        hub_id="hkust-nlp/SimpleRL-Zoo-Data",
        description="SimpleRL-Zoo MATH L3-5, qwen-boxed format: AAPO's Qwen2.5-Math-7B run",
        question_column="question",
        answer_column="gt_answer",
        required_columns=("question", "gt_answer"),
        schema_columns=_SIMPLERL_SCHEMA,
        question_fn=_question_from_column("question"),
        answer_fn=_answer_simplerl,
        system_prompt=SIMPLERL_QWEN_SYSTEM_PROMPT,
        user_template=SIMPLERL_QWEN_USER_TEMPLATE,
        level_column="level",
        hub_data_dir="simplelr_qwen_level3to5",
        hub_data_files="{data_dir}/{split}.parquet",
        aliases=(
            "SimpleRL-Zoo-Data/simplelr_qwen_level3to5",
            "hkust-nlp/SimpleRL-Zoo-Data/simplelr_qwen_level3to5",
        ),
        sniff=_sniff_simplerl_qwen,
        source="hkust-nlp/simpleRL-reason README; Qwen2.5-Math evaluation 'qwen-boxed' template",
    ),
    DatasetSpec(
        name="dapo-math-17k",
        hub_id="BytedTsinghua-SIA/DAPO-Math-17k",
        description="DAPO-Math-17k (Yu et al. 2025): ZAPO's training data (with MATH-lighteval)",
        question_column="prompt",
        answer_column="reward_model",
        required_columns=("prompt", "reward_model"),
        schema_columns=("data_source", "prompt", "ability", "reward_model", "extra_info"),
        question_fn=_question_from_dapo_prompt,
        answer_fn=_answer_from_reward_model,
        system_prompt=None,
        user_template=DAPO_USER_TEMPLATE,
        deduplicate=True,
        aliases=("BytedTsinghua-SIA/DAPO-Math-17k", "dapo-math", "dapo_math", "dapo"),
        source="the dataset's own prompt column (BytedTsinghua-SIA/DAPO-Math-17k)",
    ),
    DatasetSpec(
        name="math-lighteval",
        hub_id="DigitalLearningGmbH/MATH-lighteval",
        description="MATH (Hendrycks et al. 2021), 7.5k train / 5k test: ZAPO's 'Light-eval' set",
        question_column="problem",
        answer_column="solution",
        required_columns=("problem", "solution"),
        schema_columns=("problem", "level", "type", "solution"),
        question_fn=_question_from_column("problem"),
        answer_fn=_answer_math,
        system_prompt=None,
        user_template=MATH_LIGHTEVAL_USER_TEMPLATE,
        level_column="level",
        aliases=("DigitalLearningGmbH/MATH-lighteval", "lighteval-math", "light-eval", "lighteval"),
        source="verl examples/data_preprocess/lighteval_math.py (run by GRESO generate_dataset.sh)",
    ),
)

_SIMPLERL_QWEN, _MATH_LIGHTEVAL = _SPECS[1], _SPECS[3]
_SPECS += (
    dataclasses.replace(
        _SIMPLERL_QWEN,
        name="simplelr_abel_level3to5",
        description="SimpleRL-Zoo MATH L3-5, abel format: AAPO's Llama-3.2-1B/3B-Instruct runs",
        system_prompt=None,
        user_template=SIMPLERL_ABEL_USER_TEMPLATE,
        hub_data_dir="simplelr_abel_level3to5",
        aliases=(
            "SimpleRL-Zoo-Data/simplelr_abel_level3to5",
            "hkust-nlp/SimpleRL-Zoo-Data/simplelr_abel_level3to5",
            "simplelr_able_level3to5",  # the AAPO paper's spelling (App. C.2)
        ),
        sniff=_sniff_simplerl_abel,
        source="hkust-nlp/simpleRL-reason README; 'abel' template; AAPO App. C.2 (no system prompt)",
    ),
    dataclasses.replace(
        _MATH_LIGHTEVAL,
        name="math-lighteval-level3to5",
        description="MATH Level 3-5 (SimpleRL-Zoo's 'level3to5' filter) in the lighteval wording",
        required_columns=("problem", "solution", "level"),
        default_levels=(3, 4, 5),
        aliases=("math_level3to5",),
        source="hkust-nlp/simpleRL-reason README (Hard = MATH lv.3-5)",
    ),
)

#: Registry name -> :class:`DatasetSpec`. Names are also accepted with ``_``/``-`` swapped, in any
#: case, and as the Hub ids / paths listed in each spec's ``aliases``.
DATASET_SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}

#: Name of the built-in procedural dataset in :func:`load_prompt_dataset`.
ARITHMETIC_NAME = "arithmetic"


def _norm_name(name: str) -> str:
    return str(name).strip().strip("/").lower().replace("_", "-")


_ALIASES: dict[str, str] = {}
for _spec in _SPECS:
    for _alias in (_spec.name, *_spec.aliases):
        _ALIASES[_norm_name(_alias)] = _spec.name


def get_dataset_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The :class:`DatasetSpec` of a registry name, alias or Hub id (``KeyError`` lists names)."""
    if isinstance(name, DatasetSpec):
        return name
    key = _ALIASES.get(_norm_name(name))
    if key is None:
        raise KeyError(
            f"Unknown dataset {name!r}. Known: {sorted(DATASET_SPECS)} and {ARITHMETIC_NAME!r} "
            "(or pass a local folder/JSON/JSONL/Parquet file)."
        )
    return DATASET_SPECS[key]


# --------------------------------------------------------------------------------------------
# Validation, mapping, filtering
# --------------------------------------------------------------------------------------------


def validate_columns(
    dataset, spec: str | DatasetSpec, dataset_label: str | None = None, *, need_level: bool = False
) -> None:
    """Raise a ``ValueError`` naming the dataset and the missing columns, listing those present."""
    spec = get_dataset_spec(spec)
    present = list(dataset.column_names)
    required = list(spec.required_columns)
    if need_level and spec.level_column and spec.level_column not in required:
        required.append(spec.level_column)
    missing = [column for column in required if column not in present]
    if missing:
        label = dataset_label or spec.name
        raise ValueError(
            f"Dataset {label!r} (read as the {spec.name!r} format, Hub {spec.hub_id}) is missing "
            f"required column(s) {missing}; columns present: {present}. Pass "
            f"dataset_format=<one of {sorted(DATASET_SPECS)}> if the format was guessed wrong."
        )


def _build_prompt(question: str, system_prompt: str | None, user_template: str) -> list[dict]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    user_message = user_template.replace(QUESTION_PLACEHOLDER, question)
    messages.append({"role": "user", "content": user_message})
    return messages


def _output_features():
    from datasets import Features, Value

    return Features(
        {
            "prompt": [{"role": Value("string"), "content": Value("string")}],
            "solution": Value("string"),
            "row_id": Value("int64"),
            "level": Value("string"),
            "question": Value("string"),
        }
    )


def map_rows(
    dataset,
    spec: str | DatasetSpec,
    system_prompt: str | None = None,
    *,
    user_template: str | None = None,
    dataset_label: str | None = None,
):
    """Map rows in ``spec``'s Hub schema to the conversational columns (see the module doc).

    Pure apart from the warning: no loading, filtering or sub-sampling. ``system_prompt`` ``None``
    uses the recipe's default, ``""`` drops the system message, any other string replaces it;
    ``user_template`` likewise (it must contain ``{question}``). ``row_id`` is the row's index in
    ``dataset`` unless the dataset already has a ``row_id`` column, which is kept.

    Rows without an extractable gold answer (or question) are kept with ``solution == ""`` and
    counted in one :class:`UnscorableRowsWarning`; if no row at all is usable, ``ValueError``.
    All original columns are dropped.
    """
    spec = get_dataset_spec(spec)
    label = dataset_label or spec.name
    validate_columns(dataset, spec, label)
    system = spec.system_prompt if system_prompt is None else system_prompt
    template = spec.user_template if user_template is None else user_template
    if QUESTION_PLACEHOLDER not in template:
        raise ValueError(f"user_template must contain {QUESTION_PLACEHOLDER!r}; got {template!r}")
    has_row_id = "row_id" in dataset.column_names
    level_column = spec.level_column if spec.level_column in dataset.column_names else None

    def convert(row: dict, index: int) -> dict:
        question = spec.question_fn(row)
        answer = spec.answer_fn(row) if question is not None else None
        return {
            "prompt": _build_prompt(question or "", system, template),
            "solution": answer or "",
            "row_id": int(row["row_id"]) if has_row_id else index,
            "level": normalize_level(row.get(level_column)) if level_column else "",
            "question": question or "",
        }

    mapped = dataset.map(
        convert,
        with_indices=True,
        remove_columns=list(dataset.column_names),
        features=_output_features(),
        desc=f"Formatting {label}",
    )
    if len(mapped) == 0:
        return mapped
    unusable = sum(1 for solution in list(mapped["solution"]) if solution == "")
    if unusable == len(mapped):
        raise ValueError(
            f"Dataset {label!r}: no gold answer could be extracted from any of its {len(mapped)} "
            f"rows (format {spec.name!r}, answer from column {spec.answer_column!r}). Is this the "
            "right dataset_format?"
        )
    if unusable:
        message = (
            f"Dataset {label!r}: {unusable} of {len(mapped)} rows have no extractable gold answer "
            f"(column {spec.answer_column!r}); kept with solution='' (unscorable)."
        )
        warnings.warn(message, UnscorableRowsWarning, stacklevel=2)
        logger.warning(message)
    return mapped


def filter_levels(dataset, levels: Iterable[Any] | None, *, dataset_label: str = "dataset"):
    """Keep rows whose ``level`` (after :func:`normalize_level`) is one of ``levels``.

    ``levels=None`` keeps everything. Accepts ints, ``"3"``, ``"Level 3"``, ``"Hard"``
    (case-insensitive). ``ValueError`` if the dataset has no level labels or nothing is left.
    """
    if levels is None:
        return dataset
    if isinstance(levels, (str, int)):
        levels = [levels]
    wanted = {_level_key(level) for level in levels}
    labels = list(dataset["level"]) if "level" in dataset.column_names else []
    if not any(labels):
        raise ValueError(
            f"Dataset {dataset_label!r} has no level labels; cannot filter by {levels!r}."
        )
    keep = [i for i, level in enumerate(labels) if level.lower() in wanted]
    if not keep:
        present = sorted(set(labels))
        raise ValueError(
            f"Dataset {dataset_label!r}: no row has a level in {sorted(wanted)}; "
            f"levels present: {present}."
        )
    return dataset.select(keep)


def _deduplicate(dataset, dataset_label: str):
    seen: set[str] = set()
    keep = []
    for index, question in enumerate(list(dataset["question"])):
        key = " ".join(question.split())
        if key not in seen:
            seen.add(key)
            keep.append(index)
    if len(keep) < len(dataset):
        dropped = len(dataset) - len(keep)
        logger.info(
            "%s: dropped %d duplicate questions, %d left",
            dataset_label,
            dropped,
            len(keep),
        )
        dataset = dataset.select(keep)
    return dataset


def _subsample(dataset, max_samples: int | None, seed: int):
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    chosen = sorted(random.Random(seed).sample(range(len(dataset)), max_samples))
    return dataset.select(chosen)


# --------------------------------------------------------------------------------------------
# Loading (local files or the Hub)
# --------------------------------------------------------------------------------------------

_DATA_EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def _split_files(folder: Path, split: str) -> list[Path]:
    patterns = []
    for ext in _DATA_EXTENSIONS:
        patterns += [f"{split}{ext}", f"{split}-*{ext}", f"data/{split}{ext}"]
        patterns += [f"data/{split}-*{ext}", f"{split}/*{ext}"]
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found
    data_files = sorted(
        p for p in folder.rglob("*") if p.suffix in _DATA_EXTENSIONS and p.is_file()
    )
    found_names = [str(p.relative_to(folder)) for p in data_files]
    if len(data_files) == 1:
        return data_files
    raise FileNotFoundError(
        f"No {split!r} split in {folder}: expected e.g. {split}.jsonl / {split}.parquet / "
        f"data/{split}-*.parquet; data files found: {found_names}"
    )


def _load_local(path: Path, split: str):
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise FileNotFoundError(f"No split {split!r} in {path}; splits: {list(loaded)}")
            return loaded[split]
        return loaded
    files = [path] if path.is_file() else _split_files(path, split)
    builders = {_DATA_EXTENSIONS.get(f.suffix) for f in files}
    if None in builders or len(builders) != 1:
        names = [str(f) for f in files]
        raise ValueError(f"Cannot read {names}: use .jsonl, .json or .parquet files.")
    return datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")


def _load_hub(spec: DatasetSpec, split: str, data_dir: str | None, config: str | None = None):
    import datasets

    data_dir = data_dir or spec.hub_data_dir
    if spec.hub_data_files:
        if config not in DEFAULT_CONFIGS:
            raise ValueError(
                f"dataset_config={config!r}: {spec.name} is read from its files ({spec.hub_data_files}), which "
                "have no configurations; remove dataset_config."
            )
        data_files = {split: spec.hub_data_files.format(data_dir=data_dir, split=split)}
        return datasets.load_dataset(spec.hub_id, data_files=data_files, split=split)
    named = {} if config is None else {"name": config}
    if data_dir:
        return datasets.load_dataset(spec.hub_id, data_dir=data_dir, split=split, **named)
    return datasets.load_dataset(spec.hub_id, split=split, **named)


DEFAULT_CONFIGS = (None, "default")
"""``dataset_config`` values that name a dataset's only (default) configuration."""


def with_question_column(spec: DatasetSpec, column: str | None) -> DatasetSpec:
    """``spec`` reading its question from ``column`` (open-r1's ``dataset_prompt_column``), its user message still
    built with the format's template; ``spec`` itself when ``column`` is ``None`` or already its question column."""
    if column is None or column == spec.question_column:
        return spec
    required = (column, *(name for name in spec.required_columns if name != spec.question_column))
    return dataclasses.replace(spec, question_column=column, question_fn=_question_from_column(column),
                               required_columns=required)


def _spec_from_path(path: Path) -> DatasetSpec | None:
    """A registry name among the path's last components (``.../open-rs/train.jsonl``)."""
    candidates = [path.stem, path.name, *[parent.name for parent in list(path.parents)[:3]]]
    for candidate in candidates:
        key = _ALIASES.get(_norm_name(candidate))
        if key:
            return DATASET_SPECS[key]
    return None


def _infer_spec(dataset, label: str) -> DatasetSpec:
    """The registry format whose schema the dataset's columns match best."""
    present = set(dataset.column_names)
    scored = []
    for spec in _SPECS:
        if spec.default_levels is not None:  # filtered variants are only chosen by name
            continue
        if set(spec.required_columns) <= present:
            scored.append((len(set(spec.schema_columns) & present), spec))
    if not scored:
        raise ValueError(
            f"Dataset {label!r} matches no known format: columns present {sorted(present)}. "
            "Required "
            f"columns per format: { {s.name: list(s.required_columns) for s in _SPECS} }. "
            "Pass dataset_format=<name>."
        )
    best = max(score for score, _ in scored)
    tied = [spec for score, spec in scored if score == best]
    if len(tied) > 1 and len(dataset) > 0:
        first = dataset[0]
        sniffed = [spec for spec in tied if spec.sniff is not None and spec.sniff(first)]
        if len(sniffed) == 1:
            tied = sniffed
    if len(tied) > 1:
        raise ValueError(
            f"Dataset {label!r} matches several formats {[s.name for s in tied]}; "
            "pass dataset_format=."
        )
    return tied[0]


def load_prompt_dataset(
    name_or_path: str | Path,
    split: str | None = None,
    system_prompt: str | None = None,
    levels: Iterable[Any] | str | int | None = None,
    data_dir: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    *,
    dataset_format: str | None = None,
    user_template: str | None = None,
    deduplicate: bool | None = None,
    config: str | None = None,
    question_column: str | None = None,
    **arithmetic_kwargs: Any,
):
    """Load a training/eval prompt set as a ``datasets.Dataset`` in TRL's conversational format.

    Args:
        name_or_path: ``"arithmetic"`` (the built-in set); a registry name, alias or Hub id from
            :data:`DATASET_SPECS` (downloaded from the Hub unless a local path of that name
            exists); or a local folder / ``.jsonl`` / ``.json`` / ``.parquet`` file in the Hub
            dataset's schema (its format comes from ``dataset_format``, else a registry name in
            the path, else the columns).
        split: Split to load (``None``: the format's default, ``"train"``). A folder is searched
            for ``{split}.jsonl|json|parquet``, ``{split}-*.parquet``, ``data/{split}-*`` ...
        system_prompt: ``None``: the recipe's system prompt; ``""``: no system message.
        levels: Keep only these difficulty levels (``[3, 4, 5]``, ``["Hard"]``, ``["add1"]``);
            ``None``: the format's default filter (none, except ``math-lighteval-level3to5``;
            for ``"arithmetic"``: :data:`DEFAULT_ARITHMETIC_LEVELS`); ``"all"``: no filter
            (every arithmetic level).
        data_dir: Folder inside the Hub repository (SimpleRL-Zoo-Data's subsets); local: unused.
        max_samples: Keep a seeded random subset of this many rows (original order kept).
        seed: Seed for ``max_samples`` and for the arithmetic generator.
        dataset_format: Registry name of a local file's schema, when it cannot be inferred.
        user_template: Replace the recipe's user message (must contain ``{question}``).
        deduplicate: Drop repeated questions (``None``: the format's default; on for DAPO).
        config: The Hub dataset's configuration (TRL's ``dataset_config``, ``load_dataset``'s ``name``); a local
            path or a dataset read from its files takes only ``None`` / ``"default"``.
        question_column: Read the question from this column instead of the format's (open-r1's
            ``dataset_prompt_column``); the user message is still built with the format's template.
        **arithmetic_kwargs: Passed to :func:`make_arithmetic_dataset` (``num_train``,
            ``num_test``, ``prompt_style``, ``on_overflow``) for ``"arithmetic"``.

    Returns:
        ``datasets.Dataset`` with ``prompt``, ``solution``, ``row_id``, ``level``, ``question``.
    """
    if str(name_or_path).strip().lower() == ARITHMETIC_NAME:
        if config not in DEFAULT_CONFIGS or question_column is not None:
            raise ValueError("the arithmetic dataset has no configurations or columns to choose: remove "
                             "dataset_config / dataset_prompt_column.")
        if levels is None:
            levels = DEFAULT_ARITHMETIC_LEVELS
        elif isinstance(levels, str) and levels == "all":
            levels = ARITHMETIC_LEVELS
        dataset_dict = make_arithmetic_dataset(
            levels=levels,
            seed=seed,
            system_prompt=system_prompt,
            **arithmetic_kwargs,
        )
        split = split or "train"
        if split not in dataset_dict:
            raise KeyError(
                f"The arithmetic dataset has splits {list(dataset_dict)}, not {split!r}."
            )
        dataset = dataset_dict[split]
        if max_samples is not None and max_samples < len(dataset):
            dataset = dataset.select(range(max_samples))  # rows are already in a seeded order
        return dataset
    if arithmetic_kwargs:
        raise TypeError(f"Unexpected arguments for {name_or_path!r}: {sorted(arithmetic_kwargs)}")

    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        if config not in DEFAULT_CONFIGS:
            raise ValueError(f"dataset_config={config!r} names a Hub configuration, but {path} is a local path.")
        spec = get_dataset_spec(dataset_format) if dataset_format else _spec_from_path(path)
        split = split or (spec.default_split if spec else "train")
        raw = _load_local(path, split)
        label = str(path)
        spec = spec or _infer_spec(raw, label)
    else:
        spec = get_dataset_spec(dataset_format or str(name_or_path))
        split = split or spec.default_split
        hub_dir = data_dir or spec.hub_data_dir
        label = spec.hub_id + (f"/{hub_dir}" if hub_dir else "")
        raw = _load_hub(spec, split, data_dir, config)
    label = f"{label} [{split}]"
    spec = with_question_column(spec, question_column)

    level_filter = spec.default_levels if levels is None else (None if levels == "all" else levels)
    validate_columns(raw, spec, label, need_level=level_filter is not None)
    dataset = map_rows(raw, spec, system_prompt, user_template=user_template, dataset_label=label)
    dataset = filter_levels(dataset, level_filter, dataset_label=label)
    if spec.deduplicate if deduplicate is None else deduplicate:
        dataset = _deduplicate(dataset, label)
    return _subsample(dataset, max_samples, seed)


# --------------------------------------------------------------------------------------------
# The built-in arithmetic dataset
# --------------------------------------------------------------------------------------------

#: Levels from easiest to hardest (docs/RESULTS.md, section 1: the difficulty mix).
ARITHMETIC_LEVELS: tuple[str, ...] = (
    "add1", "sub1", "mul1", "add2", "sub2", "mul12", "mul22", "lineq"
)

#: The 1-digit levels: where SmolLM2-135M-Instruct learns on CPU (TESTBED.md); add1 alone has only
#: ~100 distinct problems, so subtraction and multiplication are mixed in for variety.
DEFAULT_ARITHMETIC_LEVELS: tuple[str, ...] = ("add1", "sub1", "mul1")

#: Instruction per prompt style. "boxed" suits the boxed-first accuracy reward; "plain" the
#: last-integer reward.
ARITHMETIC_PROMPT_STYLES: dict[str, str] = {
    "boxed": "Solve the problem. Write the final answer as a single integer inside \\boxed{}.",
    "plain": "Solve the problem. End your reply with the final answer as a single integer.",
}

#: The user message: instruction, one worked example of the same level, then the problem.
ARITHMETIC_USER_TEMPLATE = (
    "{instruction}\n\nExample:\nQuestion: {example_question}\nAnswer: {example_answer}\n\n"
    "Question: {question}\nAnswer:"
)

_OPERATORS = {"add": "+", "sub": "-", "mul": "*"}

# Level -> (operand ranges / generator parameters, worked example operands). The worked example is
# excluded from the level's pool so that it never appears as a problem.
_ARITHMETIC_EXAMPLES: dict[str, tuple[int, ...]] = {
    "add1": (3, 4),
    "sub1": (8, 3),
    "mul1": (4, 2),
    "add2": (23, 45),
    "sub2": (74, 28),
    "mul12": (3, 21),
    "mul22": (12, 31),
    "lineq": (2, 3, 4),  # 2x + 3 = 11, x = 4
}


def _arithmetic_pool(level: str) -> list[tuple[int, ...]]:
    """Every distinct problem of a level, in a fixed order (the order defines ``row_id``)."""
    one, two = range(10), range(10, 100)
    if level == "add1":
        return [(a, b) for a in one for b in one]
    if level == "sub1":
        return [(a, b) for a in one for b in one if a >= b]
    if level == "mul1":
        return [(a, b) for a in one for b in one]
    if level == "add2":
        return [(a, b) for a in two for b in two]
    if level == "sub2":
        return [(a, b) for a in two for b in two if a >= b]
    if level == "mul12":
        return [(a, b) for a in range(2, 10) for b in two]
    if level == "mul22":
        return [(a, b) for a in two for b in two]
    if level == "lineq":  # a*x + b = c with a in 2..9, x in 0..12, b in 1..20
        return [(a, b, x) for a in range(2, 10) for b in range(1, 21) for x in range(13)]
    raise ValueError(f"Unknown arithmetic level {level!r}; levels: {ARITHMETIC_LEVELS}")


def _render_problem(level: str, operands: tuple[int, ...]) -> tuple[str, int, str]:
    """(question text, integer answer, worked solution text without the final-answer part)."""
    if level == "lineq":
        a, b, x = operands
        c = a * x + b
        work = f"{a}x = {c} - {b} = {c - b}, so x = {c - b} / {a} = {x}."
        return f"Solve for x: {a}x + {b} = {c}.", x, work
    a, b = operands
    op = _OPERATORS[level.rstrip("0123456789")]
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", answer, f"{a} {op} {b} = {answer}."


def _final_answer_text(style: str, answer: int) -> str:
    return f"The answer is \\boxed{{{answer}}}." if style == "boxed" else f"The answer is {answer}."


def _arithmetic_user_message(level: str, question: str, style: str) -> str:
    example = _ARITHMETIC_EXAMPLES[level]
    example_question, example_answer, example_work = _render_problem(level, example)
    replacements = {
        "{instruction}": ARITHMETIC_PROMPT_STYLES[style],
        "{example_question}": example_question,
        "{example_answer}": f"{example_work} {_final_answer_text(style, example_answer)}",
        "{question}": question,
    }
    message = ARITHMETIC_USER_TEMPLATE
    for placeholder, value in replacements.items():
        message = message.replace(placeholder, value)
    return message


def arithmetic_level_size(level: str) -> int:
    """How many distinct problems a level has (its worked example excluded)."""
    return len(_arithmetic_pool(level)) - 1


def make_arithmetic_dataset(
    levels: Sequence[str] | str = DEFAULT_ARITHMETIC_LEVELS,
    num_train: int | None = None,
    num_test: int = 20,
    seed: int = 0,
    system_prompt: str | None = None,
    prompt_style: str = "boxed",
    on_overflow: str = "warn",
):
    """A procedural, seeded arithmetic dataset with disjoint ``train`` and ``test`` splits.

    Each level's distinct problems are enumerated, the level's worked example is removed, and the
    rest is shuffled with ``seed``: the first ``num_test`` go to ``test``, the next ``num_train``
    (``None``: all remaining) to ``train``. So no problem is in both splits, no problem repeats, and
    the test split does not depend on ``num_train``. Levels (:data:`ARITHMETIC_LEVELS`, easiest
    first): ``add1``/``sub1``/``mul1`` 1-digit (sub1 non-negative; 100/55/100 problems less the
    example), ``add2``/``sub2`` 2-digit, ``mul12`` 1-digit (2-9) times 2-digit, ``mul22``
    2x2-digit, ``lineq`` ``a x + b = c`` with integer ``x`` in 0..12.

    Args:
        levels: Level names (one string or a sequence).
        num_train: Train problems *per level* (``None``: all not used by ``test``).
        num_test: Test problems per level.
        seed: Seeds the shuffles; same seed, same rows.
        system_prompt: ``None`` or ``""``: no system message (SmolLM2's chat template then adds
            its own default one); a string: that system message.
        prompt_style: ``"boxed"`` (asks for ``\\boxed{N}``) or ``"plain"``; see
            :data:`ARITHMETIC_PROMPT_STYLES`.
        on_overflow: When ``num_test + num_train`` exceeds a level's problems: ``"warn"`` caps
            ``train`` with a warning, ``"error"`` raises. ``num_test`` alone above the level's
            size always raises.

    Returns:
        ``datasets.DatasetDict`` with ``train`` and ``test``; columns ``prompt``, ``solution``
        (the integer as a string), ``level``, ``row_id`` (level index * 100000 + the problem's
        index in its level's enumeration: stable across seeds and sizes), ``question``.
    """
    from datasets import Dataset, DatasetDict

    if isinstance(levels, str):
        levels = [levels]
    levels = list(dict.fromkeys(levels))
    if not levels:
        raise ValueError("levels must name at least one arithmetic level")
    unknown = [level for level in levels if level not in ARITHMETIC_LEVELS]
    if unknown:
        raise ValueError(
            f"Unknown arithmetic level(s) {unknown}; levels: {list(ARITHMETIC_LEVELS)}"
        )
    if prompt_style not in ARITHMETIC_PROMPT_STYLES:
        raise ValueError(
            f"prompt_style must be one of {sorted(ARITHMETIC_PROMPT_STYLES)}, got {prompt_style!r}"
        )
    if on_overflow not in ("warn", "error"):
        raise ValueError(f"on_overflow must be 'warn' or 'error', got {on_overflow!r}")
    if num_test < 0 or (num_train is not None and num_train < 0):
        raise ValueError("num_train and num_test must be >= 0")

    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for level in levels:
        level_index = ARITHMETIC_LEVELS.index(level)
        pool = _arithmetic_pool(level)
        example = _ARITHMETIC_EXAMPLES[level]
        candidates = [index for index, operands in enumerate(pool) if operands != example]
        random.Random(f"aapo_trl.arithmetic:{seed}:{level}").shuffle(candidates)
        available = len(candidates)
        if num_test > available:
            raise ValueError(
                f"Arithmetic level {level!r} has only {available} distinct problems; "
                f"num_test={num_test} is more than that."
            )
        left = available - num_test
        n_train = left if num_train is None else num_train
        if n_train > left:
            message = (
                f"Arithmetic level {level!r} has only {available} distinct problems: "
                f"num_test={num_test} + num_train={num_train} do not fit, at most {left} train "
                "problems do"
            )
            if on_overflow == "error":
                raise ValueError(message + ".")
            message += f"; train capped at {left}."
            warnings.warn(message, UserWarning, stacklevel=2)
            logger.warning(message)
            n_train = left
        chosen = {"test": candidates[:num_test], "train": candidates[num_test : num_test + n_train]}
        for split_name, indices in chosen.items():
            for index in indices:
                question, answer, _ = _render_problem(level, pool[index])
                user_message = _arithmetic_user_message(level, question, prompt_style)
                splits[split_name].append(
                    {
                        "prompt": _build_prompt(user_message, system_prompt, QUESTION_PLACEHOLDER),
                        "solution": str(answer),
                        "level": level,
                        "row_id": level_index * 100_000 + index,
                        "question": question,
                    }
                )

    features = _output_features()
    result = {}
    for split_name, rows in splits.items():
        random.Random(f"aapo_trl.arithmetic:{seed}:{split_name}").shuffle(rows)
        if not rows:
            message = f"The arithmetic {split_name!r} split is empty."
            warnings.warn(message, UserWarning, stacklevel=2)
        result[split_name] = Dataset.from_list(rows, features=features)
    return DatasetDict(result)


MIXTURE_SEPARATOR = "+"
MIXTURE_ROW_ID_STRIDE = 10_000_000
"""Row ids of the k-th dataset of a mixture are ``k * MIXTURE_ROW_ID_STRIDE + row_id``: unique and stable."""


def load_dataset_mixture(names: str | Sequence[str], **kwargs: Any):
    """Several prompt sets concatenated, e.g. ``"dapo-math-17k+math-lighteval"`` (ZAPO trains on both).

    Each part is loaded with :func:`load_prompt_dataset` and the same keyword arguments (its own recipe
    prompt unless ``system_prompt``/``user_template`` override it); ``row_id`` stays unique and stable
    across the parts (:data:`MIXTURE_ROW_ID_STRIDE`), which GRESO's per-prompt history relies on. A
    single name is simply :func:`load_prompt_dataset`.
    """
    from datasets import concatenate_datasets

    parts = names.split(MIXTURE_SEPARATOR) if isinstance(names, str) else list(names)
    parts = [part.strip() for part in parts if part.strip()]
    if not parts:
        raise ValueError(f"no dataset name in {names!r}")
    if len(parts) == 1:
        return load_prompt_dataset(parts[0], **kwargs)
    loaded = []
    for index, part in enumerate(parts):
        dataset = load_prompt_dataset(part, **kwargs)
        if len(dataset) >= MIXTURE_ROW_ID_STRIDE:
            raise ValueError(f"{part} has {len(dataset)} rows, more than a mixture supports ({MIXTURE_ROW_ID_STRIDE})")
        loaded.append(dataset.map(lambda row, k=index: {"row_id": k * MIXTURE_ROW_ID_STRIDE + row["row_id"]}))
    return concatenate_datasets(loaded)
