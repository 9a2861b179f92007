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
``AAPO_EVAL_SCORING``             ``papers`` (default) or ``robust`` (see :class:`RobustExtractiveMatch`)
"""

from __future__ import annotations

import importlib.util
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


def _load_benchmarks():
    """``evaluation/benchmarks.py``, shared with the runner as ``aapo_eval_benchmarks``."""
    name = "aapo_eval_benchmarks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("benchmarks.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


benchmarks = _load_benchmarks()
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
    would not (each fix found on the full public sets, checked by the oracle/control tests):

    * a LaTeX gold without math delimiters (409 of OlympiadBench's 675, e.g. ``1,3``) is read as
      ``$gold$``: the papers' scorer cannot parse it and compares raw strings, so ``1, 3`` scored 0;
      a gold that does not parse even then is compared as text without spaces and ``$``;
    * a percent (``25\\%``, read as 0.25) also matches the number without the sign, on either side:
      gold ``25\\%`` and answer ``25`` (or gold ``25`` and answer ``25\\%``) match;
    * a gold with an odd number of ``$`` (malformed, e.g. OlympiadBench's ``$221,$8$``, which the
      papers' scorer reads as ``221,``) is also read with its ``$`` removed and the rest wrapped once.

    A prediction is correct when any reading of it matches any reading of the gold."""

    def gold_readings(self, gold: str) -> list[str]:
        text = gold.strip()
        if self.gold_kind == "latex" and not any(mark in text for mark in _MATH_DELIMITERS):
            text = f"${text}$"
        readings = [text]
        if text.count("$") % 2:
            readings.append("$" + text.replace("$", "") + "$")
        if _PERCENT.search(text):
            readings.append(_PERCENT.sub("", text))
        return readings

    def extract_golds(self, doc: Doc) -> list[list]:
        extracted = []
        for gold in doc.get_golds():
            for reading in self.gold_readings(gold):
                found = self._extract(doc, reading, self.gold_extraction_target)
                extracted.append(found or [_plain_text(reading)])
        return extracted

    def extract_prediction(self, doc: Doc, text: str) -> list[list]:
        readings = [text] + ([_PERCENT.sub("", text)] if _PERCENT.search(text) else [])
        extracted = []
        for reading in readings:
            found = self._extract(doc, reading, self.pred_extraction_target)
            extracted.append(found + [_plain_text(str(item)) for item in found if isinstance(item, str)])
        return extracted

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


def _plain_text(text: str) -> str:
    """A gold or answer compared as text: no spaces, no ``$``, no final period."""
    return re.sub(r"\s+|\$", "", text).rstrip(".")


def extractive_match(gold_kind: str, scoring: str = DEFAULT_SCORING) -> PapersExtractiveMatch:
    """The open-rs extractive match for a gold read as ``"expr"`` or as ``"latex"`` (``scoring="papers"``,
    the default), or its robust variant (``scoring="robust"``)."""
    check_scoring(scoring)
    return (RobustExtractiveMatch if scoring == "robust" else PapersExtractiveMatch)(gold_kind)


class PassAtKFromSamples(SamplingMetric, SampleLevelComputation):
    """Scores each of a problem's ``n`` samples once with the open-rs extractive match and returns
    ``{"pass@1": c / n, "pass@8": ..., ...}``. As a lighteval ``SamplingMetric`` its
    :meth:`num_samples` is how many samples lighteval generates per problem."""

    def __init__(self, gold_kind: str, n: int = 1, scoring: str = DEFAULT_SCORING):
        scorer = extractive_match(gold_kind, scoring)
        super().__init__(sample_scoring_function=scorer)
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.gold_kind = gold_kind
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


def pass_at_k_metric(gold_kind: str, n: int = 1, scoring: str = DEFAULT_SCORING) -> SampleLevelMetricGrouping:
    names = benchmarks.metric_names(n)
    return SampleLevelMetricGrouping(
        metric_name=names,
        higher_is_better=dict.fromkeys(names, True),
        category=SamplingMethod.GENERATIVE,
        sample_level_fn=PassAtKFromSamples(gold_kind, n, scoring),
        corpus_level_fn=dict.fromkeys(names, np.mean),
    )


def score_completion(
    bench: Benchmark | str, row: Mapping[str, Any], completion: str, scoring: str = DEFAULT_SCORING
) -> float:
    """1.0 when ``completion`` answers ``row`` of ``bench`` correctly under the task's metric."""
    bench = benchmarks.benchmark(bench)
    doc = make_prompt_function(bench)(row, bench.task_name)
    return float(extractive_match(bench.gold_kind, scoring).compute(doc, ModelResponse(text=[completion])))


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def make_prompt_function(bench: Benchmark):
    def prompt_function(line: Mapping[str, Any], task_name: str | None = None) -> Doc:
        return Doc(task_name=task_name, query=bench.query(line), choices=[bench.gold(line)], gold_index=0)

    prompt_function.__name__ = f"{bench.key}_prompt"
    return prompt_function


def make_task_config(
    bench: Benchmark | str,
    num_samples: int = 1,
    generation_size: int | None = DEFAULT_GENERATION_SIZE,
    source: str | None = None,
    scoring: str = DEFAULT_SCORING,
) -> LightevalTaskConfig:
    """The lighteval task for one benchmark, reading its rows from ``source`` (default: the Hub id)."""
    bench = benchmarks.benchmark(bench)
    return LightevalTaskConfig(
        name=bench.task_name,
        prompt_function=make_prompt_function(bench),
        hf_repo=source or bench.hub_id,
        hf_subset="default",
        hf_avail_splits=[bench.split],
        evaluation_splits=[bench.split],
        few_shots_split=None,
        few_shots_select=None,
        generation_size=generation_size,
        metrics=[pass_at_k_metric(bench.gold_kind, num_samples, scoring)],
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
) -> list[LightevalTaskConfig]:
    """Task configurations for the chosen benchmarks (default: all five), in table order."""
    return [
        make_task_config(b, num_samples, generation_size, benchmarks.resolve_dataset(b, datasets, data_dir, environ),
                         scoring)
        for b in benchmarks.parse_benchmarks(benchmark_names)
    ]


def _int_from_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


TASKS_TABLE = make_task_configs(
    num_samples=_int_from_env("AAPO_EVAL_NUM_SAMPLES", 1),
    generation_size=_int_from_env("AAPO_EVAL_GENERATION_SIZE", DEFAULT_GENERATION_SIZE),
    scoring=os.environ.get("AAPO_EVAL_SCORING") or DEFAULT_SCORING,
)

__all__ = [
    "BENCHMARKS",
    "PapersExtractiveMatch",
    "PassAtKFromSamples",
    "RobustExtractiveMatch",
    "SCORINGS",
    "TASKS_TABLE",
    "extractive_match",
    "make_prompt_function",
    "make_task_config",
    "make_task_configs",
    "pass_at_k_metric",
    "score_completion",
]
