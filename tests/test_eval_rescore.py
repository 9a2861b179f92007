"""``aapo-trl eval --rescore PATH``: saved generations re-graded under every scorer, no model loaded, from
this harness's lighteval details, lighteval's older details layout and the Qwen2.5-Math toolkit's jsonl
(files written here in each format), each row matched to its benchmark problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aapo_trl.cli import main
from aapo_trl.evaluation import evaluation_module

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
rescore = evaluation_module("rescore")
benchmarks = evaluation_module("benchmarks")

RIGHT = "Therefore, the final answer is: $\\boxed{%s}$. I hope it is correct"


def _rows(key: str) -> list[dict]:
    path = next((FIXTURES / key).glob("*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_qwen_jsonl(path: Path) -> None:
    """The toolkit's output: question, gt, code (generations), pred, score (its flags). The third row's
    second sample is right but unboxed and written ``25\\%``-free; its flags are set as the toolkit would."""
    rows = _rows("aime24")
    lines = [
        {"idx": 0, "question": rows[0]["problem"], "gt": "42", "code": [RIGHT % "42", RIGHT % "41"],
         "pred": ["42", "41"], "score": [True, False]},
        {"idx": 1, "question": rows[1]["problem"], "gt": rows[1]["answer"],
         "code": [RIGHT % rows[1]["answer"], "I give up."], "pred": [rows[1]["answer"], ""], "score": [True, False]},
        {"idx": 2, "question": rows[2]["problem"], "gt": "370", "code": [RIGHT % "370", "so it is 370"],
         "pred": ["370", "370"], "score": [True, True]},
        {"idx": 3, "question": "A problem of another set entirely.", "gt": "1", "code": ["1"], "pred": ["1"],
         "score": [True]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def write_lighteval_details(path: Path, key: str = "math_500") -> None:
    """This harness's lighteval 0.13 details: doc (query = the open-rs prompt, specific.scores = the
    papers scorer's flags), model_response.text (the samples), metric."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bench = benchmarks.BENCHMARKS[key]
    rows = _rows(key)[:2]
    answers = [bench.final_answer(row) for row in rows]
    records = []
    for row, answer in zip(rows, answers):
        texts = [RIGHT % answer, RIGHT % "999"]
        records.append({"doc": {"query": bench.query(row), "choices": [bench.gold(row)], "gold_index": 0,
                                "specific": {"scores": [1.0, 0.0]}, "task_name": bench.task_name},
                        "model_response": {"text": texts}, "metric": {"pass@1": 0.5}})
    pq.write_table(pa.Table.from_pylist(records), str(path))


def write_old_lighteval_details(path: Path) -> None:
    """lighteval's older layout (open-r1 era): full_prompt, predictions, metrics (one sample each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bench = benchmarks.BENCHMARKS["amc23"]
    rows = _rows("amc23")
    records = [{"full_prompt": bench.query(row), "predictions": [RIGHT % benchmarks.gold_text(row["answer"])],
                "gold": [benchmarks.gold_text(row["answer"])], "metrics": {"extractive_match": 1.0}}
               for row in rows]
    records[-1]["predictions"], records[-1]["metrics"] = ["no idea"], {"extractive_match": 0.0}
    pq.write_table(pa.Table.from_pylist(records), str(path))


def test_rescore_a_qwen_toolkit_jsonl_matches_problems_and_reports_agreement(tmp_path):
    path = tmp_path / "aime24" / "test_qwen25-math-cot_-1_seed0_t0.0_s0_e-1.jsonl"
    path.parent.mkdir()
    write_qwen_jsonl(path)
    [result] = rescore.rescore([path], data_dir=FIXTURES, environ={})
    assert (result.benchmark, result.format, result.problems, result.samples, result.unmatched) == (
        "aime24", "qwen-jsonl", 3, 6, 1)
    # papers / robust read the boxed answers; "so it is 370" is read by lighteval's fallback and the
    # toolkit's last number alike
    assert result.pass_at_1["qwen"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert result.agreement["qwen"] == 1.0  # the toolkit's grader, re-implemented, agrees with its flags
    assert set(result.pass_at_1) == set(result.agreement) == {"papers", "robust", "qwen"}


def test_rescore_this_harness_and_older_lighteval_details(tmp_path):
    write_lighteval_details(tmp_path / "details_aapo_math_500|0_2025.parquet")
    write_old_lighteval_details(tmp_path / "details_custom|amc23|0_2024.parquet")
    results = {r.benchmark: r for r in rescore.rescore([tmp_path], data_dir=FIXTURES, environ={})}
    assert set(results) == {"math_500", "amc23"}
    ours = results["math_500"]
    assert (ours.problems, ours.samples, ours.unmatched) == (2, 4, 0)
    assert ours.pass_at_1 == {"papers": 0.5, "robust": 0.5, "qwen": 0.5}
    assert ours.agreement == {"papers": 1.0, "robust": 1.0, "qwen": 1.0}
    old = results["amc23"]
    assert old.problems == len(_rows("amc23")) and old.agreement["papers"] == 1.0


def test_zapo_protocol_reads_amc_as_the_83_problem_set_and_the_greso_prompt(tmp_path):
    bench = benchmarks.BENCHMARKS["amc_aimo"]
    rows = _rows("amc_aimo")
    path = tmp_path / "out.jsonl"
    path.write_text("\n".join(json.dumps({"question": bench.query(row, "greso"), "code": [
        "so \\boxed{%s}" % benchmarks.gold_text(row["answer"])], "score": [1]}) for row in rows) + "\n")
    [result] = rescore.rescore([path], protocol="zapo", benchmark_names="amc", data_dir=FIXTURES, environ={})
    assert result.benchmark == "amc_aimo" and result.problems == 3
    assert result.pass_at_1 == {"papers": 1.0, "robust": 1.0, "qwen": 1.0}


def test_cli_rescore_prints_every_scorer_and_refuses_what_it_cannot_read(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    write_qwen_jsonl(path)
    assert main(["eval", "--rescore", str(path), "--data-dir", str(FIXTURES)]) == 0
    printed = capsys.readouterr().out
    assert "| out.jsonl | qwen-jsonl | AIME24 | 3 | 6 | 1 |" in printed
    assert "pass@1 papers | pass@1 robust | pass@1 qwen | agree papers" in printed
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*code"):
        rescore.rescore([tmp_path / "bad.jsonl"], data_dir=FIXTURES, environ={})
    (tmp_path / "other.jsonl").write_text(json.dumps({"question": "nothing like it", "code": ["1"]}) + "\n")
    with pytest.raises(ValueError, match="none of the rows matches"):
        rescore.rescore([tmp_path / "other.jsonl"], data_dir=FIXTURES, environ={})
    with pytest.raises(FileNotFoundError):
        rescore.rescore([tmp_path / "missing"], data_dir=FIXTURES, environ={})
    assert re.search(r"agree \(%\)", printed)
