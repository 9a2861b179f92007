"""``--scoring qwen``: the Qwen2.5-Math evaluation toolkit's grader (``evaluation/qwen_math.py``), rule by
rule as the toolkit documents it (its own unit tests included), then through the harness on each benchmark."""

from __future__ import annotations

import pytest

from aapo_trl.evaluation import evaluation_module

tasks = evaluation_module("tasks")
benchmarks = evaluation_module("benchmarks")
qwen = evaluation_module("qwen_math")  # the module tasks.py grades with (one aapo_eval_qwen_math per process)

CORRECT = "Therefore, the final answer is: $\\boxed{%s}$. I hope it is correct"


@pytest.mark.parametrize("prediction,reference,equal", [
    # the toolkit's own TestMathEquality cases
    ("10", "10", True), ("10%", "0.1", True), ("[1, 2, 3]", "[1, 2, 3]", True), ("10", "20", False),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("x = y", "x = y", True), ("x = y", "x = z", False),
    # numbers: commas, percent, the gold x 100 and / 100, relative tolerance 1e-4
    ("1,000", "1000", True), ("50", "0.5", True), ("0.5", "50", True), ("6630.65", "6630", True),
    ("6631", "6630", False),
    # brackets and lists: element-wise for two bracketed lists of one length
    ("(1,2)", "(1,2)", True), ("(1,\\frac{9}{2})", "(1,4.5)", True),
    ("[1,3]", "(1,3)", True),  # the toolkit compares two bracketed lists element-wise, brackets ignored
    ("(1,2,3)", "(1,2)", False),
    # equations: a short left side is dropped, two equations compared as differences
    ("x=5", "5", True), ("5", "k=5", True), ("y=2x+1", "y-1=2x", True),
    # symbolic: LaTeX parsed, simplify(a - b) == 0, numbers within the tolerance
    ("\\frac{x}{7}+\\frac{2}{7}", "\\frac{x+2}{7}", True), ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("\\frac{1}{3}", "0.333333", True), ("\\frac{1}{3}", "0.33", False), ("0.0833333333333333", "\\frac{1}{12}", True),
    ("x^2+1", "x^2+2", False),
    # multiple choice: the last letter A-E of the answer
    ("(C) 12", "C", True), ("B", "C", False),
])
def test_math_equal_follows_the_toolkits_rules(prediction, reference, equal):
    assert qwen.math_equal(prediction, reference) is equal


@pytest.mark.parametrize("text,expected", [
    ("\\dfrac12", "\\frac{1}{2}"), ("3/4", "\\frac{3}{4}"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("10 \\text{ cm}", "10"), ("90^\\circ", "90"), ("\\$5.00", "5"), ("x = 3", "3"), ("\\sqrt3", "\\sqrt{3}"),
    ("twenty one", "21"), ("\\left( 1, 2 \\right)", "(1,2)"), ("50\\%", "50"), (".5", "0.5"),
    ("5 apples", "5"),  # the toolkit's unit words (MathQA's), removed outside Minerva
])
def test_strip_string_normalises_as_the_toolkit(text, expected):
    assert qwen.strip_string(text) == expected


def test_answers_are_normalised_twice_as_the_toolkit_runs_it():
    gold = "so $-2 \\le x \\le 7$ and $\\boxed{x \\in [-2,7]}$."
    assert qwen.extract_answer(gold, "math_500") == "x\\in[-2,7]"
    predicted = qwen.predicted_answer(CORRECT % "x \\in [-2,7]", "math_500")
    assert qwen.gold_answer("math_500", gold) == predicted == "[-2,7]"


def test_minerva_keeps_unit_words_and_its_gold_unnormalised():
    assert qwen.strip_string("5 m", skip_unit=True) == "5m"
    assert qwen.extract_answer(CORRECT % "5 m", "minerva") == "5m"
    assert qwen.extract_answer(CORRECT % "5 m", "math_500") == "5"
    assert qwen.gold_answer("minerva", "So $\\boxed{2 \\leq x}$.") == "2\\lex"  # spaces go, as in the toolkit


@pytest.mark.parametrize("completion,answer", [
    ("...Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("so \\boxed{\\frac{3}{4}} and then", "\\frac{3}{4}"),
    ("first \\boxed{1}, finally \\boxed{2}", "2"),  # the last box
    ("thus the answer is 7.", "7"),
    ("we get 3, then 4, then 1,234", "1234"),  # no box, no phrase: the last number
    ("no number here", ""),
])
def test_extract_answer_as_the_toolkit(completion, answer):
    assert qwen.extract_answer(completion, "math_500") == answer


@pytest.mark.parametrize("bench,gold,right,wrong", [
    ("aime24", "204", "204", "205"),
    ("amc23", "27", "27.0", "28"),
    ("amc_aimo", "142", "142", "141"),
    ("math_500", "So $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{12}}{4}", "\\frac{\\sqrt{2}}{2}"),
    ("minerva", "Thus $\\boxed{6630}$ Angstroms.", "6630.65", "6700"),
    ("olympiadbench", "$\\frac{-1}{1997}$", "-\\frac{1}{1997}", "\\frac{1}{1997}"),
])
def test_qwen_scorer_through_the_harness(bench, gold, right, wrong):
    key = benchmarks.BENCHMARKS[bench]
    row = {key.question_column: "Q", key.gold_column: gold}
    assert tasks.score_completion(key, row, CORRECT % right, "qwen") == 1.0
    assert tasks.score_completion(key, row, CORRECT % wrong, "qwen") == 0.0
    assert tasks.score_completion(key, row, "I do not know.", "qwen") == 0.0
