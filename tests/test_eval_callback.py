"""The in-training benchmark evaluation callback, in a real (tiny, CPU, offline) TRL training run."""

from __future__ import annotations

from pathlib import Path

import pytest

import lighteval  # noqa: E402,F401  (the eval extra; make test installs it: a missing install must fail, not skip)

from _training import CPU_ARGS, hashed_reward, prompt_dataset  # noqa: E402

from aapo_trl.configs import GRPOBaselineConfig  # noqa: E402
from aapo_trl.eval_callback import BenchmarkEvalCallback  # noqa: E402
from aapo_trl.trainers import GRPOBaselineTrainer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "eval"

pytestmark = pytest.mark.slow


def tiny_trainer(model_path, tmp_path, max_steps=2):
    config = GRPOBaselineConfig(**dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=4,
                                       num_generations=2, max_completion_length=4, max_steps=max_steps))
    return GRPOBaselineTrainer(str(model_path), reward_funcs=[hashed_reward], args=config,
                               train_dataset=prompt_dataset(4))


def test_callback_logs_pass_at_1_during_training(tiny_model_path, tmp_path):
    trainer = tiny_trainer(tiny_model_path, tmp_path)
    callback = BenchmarkEvalCallback(trainer, benchmark="math_500", data_dir=str(FIXTURES), eval_steps=2,
                                     num_problems=2, num_samples=8, max_new_tokens=4, batch_size=2,
                                     eval_on_start=True)
    trainer.add_callback(callback)
    trainer.train()

    evaluated = [entry for entry in trainer.state.log_history if "eval/math_500/pass@1" in entry]
    assert [entry["step"] for entry in evaluated] == [0, 2]  # on start, then every 2 steps
    for entry in evaluated:
        assert 0.0 <= entry["eval/math_500/pass@1"] <= 1.0
        assert 0.0 <= entry["eval/math_500/pass@8"] <= 1.0
        assert entry["eval/math_500/num_problems"] == 2
        assert 0 < entry["eval/math_500/mean_completion_tokens"] <= 4
        assert "reward" not in entry  # TRL's training metrics stay in their own entries
    training = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert [entry["step"] for entry in training] == [1, 2]
    assert trainer.model.training  # train mode restored after evaluating


def test_callback_scores_right_answers_as_right(tiny_model_path, tmp_path):
    trainer = tiny_trainer(tiny_model_path, tmp_path, max_steps=1)
    callback = BenchmarkEvalCallback(trainer, benchmark="olympiadbench", data_dir=str(FIXTURES), eval_steps=1,
                                     num_problems=None, num_samples=2, max_new_tokens=2, batch_size=2)
    rows = callback.rows()
    assert len(rows) == 3  # the whole fixture split

    def answer_first_sample_right(model, tokenizer, batch):
        texts = [[f"so the final answer is $\\boxed{{{row['answer'].strip('$')}}}$", "no idea"] for row in batch]
        return texts, [3] * (2 * len(batch))

    callback._generate = answer_first_sample_right
    metrics = callback.evaluate()
    assert metrics["eval/olympiadbench/pass@1"] == pytest.approx(0.5)
    assert metrics["eval/olympiadbench/num_problems"] == 3
    assert metrics["eval/olympiadbench/mean_completion_tokens"] == 3


def test_callback_rejects_sampling_settings_that_cannot_work(tiny_model_path, tmp_path):
    trainer = tiny_trainer(tiny_model_path, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="temperature"):
        BenchmarkEvalCallback(trainer, data_dir=str(FIXTURES), num_samples=4, temperature=0.0)
    with pytest.raises(KeyError, match="unknown benchmark"):
        BenchmarkEvalCallback(trainer, benchmark="gsm8k", data_dir=str(FIXTURES))
