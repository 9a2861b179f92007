"""Rule-based reward functions for the AAPO / ZAPO recipes, in TRL's reward-function protocol.

Every reward is called as ``fn(completions, solution=None, **kwargs) -> list[float | None]``, one value per
completion. A completion is a plain string or a conversational list of messages
(``[{"role": "assistant", "content": "..."}]``). TRL also passes ``prompts``, ``completion_ids``,
``trainer_state``, ``log_extra``, ``log_metric`` and the dataset's other columns; they are accepted and
ignored where unused. ``None`` means "unscorable" (the gold answer cannot be parsed): TRL turns it into NaN
and the row is left out instead of being rewarded.

Where the values come from:

- ``accuracy``: the AAPO paper's accuracy reward (Appendix C.1: 1 correct, 0 otherwise), graded by
  math-verify the way open-r1 / TRL do (boxed answer first, anchored extraction). A response without a
  boxed answer but with DAPO-Math's ``Answer: ...`` line is graded as DAPO's recipe grades it (verl's
  ``math_dapo``: the normalised answer string must equal the normalised gold; nothing is evaluated).
- ``format``: the AAPO paper's format reward (Appendix C.1, the open-rs recipe): 1 when the response
  contains the delimiter ``"\\n</think>\\n"``.
- ``tag_count``: open-r1's ``tag_count_reward`` (0.25 per tag that appears exactly once).
- ``cosine``: the cosine length-scaled reward of the AAPO paper (Appendix C.1, Eqs. 9-10) with open-r1's
  defaults, with progress clipped to [0, 1] (the authors' code does not clip; see ALGORITHMS.md section 2).
  Its values, ``max_len`` and length unit are the config fields ``cosine_*`` (open-r1's / open-rs's names).
- ``accuracy_zapo``: the ZAPO paper's reward, 1 correct / 0.1 wrong, and 0 when no answer can be
  extracted (as in GRESO's code; ALGORITHMS.md section 3); the config fields ``correct_reward`` /
  ``incorrect_reward`` set the first two.
- ``final_number``: the last number in the completion equals the gold number (TESTBED.md, "Rewards on
  arithmetic"), for the built-in arithmetic dataset.

Unlike the authors' code, an unparseable gold answer gives ``None``, never 1.0.

math-verify 0.5.2 guards its parsing and comparisons with ``signal.alarm`` timeouts. Those fail off the
main thread, and math-verify swallows the error: every LaTeX parse then falls back to a bare string and
every ``verify`` returns False, so every answer would silently score 0. Passing ``None`` as the timeout does
not help in 0.5.2 (``signal.alarm(None)`` raises inside the same swallowed ``try``). This module therefore
wraps math-verify's ``timeout`` decorator once, on import: on the main thread it keeps the timeout; off
the main thread, or with a falsy timeout, it runs the function without one.
"""

from __future__ import annotations

import enum
import functools
import math
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import math_verify.grader
import math_verify.parser
from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

RewardFunc = Callable[..., list]

PARSING_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5

THINK_CLOSE = "\n</think>\n"
TAG_COUNT_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


# --------------------------------------------------------------------------- math-verify timeouts


def _thread_safe_timeout(original: Callable) -> Callable:
    """Wrap math-verify's ``timeout(seconds)`` decorator so that it works off the main thread."""

    def timeout(timeout_seconds=10):
        def decorator(func):
            if not timeout_seconds or threading.current_thread() is not threading.main_thread():
                return func
            return original(timeout_seconds)(func)

        return decorator

    timeout.aapo_original = original
    return timeout


def _install_thread_safe_timeouts() -> None:
    for module in (math_verify.parser, math_verify.grader):
        current = getattr(module, "timeout", None)
        if current is not None and not hasattr(current, "aapo_original"):
            module.timeout = _thread_safe_timeout(current)


_install_thread_safe_timeouts()


# --------------------------------------------------------------------------- completion text


