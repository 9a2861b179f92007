"""The lighteval task definitions of AIME24, MATH-500, AMC23, Minerva and OlympiadBench (issue 4):
names, datasets, prompts, scoring of every answer style, pass@k, and the offline fixtures."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

import lighteval  # noqa: E402,F401  (the eval extra; make test installs it: a missing install must fail, not skip)

from aapo_trl.evaluation import evaluation_module  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
benchmarks = evaluation_module("benchmarks")
tasks = evaluation_module("tasks")

CORRECT = "Step by step... Therefore, the final answer is: $\\boxed{%s}$. I hope it is correct"

# Columns of the Hub datasets the AAPO / open-rs evaluation loads (fixtures must have exactly these).
HUB_COLUMNS = {
    "aime24": {"id", "problem", "solution", "answer", "url", "year"},
    "math_500": {"problem", "solution", "answer", "subject", "level", "unique_id"},
    "amc23": {"id", "problem", "answer", "url", "question"},
    "minerva": {"problem", "solution", "type", "idx"},
    "olympiadbench": {"id", "question", "solution", "final_answer", "context", "subfield", "unit", "answer_type",
                      "error", "is_multiple_answer", "answer"},
    "amc_aimo": {"id", "problem", "answer", "url"},
}


def row_with_gold(key: str, gold: str, question: str = "Q?") -> dict:
    """A row in the benchmark's schema whose gold column holds ``gold`` the way the dataset writes it."""
    bench = benchmarks.BENCHMARKS[key]
    row = {column: None for column in HUB_COLUMNS[key]}
    row[bench.question_column] = question
    if key in ("aime24", "amc23", "amc_aimo"):
        row["answer"] = gold  # a bare answer, read as an expression
    elif key == "math_500":
        row["solution"] = f"Working... so the answer is $\\boxed{{{gold}}}$."
        row["answer"] = gold
    elif key == "minerva":
        row["solution"] = f"Working... Final answer: The final answer is \\boxed{{{gold}}}."
    else:  # olympiadbench: answer column, LaTeX in dollars as the source's final_answer
        row["answer"] = f"${gold}$"
        row["final_answer"] = [f"${gold}$"]
    return row


# For each answer style: (gold as the dataset writes it, a correct answer, a wrong answer).
# Expression golds (AIME24, AMC23) are numbers in those datasets; the styles vary how the model writes
# the answer, and the interval case relies on open-rs's fallback (an unparseable gold is compared as
# text). LaTeX golds (the others) come in every style and accept any equivalent answer.
STYLES = {
    "expr": {
        "integer": ("204", "204", "205"),
        "fraction": ("0.75", "\\frac{3}{4}", "\\frac{4}{3}"),
        "latex_expression": ("12", "2^{2} \\cdot 3", "2^{3} \\cdot 3"),
        "interval": ("(1,2]", "(1,2]", "(1,3]"),
    },
    "latex": {
        "integer": ("204", "204", "205"),
        "fraction": ("\\frac{3}{4}", "0.75", "\\frac{4}{3}"),
        "latex_expression": ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{12}}{4}", "\\frac{\\sqrt{2}}{2}"),
        "interval": ("(-\\infty, 2]", "(-\\infty,2]", "(-\\infty, 2)"),
    },
}


@pytest.mark.parametrize("key", benchmarks.BENCHMARK_KEYS)
@pytest.mark.parametrize("style", ["integer", "fraction", "latex_expression", "interval"])
def test_each_task_scores_a_right_and_a_wrong_answer_of_each_style(key, style):
    bench = benchmarks.BENCHMARKS[key]
    gold, correct, wrong = STYLES[bench.gold_kind][style]
    row = row_with_gold(key, gold)
    assert tasks.score_completion(bench, row, CORRECT % correct) == 1.0
    assert tasks.score_completion(bench, row, CORRECT % wrong) == 0.0
    assert tasks.score_completion(bench, row, "I do not know.") == 0.0


def test_expression_golds_keep_open_rs_limits():
    """Protocol fidelity, not a wish: an expression gold is parsed as an expression, so a gold
    written as an interval with a space keeps only its last number (as in open-rs)."""
    row = row_with_gold("aime24", "(1, 2]")
    assert tasks.score_completion("aime24", row, CORRECT % "2") == 1.0
    assert tasks.score_completion("aime24", row, CORRECT % "(1, 2]") == 0.0


def test_gold_kinds_follow_open_rs():
    kinds = {key: b.gold_kind for key, b in benchmarks.BENCHMARKS.items()}
    assert kinds == {"aime24": "expr", "math_500": "latex", "amc23": "expr", "minerva": "latex",
                     "olympiadbench": "latex", "amc_aimo": "expr"}
    hubs = {key: (b.hub_id, b.split) for key, b in benchmarks.BENCHMARKS.items()}
    assert hubs == {
        "aime24": ("HuggingFaceH4/aime_2024", "train"),
        "math_500": ("HuggingFaceH4/MATH-500", "test"),
        "amc23": ("knoveleng/AMC-23", "train"),
        "minerva": ("knoveleng/Minerva-Math", "train"),
        "olympiadbench": ("knoveleng/OlympiadBench", "train"),
        "amc_aimo": ("AI-MO/aimo-validation-amc", "train"),
    }


