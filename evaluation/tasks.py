"""lighteval 0.13 custom tasks for the AAPO / ZAPO evaluation: AIME24, MATH-500, AMC23, Minerva and
OlympiadBench, defined as the AAPO repository's ``open-rs/evaluate.py`` (open-rs's and open-r1's
``src/open_r1/evaluate.py``) defines them, scored pass@1 / pass@k from ``n`` samples per problem.

Kept from that definition (the papers' protocol), see ``evaluation/benchmarks.py``:

* the datasets: ``HuggingFaceH4/aime_2024`` (train), ``HuggingFaceH4/MATH-500`` (test),
  ``knoveleng/AMC-23``, ``knoveleng/Minerva-Math``, ``knoveleng/OlympiadBench`` (train);
* the prompt: one user message, ``MATH_QUERY_TEMPLATE`` around the problem (lighteval applies the
  model's chat template; no system prompt unless the runner is given one);
* the scoring: lighteval's extractive match (math-verify), the prediction extracted as an expression
  or as LaTeX with ``\\boxed{}`` first, ``fallback_mode="first_match"``, precision 5; the gold read as
  an *expression* for AIME24 / AMC23 (their ``answer`` column) and as *LaTeX* for the others
  (MATH-500's and Minerva's ``solution``, OlympiadBench's ``answer``);
* the generation budget: ``generation_size`` 32768 tokens.

Changed, and why:

* task names carry an ``aapo_`` prefix (``aapo_aime24`` ...), so they never collide with lighteval's
  built-ins (``aime24``, ``math_500``, ...);
* the metric scores each of the ``n`` samples of a problem once and reports ``pass@1`` (the mean over
  the samples) and the unbiased ``pass@k`` (Chen et al., 2021) for every k in {8, 16, 32, 64} with
  ``k <= n`` (AAPO Table 7 samples 64). With ``n = 1``, ``pass@1`` is exactly the open-rs metric;
* golds that are numbers are turned into text (the extraction only reads ``str``);
* the dataset location is configurable, so the tasks run offline on a local copy.

lighteval's own CLI also runs them, with the ``eval`` extra (which pins ``huggingface_hub<2`` for it):
``lighteval accelerate "model_name=PATH" "aapo_math_500|0" --custom-tasks evaluation/tasks.py`` (task
names ``aapo_aime24|0`` ...), configured through these environment variables
(``tests/test_lighteval_cli.py``); its transformers backend generates greedily (it never turns
sampling on, so ``AAPO_EVAL_NUM_SAMPLES`` above 1 fails there). Its start-up imports every built-in
task, which fetches two files unless they are already there (``evaluation/README.md``, "lighteval's
own CLI"); ``evaluation/run.py`` and ``aapo-trl eval`` load only this module. lighteval's ``vllm``
command does not run (its vLLM backend needs vllm<0.10.2): use ``aapo-trl eval --backend vllm``.

``AAPO_EVAL_DATA_DIR``            folder with one sub-folder per benchmark key (``aime24/`` ...)
``AAPO_EVAL_DATASET_<KEY>``       a local folder or Hub id for one benchmark (``AAPO_EVAL_DATASET_AIME24``)
``AAPO_EVAL_NUM_SAMPLES``         samples per problem (default 1)
``AAPO_EVAL_GENERATION_SIZE``     maximum new tokens (default 32768)
``AAPO_EVAL_SCORING``             ``papers`` (default), ``robust`` (:class:`RobustExtractiveMatch`) or ``qwen``
``AAPO_EVAL_PROTOCOL``            ``aapo`` (default) or ``zapo``: the benchmarks, prompt and ``papers`` grader
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from lighteval.metrics.dynamic_metrics import (
    ExprExtractionConfig,
    LatexExtractionConfig,
    MultilingualExtractiveMatchMetric,
)
from lighteval.metrics.metrics_sample import SampleLevelComputation, SamplingMetric
from lighteval.metrics.utils.extractive_match_utils import extract_target_from_pred, get_extraction_regexes
from lighteval.metrics.utils.math_comparison import compare_gold_target
from lighteval.metrics.utils.metric_utils import SampleLevelMetricGrouping
from lighteval.models.model_output import ModelResponse
from lighteval.tasks.lighteval_task import LightevalTaskConfig
from lighteval.tasks.requests import Doc, SamplingMethod
from lighteval.utils.language import Language


def _load_sibling(name: str):
    """``evaluation/<name>.py`` as ``aapo_eval_<name>``, the module the runner's loader gives (lighteval's CLI loads
    this file alone, so it cannot rely on the runner)."""
    module_name = f"aapo_eval_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


benchmarks = _load_sibling("benchmarks")
Benchmark = benchmarks.Benchmark
BENCHMARKS = benchmarks.BENCHMARKS
DEFAULT_GENERATION_SIZE = benchmarks.DEFAULT_GENERATION_SIZE
MATH_QUERY_TEMPLATE = benchmarks.MATH_QUERY_TEMPLATE


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


SCORINGS = benchmarks.SCORINGS
DEFAULT_SCORING = benchmarks.DEFAULT_SCORING

#: Math delimiters that make lighteval's LaTeX extraction read a gold (it reads nothing outside them).
_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
_PERCENT = re.compile(r"\\?%")


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, not {scoring!r}")
    return scoring


class PapersExtractiveMatch(MultilingualExtractiveMatchMetric):
    """lighteval's extractive match, unchanged (:meth:`compute` is lighteval's own), with its steps
    also exposed one by one -- :meth:`extract_golds`, :meth:`extract_prediction`, :meth:`matches` --
    so that checks over many (gold, prediction) pairs extract each text once."""

    def __init__(self, gold_kind: str):
        if gold_kind == "expr":
            gold_target = (ExprExtractionConfig(),)
        elif gold_kind == "latex":
            gold_target = (LatexExtractionConfig(),)
        else:
            raise ValueError(f"gold_kind must be 'expr' or 'latex', not {gold_kind!r}")
        super().__init__(
            language=Language.ENGLISH,
            fallback_mode="first_match",
            precision=5,
            gold_extraction_target=gold_target,
            # the boxed answer first, then the other LaTeX / expression patterns
            pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)),
            aggregation_function=max,
        )
        self.gold_kind = gold_kind

    def _extract(self, doc: Doc, text: str, targets) -> list:
        regexes = get_extraction_regexes(doc, targets, self.language)
        return extract_target_from_pred(text, regexes, self.fallback_mode, self.extraction_mode, self.timeout_seconds)

    def extract_golds(self, doc: Doc) -> list[list]:
        """The golds as lighteval extracts them; a gold it cannot read is compared as its raw text."""
        golds = doc.get_golds()
        extracted = [self._extract(doc, gold, self.gold_extraction_target) for gold in golds]
        return [[gold] for gold in golds] if any(len(g) == 0 for g in extracted) else extracted

    def extract_prediction(self, doc: Doc, text: str) -> list[list]:
        return [self._extract(doc, text, self.pred_extraction_target)]

    def matches(self, golds: list[list], predictions: list[list]) -> bool:
        return any(
            compare_gold_target(gold, prediction, self.precision, timeout_seconds=self.timeout_seconds)
            for gold in golds
            for prediction in predictions
        )


class RobustExtractiveMatch(PapersExtractiveMatch):
    """``--scoring robust``: the papers' extractive match, plus what it marks wrong and a grader
    would not (each fix found on the full public sets or on public graded completions, checked by
    the oracle/control tests and by adversarial cases; ``evaluation/README.md`` lists the rules):

    * a LaTeX gold without math delimiters (409 of OlympiadBench's 675, e.g. ``1,3``) is read as
      ``$gold$``: the papers' scorer cannot parse it and compares raw strings, so ``1, 3`` scored 0;
      a gold that does not parse even then is compared as text without spaces and ``$``;
    * a percent (``25\\%``, read as 0.25) also matches the number without the sign, on either side:
      gold ``25\\%`` and answer ``25`` (or gold ``25`` and answer ``25\\%``) match;
    * a gold with an odd number of ``$`` (malformed, e.g. OlympiadBench's ``$221,$8$``, which the
      papers' scorer reads as ``221,``) is also read with its ``$`` removed and the rest wrapped once;
    * the final answer (the last ``\\boxed{}`` of an answer, or a bare gold) is also read normalised
      (:func:`answer_readings`): scientific notation as a power of ten (``1e-5`` = ``0.00001``), a
      number with thousands separators and trailing units alone (``15,000 \\, \\text{kcal m}^{-2}``
      = ``15000``), and, when it does not parse, as text with canonical subscripts and no spacing
      commands (``\\frac{1}{3} E_1`` = ``\\frac{1}{3}E_{1}``);
    * with a :attr:`relative_tolerance` (Minerva's, :data:`ROBUST_RELATIVE_TOLERANCE`), two numbers
      match within it (``6630.65`` against ``6630``);
    * lines of the completion that restate the prompt verbatim are not read: an answer that only
      repeats the question (``Compute $2^{10}$.``) is not the question's answer.

    A prediction is correct when any reading of it matches any reading of the gold."""

    def __init__(self, gold_kind: str, relative_tolerance: float = 0.0):
        super().__init__(gold_kind)
        self.relative_tolerance = float(relative_tolerance)

    def gold_readings(self, gold: str) -> list[str]:
        text = gold.strip()
        if self.gold_kind == "latex" and not any(mark in text for mark in _MATH_DELIMITERS):
            text = f"${text}$"
        readings = [text]
        if text.count("$") % 2:
            readings.append("$" + text.replace("$", "") + "$")
        if _PERCENT.search(text):
            readings.append(_PERCENT.sub("", text))
        final = benchmarks.last_boxed(text)
        final = final if final is not None else text.replace("$", "").strip()
        readings.extend(f"${reading}$" for reading in answer_readings(final))
        return readings

    def extract_golds(self, doc: Doc) -> list[list]:
        extracted = []
        for gold in doc.get_golds():
            for reading in self.gold_readings(gold):
                found = self._extract(doc, reading, self.gold_extraction_target)
                extracted.append(_with_plain_text(found) or [_plain_text(reading)])
        return extracted

    def extract_prediction(self, doc: Doc, text: str) -> list[list]:
        text = without_restated_prompt(text, doc.query)
        readings = [text] + ([_PERCENT.sub("", text)] if _PERCENT.search(text) else [])
        final = benchmarks.last_boxed(text)
        if final is not None:
            readings.extend(f"$\\boxed{{{reading}}}$" for reading in answer_readings(final))
        return [_with_plain_text(self._extract(doc, reading, self.pred_extraction_target)) for reading in readings]

    def matches(self, golds: list[list], predictions: list[list]) -> bool:
        if super().matches(golds, predictions):
            return True
        if self.relative_tolerance <= 0:
            return False
        gold_numbers = [n for reading in golds for n in map(_as_number, reading) if n is not None]
        predicted = [n for reading in predictions for n in map(_as_number, reading) if n is not None]
        return any(math.isclose(p, g, rel_tol=self.relative_tolerance) for g in gold_numbers for p in predicted)

    def compute(self, doc: Doc, model_response: ModelResponse) -> float:
        golds = self.extract_golds(doc)
        scores, specific = [], []
        for text in model_response.final_text:
            predictions = self.extract_prediction(doc, text)
            specific.extend(str(item) for reading in predictions[:1] for item in reading)
            scores.append(1.0 if self.matches(golds, predictions) else 0.0)
        doc.specific = dict(doc.specific or {}, extracted_predictions=specific,
                            extracted_golds=[str(g) for reading in golds for g in reading])
        return self.aggregation_function(scores)


#: ``--scoring robust`` compares two numbers within this relative tolerance on these benchmarks.
#: Minerva's answers are physical estimates given to a few significant figures (``6630`` Angstroms
#: for 6565 x 1.01 = 6630.65); 1e-4 is the tolerance the Qwen2.5-Math evaluation toolkit's
#: ``numeric_equal`` applies when it grades Minerva-Math (``math_isclose(rel_tol=1e-4)``).
ROBUST_RELATIVE_TOLERANCE = {"minerva": 1e-4}

_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)(?![\w.])")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SPACING = r"(?:\s|~|\\[,;:! ])"
_UNIT = r"\\(?:text|mathrm|textrm|mbox|rm)\s*\{[^{}]*\}(?:\s*\^\s*(?:\{\s*[-+]?\d+\s*\}|[-+]?\d))?"
_NUMBER_WITH_UNITS = re.compile(rf"^(?P<number>[-+]?\d[\d,]*(?:\.\d+)?){_SPACING}*(?:{_UNIT}{_SPACING}*)+$")
_SPACING_COMMANDS = re.compile(r"\\[,;:! ]|~")
_BARE_SUBSCRIPT = re.compile(r"_([A-Za-z0-9])")


def answer_readings(answer: str) -> list[str]:
    """Normalised forms of one final answer (``\\boxed{}`` content or bare gold) that robust also
    reads; the answer itself is not repeated. Each rule changes notation only, never the value."""
    text = answer.strip()
    readings = []
    with_units = _NUMBER_WITH_UNITS.match(text)
    if with_units:
        text = with_units.group("number")
        readings.append(text)
    if _THOUSANDS.match(text):
        readings.append(text.replace(",", ""))
    if _SCIENTIFIC.search(text):
        readings.append(_SCIENTIFIC.sub(r"\1\\times10^{\2}", text))
    return readings


def without_restated_prompt(text: str, prompt: str | None, min_length: int = 12) -> str:
    """``text`` without its lines (of at least ``min_length`` characters) that restate the problem:
    they occur verbatim in the prompt and not in a prompt template (the template's own answer format,
    ``$. I hope it is correct``, is how a right answer ends). A completion restating the question must
    not be graded on the question's own numbers."""
    if not prompt:
        return text
    templates = "\n".join(benchmarks.PROMPTS.values())

    def restates(line: str) -> bool:
        return len(line) >= min_length and line in prompt and line not in templates

    return "\n".join(line for line in text.splitlines() if not restates(line.strip()))


def _as_number(item) -> float | None:
    """A number extracted by math-verify (a sympy number) as a float, else ``None``."""
    if isinstance(item, str) or not getattr(item, "is_number", False):
        return None
    try:
        value = float(item)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _with_plain_text(found: list) -> list:
    """Extracted items plus each text item compared as :func:`_plain_text` (math-verify returns the
    text itself when it cannot parse it, e.g. ``\\frac{1}{3}E_{1}+\\frac{2}{3}E_{2}``)."""
    return found + [_plain_text(item) for item in found if isinstance(item, str)]


def _plain_text(text: str) -> str:
    """A gold or answer compared as text: no spaces, spacing commands or ``$``, no final period,
    one-character subscripts braced (``E_1`` -> ``E_{1}``)."""
    text = _BARE_SUBSCRIPT.sub(r"_{\1}", _SPACING_COMMANDS.sub("", text))
    return re.sub(r"\s+|\$", "", text).rstrip(".")


def extractive_match(gold_kind: str, scoring: str = DEFAULT_SCORING) -> PapersExtractiveMatch:
    """The open-rs extractive match for a gold read as ``"expr"`` or as ``"latex"`` (``scoring="papers"``,
    the default), or its robust variant (``scoring="robust"``, without a benchmark's tolerance:
    :func:`make_scorer` gives each benchmark its own)."""
    check_scoring(scoring)
    if scoring not in ("papers", "robust"):
        raise ValueError(f"extractive_match covers the papers and robust scorers, not {scoring!r}: use make_scorer")
    return (RobustExtractiveMatch if scoring == "robust" else PapersExtractiveMatch)(gold_kind)


class AnswerGrader:
    """A grader that reads one final answer from the gold and one from each completion:
    :meth:`compute` has the interface of the extractive matches (``doc.specific`` records what it read)."""

    def extract_golds(self, doc: Doc) -> list:
        raise NotImplementedError

    def extract_prediction(self, doc: Doc, text: str) -> list:
        raise NotImplementedError

    def matches(self, golds: list, predictions: list) -> bool:
        raise NotImplementedError

    def compute(self, doc: Doc, model_response: ModelResponse, **kwargs) -> float:
        golds = self.extract_golds(doc)
        scores, specific = [], []
        for text in model_response.final_text:
            predictions = self.extract_prediction(doc, text)
            specific.extend(str(item) for item in predictions)
            scores.append(1.0 if self.matches(golds, predictions) else 0.0)
        doc.specific = dict(doc.specific or {}, extracted_predictions=specific,
                            extracted_golds=[str(g) for g in golds])
        return max(scores) if scores else 0.0


class GresoBoxedMathVerify(AnswerGrader):
    """``--scoring papers`` under ZAPO's protocol: GRESO's grader (ZAPO evaluates "following the same
    settings as GRESO", in verl). The content of the completion's *last* ``\\boxed{}`` (none: wrong) is
    verified against the gold answer with math-verify (``parse`` both, ``verify(gold, answer)``), as
    GRESO's ``verl/utils/reward_score/latex_math.py`` ``compute_score`` does per issue 28's reading of
    it; both are parsed inside ``\\boxed{}`` as verl's own math-verify reward
    (``verl/utils/reward_score/math_verify.py``) wraps its ground truth. The gold is the answer as
    GRESO's test-set scripts store it (:func:`benchmarks.answer_of_gold`: MATH-500's and Minerva's
    boxed answer, OlympiadBench's ``final_answer[0]`` without ``$``, AIME's / AMC's number).
    GRESO's reward file itself is not in the reference index this was written from: what is
    followed here is that description and verl's reward; differences from GRESO's file, if any, are
    in the boxed wrapping only."""

    def __init__(self, parsing_timeout: int = 5):
        self.parsing_timeout = parsing_timeout

    def _parse(self, answer: str) -> list:
        from math_verify import parse

        try:
            return parse(f"\\boxed{{{answer}}}", parsing_timeout=self.parsing_timeout)
        except Exception:  # a parser failure or timeout grades as no answer, as verl's reward does
            return []

    def extract_golds(self, doc: Doc) -> list:
        return [self._parse(benchmarks.answer_of_gold(gold)) for gold in doc.get_golds()]

    def extract_prediction(self, doc: Doc, text: str) -> list:
        boxed = benchmarks.last_boxed(text)
        return [] if boxed is None else [self._parse(boxed)]

    def matches(self, golds: list, predictions: list) -> bool:
        from math_verify import verify

        for gold in golds:
            for prediction in predictions:
                try:
                    if gold and prediction and verify(gold, prediction):
                        return True
                except Exception:
                    continue
        return False


class QwenMathEqual(AnswerGrader):
    """``--scoring qwen``: the Qwen2.5-Math toolkit's ``extract_answer`` + ``math_equal`` on one
    benchmark (``evaluation/qwen_math.py``, which states the rules and where it differs)."""

    def __init__(self, bench_key: str):
        self.bench_key = bench_key
        self.rules = _load_sibling("qwen_math")

    def extract_golds(self, doc: Doc) -> list[str]:
        return [self.rules.gold_answer(self.bench_key, gold) for gold in doc.get_golds()]

    def extract_prediction(self, doc: Doc, text: str) -> list[str]:
        return [self.rules.predicted_answer(text, self.bench_key)]

    def matches(self, golds: list[str], predictions: list[str]) -> bool:
        return any(self.rules.math_equal(p, g) for g in golds for p in predictions)


def make_scorer(bench: Benchmark | str, scoring: str = DEFAULT_SCORING, protocol: str = benchmarks.DEFAULT_PROTOCOL):
    """The grader of one benchmark under ``scoring`` and ``protocol``: ``papers`` is the protocol's
    paper's grader (:data:`benchmarks.PAPERS_GRADERS`). Every grader has ``extract_golds(doc)``,
    ``extract_prediction(doc, text)``, ``matches(golds, prediction)`` and ``compute(doc, response)``."""
    bench = benchmarks.benchmark(bench, protocol)
    check_scoring(scoring)
    benchmarks.check_protocol(protocol)
    if scoring == "robust":
        return RobustExtractiveMatch(bench.gold_kind, ROBUST_RELATIVE_TOLERANCE.get(bench.key, 0.0))
    if scoring == "qwen":
        return QwenMathEqual(bench.key)
    if benchmarks.PAPERS_GRADERS[protocol] == "greso":
        return GresoBoxedMathVerify()
    return PapersExtractiveMatch(bench.gold_kind)


class PassAtKFromSamples(SamplingMetric, SampleLevelComputation):
    """Scores each of a problem's ``n`` samples once with the open-rs extractive match and returns
    ``{"pass@1": c / n, "pass@8": ..., ...}``. As a lighteval ``SamplingMetric`` its
    :meth:`num_samples` is how many samples lighteval generates per problem."""

    def __init__(self, bench: Benchmark | str, n: int = 1, scoring: str = DEFAULT_SCORING,
                 protocol: str = benchmarks.DEFAULT_PROTOCOL):
        scorer = make_scorer(bench, scoring, protocol)
        super().__init__(sample_scoring_function=scorer)
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.bench = benchmarks.benchmark(bench)
        self.scoring = scoring
        self.scorer = scorer
        self.n = int(n)

    def num_samples(self) -> int:
        return self.n

    def score_samples(self, doc: Doc, texts: Sequence[str]) -> list[float]:
        """One 0/1 score per text; ``doc.specific`` keeps what was extracted from each."""
        scores, extracted, golds = [], [], []
        for text in texts:
            scores.append(float(self.scorer.compute(doc, ModelResponse(text=[text]))))
            specific = doc.specific or {}
            extracted.append(list(specific.get("extracted_predictions", [])))
            golds = specific.get("extracted_golds", golds)
        doc.specific = {"extracted_predictions": extracted, "extracted_golds": golds, "scores": scores}
        return scores

    def compute(self, doc: Doc, model_response: ModelResponse, **kwargs) -> dict[str, float]:
        texts = list(model_response.final_text)[: self.n] or [""]
        return benchmarks.pass_at_ks(self.score_samples(doc, texts), self.n)


def pass_at_k_metric(bench: Benchmark | str, n: int = 1, scoring: str = DEFAULT_SCORING,
                     protocol: str = benchmarks.DEFAULT_PROTOCOL) -> SampleLevelMetricGrouping:
    names = benchmarks.metric_names(n)
    return SampleLevelMetricGrouping(
        metric_name=names,
        higher_is_better=dict.fromkeys(names, True),
        category=SamplingMethod.GENERATIVE,
        sample_level_fn=PassAtKFromSamples(bench, n, scoring, protocol),
        corpus_level_fn=dict.fromkeys(names, np.mean),
    )


def score_completion(
    bench: Benchmark | str, row: Mapping[str, Any], completion: str, scoring: str = DEFAULT_SCORING,
    protocol: str = benchmarks.DEFAULT_PROTOCOL,
) -> float:
    """1.0 when ``completion`` answers ``row`` of ``bench`` correctly under the task's metric."""
    bench = benchmarks.benchmark(bench, protocol)
    doc = make_prompt_function(bench, protocol)(row, bench.task_name)
    return float(make_scorer(bench, scoring, protocol).compute(doc, ModelResponse(text=[completion])))


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def make_prompt_function(bench: Benchmark, protocol: str = benchmarks.DEFAULT_PROTOCOL):
    """The row -> ``Doc`` function: the protocol's prompt (:data:`benchmarks.PROTOCOL_PROMPTS`), the
    gold as open-rs passes it (every grader reads its answer from that text)."""
    prompt = benchmarks.PROTOCOL_PROMPTS[benchmarks.check_protocol(protocol)]

    def prompt_function(line: Mapping[str, Any], task_name: str | None = None) -> Doc:
        return Doc(task_name=task_name, query=bench.query(line, prompt), choices=[bench.gold(line)], gold_index=0)

    prompt_function.__name__ = f"{bench.key}_prompt"
    return prompt_function


def make_task_config(
    bench: Benchmark | str,
    num_samples: int = 1,
    generation_size: int | None = DEFAULT_GENERATION_SIZE,
    source: str | None = None,
    scoring: str = DEFAULT_SCORING,
    protocol: str = benchmarks.DEFAULT_PROTOCOL,
) -> LightevalTaskConfig:
    """The lighteval task for one benchmark, reading its rows from ``source`` (default: the Hub id)."""
    bench = benchmarks.benchmark(bench, protocol)
    return LightevalTaskConfig(
        name=bench.task_name,
        prompt_function=make_prompt_function(bench, protocol),
        hf_repo=source or bench.hub_id,
        hf_subset="default",
        hf_avail_splits=[bench.split],
        evaluation_splits=[bench.split],
        few_shots_split=None,
        few_shots_select=None,
        generation_size=generation_size,
        metrics=[pass_at_k_metric(bench, num_samples, scoring, protocol)],
        stop_sequence=[],  # chat models stop at their EOS token
        version=1,
    )


def make_task_configs(
    benchmark_names: str | Sequence[str] | None = None,
    num_samples: int = 1,
    generation_size: int | None = DEFAULT_GENERATION_SIZE,
    datasets: Mapping[str, str] | None = None,
    data_dir: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    scoring: str = DEFAULT_SCORING,
    protocol: str = benchmarks.DEFAULT_PROTOCOL,
) -> list[LightevalTaskConfig]:
    """Task configurations for the chosen benchmarks (default: the protocol's five), in table order."""
    return [
        make_task_config(b, num_samples, generation_size,
                         benchmarks.resolve_dataset(b, datasets, data_dir, environ, protocol), scoring, protocol)
        for b in benchmarks.parse_benchmarks(benchmark_names, protocol)
    ]


def _int_from_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


TASKS_TABLE = make_task_configs(
    num_samples=_int_from_env("AAPO_EVAL_NUM_SAMPLES", 1),
    generation_size=_int_from_env("AAPO_EVAL_GENERATION_SIZE", DEFAULT_GENERATION_SIZE),
    scoring=os.environ.get("AAPO_EVAL_SCORING") or DEFAULT_SCORING,
    protocol=os.environ.get("AAPO_EVAL_PROTOCOL") or benchmarks.DEFAULT_PROTOCOL,
)

__all__ = [
    "AnswerGrader",
    "BENCHMARKS",
    "GresoBoxedMathVerify",
    "PapersExtractiveMatch",
    "PassAtKFromSamples",
    "QwenMathEqual",
    "RobustExtractiveMatch",
    "SCORINGS",
    "TASKS_TABLE",
    "extractive_match",
    "make_prompt_function",
    "make_scorer",
    "make_task_config",
    "make_task_configs",
    "pass_at_k_metric",
    "score_completion",
]