def completion_text(completion: Any) -> str:
    """The text of one completion, plain (``str``) or conversational (a list of messages, or one message).

    Conversational completions: the contents of the assistant messages (a message without a role counts as
    the assistant's), joined by newlines; content given as a list of parts contributes its text parts.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _message_text(completion)
    if isinstance(completion, (list, tuple)):
        return "\n".join(_message_text(m) for m in completion if m.get("role", "assistant") == "assistant")
    raise TypeError(f"A completion must be a string or a list of messages, got {type(completion).__name__}.")


def _message_text(message: dict) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


# --------------------------------------------------------------------------- math-verify grading

# open-r1's answer-side settings: boxed answers first, and no extraction without an anchor ("answer is",
# \boxed{}, ...), so that merely restating the question ("6 + 8") is not read as the answer.
_ANSWER_CONFIG = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            basic_latex=True,
            units=True,
            malformed_operators=False,
            nits=False,
            boxed="all",
            equations=True,
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
]
_GOLD_CONFIG = [LatexExtractionConfig(boxed_match_priority=0)]
_LATEX_ANCHORS = ("$", "\\boxed", "\\fbox", "\\(", "\\[")


class _Grade(enum.Enum):
    CORRECT = "correct"
    WRONG = "wrong"
    NO_ANSWER = "no_answer"
    UNSCORABLE = "unscorable"


def _gold_candidates(gold: str) -> list[str]:
    """Texts to try for a gold answer: a gold with a LaTeX anchor as is; a bare one wrapped.

    A bare gold is wrapped rather than parsed as is: math-verify's plain-expression extraction takes the
    last number of a bare LaTeX string, so "2^{10}" would parse as 2 and "3\\sqrt{3}" as 3.
    """
    if any(anchor in gold for anchor in _LATEX_ANCHORS):
        return [gold]
    return [f"${gold}$", f"\\boxed{{{gold}}}"]


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """math-verify's reading of a gold answer; empty when nothing parses to a sympy object."""
    for text in _gold_candidates(gold):
        parsed = parse(text, _GOLD_CONFIG, extraction_mode="first_match", parsing_timeout=PARSING_TIMEOUT_S)
        if any(not isinstance(item, str) for item in parsed):
            return tuple(parsed)
    return ()


# --------------------------------------------------------------------------- DAPO's ``Answer:`` line

# DAPO-Math-17k's prompt asks for a last line ``Answer: 42`` instead of a boxed answer. DAPO's recipe scores
# that line with verl's ``math_dapo`` reward: the last ``Answer:`` match within the response's last 300
# characters, normalised (Minerva's final-answer normalisation) and compared as a string with the normalised
# gold. An unevaluated ``Answer: 6+8`` therefore does not match 14. What follows re-implements that scorer.
DAPO_ANSWER = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)
DAPO_ANSWER_WINDOW = 300
"""verl's math_dapo looks for the ``Answer:`` line in the last 300 characters of the response only."""

# Applied in this order to the text after the last "=": plain replacements, then words and markup dropped.
_DAPO_REPLACEMENTS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_DAPO_DROPPED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue", "points",
    "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
    "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
    "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)
_DAPO_UNWRAPPED = ("text", "textbf", "overline")  # \text{x} -> x (first closing brace)


def normalize_dapo_answer(answer: str) -> str:
    """A final answer as DAPO's verl reward (``math_dapo.normalize_final_answer``) normalises it.

    Keeps what follows the last ``=``, drops spaces, units and text markup, keeps the first ``$...$``
    span, unwraps ``\\text{}``, ``\\textbf{}``, ``\\overline{}`` and ``\\boxed{}``, expands the
    shorthands ``\\frac12`` and ``\\sqrt2``, and removes thousands separators from an integer. It does not
    evaluate anything: ``6+8`` stays ``6+8`` and ``\\frac{1}{2}`` is not ``1/2``.
    """
    text = answer.split("=")[-1]
    for old, new in _DAPO_REPLACEMENTS:
        text = text.replace(old, new)
    for dropped in _DAPO_DROPPED:
        text = text.replace(dropped, "")
    text = re.sub(r".*?\$(.*?)\$.*", r"$\1$", text)  # per line: only its first $...$ span is kept
    for command in _DAPO_UNWRAPPED:
        text = re.sub(rf"\\{command}\{{(.*?)\}}", r"\1", text)
    text = re.sub(r"\\boxed\{(.*)\}", r"\1", text)  # greedy: up to the last closing brace
    text = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", text)
    text = re.sub(r"sqrt([^{])", r"sqrt{\1}", text)
    text = text.replace("$", "")
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


