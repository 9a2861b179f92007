"""``--scoring papers|robust``: the papers' scorer (lighteval's extractive match, as open-rs configures
it) stays the default; ``robust`` fixes the ways it marks right answers wrong without accepting wrong
ones: each false-negative class and adversarial wrong answers here, the oracle and control of every
scorer on the full sets in ``tests/test_eval_oracle_control.py``."""

from __future__ import annotations

import pytest

from aapo_trl.evaluation import evaluation_module

CORRECT = "Therefore, the final answer is: $\\boxed{%s}$. I hope it is correct"

tasks = evaluation_module("tasks")
benchmarks = evaluation_module("benchmarks")


def score(bench: str, gold: str, answer: str, scoring: str) -> float:
    key = benchmarks.benchmark(bench)
    row = {key.question_column: "Q", key.gold_column: gold}
    return tasks.score_completion(key, row, CORRECT % answer, scoring=scoring)


@pytest.mark.parametrize("bench,gold,right,wrong", [
    ("math_500", "So the answer is $\\boxed{25\\%}$.", "25", "26"),  # percent gold read as 0.25
    ("olympiadbench", "25\\%", "25", "0.26"),
    ("olympiadbench", "1,3", "1, 3", "1, 4"),  # gold without $...$: compared as a raw string
    ("olympiadbench", "$221,$8$", "221, 8", "221"),  # malformed gold
])
def test_robust_accepts_what_papers_marks_wrong_and_still_rejects_wrong_answers(bench, gold, right, wrong):
    assert score(bench, gold, right, "papers") == 0.0
    assert score(bench, gold, right, "robust") == 1.0
    assert score(bench, gold, wrong, "robust") == 0.0
    assert score(bench, gold, wrong, "papers") == 0.0


#: Right answers the papers' scorer (and robust before issue 28) marked wrong, one class per row group,
#: each with a wrong answer of the same shape that must stay wrong: (bench, gold as written, right, wrong).
FALSE_NEGATIVES = {
    "negative fraction": [("olympiadbench", "$\\frac{-1}{7}$", "-\\frac{1}{7}", "\\frac{1}{7}"),
                          ("math_500", "$\\boxed{\\frac{-2}{5}}$", "-\\frac{2}{5}", "\\frac{-5}{2}")],
    "scientific notation": [("minerva", "$\\boxed{1e-5}$", "0.00001", "0.0001"),
                            ("minerva", "$\\boxed{2.5e-3}$", "0.0025", "0.025"),
                            ("olympiadbench", "3e8", "300000000", "30000000")],
    "subscripts": [("minerva", "$\\boxed{\\frac{1}{3}E_{1}+\\frac{2}{3}E_{2}}$",
                    "\\frac{1}{3} E_1 + \\frac{2}{3} E_2", "\\frac{2}{3} E_1 + \\frac{1}{3} E_2"),
                   ("minerva", "$\\boxed{\\frac{1}{2}E_{0}+\\frac{1}{2}E_{3}}$",
                    "\\frac{1}{2}E_0+\\frac{1}{2}E_3", "\\frac{1}{2}E_0+\\frac{1}{2}E_2")],
    "units and thousands": [("minerva", "$\\boxed{15000}$", "15,000 \\, \\text{kcal m}^{-2} \\text{ yr}^{-1}",
                             "16,000 \\, \\text{kcal m}^{-2} \\text{ yr}^{-1}"),
                            ("minerva", "$\\boxed{2400}$", "2,400 \\mathrm{~km} \\mathrm{~s}^{-1}",
                             "2,500 \\mathrm{~km} \\mathrm{~s}^{-1}")],
    "minerva precision": [("minerva", "$\\boxed{6630}$", "6630.65", "6640"),
                          ("minerva", "$\\boxed{1.6}$", "1.60001", "1.61")],
}


@pytest.mark.parametrize("case", [pytest.param(case, id=f"{name}-{i}") for name, cases in FALSE_NEGATIVES.items()
                                  for i, case in enumerate(cases)])
def test_robust_accepts_each_false_negative_class_and_rejects_the_wrong_answer_of_its_shape(case):
    bench, gold, right, wrong = case
    assert score(bench, gold, right, "robust") == 1.0
    assert score(bench, gold, wrong, "robust") == 0.0
    assert score(bench, gold, wrong, "papers") == 0.0


def test_the_tolerance_is_minervas_only():
    """1e-4 relative is an estimate's precision on Minerva; elsewhere a number is exact."""
    assert score("minerva", "$\\boxed{6630}$", "6630.65", "papers") == 0.0
    assert score("math_500", "$\\boxed{6630}$", "6630.65", "robust") == 0.0
    assert score("olympiadbench", "6630", "6630.65", "robust") == 0.0


