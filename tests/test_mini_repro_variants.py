"""``benchmarks/mini_repro.py``'s variants (GRPO + GRESO, GRPO + dynamic sampling) and the generation cost per step."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mini_repro.py"


@pytest.fixture(scope="module")
def mini_repro():
    spec = importlib.util.spec_from_file_location("mini_repro", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_train_with_their_trainer_and_fields(mini_repro, tmp_path):
    args = SimpleNamespace(model="tiny", steps=2, max_completion_length=48, train_args=[])
    argv = mini_repro.train_argv(args, "grpo-ds", 0, tmp_path)
    assert mini_repro.trainer_of("grpo-ds") == "grpo" and mini_repro.trainer_of("aapo") == "aapo"
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert pairs["--dynamic_sampling"] == "true" and pairs["--dynamic_sampling_metric"] == "reward"
    assert pairs["--dynamic_sampling_on_exhaustion"] == "train_kept"
    assert "--dynamic_sampling" not in mini_repro.train_argv(args, "grpo", 0, tmp_path)
    assert dict(zip(*[iter(mini_repro.train_argv(args, "grpo-greso", 0, tmp_path))] * 2))["--greso"] == "true"


def test_generation_cost_of_a_run_without_dynamic_sampling(mini_repro):
    series = [{"zero_adv_before": 0.5, "step_time_s": 2.0}, {"zero_adv_before": 0.0, "step_time_s": 4.0}]
    cost = mini_repro.generation_cost(series, prompts_per_step=4, num_generations=8)
    # 2 steps x 32 completions for 2 + 4 groups with signal
    assert cost == {"completions_per_step": 32.0, "completions_per_group_with_signal": 64 / 6, "step_time_s": 3.0}


def test_generation_cost_of_a_dynamic_sampling_run(mini_repro):
    series = [{"generated_completions": 64.0, "completions_per_kept_group": 16.0, "step_time_s": 1.0},
              {"generated_completions": 32.0, "completions_per_kept_group": 8.0, "step_time_s": 1.0}]
    cost = mini_repro.generation_cost(series, prompts_per_step=4, num_generations=8)
    assert cost["completions_per_step"] == 48.0
    assert cost["completions_per_group_with_signal"] == pytest.approx(96 / 8)  # 4 kept groups each step
    # a step that trained no group with signal (exhausted, train_kept) logs no cost per kept group
    series.append({"generated_completions": 256.0, "completions_per_kept_group": None, "step_time_s": 1.0})
    assert mini_repro.generation_cost(series, 4, 8)["completions_per_group_with_signal"] == pytest.approx(352 / 8)


def test_runs_published_before_the_cost_was_recorded_get_it_from_their_log(mini_repro):
    history = [{"step": 1, "zero_adv/frac_groups": 0.5, "step_time": 3.0},
               {"step": 2, "zero_adv/frac_groups": 0.25, "step_time": 5.0}]
    data = {"summary": {}, "log_history": history, "recipe": {"train_argv": ["--truncated_completions", "score"]}}
    assert mini_repro.run_costs(data) == {"completions_per_step": 32.0,
                                          "completions_per_group_with_signal": 64 / 5, "step_time_s": 4.0}
    assert mini_repro.truncation_of(data) == "score"
    assert mini_repro.truncation_of({"recipe": {"truncated_completions": "unscorable", "train_argv": []}}) == "unscorable"
    assert mini_repro.truncation_of({"recipe": {"train_argv": []}}) == "-"  # not recorded