def _dapo_answer_line(text: str) -> str | None:
    """The last ``Answer:`` line of the response's last 300 characters (DAPO's extraction), or None."""
    found = DAPO_ANSWER.findall(text[-DAPO_ANSWER_WINDOW:])
    return found[-1] if found else None


_BOXED_MARKERS = ("\\boxed", "\\fbox")


def _parse_answer(text: str) -> list:
    """math-verify's reading of the answer: a boxed answer first, else LaTeX after an anchor."""
    return parse(text, _ANSWER_CONFIG, extraction_mode="first_match", parsing_timeout=PARSING_TIMEOUT_S)


def _gold_text(solution: Any) -> str | None:
    if isinstance(solution, str):
        return solution.strip() or None
    if isinstance(solution, (int, float)) and not isinstance(solution, bool):
        return str(solution)
    return None


def _grade(text: str, solution: Any) -> _Grade:
    """Boxed answers (and anchored LaTeX) by math-verify; a response without a box but with DAPO's
    ``Answer:`` line by DAPO's own scorer (normalised string match, :func:`normalize_dapo_answer`)."""
    gold_text = _gold_text(solution)
    gold = _parse_gold(gold_text) if gold_text is not None else ()
    if not gold:
        return _Grade.UNSCORABLE
    answer_line = None if any(marker in text for marker in _BOXED_MARKERS) else _dapo_answer_line(text)
    if answer_line is not None:
        correct = normalize_dapo_answer(answer_line) == normalize_dapo_answer(gold_text)
        return _Grade.CORRECT if correct else _Grade.WRONG
    answer = _parse_answer(text)
    if not answer:
        return _Grade.NO_ANSWER
    try:
        correct = verify(list(gold), answer, timeout_seconds=VERIFY_TIMEOUT_S)
    except Exception:
        correct = False
    return _Grade.CORRECT if correct else _Grade.WRONG


def _solutions(solution: Any, completions: Sequence, reward_name: str) -> list:
    if solution is None:
        raise ValueError(f"The reward {reward_name!r} needs the dataset's `solution` column (one per completion).")
    if isinstance(solution, (str, bytes)) or len(solution) != len(completions):
        raise ValueError(f"The reward {reward_name!r} needs one `solution` per completion ({len(completions)}).")
    return list(solution)


def _grades(completions: Sequence, solution: Any, reward_name: str) -> list[_Grade]:
    golds = _solutions(solution, completions, reward_name)
    return [_grade(completion_text(c), gold) for c, gold in zip(completions, golds)]


# --------------------------------------------------------------------------- rewards


GOLD_COLUMNS = ("solution",)
"""Dataset columns a gold-answer reward reads; exposed as ``required_columns`` so trainers check them up front."""


