"""Bad input fails fast and clearly; bad rows during training are handled; same seed, same run; safe loading."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from _training import CPU_ARGS, Recorder, hashed_reward, prompt_dataset
from datasets import Dataset

from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig
from aapo_trl.greso import GRESO_STATE_FILENAME, GRESOStateError
from aapo_trl.rewards import RewardFunctionError
from aapo_trl.train import parse_args
from aapo_trl.trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer, ZAPOTrainer

ROOT = Path(__file__).resolve().parents[1]


def config(config_class=AAPOConfig, tmp_path="unused", **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=4, max_steps=1)
    values.update(overrides)
    return config_class(**values)


def never_called(*args, **kwargs):
    pytest.fail("the model must not be loaded before the inputs are validated")


# ---------------------------------------------------------------------------------------------------- fail fast


class TestFailFast:
    """Every error below is raised before a model is loaded or a completion generated."""

    def test_dataset_without_prompt(self, tmp_path):
        data = Dataset.from_list([{"question": "1 + 1?", "solution": "2"}])
        with pytest.raises(ValueError, match=r"no 'prompt' column \(columns: \['question', 'solution'\]\)"):
            AAPOTrainer("no-model-needed", reward_funcs=["final_number"], args=config(tmp_path=tmp_path),
                        train_dataset=data)

    def test_dataset_without_the_column_a_reward_reads(self, tmp_path):
        data = Dataset.from_list([{"prompt": "1 + 1?", "answer": "2"}])
        with pytest.raises(ValueError, match=r"reward function 'accuracy' reads the column\(s\) \['solution'\]"):
            AAPOTrainer("no-model-needed", reward_funcs=["accuracy"], args=config(tmp_path=tmp_path),
                        train_dataset=data)

    def test_empty_dataset(self, tmp_path):
        empty = Dataset.from_list([{"prompt": "x", "solution": "1"}]).select([])
        with pytest.raises(ValueError, match="train_dataset is empty"):
            GPGTrainer("no-model-needed", reward_funcs=["final_number"], args=config(GPGConfig, tmp_path),
                       train_dataset=empty)

    def test_unknown_reward_name(self, tmp_path):
        with pytest.raises(ValueError, match=r"unknown reward function 'acuracy': known names are \["):
            AAPOTrainer("no-model-needed", reward_funcs=["acuracy"], args=config(tmp_path=tmp_path),
                        train_dataset=prompt_dataset())

    def test_num_generations(self, tmp_path):
        with pytest.raises(ValueError, match="at least 2 generations"):
            config(tmp_path=tmp_path, num_generations=1, per_device_train_batch_size=3)
        with pytest.raises(ValueError, match=r"generation_batch_size \(3\) must be divisible by num_generations \(2\)"):
            config(tmp_path=tmp_path, per_device_train_batch_size=3)

    def test_reward_weights_of_the_wrong_length(self, tiny_model_path, tmp_path):
        with pytest.raises(ValueError, match=r"Number of reward weights \(2\) must match number of reward functions"):
            AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward],
                        args=config(tmp_path=tmp_path, reward_weights=[1.0, 2.0]), train_dataset=prompt_dataset())
        with pytest.raises(ValueError, match="reward_weights has 2 values but reward_funcs names 1 functions"):
            from aapo_trl.train import run

            run("aapo", ["--model_name_or_path", "tiny", "--reward_weights", "1", "2", "--output_dir", str(tmp_path)])

    def test_recipe_field_typo_names_the_file_and_the_field(self, tmp_path):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("model_name_or_path: tiny\nlerning_rate: 1.0e-5\n")
        with pytest.raises(ValueError, match=re.escape(f"unknown field(s) in the recipe {recipe}: 'lerning_rate' "
                                                       "(did you mean 'learning_rate'?)")):
            parse_args("aapo", ["--config", str(recipe)])
        with pytest.raises(ValueError, match=r"'margin_clp' \(did you mean 'margin_clip'\?\)"):
            parse_args("aapo", ["--margin_clp", "false"])

    def test_zapo_without_total_steps(self, tmp_path):
        stream = prompt_dataset().to_iterable_dataset()
        with pytest.raises(ValueError, match="needs the total number of training steps T"):
            ZAPOTrainer("no-model-needed", reward_funcs=[hashed_reward], train_dataset=stream,
                        args=config(ZAPOConfig, tmp_path, max_steps=-1))

    def test_bad_policies(self, tmp_path):
        with pytest.raises(ValueError, match="reward_errors must be one of"):
            config(tmp_path=tmp_path, reward_errors="ignore")
        with pytest.raises(ValueError, match="truncated_completions must be one of"):
            config(ZAPOConfig, tmp_path, truncated_completions="drop")

    def test_greso_state_from_another_dataset(self, tiny_model_path, tmp_path):
        first = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(4),
                                    args=config(GRPOBaselineConfig, tmp_path, greso=True, save_strategy="steps",
                                                save_steps=1))
        first.train()
        state_file = tmp_path / "checkpoint-1" / GRESO_STATE_FILENAME
        assert state_file.exists()
        other = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(6),
                                    args=config(GRPOBaselineConfig, tmp_path, greso=True, max_steps=2))
        other._generate_and_score_completions = never_called
        with pytest.raises(GRESOStateError, match=re.escape(str(state_file))):
            other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# ---------------------------------------------------------------------------------------------- during training


def failing_on_row(bad_row: int):
    def flaky_reward(completions, **kwargs):
        if any(kwargs["solution"][i] == str(2 * bad_row + 1) for i in range(len(completions))):
            if len(completions) == 1:
                raise ZeroDivisionError("cannot score this row")
            raise ZeroDivisionError("batch failed")
        return [1.0 if i % 2 else 0.0 for i in range(len(completions))]

    return flaky_reward


def test_a_reward_that_raises_names_the_function_row_and_exception(tiny_model_path, tmp_path):
    trainer = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[failing_on_row(0)], train_dataset=prompt_dataset(2),
                                  args=config(GRPOBaselineConfig, tmp_path))
    with pytest.raises(RewardFunctionError, match=r"reward function 'flaky_reward' failed on row \d+ of the batch "
                                                  r".*ZeroDivisionError: cannot score this row"):
        trainer.train()


def test_reward_errors_unscorable_zeroes_those_rows_and_counts_them(tiny_model_path, tmp_path):
    trainer = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[failing_on_row(0)], train_dataset=prompt_dataset(2),
                                  args=config(GRPOBaselineConfig, tmp_path, reward_errors="unscorable"))
    recorder = Recorder(trainer)
    trainer.train()
    rewards, advantages = recorder.batches[0]["rewards"], recorder.batches[0]["advantages"]
    assert int(torch.isnan(rewards).sum()) == 2  # the group of the failing prompt
    assert (advantages[torch.isnan(rewards)] == 0).all()
    assert trainer.state.log_history[0]["reward_errors/flaky_reward/frac"] == pytest.approx(0.5)


def test_nan_and_inf_rewards_are_unscorable(tiny_model_path, tmp_path):
    def non_finite(completions, **kwargs):
        return [math.nan, math.inf, 1.0, 0.0][: len(completions)]

    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[non_finite], train_dataset=prompt_dataset(2),
                          args=config(tmp_path=tmp_path))
    recorder = Recorder(trainer)
    trainer.train()
    rewards, advantages = recorder.batches[0]["rewards"], recorder.batches[0]["advantages"]
    assert torch.isnan(rewards).tolist() == [True, True, False, False]
    assert advantages[:2].tolist() == [0.0, 0.0] and torch.isfinite(advantages).all()
    assert trainer.state.log_history[0]["reward_nonfinite/non_finite/frac"] == pytest.approx(0.5)


def test_truncated_and_empty_completions_and_all_none_groups_get_zero(tiny_model_path, tmp_path):
    def none_for_first_prompt(completions, solution, **kwargs):
        return [None if s == "1" else float(i % 2) for i, s in enumerate(solution)]

    # opt-in policy: completions cut at max_completion_length are unscorable (the tiny model never stops in 4 tokens)
    truncating = config(ZAPOConfig, tmp_path, truncated_completions="unscorable", max_steps=2)
    trainer = ZAPOTrainer(str(tiny_model_path), reward_funcs=[none_for_first_prompt], train_dataset=prompt_dataset(2),
                          args=truncating)
    recorder = Recorder(trainer)
    trainer.train()
    for batch in recorder.batches:
        assert torch.isnan(batch["rewards"]).all() and (batch["advantages"] == 0).all()
    assert trainer.state.global_step == 2  # training went on
    assert trainer.state.log_history[0]["unscorable/frac_rows"] == 1.0

    # opt-in policy: empty completions (EOS first, forced by a bias) are unscorable, and so is an all-None group:
    # advantage 0 (by default empty completions are scored: tests/test_empty_completions.py)
    eos = 2
    scoring = config(AAPOConfig, tmp_path / "b", generation_kwargs={"sequence_bias": [[[eos], 100.0]]},
                     empty_completions="unscorable")
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[none_for_first_prompt], train_dataset=prompt_dataset(2),
                          args=scoring)
    recorder = Recorder(trainer)
    trainer.train()
    batch = recorder.batches[0]
    assert all(ids == [eos] for ids in batch["completion_ids"])
    assert torch.isnan(batch["rewards"]).all() and (batch["advantages"] == 0).all()


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("trainer_class, config_class, extra", [
    (AAPOTrainer, AAPOConfig, {}),
    (GPGTrainer, GPGConfig, {}),
    (ZAPOTrainer, ZAPOConfig, {}),
    (GRPOBaselineTrainer, GRPOBaselineConfig, {"greso": True}),
])
def test_same_seed_same_run(tiny_model_path, tmp_path, trainer_class, config_class, extra):
    def run(output_dir):
        args = config(config_class, output_dir, max_steps=3, learning_rate=1e-2, seed=7, **extra)
        trainer = trainer_class(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(6),
                                args=args)
        recorder = Recorder(trainer)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        greso = trainer.greso_filter.state_dict() if trainer.greso_filter is not None else None
        return [b["advantages"] for b in recorder.batches], losses, greso

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    for a, b in zip(first[0], second[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert first[1] == second[1] and len(first[1]) == 3
    assert first[2] == second[2]


# ---------------------------------------------------------------------------------------------------- safety


UNSAFE_PATTERNS = {
    r"torch\.load\((?![^)]*weights_only\s*=\s*True)": "torch.load without weights_only=True",
    r"\bpickle\.loads?\(": "pickle load",
    r"trust_remote_code\s*=\s*True": "trust_remote_code enabled by default",
    r"(?<![.\w])(?:eval|exec)\(": "eval/exec",
    r"yaml\.load\((?![^)]*SafeLoader)": "yaml.load without SafeLoader",
}


def test_package_has_no_unsafe_loads():
    offenders = []
    for path in sorted((ROOT / "aapo_trl").rglob("*.py")):
        text = path.read_text()
        for pattern, what in UNSAFE_PATTERNS.items():
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert offenders == []


def test_the_scan_catches_what_it_should():
    samples = ["torch.load(path)", "pickle.load(f)", "from_pretrained(x, trust_remote_code=True)", "eval(s)"]
    assert not any(re.search(p, "model.eval()") for p in UNSAFE_PATTERNS)
    for sample in samples:
        assert any(re.search(pattern, sample) for pattern in UNSAFE_PATTERNS), sample
    assert not any(re.search(p, "torch.load(path, weights_only=True)") for p in UNSAFE_PATTERNS)


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    _, args, _ = parse_args("aapo", ["--output_dir", str(tmp_path)])
    assert args.trust_remote_code is False
