"""Completions cut at max_completion_length are scored by default, as in the papers and TRL (issue 14, part 2)."""

from __future__ import annotations

import pytest
import torch
from _training import CPU_ARGS, Recorder, prompt_dataset

from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig
from aapo_trl.train import parse_args
from aapo_trl.trainers import GRPOBaselineTrainer, ZAPOTrainer

G = 4
MAX_LENGTH = 4  # the tiny random model never stops within 4 tokens: every completion is truncated


def last_row_of_each_group_wrong(completions, **kwargs):
    """[1, 1, 1, 0] in every group: three right answers and one that ran out of tokens (no answer)."""
    return [0.0 if i % G == G - 1 else 1.0 for i in range(len(completions))]


def all_wrong(completions, **kwargs):
    return [0.0] * len(completions)


def small_config(config_class, tmp_path, **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                  max_completion_length=MAX_LENGTH, max_steps=1)
    values.update(overrides)
    return config_class(**values)


@pytest.mark.parametrize("config_class", [AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig])
def test_every_config_scores_truncated_completions_by_default(config_class, tmp_path):
    assert config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False).truncated_completions == "score"
    opted_in = config_class(output_dir=str(tmp_path), use_cpu=True, bf16=False, truncated_completions="unscorable")
    assert opted_in.truncated_completions == "unscorable"


@pytest.mark.parametrize("name", ["aapo", "gpg", "grpo", "zapo"])
def test_the_command_line_scores_truncated_completions_by_default(name):
    assert parse_args(name, ["--output_dir", "unused"])[1].truncated_completions == "score"


def test_zapo_group_of_three_right_and_one_truncated_is_mixed_not_easy(tiny_model_path, tmp_path):
    trainer = ZAPOTrainer(str(tiny_model_path), reward_funcs=[last_row_of_each_group_wrong],
                          train_dataset=prompt_dataset(2), args=small_config(ZAPOConfig, tmp_path))
    recorder = Recorder(trainer)
    trainer.train()
    batch = recorder.batches[0]
    eos = set(trainer.eos_token_ids)
    assert all(len(ids) == MAX_LENGTH and ids[-1] not in eos for ids in batch["completion_ids"])  # all truncated
    assert batch["rewards"].tolist() == [1.0, 1.0, 1.0, 0.0] * 2  # scored, not NaN
    logs = trainer.state.log_history[0]
    assert logs["unscorable/frac_rows"] == 0.0
    assert logs["zero_adv/frac_groups"] == 0.0  # mixed: no group is easy
    advantages = batch["advantages"].view(-1, G)
    # GRPO's [0.5, 0.5, 0.5, -1.5] reshaped by TDAR (a factor in (1, 2), the same for the whole group)
    factor = advantages[:, 0] / 0.5
    assert ((factor > 1) & (factor < 2)).all()
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.5, 0.5, -1.5]]) * factor.unsqueeze(1))


def test_greso_counts_an_all_truncated_prompt_as_hard(tiny_model_path, tmp_path):
    trainer = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[all_wrong], train_dataset=prompt_dataset(2),
                                  args=small_config(GRPOBaselineConfig, tmp_path, greso=True))
    trainer.train()
    history = trainer.greso_filter.history
    assert sorted(history) == [0, 1]
    assert all(entries[-1][1:] == (0.0, "hard") for entries in history.values())


def test_every_completion_is_scored_by_default_and_each_opt_in_leaves_out_its_kind(tiny_model_path, tmp_path):
    """Truncated and empty completions are scored by default (issue 26, part 6: empty ones too)."""
    trainer = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[all_wrong], train_dataset=prompt_dataset(2),
                                  args=small_config(GRPOBaselineConfig, tmp_path))
    eos, pad, word = trainer.eos_token_ids[0], trainer._tokenizer.pad_token_id, 100
    finished, truncated, empty, padded_empty = [word, word, eos], [word, word, word], [eos], [eos, pad]
    rows = [finished, truncated, empty, padded_empty]
    assert trainer._unscorable_completions(rows).tolist() == [False, False, False, False]
    trainer.args.truncated_completions = "unscorable"
    assert trainer._unscorable_completions(rows).tolist() == [False, True, False, False]
    trainer.args.truncated_completions, trainer.args.empty_completions = "score", "unscorable"
    assert trainer._unscorable_completions(rows).tolist() == [False, False, True, True]