def test_prompt_is_the_open_rs_boxed_prompt():
    bench = benchmarks.BENCHMARKS["olympiadbench"]
    doc = tasks.make_prompt_function(bench)(row_with_gold("olympiadbench", "7", "Compute $3+4$."), "t")
    assert doc.query.startswith("Solve the following math problem efficiently and clearly.  The last line")
    assert "'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct'" in doc.query
    assert doc.query.endswith("Think step by step before answering.\n\nCompute $3+4$.")
    assert doc.choices == ["$7$"] and doc.gold_index == 0


def test_numeric_golds_are_read_as_text():
    # open-rs hands the raw column to lighteval, whose extraction only reads str
    row = row_with_gold("amc23", "x")
    row["answer"] = 27.0
    assert tasks.score_completion("amc23", row, CORRECT % "27") == 1.0
    assert benchmarks.gold_text(["$\\frac{1}{4}$", "x"]) == "$\\frac{1}{4}$"


def test_task_names_do_not_collide_with_lighteval_builtins():
    import lighteval

    builtin_dir = Path(lighteval.__file__).parent / "tasks"
    sources = "\n".join(p.read_text(errors="ignore") for p in builtin_dir.rglob("*.py"))
    builtin_names = set(re.findall(r"""name\s*=\s*["']([^"']+)["']""", sources))
    aapo = {task.name for task in tasks.make_task_configs()}
    zapo = {task.name for task in tasks.make_task_configs(protocol="zapo")}
    assert aapo == {f"aapo_{key}" for key in ("aime24", "math_500", "amc23", "minerva", "olympiadbench")}
    assert zapo == {f"aapo_{key}" for key in ("amc_aimo", "math_500", "minerva", "olympiadbench", "aime24")}
    ours = aapo | zapo
    assert ours == {f"aapo_{key}" for key in benchmarks.BENCHMARK_KEYS}
    assert {"aime24", "math_500"} <= builtin_names  # the names we must avoid do exist there
    assert not ours & builtin_names
    assert "aapo_" not in sources


def test_task_configs_carry_samples_generation_size_and_source(tmp_path):
    from lighteval.tasks.lighteval_task import LightevalTask

    (tmp_path / "minerva").mkdir()
    configs = tasks.make_task_configs("minerva,aime", num_samples=16, generation_size=123, data_dir=tmp_path,
                                      datasets={"aime": "me/my-aime"}, environ={})
    assert [c.name for c in configs] == ["aapo_aime24", "aapo_minerva"]  # table order
    assert [c.hf_repo for c in configs] == ["me/my-aime", str(tmp_path / "minerva")]
    for config in configs:
        assert config.generation_size == 123
        assert list(config.metrics[0].metric_name) == ["pass@1", "pass@8", "pass@16"]
        assert max(LightevalTask(config).num_samples) == 16  # lighteval generates n samples per problem


def test_dataset_resolution_order(tmp_path):
    bench = benchmarks.BENCHMARKS["math_500"]
    (tmp_path / "a" / "math_500").mkdir(parents=True)
    (tmp_path / "b" / "math_500").mkdir(parents=True)
    assert benchmarks.resolve_dataset(bench, environ={}) == "HuggingFaceH4/MATH-500"
    env = {"AAPO_EVAL_DATA_DIR": str(tmp_path / "b")}
    assert benchmarks.resolve_dataset(bench, environ=env) == str(tmp_path / "b" / "math_500")
    env["AAPO_EVAL_DATASET_MATH_500"] = "someone/math500"
    assert benchmarks.resolve_dataset(bench, environ=env) == "someone/math500"
    assert benchmarks.resolve_dataset(bench, data_dir=tmp_path / "a", environ=env) == str(tmp_path / "a" / "math_500")
    assert benchmarks.resolve_dataset(bench, {"math500": "x/y"}, tmp_path / "a", env) == "x/y"
    assert benchmarks.resolve_dataset(bench, data_dir=tmp_path / "missing", environ={}) == "HuggingFaceH4/MATH-500"


