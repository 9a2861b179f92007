"""Oracle and control of every scorer on the six full public sets, under both protocols' prompts (issue 28):
each problem's own gold answer, boxed in the prompt's answer format, scores 1; another problem's gold answer
scores 0 in every one of 500 seeded pairs per set. ``evaluation/scorer_checks.py`` does the work (and prints
the table); skipped when the full sets are not next to the checkout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from aapo_trl.evaluation import evaluation_module

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
checks = evaluation_module("scorer_checks")
benchmarks = evaluation_module("benchmarks")
tasks = evaluation_module("tasks")

pytestmark = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the full benchmark sets are not next to this checkout ({SHARED_DATA})")

every_set_scorer_and_prompt = pytest.mark.parametrize(
    "key,protocol,scoring",
    [(key, protocol, scoring) for key in benchmarks.BENCHMARKS for protocol in ("aapo", "zapo")
     for scoring in tasks.SCORINGS])


@pytest.fixture(autouse=True)
def quiet_parsers():
    for name in ("lighteval", "math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


@every_set_scorer_and_prompt
def test_oracle_every_boxed_gold_answer_scores_one(key, protocol, scoring):
    """Every one for robust; for the papers' graders and qwen, all but their own named misses
    (``KNOWN_ORACLE_MISSES``), exactly those, so that a change in either direction shows."""
    problems, failed = checks.oracle_failures(key, protocol, scoring, str(SHARED_DATA))
    assert problems == benchmarks.BENCHMARKS[key].num_problems
    assert set(failed) == checks.known_misses(key, protocol, scoring), failed[:10]


@every_set_scorer_and_prompt
def test_control_another_problems_gold_scores_zero(key, protocol, scoring):
    """0 false matches for papers and robust; for qwen exactly the Qwen2.5-Math toolkit's own
    (``QWEN_TOOLKIT_FALSE_MATCHES``: the faithful grader keeps them, and a change shows)."""
    pairs, false_matches = checks.control_false_matches(key, protocol, scoring, str(SHARED_DATA))
    assert pairs == checks.CONTROL_PAIRS
    known = {(gold, other) for bench, gold, other in checks.QWEN_TOOLKIT_FALSE_MATCHES
             if bench == key and scoring == "qwen"}
    assert set(false_matches) == known, false_matches


def test_the_papers_scorer_is_the_protocols_and_the_answer_format_its_prompts():
    assert isinstance(tasks.make_scorer("aime24", "papers", "aapo"), tasks.PapersExtractiveMatch)
    assert isinstance(tasks.make_scorer("aime24", "papers", "zapo"), tasks.GresoBoxedMathVerify)
    assert set(checks.ANSWER_FORMATS) == set(benchmarks.PROMPTS)
    assert not any(grader == "robust" for grader, _, _ in checks.KNOWN_ORACLE_MISSES)
    assert checks.control_pairs(["1", "1 ", "2"]) == [(0, 2), (1, 2), (2, 0), (2, 1)]  # same answers are no control
