"""GRESO inside real training runs: filtering with GRPO/AAPO/ZAPO, checkpointed state, exact resume."""

from __future__ import annotations

import json

import pytest
from _training import CPU_ARGS
from datasets import Dataset

from aapo_trl.configs import AAPOConfig, GRPOBaselineConfig, ZAPOConfig
from aapo_trl.greso import GRESO_STATE_FILENAME, GRESORepeatSampler
from aapo_trl.trainers import AAPOTrainer, GRPOBaselineTrainer, ZAPOTrainer

pytestmark = pytest.mark.slow

KINDS = ["easy"] * 3 + ["hard"] * 3 + ["mixed"] * 2


def dataset():
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "solution": kind, "row_id": i}
        for i, kind in enumerate(KINDS)
    ])


def prompt_determined_reward(completions, solution, **kwargs):
    """Easy prompts always all-correct, hard ones all-wrong, mixed ones half right: GRESO's history
    then depends on the prompts alone, not on what the model happened to sample."""
    rewards, position = [], {}
    for kind in solution:
        index = position[kind] = position.get(kind, -1) + 1
        rewards.append({"easy": 1.0, "hard": 0.0}.get(kind, float(index % 2 == 0)))
    return rewards


def config(config_class, tmp_path, **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=3, max_steps=12, greso=True, learning_rate=1e-3)
    values.update(overrides)
    return config_class(**values)


@pytest.mark.parametrize("trainer_class, config_class", [
    (GRPOBaselineTrainer, GRPOBaselineConfig), (AAPOTrainer, AAPOConfig), (ZAPOTrainer, ZAPOConfig),
])
def test_greso_filters_zero_variance_prompts_in_every_trainer(tiny_model_path, tmp_path, trainer_class, config_class):
    trainer = trainer_class(str(tiny_model_path), reward_funcs=[prompt_determined_reward],
                            args=config(config_class, tmp_path), train_dataset=dataset())
    trainer.train()
    assert isinstance(trainer._greso_sampler, GRESORepeatSampler)
    greso = trainer.greso_filter
    rolled_out = {pid: len(history) for pid, history in greso.history.items()}
    # 12 steps x 2 prompts = 24 rollouts over 8 prompts: mixed prompts are never skipped, so they are
    # rolled out at least as often as the always-zero-variance ones
    assert sum(rolled_out.values()) == 24
    mixed = [rolled_out.get(i, 0) for i, kind in enumerate(KINDS) if kind == "mixed"]
    zero_variance = [rolled_out.get(i, 0) for i, kind in enumerate(KINDS) if kind != "mixed"]
    assert min(mixed) >= max(zero_variance)
    assert {kind for history in greso.history.values() for (_, _, kind) in history} == {"easy", "hard", "mixed"}
    logged = [entry for entry in trainer.state.log_history if "greso/skip_rate" in entry]
    assert len(logged) == 12
    assert any(entry["greso/skip_rate"] > 0 for entry in logged)
    assert logged[-1]["greso/p_easy"] != 0.5 or logged[-1]["greso/p_hard"] != 0.5  # adapted after epoch 1


def test_greso_state_is_checkpointed_and_resumed_exactly(tiny_model_path, tmp_path):
    def run(output_dir, max_steps, resume=None):
        trainer = GRPOBaselineTrainer(
            str(tiny_model_path), reward_funcs=[prompt_determined_reward], train_dataset=dataset(),
            args=config(GRPOBaselineConfig, output_dir, max_steps=max_steps, save_strategy="steps", save_steps=4),
        )
        consumed = []
        record = trainer._record_greso_rollouts

        def recording(rewards, num_generations):
            record(rewards, num_generations)
            consumed.append(list(trainer.greso_filter.history))

        trainer._record_greso_rollouts = recording
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a", max_steps=12)
    interrupted = run(tmp_path / "b", max_steps=4)  # stops at the checkpoint of step 4
    saved = json.loads((tmp_path / "b" / "checkpoint-4" / GRESO_STATE_FILENAME).read_text())
    assert saved == json.loads((tmp_path / "a" / "checkpoint-4" / GRESO_STATE_FILENAME).read_text())
    del interrupted

    resumed = run(tmp_path / "b", max_steps=12, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert resumed.greso_filter.state_dict() == uninterrupted.greso_filter.state_dict()
    for step in (8, 12):
        a = json.loads((tmp_path / "a" / f"checkpoint-{step}" / GRESO_STATE_FILENAME).read_text())
        b = json.loads((tmp_path / "b" / f"checkpoint-{step}" / GRESO_STATE_FILENAME).read_text())
        assert a == b, f"GRESO state differs at step {step}"


def test_resume_needs_a_greso_checkpoint(tiny_model_path, tmp_path):
    plain = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[prompt_determined_reward], train_dataset=dataset(),
                                args=config(GRPOBaselineConfig, tmp_path / "plain", greso=False, max_steps=1,
                                            save_strategy="steps", save_steps=1))
    plain.train()
    greso = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[prompt_determined_reward], train_dataset=dataset(),
                                args=config(GRPOBaselineConfig, tmp_path / "plain", max_steps=2))
    with pytest.raises(FileNotFoundError, match=GRESO_STATE_FILENAME):
        greso.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-1"))