def test_pass_at_k_is_the_unbiased_estimator():
    for n in (1, 4, 16, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert benchmarks.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert benchmarks.pass_at_k(16, 1, 8) == pytest.approx(0.5)
    assert benchmarks.reported_ks(1) == [1]
    assert benchmarks.reported_ks(20) == [1, 8, 16]
    assert benchmarks.reported_ks(64) == [1, 8, 16, 32, 64]
    with pytest.raises(ValueError):
        benchmarks.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        benchmarks.pass_at_k(4, 1, 8)


def test_metric_scores_every_sample_once():
    from lighteval.models.model_output import ModelResponse

    bench = benchmarks.BENCHMARKS["aime24"]
    doc = tasks.make_prompt_function(bench)(row_with_gold("aime24", "130"), bench.task_name)
    metric = tasks.pass_at_k_metric("aime24", n=8)
    texts = [CORRECT % "130", CORRECT % "131"] + ["no idea"] * 5 + [CORRECT % "130"]
    result = metric.compute_sample(doc=doc, model_response=ModelResponse(text=texts))
    assert result == {"pass@1": pytest.approx(2 / 8), "pass@8": pytest.approx(1.0)}
    assert doc.specific["scores"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert metric.sample_level_fn.num_samples() == 8


def test_only_our_module_is_loaded_by_the_registry():
    run = evaluation_module("run")
    from types import ModuleType

    from lighteval.tasks.registry import Registry

    module = ModuleType("fixture_tasks")
    module.TASKS_TABLE = tasks.make_task_configs("aime24", data_dir=FIXTURES, environ={})
    before = set(sys.modules)
    with run.only_these_tasks():
        registry = Registry(tasks="aapo_aime24|0", custom_tasks=module)
        loaded = registry.load_tasks()
    assert list(loaded) == ["aapo_aime24|0"]
    imported = {name for name in set(sys.modules) - before if name.startswith("lighteval.tasks.tasks")}
    assert not imported, imported
    # the patch is undone afterwards
    assert Registry.load_all_task_configs is not None and "load_custom_only" not in repr(
        Registry.__dict__["load_all_task_configs"].__func__)


def fixture_answer(key: str, row: dict) -> str:
    """The answer a correct model would box, read from the fixture row."""
    if key == "minerva":
        return re.search(r"\\boxed\{(.*)\}\.$", row["solution"]).group(1)
    if key == "olympiadbench":
        return row["answer"].strip("$")
    return benchmarks.gold_text(row["answer"])


@pytest.mark.parametrize("key", benchmarks.BENCHMARK_KEYS)
def test_fixtures_have_the_hub_schema_and_score_their_own_answers(key):
    bench = benchmarks.BENCHMARKS[key]
    rows = benchmarks.load_rows(bench, benchmarks.resolve_dataset(bench, data_dir=FIXTURES, environ={}))
    assert len(rows) >= 2
    for row in rows:
        assert set(row) == HUB_COLUMNS[key]
        answer = fixture_answer(key, row)
        assert tasks.score_completion(bench, row, CORRECT % answer) == 1.0, (key, answer)
        assert tasks.score_completion(bench, row, CORRECT % "99999") == 0.0
    # the split file is named after the Hub split, so lighteval's loader finds it
    assert (FIXTURES / key / f"{bench.split}.jsonl").is_file()
    first = json.loads((FIXTURES / key / f"{bench.split}.jsonl").read_text().splitlines()[0])
    assert set(first) == HUB_COLUMNS[key]


def test_zapo_protocol_is_gresos_benchmarks_prompt_and_grader():
    """ZAPO evaluates as GRESO: the 83-problem AMC, GRESO's prompt, the last boxed answer verified with
    math-verify (issue 28)."""
    assert [b.key for b in benchmarks.parse_benchmarks(None, "zapo")] == [
        "amc_aimo", "math_500", "minerva", "olympiadbench", "aime24"]
    assert [b.key for b in benchmarks.parse_benchmarks("amc", "zapo")] == ["amc_aimo"]
    assert [b.key for b in benchmarks.parse_benchmarks("amc")] == ["amc23"]
    assert benchmarks.BENCHMARKS["amc_aimo"].num_problems == 83
    bench = benchmarks.BENCHMARKS["amc_aimo"]
    doc = tasks.make_prompt_function(bench, "zapo")({"problem": "What is $1+1$?", "answer": 2.0}, "t")
    assert doc.query == (
        "Please solve the following math problem: What is $1+1$?. The assistant first thinks about the reasoning "
        "process step by step and then provides the user with the answer. Return the final answer in \\boxed{} "
        "tags, for example \\boxed{1}. Let's solve this step by step. ")
    assert doc.choices == ["2"]
    assert isinstance(tasks.make_scorer(bench, "papers", "zapo"), tasks.GresoBoxedMathVerify)
    assert isinstance(tasks.make_scorer(bench, "papers", "aapo"), tasks.PapersExtractiveMatch)
    with pytest.raises(ValueError, match="protocol"):
        tasks.make_prompt_function(bench, "grpo")


@pytest.mark.parametrize("completion,expected", [
    ("so $\\boxed{142}$", 1.0),
    ("$\\boxed{142.0}$", 1.0),
    ("The answer is 142.", 0.0),  # GRESO's grader reads a boxed answer only
    ("$\\boxed{142}$ ... no, $\\boxed{143}$", 0.0),  # the last box counts
    ("$\\boxed{143}$ ... no, $\\boxed{142}$", 1.0),
])
def test_greso_grader_verifies_the_last_boxed_answer(completion, expected):
    row = {"id": 0, "problem": "Q", "answer": 142.0, "url": "u"}
    assert tasks.score_completion("amc", row, completion, "papers", protocol="zapo") == expected
