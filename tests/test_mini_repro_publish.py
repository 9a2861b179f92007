"""``benchmarks/mini_repro.py publish``: finished runs are copied compactly into the repository and reported there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _scripts import load_benchmark

pytest.importorskip("matplotlib")

@pytest.fixture(scope="module")
def mini_repro():
    return load_benchmark("mini_repro")


def _finished_run(folder: Path, algorithm: str, seed: int, reward0: float) -> None:
    history = [{"loss": 0.123456789, "reward": reward0 + 0.1 * i, "rewards/final_number/mean": reward0 + 0.1 * i,
                "completions/mean_length": 20.0 - i, "zero_adv/frac_groups": 0.25 * i,
                "zero_adv/frac_groups_final": 0.0 if algorithm == "zapo" else 0.25 * i,
                "zero_adv/all_zero_batch": 0.0, "step": i + 1} for i in range(4)]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "algorithm": algorithm, "seed": seed,
        "summary": {"algorithm": algorithm, "train_accuracy_first_step": reward0, "train_accuracy_last5": 0.712345678901,
                    "first_step_train_accuracy_ge_0_6": None, "first_step_train_accuracy_ge_0_8": None},
        "heldout": {"before": {"greedy": 2 / 3, "pass@1": 0.4}, "after": {"greedy": 0.9, "pass@1": 0.85}},
        "timing": {"train_s": 100.0, "total_s": 120.0}, "peak_rss_gb": 4.4, "log_history": history,
    }, indent=2))


def test_publish_compacts_runs_and_reports_from_every_published_run(tmp_path, mini_repro):
    out, target = tmp_path / "outputs", tmp_path / "docs" / "mini_repro"
    _finished_run(out / "grpo-seed1", "grpo", 1, 0.4)
    _finished_run(out / "zapo-seed1", "zapo", 1, 0.5)
    (out / "aapo-seed1").mkdir()  # unfinished: no results.json, not published
    (out / "base-eval-seed1.json").write_text(json.dumps({"settings": {"seed": 1}, "result": {"greedy": 2 / 3}}))
    _finished_run(target / "grpo-seed0", "grpo", 0, 0.3)  # published by an earlier session

    code = mini_repro.main(["publish", "--out", str(out), "--to", str(target)])

    assert code == 0
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == ["grpo-seed0", "grpo-seed1", "report", "zapo-seed1"]
    published_text = (target / "grpo-seed1" / "results.json").read_text()
    assert "\n" not in published_text.strip() and '"loss":0.123457' in published_text
    published = json.loads(published_text)
    assert published["summary"]["train_accuracy_last5"] == 0.712346
    assert published["heldout"]["before"]["greedy"] == 0.666667
    assert published["summary"]["first_step_train_accuracy_ge_0_6"] is None
    assert json.loads((target / "base-eval-seed1.json").read_text())["result"]["greedy"] == 0.666667
    report = (target / "report" / "report.md").read_text()
    for run in ("grpo-seed0", "grpo-seed1", "zapo-seed1"):
        assert run in report
    assert "aapo-seed1" not in report
    assert {"reward.png", "zero_adv.png", "completion_length.png"} <= {p.name for p in (target / "report").iterdir()}
    training = (target / "report" / "training.md").read_text()
    assert "| grpo-seed1 | 0.400 | 0.712 |" in training


def test_publish_with_nothing_finished_writes_nothing(tmp_path, mini_repro):
    out, target = tmp_path / "outputs", tmp_path / "published"
    out.mkdir()
    assert mini_repro.main(["publish", "--out", str(out), "--to", str(target)]) == 0
    assert not target.exists() or not any(target.glob("*/results.json"))
