"""``aapo-trl report``: reading runs (trainer_state.json, checkpoints, metrics.json), plots and the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from aapo_trl.cli import main as cli_main  # noqa: E402
from aapo_trl.report import build_report, load_run, train_entries  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(steps: int, *, reward0: float, slope: float, zero_before: list[float], zero_after: list[float],
             all_zero: list[float], extra=None) -> list[dict]:
    history = []
    for index in range(steps):
        entry = {
            "loss": 0.1,
            "reward": reward0 + slope * index,
            "completions/mean_length": 40.0 - index,
            "zero_adv/frac_groups": zero_before[index],
            "zero_adv/frac_groups_final": zero_after[index],
            "zero_adv/all_zero_batch": all_zero[index],
            "step": index + 1,
            "epoch": (index + 1) / steps,
        }
        entry.update((extra or (lambda i: {}))(index))
        history.append(entry)
    history.append({"eval_loss": 1.0, "eval_reward": 0.9, "step": steps})  # evaluation: not a training step
    history.append({"train_runtime": 12.0, "train_loss": 0.1, "step": steps})  # end of training: ignored
    return history


def _write_state(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": history[-1]["step"], "log_history": history}))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # GRPO: TRL's trainer_state.json in the run folder
    _write_state(root / "grpo-seed0" / "trainer_state.json", _history(
        6, reward0=0.2, slope=0.1, zero_before=[0.0, 0.25, 0.5, 0.5, 0.75, 1.0],
        zero_after=[0.0, 0.25, 0.5, 0.5, 0.75, 1.0], all_zero=[0, 0, 0, 0, 0, 1]))
    # AAPO: our metrics.json, with held-out accuracy
    aapo_history = _history(6, reward0=0.3, slope=0.1, zero_before=[0.0, 0.25, 0.5, 0.5, 0.75, 0.75],
                            zero_after=[0.0] * 6, all_zero=[0] * 6)
    (root / "run-b").mkdir(parents=True)
    (root / "run-b" / "metrics.json").write_text(json.dumps({
        "summary": {"algorithm": "aapo", "steps": 6},
        "log_history": aapo_history,
        "heldout": {"before": {"greedy": 0.25, "pass@1": 0.2}, "after": {"greedy": 0.5, "pass@1": 0.45}},
    }))
    # ZAPO with GRESO: only checkpoints, the last one (8 steps) must win over checkpoint-4 and checkpoint-10 is
    # absent; checkpoint-9 has no trainer_state.json and is ignored
    def zapo_extra(i):
        return {"zapo/se_mean": 0.5 + 0.01 * i, "zapo/te_mean": 0.8 - 0.01 * i,
                "greso/p_easy": 0.5 - 0.01 * i, "greso/p_hard": 0.5 + 0.01 * i}

    zapo_history = _history(8, reward0=0.1, slope=0.05, zero_before=[0.5] * 8, zero_after=[0.0] * 8,
                            all_zero=[0] * 8, extra=zapo_extra)
    _write_state(root / "zapo-greso" / "checkpoint-4" / "trainer_state.json",
                 [e for e in zapo_history if e["step"] <= 4])
    _write_state(root / "zapo-greso" / "checkpoint-8" / "trainer_state.json", zapo_history)
    (root / "zapo-greso" / "checkpoint-9").mkdir()
    # A plain TRL GRPO run (no aapo-trl metrics): TRL's frac_reward_zero_std stands for the "before" share
    plain = [{"loss": 0.0, "reward": 0.5, "frac_reward_zero_std": 0.25 * i, "completions/mean_length": 30.0,
              "step": i + 1} for i in range(4)]
    _write_state(root / "trl-plain" / "trainer_state.json", plain)
    return root


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| run ") and not line.startswith("| algorithm "):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width > 100 and height > 100


def test_load_run_sources(runs):
    grpo = load_run(runs / "grpo-seed0")
    assert grpo.source.name == "trainer_state.json" and grpo.algorithm == "grpo"
    assert [e["step"] for e in grpo.train_steps()] == [1, 2, 3, 4, 5, 6]  # eval and train_runtime entries left out
    aapo = load_run(runs / "run-b")
    assert aapo.algorithm == "aapo" and aapo.heldout["after"]["greedy"] == 0.5  # from the summary, not the name
    zapo = load_run(runs / "zapo-greso")
    assert zapo.source == runs / "zapo-greso" / "checkpoint-8" / "trainer_state.json"
    assert zapo.algorithm == "zapo" and len(zapo.train_steps()) == 8
    checkpoint = load_run(runs / "zapo-greso" / "checkpoint-4")  # a checkpoint given directly
    assert checkpoint.name == "zapo-greso" and len(checkpoint.train_steps()) == 4
    assert load_run(runs / "trl-plain").algorithm is None
    with pytest.raises(FileNotFoundError):
        load_run(runs / "zapo-greso" / "checkpoint-9")


def test_report_plots_and_table(runs, tmp_path):
    out = tmp_path / "report"
    result = build_report([runs], out, final_window=3)  # a folder of runs stands for every run in it
    names = {path.name for path in result["plots"]}
    assert names == {"reward.png", "zero_adv.png", "completion_length.png", "zapo_entropy.png", "greso.png"}
    for path in result["plots"]:
        _assert_png(path)
    markdown = (out / "report.md").read_text()
    for name in names:
        assert f"({name})" in markdown
    rows = _table_rows(result["table"])
    assert set(rows) == {"grpo", "aapo", "zapo", "trl-plain"}
    # columns: run, algorithm, steps, final reward (last 3), zero-adv before, after, all-zero batches, greedy, pass@1
    grpo, aapo, zapo, plain = rows["grpo"], rows["aapo"], rows["zapo"], rows["trl-plain"]
    assert grpo[1:7] == ["grpo", "6", "0.600", "0.500", "0.500", "1"]  # rewards 0.5 0.6 0.7; zero shares mean 3/6
    assert aapo[1:7] == ["aapo", "6", "0.700", "0.458", "0.000", "0"]
    assert aapo[7:] == ["0.250 -> 0.500", "0.200 -> 0.450"]
    assert grpo[7:] == ["-", "-"]
    assert zapo[1:7] == ["zapo", "8", "0.400", "0.500", "0.000", "0"]
    assert plain[1:7] == ["-", "4", "0.500", "0.375", "-", "-"]


def test_seeds_are_aggregated_and_labelled(runs, tmp_path):
    second = runs / "grpo-seed1" / "trainer_state.json"
    history = json.loads((runs / "grpo-seed0" / "trainer_state.json").read_text())["log_history"]
    for entry in history:
        if "reward" in entry:
            entry["reward"] += 0.2
    _write_state(second, history)
    result = build_report([runs / "grpo-seed0", runs / "grpo-seed1", runs / "run-b"], tmp_path / "out")
    rows = _table_rows(result["table"])
    assert set(rows) == {"grpo-seed0", "grpo-seed1", "aapo"}  # labels tell same-algorithm runs apart
    grpo = next(entry for entry in result["aggregated"] if entry["algorithm"] == "grpo")
    assert grpo["runs"] == 2
    mean, std = grpo["final_reward"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414, abs=1e-3)  # last-5 means 0.5 and 0.7
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| grpo | 2 | 0.600 +- 0.141 |" in markdown
    assert not (tmp_path / "out" / "zapo_entropy.png").exists()  # no run logged ZAPO's entropies


def test_cli(runs, tmp_path, capsys):
    out = tmp_path / "cli-report"
    assert cli_main(["report", str(runs / "grpo-seed0"), str(runs / "zapo-greso"), "--output-dir", str(out),
                     "--smooth", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| grpo |" in printed and "| zapo |" in printed and "report.md" in printed
    assert (out / "greso.png").is_file() and (out / "report.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty), "--output-dir", str(out)]) == 2


def test_train_entries_keep_one_entry_per_step():
    history = [{"loss": 1.0, "step": 1}, {"loss": 2.0, "step": 1}, {"learning_rate": 0.1, "step": 2}]
    assert train_entries(history) == [{"loss": 2.0, "step": 1}]


@pytest.mark.slow
def test_report_on_a_real_tiny_run(tmp_path, tiny_model_path):
    from aapo_trl.train import run

    output_dir = tmp_path / "grpo-tiny"
    run("grpo", ["--model_name_or_path", "tiny", "--max_steps", "1", "--num_generations", "2",
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                 "--max_completion_length", "4", "--max_train_samples", "8", "--output_dir", str(output_dir),
                 "--truncated_completions", "score", "--disable_tqdm", "true"])
    result = build_report([output_dir], tmp_path / "report")
    (row,) = result["rows"]
    assert row["algorithm"] == "grpo" and row["steps"] == 1 and row["final_reward"] is not None
    assert row["zero_adv_before"] is not None and row["all_zero_batches"] in (0, 1)
    rows = _table_rows(result["table"])
    assert rows["grpo"][1:3] == ["grpo", "1"]
    assert {p.name for p in result["plots"]} == {"reward.png", "zero_adv.png", "completion_length.png"}
    for path in result["plots"]:
        _assert_png(path)