def _registered_as(name: str, required_columns: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Give a reward function the name TRL logs it under (``rewards/<name>/mean``) and its dataset needs."""

    def rename(func: Callable) -> Callable:
        func.__name__ = name
        func.required_columns = required_columns
        return func

    return rename


@_registered_as("accuracy", GOLD_COLUMNS)
def accuracy_reward(completions: Sequence, solution: Sequence | None = None, **kwargs) -> list[float | None]:
    """1.0 when the answer verifies against the gold, else 0.0; None for an unparseable gold.

    AAPO paper, Appendix C.1 ("assigns a binary reward of 1 for correct response and 0 otherwise"); the
    grading is open-r1's / TRL's math-verify accuracy reward: the boxed answer first, LaTeX only after an
    anchor, so restating "6 + 8" does not score for gold 14 (TESTBED.md). A verification error gives 0.0.
    An answer equal to the gold as an expression does score (``\\boxed{6 + 8}`` for 14): on arithmetic,
    where that restates the question, ``final_number`` is the reward that cannot be gamed this way.
    Without a boxed answer, an ``Answer: ...`` line (DAPO-Math's format) is compared as a normalised string
    (:func:`normalize_dapo_answer`), as DAPO's own scorer does: ``Answer: 6+8`` is wrong for 14.
    """
    values = {_Grade.CORRECT: 1.0, _Grade.WRONG: 0.0, _Grade.NO_ANSWER: 0.0, _Grade.UNSCORABLE: None}
    return [values[g] for g in _grades(completions, solution, "accuracy")]


@_registered_as("format")
def format_reward(completions: Sequence, **kwargs) -> list[float]:
    """1.0 when the completion contains ``"\\n</think>\\n"`` exactly once, else 0.0.

    AAPO paper, Appendix C.1: a binary format reward for "containing the delimiter sequence \\n</think>\\n"
    (the open-rs recipe the paper trains DeepSeek-R1-Distill-Qwen-1.5B with).
    """
    return [1.0 if completion_text(c).count(THINK_CLOSE) == 1 else 0.0 for c in completions]


OPEN_R1_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE)


@_registered_as("open_r1_format")
def open_r1_format_reward(completions: Sequence, **kwargs) -> list[float]:
    """1.0 when the completion is ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>``, else 0.0.

    open-r1's ``format_reward`` (``re.match`` with DOTALL | MULTILINE, as there). Not the AAPO authors' ``format``,
    which only asks for the ``\\n</think>\\n`` delimiter (see :func:`format_reward`); ``aapo-trl migrate-recipe``
    says which is which.
    """
    return [1.0 if OPEN_R1_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


@_registered_as("tag_count")
def tag_count_reward(completions: Sequence, **kwargs) -> list[float]:
    """0.25 for each of ``<think>\\n``, ``\\n</think>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` seen exactly once.

    open-r1's ``tag_count_reward`` (values 0.0, 0.25, ..., 1.0).
    """
    texts = [completion_text(c) for c in completions]
    return [0.25 * sum(text.count(tag) == 1 for tag in TAG_COUNT_TAGS) for text in texts]


COSINE_LENGTH_UNITS = ("tokens", "characters")
"""What the cosine reward's ``max_len`` counts: completion tokens, or characters as open-r1 / open-rs do."""


class _CosineReward:
    """Callable, not a closure, so that it pickles (TRL may send reward functions to another process)."""

    def __init__(self, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct, max_len, length_unit):
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}.")
        if length_unit not in COSINE_LENGTH_UNITS:
            raise ValueError(f"length_unit must be one of {COSINE_LENGTH_UNITS}, got {length_unit!r}.")
        self.__name__ = "cosine"
        self.required_columns = GOLD_COLUMNS
        self.min_value_wrong, self.max_value_wrong = min_value_wrong, max_value_wrong
        self.min_value_correct, self.max_value_correct = min_value_correct, max_value_correct
        self.max_len, self.length_unit = max_len, length_unit

    def parameters(self) -> dict[str, Any]:
        """The arguments of :func:`make_cosine_reward` this reward was built with."""
        return {
            "min_value_wrong": self.min_value_wrong, "max_value_wrong": self.max_value_wrong,
            "min_value_correct": self.min_value_correct, "max_value_correct": self.max_value_correct,
            "max_len": self.max_len, "length_unit": self.length_unit,
        }

    def value(self, correct: bool, length: int) -> float:
        """The reward of one graded completion of ``length`` units."""
        progress = min(max(length / self.max_len, 0.0), 1.0)
        if correct:  # short and correct: max_value_correct; max_len and beyond: min_value_correct
            short, long = self.max_value_correct, self.min_value_correct
        else:  # short and wrong: min_value_wrong; max_len and beyond: max_value_wrong
            short, long = self.min_value_wrong, self.max_value_wrong
        return long + 0.5 * (short - long) * (1.0 + math.cos(progress * math.pi))

    def lengths(self, completions: Sequence, completion_ids: Sequence | None) -> list[int]:
        if self.length_unit == "tokens" and completion_ids is not None:
            return [len(ids) for ids in completion_ids]
        if self.length_unit == "tokens":
            warnings.warn("cosine reward: no completion_ids given, measuring length in characters.", stacklevel=3)
        return [len(completion_text(c)) for c in completions]

    def __call__(self, completions, solution=None, completion_ids=None, **kwargs) -> list[float | None]:
        grades = _grades(completions, solution, "cosine")
        lengths = self.lengths(completions, completion_ids)
        return [
            None if g is _Grade.UNSCORABLE else self.value(g is _Grade.CORRECT, n)
            for g, n in zip(grades, lengths, strict=True)
        ]

    def __repr__(self) -> str:
        return f"make_cosine_reward(max_len={self.max_len}, length_unit={self.length_unit!r}, ...)"


def make_cosine_reward(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
    length_unit: str = "tokens",
) -> RewardFunc:
    """The cosine length-scaled reward (AAPO paper Appendix C.1, Eqs. 9-10; defaults from open-r1).

        progress = clip(len / max_len, 0, 1)
        reward   = v_long + (v_short - v_long) * (1 + cos(pi * progress)) / 2

    with (v_short, v_long) = (max_value_correct, min_value_correct) for a correct answer (short correct
    answers earn more) and (min_value_wrong, max_value_wrong) for a wrong one or no answer (short wrong
    answers are penalised more; open-rs's min_value_wrong 0.0 reverses that). Correctness is the ``accuracy``
    check; an unparseable gold gives None. ``length_unit="tokens"`` counts ``completion_ids`` (characters when
    they are not given), ``"characters"`` counts characters (as open-r1 / open-rs, whose code measures
    ``len(content)``). The progress is clipped: the authors' code does not clip, so past max_len its cosine
    climbs back and rewards very long completions. The function's ``__name__`` is "cosine". In training, the
    config fields ``cosine_*`` set these arguments (``REWARD_SETTINGS``).
    """
    return _CosineReward(min_value_wrong, max_value_wrong, min_value_correct, max_value_correct, max_len, length_unit)


class _ThreeLevelReward:
    """Correct / wrong / no answer mapped to three values (ZAPO's 1 / 0.1 / 0). Callable, not a closure, so it pickles."""

    def __init__(self, name: str, grader: Callable, correct: float, incorrect: float, no_answer: float):
        self.__name__ = name
        self.required_columns = GOLD_COLUMNS
        self.grader = grader
        self.values = {_Grade.CORRECT: correct, _Grade.WRONG: incorrect, _Grade.NO_ANSWER: no_answer}

    def parameters(self) -> dict[str, Any]:
        """The arguments of its ``make_*_zapo_reward`` factory this reward was built with."""
        return {"correct": self.values[_Grade.CORRECT], "incorrect": self.values[_Grade.WRONG],
                "no_answer": self.values[_Grade.NO_ANSWER]}

    def __call__(self, completions, solution=None, **kwargs) -> list[float | None]:
        return [self.values.get(g) for g in self.grader(completions, solution, self.__name__)]

    def __repr__(self) -> str:
        values = ", ".join(f"{g.value}={v}" for g, v in self.values.items())
        return f"{self.__name__}({values})"


def make_accuracy_zapo_reward(correct: float = 1.0, incorrect: float = 0.1, no_answer: float = 0.0) -> RewardFunc:
    """The ZAPO paper's reward: 1 correct, 0.1 wrong, 0 when no answer can be extracted; None: bad gold.

    The paper sets 1 / 0.1 (its Section 3, following DeepSeek-R1 / DAPO); 0 for a response with no
    extractable (boxed-first, anchored) answer follows GRESO's code (ALGORITHMS.md section 3). Correctness is
    the ``accuracy`` check. The function's ``__name__`` is "accuracy_zapo".
    """
    return _ThreeLevelReward("accuracy_zapo", _grades, correct, incorrect, no_answer)


_NUMBER = re.compile(r"(?:(?<![\w)\]])[-+])?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def _to_decimal(number: str) -> Decimal:
    return Decimal(number.replace(",", ""))


def _gold_number(solution: Any) -> Decimal | None:
    if isinstance(solution, bool):
        return None
    if isinstance(solution, int):
        return Decimal(solution)
    if isinstance(solution, float):
        return Decimal(repr(solution)) if math.isfinite(solution) else None
    if isinstance(solution, str) and _NUMBER.fullmatch(solution.strip()):
        return _to_decimal(solution.strip())
    return None


def _last_number(text: str) -> Decimal | None:
    numbers = _NUMBER.findall(text)
    return _to_decimal(numbers[-1]) if numbers else None


def _final_number_grades(completions: Sequence, solution: Any, reward_name: str) -> list[_Grade]:
    golds = _solutions(solution, completions, reward_name)
    grades = []
    for completion, gold in zip(completions, golds):
        target = _gold_number(gold)
        found = _last_number(completion_text(completion)) if target is not None else None
        if target is None:
            grades.append(_Grade.UNSCORABLE)
        elif found is None:
            grades.append(_Grade.NO_ANSWER)
        else:
            grades.append(_Grade.CORRECT if found == target else _Grade.WRONG)
    return grades


@_registered_as("final_number", GOLD_COLUMNS)
def final_number_reward(completions: Sequence, solution: Sequence | None = None, **kwargs) -> list[float | None]:
    """1.0 when the last number in the completion equals the gold number, else 0.0; None: gold not a number.

    TESTBED.md, "Rewards on arithmetic": the reward that trained the tiny model on the built-in arithmetic
    dataset. Numbers are integers or decimals with an optional sign (a "-" right after a letter, digit or
    closing bracket is an operator, not a sign) and optional thousands separators ("1,234"); they are
    compared exactly as decimals, so "14.0" equals 14.
    """
    values = {_Grade.CORRECT: 1.0, _Grade.WRONG: 0.0, _Grade.NO_ANSWER: 0.0}
    return [values.get(g) for g in _final_number_grades(completions, solution, "final_number")]


def make_final_number_zapo_reward(correct: float = 1.0, incorrect: float = 0.1, no_answer: float = 0.0) -> RewardFunc:
    """ZAPO's three-level reward (1 / 0.1 / 0) graded like ``final_number``: for the built-in arithmetic set.

    "No answer" means the completion contains no number at all. The function's ``__name__`` is
    "final_number_zapo".
    """
    return _ThreeLevelReward("final_number_zapo", _final_number_grades, correct, incorrect, no_answer)


class _SoftOverlongPunishment:
    """TRL's soft overlong punishment (``trl.rewards.get_soft_overlong_punishment``, DAPO Eq. 13) under the name
    aapo-trl registers it as, with the arguments it was built with. Callable, not a closure, so it pickles."""

    __name__ = "soft_overlong_punishment"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        from trl.rewards import get_soft_overlong_punishment

        for name, value in (("max_completion_length", max_completion_len), ("soft_punish_cache", soft_punish_cache)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"soft_overlong_punishment: {name} must be a positive token count, got {value!r}")
        if soft_punish_cache > max_completion_len:
            raise ValueError(
                f"soft_overlong_punishment: soft_punish_cache ({soft_punish_cache}) must not exceed "
                f"max_completion_length ({max_completion_len}): the penalty ramps over the last soft_punish_cache "
                "tokens"
            )
        self.trl_reward = get_soft_overlong_punishment(max_completion_len, soft_punish_cache)

    def parameters(self) -> dict[str, Any]:
        return {"max_completion_len": self.trl_reward.max_completion_len,
                "soft_punish_cache": self.trl_reward.soft_punish_cache}

    def __call__(self, completion_ids, **kwargs) -> list[float]:
        return self.trl_reward(completion_ids)

    def __repr__(self) -> str:
        return f"soft_overlong_punishment({self.parameters()})"


def make_soft_overlong_punishment(max_completion_len: int = 20480, soft_punish_cache: int = 4096) -> RewardFunc:
    """DAPO's overlong reward shaping (Yu et al. 2025, Sec. 3.4, Eq. 13), computed by TRL's reward: 0 up to
    ``max_completion_len - soft_punish_cache`` tokens, then a linear ramp to -1 at ``max_completion_len``.

    Defaults: the DAPO paper's 16,384 expected tokens + 4,096 soft punish cache (Sec. 4.1); a config builds it
    from ``max_completion_length`` and ``soft_punish_cache``. verl calls the cache ``overlong_buffer.len``.
    """
    return _SoftOverlongPunishment(max_completion_len, soft_punish_cache)


# --------------------------------------------------------------------------- registry

REWARD_REGISTRY: dict[str, RewardFunc] = {
    func.__name__: func
    for func in (
        accuracy_reward,
        format_reward,
        open_r1_format_reward,
        tag_count_reward,
        make_cosine_reward(),
        make_accuracy_zapo_reward(),
        final_number_reward,
        make_final_number_zapo_reward(),
        make_soft_overlong_punishment(),
    )
}


REWARD_SETTINGS: dict[str, tuple[Callable[..., RewardFunc], dict[str, str]]] = {
    "cosine": (make_cosine_reward, {
        "cosine_min_value_wrong": "min_value_wrong",
        "cosine_max_value_wrong": "max_value_wrong",
        "cosine_min_value_correct": "min_value_correct",
        "cosine_max_value_correct": "max_value_correct",
        "cosine_max_len": "max_len",
        "cosine_length_unit": "length_unit",
    }),
    "accuracy_zapo": (make_accuracy_zapo_reward, {"correct_reward": "correct", "incorrect_reward": "incorrect"}),
    "final_number_zapo": (
        make_final_number_zapo_reward, {"correct_reward": "correct", "incorrect_reward": "incorrect"}
    ),
    "soft_overlong_punishment": (
        make_soft_overlong_punishment,
        {"max_completion_length": "max_completion_len", "soft_punish_cache": "soft_punish_cache"},
    ),
}
"""The registered rewards that take parameters: their factory, and which config field sets which argument.

The fields are those of ``aapo_trl.configs.RewardArguments`` (in every aapo-trl config), named as open-r1 /
open-rs name their script arguments (``cosine_max_len``, ...) and as ZAPOConfig names its reward values.
"""


def build_reward(name: str, settings: Any = None) -> RewardFunc:
    """The registered reward ``name``, built from ``settings`` (a config, or any object with the fields of
    :data:`REWARD_SETTINGS`) when it takes parameters; fields ``settings`` lacks keep the factory's default."""
    if name not in REWARD_REGISTRY:
        known = ", ".join(sorted(REWARD_REGISTRY))
        raise ValueError(f"Unknown reward function {name!r}; known: {known}.")
    if settings is None or name not in REWARD_SETTINGS:
        return REWARD_REGISTRY[name]
    factory, fields = REWARD_SETTINGS[name]
    return factory(**{argument: getattr(settings, f) for f, argument in fields.items() if hasattr(settings, f)})


def check_reward_settings(func: Any, settings: Any) -> None:
    """A parametrised reward passed as a function must have the values its config fields state.

    Otherwise the config (and the recipe written into the model card) would describe a reward that is not
    the one trained with. Raises a ValueError naming each field that differs.
    """
    name = getattr(func, "__name__", None)
    if settings is None or name not in REWARD_SETTINGS or not hasattr(func, "parameters"):
        return
    _, fields = REWARD_SETTINGS[name]
    actual = func.parameters()
    differing = [
        f"{f}={getattr(settings, f)!r} (the function has {argument}={actual[argument]!r})"
        for f, argument in fields.items()
        if hasattr(settings, f) and argument in actual and actual[argument] != getattr(settings, f)
    ]
    if differing:
        raise ValueError(
            f"the reward function {name!r} was built with other values than the config states: "
            f"{'; '.join(differing)}. Pass the name {name!r} in reward_funcs to build it from the config, or set "
            "these config fields to the function's values."
        )


def get_reward_funcs(names: list[str] | str, settings: Any = None) -> list[RewardFunc]:
    """The registered reward functions for ``names`` (a list, or one name / comma-separated names).

    Rewards that take parameters (:data:`REWARD_SETTINGS`) are built from ``settings``, e.g. the training
    config; without it they have their defaults.
    """
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if not names:
        raise ValueError(f"No reward function named; known: {', '.join(sorted(REWARD_REGISTRY))}.")
    unknown = [name for name in names if name not in REWARD_REGISTRY]
    if unknown:
        known = ", ".join(sorted(REWARD_REGISTRY))
        raise ValueError(f"Unknown reward function(s) {', '.join(map(repr, unknown))}; known: {known}.")
    return [build_reward(name, settings) for name in names]


__all__ = [
    "COSINE_LENGTH_UNITS",
    "PARSING_TIMEOUT_S",
    "REWARD_REGISTRY",
    "REWARD_SETTINGS",
    "TAG_COUNT_TAGS",
    "THINK_CLOSE",
    "VERIFY_TIMEOUT_S",
    "accuracy_reward",
    "build_reward",
    "check_reward_settings",
    "completion_text",
    "final_number_reward",
    "format_reward",
    "get_reward_funcs",
    "make_accuracy_zapo_reward",
    "make_soft_overlong_punishment",
    "make_cosine_reward",
    "normalize_dapo_answer",
    "tag_count_reward",
]


# --------------------------------------------------------------------------- failure handling


class RewardFunctionError(RuntimeError):
    """A reward function raised while scoring a batch; names the function, the row and the exception."""


class GuardedReward:
    """Wraps a reward function so that a failure names its row and non-finite rewards become unscorable.

    ``on_error="error"``: an exception is re-raised as :class:`RewardFunctionError` naming the function,
    the row index in the batch (found by re-scoring row by row) and the original exception.
    ``on_error="unscorable"``: the failing rows become ``None`` (unscorable: advantage 0) and their share
    is logged as ``reward_errors/<name>/frac`` through TRL's ``log_metric`` side channel. NaN or
    infinite rewards are always made ``None`` (logged as ``reward_nonfinite/<name>/frac``).
    """

    def __init__(self, func: RewardFunc, on_error: str = "error"):
        if on_error not in ("error", "unscorable"):
            raise ValueError(f"on_error must be 'error' or 'unscorable', got {on_error!r}")
        self.func = func
        self.on_error = on_error
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        self.required_columns = tuple(getattr(func, "required_columns", ()))

    def __call__(self, completions, **kwargs) -> list[float | None]:
        try:
            rewards = list(self.func(completions=completions, **kwargs))
            errors = 0
        except Exception as batch_error:  # find the row(s); a reward may fail for reasons unrelated to one row
            rewards, errors = self._row_by_row(completions, kwargs, batch_error)
        nonfinite = 0
        for index, value in enumerate(rewards):
            if value is not None and not math.isfinite(float(value)):
                rewards[index], nonfinite = None, nonfinite + 1
        log_metric = kwargs.get("log_metric")
        if log_metric is not None and completions:
            if self.on_error == "unscorable":
                log_metric(f"reward_errors/{self.__name__}/frac", errors / len(completions))
            log_metric(f"reward_nonfinite/{self.__name__}/frac", nonfinite / len(completions))
        return rewards

    def _row_by_row(self, completions, kwargs, batch_error: Exception) -> tuple[list, int]:
        rewards, errors = [], 0
        for index in range(len(completions)):
            row_kwargs = {
                key: value[index : index + 1] if isinstance(value, list) and len(value) == len(completions) else value
                for key, value in kwargs.items()
            }
            try:
                (value,) = self.func(completions=completions[index : index + 1], **row_kwargs)
            except Exception as row_error:
                if self.on_error == "error":
                    raise RewardFunctionError(
                        f"reward function {self.__name__!r} failed on row {index} of the batch "
                        f"(completion {completion_text(completions[index])[:200]!r}): "
                        f"{type(row_error).__name__}: {row_error}. Fix the function or the row, or set "
                        "reward_errors='unscorable' to score such rows as None (advantage 0)."
                    ) from row_error
                value, errors = None, errors + 1
            rewards.append(value)
        if errors == 0 and self.on_error == "error":  # no single row reproduces it: report the batch failure
            raise RewardFunctionError(
                f"reward function {self.__name__!r} failed on the batch but on no single row: "
                f"{type(batch_error).__name__}: {batch_error}"
            ) from batch_error
        return rewards, errors

    def __repr__(self) -> str:
        return f"GuardedReward({self.func!r}, on_error={self.on_error!r})"
