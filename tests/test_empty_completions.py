"""Empty completions are scored by default, as in TRL and both papers (issue 26, part 6).

An answer that ends at once gets the reward of no answer (0 here): in a group with right answers, a negative
advantage, which is how an immediate EOS is discouraged. ``empty_completions="unscorable"`` (opt-in) leaves such
rows out of their group's mean/std with advantage 0, for the policy's and AAPO's reference completions alike, online
and from a ``ref-rollouts`` cache.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from _training import Recorder, aapo_test_config, prompt_dataset, text_of
from transformers import AutoTokenizer

from aapo_trl.advantages import group_relative_advantages
from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig
from aapo_trl.ref_rollouts import REF_REWARDS, REF_TRUNCATED, CachedReference, build_ref_rollouts
from aapo_trl.train import parse_args
from aapo_trl.trainers import AAPOTrainer

G = 3
REF_EMPTY = "ref_empty"  # the cache column that marks an empty reference response


def answered(completions, **kwargs):
    """1 for any answer, 0 for none: an empty completion is the wrong one of its group."""
    return [1.0 if text_of(c) else 0.0 for c in completions]


@pytest.mark.parametrize("config_class", [AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig])
def test_every_config_scores_empty_completions_by_default(config_class, tmp_path):
    values = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert config_class(**values).empty_completions == "score"
    assert config_class(**values, empty_completions="unscorable").empty_completions == "unscorable"
    with pytest.raises(ValueError, match=r"empty_completions must be one of \('score', 'unscorable'\), got 'drop'"):
        config_class(**values, empty_completions="drop")


@pytest.mark.parametrize("name", ["aapo", "gpg", "grpo", "zapo"])
def test_the_command_line_scores_empty_completions_by_default(name):
    assert parse_args(name, ["--output_dir", "unused"])[1].empty_completions == "score"


def first_of_each_group_empty(ids_per_row, eos):
    return [[eos] if row % G == 0 else ids for row, ids in enumerate(ids_per_row)]


@pytest.mark.slow
@pytest.mark.parametrize("empty_completions", ["score", "unscorable"])
def test_an_empty_policy_and_reference_completion_in_a_mixed_group(tiny_model_path, tmp_path, empty_completions):
    """A real AAPO step whose first policy and first reference response of every group end at once."""
    config = aapo_test_config(tmp_path, empty_completions=empty_completions)
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[answered], train_dataset=prompt_dataset(2),
                          args=config)
    eos = trainer.eos_token_ids[0]
    generate = trainer._generate_single_turn

    def generate_with_empty_answers(*args, **kwargs):
        completion_ids, logprobs = generate(*args, **kwargs)
        return first_of_each_group_empty(completion_ids, eos), logprobs

    trainer._generate_single_turn = generate_with_empty_answers
    sample = trainer.reference.sample
    trainer.reference.sample = lambda *args: first_of_each_group_empty(sample(*args), eos)
    recorder = Recorder(trainer)
    trainer.train()
    (batch,) = recorder.batches
    empty = torch.tensor([row % G == 0 for row in range(len(batch["completion_ids"]))])
    assert [ids for row, ids in enumerate(batch["completion_ids"]) if empty[row]] == [[eos]] * 2
    assert all(len(ids) > 1 for row, ids in enumerate(batch["completion_ids"]) if not empty[row])
    ref_rewards = batch["ref_rewards_per_func"][:, 0]
    advantages = batch["advantages"]
    logs = trainer.state.log_history[0]
    if empty_completions == "score":
        # the reward of no answer, and its group's mean/std: [0, 1, 1] -> a negative advantage for the empty row
        assert batch["rewards"].tolist() == [0.0, 1.0, 1.0] * 2
        assert ref_rewards.tolist() == [0.0, 1.0, 1.0] * 2  # the reference's empty response is scored alike
        grpo = group_relative_advantages(batch["rewards"], G)
        assert (grpo[empty] < 0).all() and (grpo[~empty] > 0).all()
        torch.testing.assert_close(advantages, grpo)  # margins r - r_ref are 0: AAPO's advantage is GRPO's
        assert (advantages[empty] < 0).all()
        assert logs["unscorable/frac_rows"] == 0.0
    else:
        assert torch.isnan(batch["rewards"][empty]).all() and (batch["rewards"][~empty] == 1.0).all()
        assert torch.isnan(ref_rewards[empty]).all() and (ref_rewards[~empty] == 1.0).all()
        assert (advantages == 0).all()  # left out: advantage 0, and the rest of each group agrees
        assert logs["unscorable/frac_rows"] == pytest.approx(1 / G)


# ---- the reference cache -----------------------------------------------------------------------------------------


def cache_trainer(**args):
    accelerator = SimpleNamespace(process_index=0, device=torch.device("cpu"), gather=lambda t: t)
    return SimpleNamespace(accelerator=accelerator, state=SimpleNamespace(epoch=0.0),
                           args=SimpleNamespace(seed=0, **args), reward_funcs=[object()], reward_func_names=["f"],
                           reward_weights=torch.tensor([1.0]))


def cached_group(**columns):
    return [{"prompt": "p", REF_REWARDS: [0.0, 1.0, 1.0], "ref_rewards_per_func": [[0.0], [1.0], [1.0]],
             REF_TRUNCATED: [False, False, False], **columns} for _ in range(G)]


def test_the_cache_applies_the_empty_completions_policy_to_ref_empty():
    rows = cached_group(**{REF_EMPTY: [True, False, False]})
    scored = CachedReference().rewards(cache_trainer(), rows, G, "train")
    assert scored["rewards"].tolist() == [0.0, 1.0, 1.0]  # scored by default, as the online path
    left_out = CachedReference().rewards(cache_trainer(empty_completions="unscorable"), rows, G, "train")
    torch.testing.assert_close(left_out["rewards"], torch.tensor([float("nan"), 1.0, 1.0]), equal_nan=True)
    assert torch.isnan(left_out["rewards_per_func"][0]).all()


def test_a_cache_without_ref_empty_is_warned_about_when_empty_completions_are_scored():
    old_cache = cached_group()  # written before ref_empty: its empty responses were stored as None
    reference = CachedReference()
    with pytest.warns(UserWarning, match="no 'ref_empty' column.*Rebuild the cache"):
        reference.rewards(cache_trainer(), old_cache, G, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference.rewards(cache_trainer(), old_cache, G, "train")  # said once
        CachedReference().rewards(cache_trainer(empty_completions="unscorable"), old_cache, G, "train")
        CachedReference().rewards(cache_trainer(), [{"prompt": "p", REF_REWARDS: [0.0] * G}] * G, G, "train")


class ScriptedSampler:
    """A reference that ends its first response to every prompt at once and answers the others."""

    name = "scripted"

    def __init__(self, eos: int):
        self.eos = eos

    def sample(self, prompt_ids, num_generations, seeds):
        return [[[self.eos]] + [[100 + k, 200 + k, self.eos] for k in range(1, num_generations)]
                for _ in prompt_ids]


def test_ref_rollouts_scores_an_empty_reference_response_and_marks_it(tiny_model_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    cache = build_ref_rollouts(prompt_dataset(2), tmp_path / "cache", num_generations=G, reward_funcs=[answered],
                               tokenizer=tokenizer, sampler=ScriptedSampler(tokenizer.eos_token_id), progress=False)
    for row in cache:
        assert row[REF_REWARDS] == [0.0, 1.0, 1.0]  # not None: scored like the trainer scores its own
        assert row[REF_EMPTY] == [True, False, False]
        assert row[REF_TRUNCATED] == [False, False, False]
    rows = [dict(row) for row in cache.select([0]) for _ in range(G)]
    assert CachedReference().rewards(cache_trainer(), rows, G, "train")["rewards"].tolist() == [0.0, 1.0, 1.0]