def score_text(bench: str, gold: str, completion: str, scoring: str, question: str = "Q") -> float:
    key = benchmarks.benchmark(bench)
    row = {key.question_column: question, key.gold_column: gold}
    return tasks.score_completion(key, row, completion, scoring=scoring)


#: Wrong answers that must score 0 under robust: (name, bench, gold, question, completion).
ADVERSARIAL = [
    ("restates the question", "aime24", "1024", "Compute $2^{10}$.", "Compute $2^{10}$."),
    ("restates the question", "math_500", "$\\boxed{1024}$", "What is $2^{10}$?", "Let me restate.\nWhat is $2^{10}$?"),
    ("restates the question", "olympiadbench", "$12$", "Find $3 \\cdot 4$ in base ten.",
     "Find $3 \\cdot 4$ in base ten."),
    ("a list with a wrong member", "olympiadbench", "1,3", "Q", CORRECT % "1,3,5"),
    ("a list with a wrong member", "olympiadbench", "$1,3$", "Q", CORRECT % "1,4"),
    ("a list with a wrong member", "math_500", "$\\boxed{(1, 2)}$", "Q", CORRECT % "(1, 3)"),
    ("the final boxed answer contradicts an earlier one", "aime24", "5", "Q",
     "So $\\boxed{5}$. Wait, that is wrong: the answer is $\\boxed{7}$."),
    ("the final boxed answer contradicts an earlier one", "minerva", "$\\boxed{6630}$", "Q",
     "First $\\boxed{6630}$; correcting the sign, $\\boxed{-6630}$."),
]


@pytest.mark.parametrize("name,bench,gold,question,completion", ADVERSARIAL)
def test_robust_never_marks_an_adversarial_wrong_answer_right(name, bench, gold, question, completion):
    assert score_text(bench, gold, completion, "robust", question) == 0.0, name


def test_restating_the_question_fooled_the_papers_scorer_and_an_answer_after_it_still_counts():
    assert score_text("aime24", "1024", "Compute $2^{10}$.", "papers", "Compute $2^{10}$.") == 1.0  # as published
    answered = "Compute $2^{10}$.\nDoubling ten times: $\\boxed{1024}$."
    assert score_text("aime24", "1024", answered, "robust", "Compute $2^{10}$.") == 1.0


def test_robust_reads_a_percent_answer_against_a_plain_gold_and_keeps_the_papers_matches():
    assert score("amc23", "25", "25\\%", "papers") == 0.0 and score("amc23", "25", "25\\%", "robust") == 1.0
    for bench, gold, answer in (("aime24", "204", "204"), ("olympiadbench", "$\\frac{2}{3}$", "2/3"),
                                ("math_500", "$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt3}{2}")):
        assert score(bench, gold, answer, "papers") == score(bench, gold, answer, "robust") == 1.0


def test_scoring_is_checked_and_papers_is_the_default():
    assert tasks.DEFAULT_SCORING == "papers"
    assert type(tasks.extractive_match("expr")) is tasks.PapersExtractiveMatch
    with pytest.raises(ValueError, match="scoring"):
        tasks.extractive_match("expr", "lenient")
    with pytest.raises(ValueError, match="scoring"):
        evaluation_module("run").EvalConfig(model="m", scoring="lenient").resolved()


def test_the_split_steps_are_the_scorers_own_compute():
    """The oracle/control checks extract once and compare many times; that must grade as compute()."""
    from lighteval.models.model_output import ModelResponse

    for protocol in ("aapo", "zapo"):
        for scoring in tasks.SCORINGS:
            for key, gold, answer in (("olympiadbench", "1,3", "1, 3"), ("math_500", "$\\boxed{5\\%}$", "5"),
                                      ("aime24", "33", "33"), ("minerva", "$\\boxed{1.6}$", "2"),
                                      ("minerva", "$\\boxed{6630}$", "6630.65")):
                bench = benchmarks.BENCHMARKS[key]
                doc = tasks.make_prompt_function(bench, protocol)(
                    {bench.question_column: "Q", bench.gold_column: gold}, bench.task_name)
                scorer = tasks.make_scorer(bench, scoring, protocol)
                split = scorer.matches(scorer.extract_golds(doc), scorer.extract_prediction(doc, CORRECT % answer))
                assert float(split) == scorer.compute(doc, ModelResponse(text=[CORRECT % answer])), (
                    protocol, scoring, key)
