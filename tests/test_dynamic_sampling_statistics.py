"""Dynamic sampling computes every batch-level statistic on the batch it trains (selection first, statistics second,
as verl's DAPO loop; ALGORITHMS.md section 5), driven through real trainers with hand-built two-round reward tables.

Each run is one optimizer step of the tiny model: G = 4, two groups per generation round. The reward function returns
the rows of ``ROUNDS[call]``, so round 1 and round 2 hold exactly the groups below, and the groups trained are known
in advance: group 0 of round 1 and group 0 of round 2. The advantages the loss sees must equal the method's advantage
computed once on those two groups -- not each round's, which saw the dropped groups too.
"""

from __future__ import annotations

import pytest
import torch
from _training import CPU_ARGS, prompt_dataset

from aapo_trl.advantages import gpg_advantages, group_relative_advantages
from aapo_trl.configs import GPGConfig, GRPOBaselineConfig, ZAPOConfig
from aapo_trl.trainers import GPGTrainer, GRPOBaselineTrainer, ZAPOTrainer
from aapo_trl.zapo_math import zapo_advantages

pytestmark = pytest.mark.slow

G = 4
MIXED_A = [1.0, 0.0, 0.0, 0.0]
MIXED_C = [1.0, 1.0, 0.0, 0.0]
# round 1: a mixed group and an all-wrong one; round 2: a mixed group and an all-right one. Under metric 'reward' the
# trained batch is [A, C] (M = 0: GPG's alpha is 1), while each round alone has M = B / 2 (alpha 2).
REWARD_ROUNDS = [MIXED_A + [0.0] * G, MIXED_C + [1.0] * G]
# ZAPO ('final_advantage'): round 1 holds a mixed group and an unscorable one (no signal at all), round 2 an easy and
# a hard group. The trained batch is [mixed, easy]: q = 1 / (1 + 0) = 1, where round 2 alone has q = 1 / (1 + 2).
ZAPO_ROUNDS = [[1.0, 0.1, 0.1, 0.1] + [None] * G, [1.0] * G + [0.1] * G]


def table_reward(rounds):
    calls = []

    def reward(completions, **kwargs):
        assert len(completions) == 2 * G, "one call per generation round of two groups"
        calls.append(len(calls))
        return list(rounds[len(calls) - 1])

    return reward, calls


def train_one_step(trainer_class, config_class, rounds, tmp_path, **overrides):
    reward, calls = table_reward(rounds)
    settings = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                    max_completion_length=3, max_steps=1, dynamic_sampling=True, seed=3)
    trainer = trainer_class(_model(), reward_funcs=[reward], args=config_class(**{**settings, **overrides}),
                            train_dataset=prompt_dataset(8))
    trained, statistics = [], []
    sample, group_statistics = trainer._dynamically_sampled_batch, getattr(trainer, "group_statistics", None)

    def recording_batch(inputs):
        batch = sample(inputs)
        trained.append({"advantages": batch["advantages"].clone(), "table": list(trainer._logs["advantages"]),
                        "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items()}})
        return batch

    def recording_statistics(*args, **kwargs):
        statistics.append(group_statistics(*args, **kwargs))
        return statistics[-1]

    trainer._dynamically_sampled_batch = recording_batch
    if group_statistics is not None:
        trainer.group_statistics = recording_statistics
    trainer.train()
    assert len(calls) == 2 and len(trained) == 1, "two rounds, one generation batch"
    return trainer, trained[0], statistics


def _model():
    from aapo_trl.models import default_cache_dir, ensure_tiny_model

    return str(ensure_tiny_model(default_cache_dir()))


def trained_rewards(rounds):
    return torch.tensor(rounds[0][:G] + rounds[1][:G], dtype=torch.float32)


def assert_trained(result, expected):
    torch.testing.assert_close(result["advantages"].cpu(), expected, rtol=1e-5, atol=1e-6)
    # the completions table and the zero_adv metrics describe the trained batch too
    torch.testing.assert_close(torch.tensor(result["table"]), expected, rtol=1e-5, atol=1e-6)


def test_gpg_alpha_is_the_trained_batchs(tmp_path):
    _, result, _ = train_one_step(GPGTrainer, GPGConfig, REWARD_ROUNDS, tmp_path)
    expected = gpg_advantages(trained_rewards(REWARD_ROUNDS), G)  # alpha = 8 / (8 - 0) = 1
    assert_trained(result, expected)
    per_round = torch.cat([gpg_advantages(torch.tensor(r), G)[:G] for r in REWARD_ROUNDS])
    assert not torch.allclose(per_round, expected)  # each round's alpha is 2: what the table must not train
    assert result["metrics"]["zero_adv/frac_groups"] == 0.0
    assert result["metrics"]["zero_adv/frac_groups_final"] == 0.0


def test_batch_scaled_std_is_the_trained_batchs(tmp_path):
    _, result, _ = train_one_step(GRPOBaselineTrainer, GRPOBaselineConfig, REWARD_ROUNDS, tmp_path,
                                  scale_rewards="batch")
    expected = group_relative_advantages(trained_rewards(REWARD_ROUNDS), G, scale="batch")
    assert_trained(result, expected)


def test_zapo_q_is_the_trained_batchs(tmp_path):
    trainer, result, statistics = train_one_step(ZAPOTrainer, ZAPOConfig, ZAPO_ROUNDS, tmp_path)
    assert trainer.args.dynamic_sampling_metric == "final_advantage"  # ZAPO's default
    assert len(statistics) == 2  # the entropies of every generated group, computed once per round
    se = torch.stack([statistics[0].groups["se"][0], statistics[1].groups["se"][0]]).cpu()
    te = torch.cat([statistics[0].rows["te"][:G], statistics[1].rows["te"][:G]]).cpu()
    assert torch.isnan(se[0]) and not torch.isnan(se[1])  # the mixed group needs no entropy, the easy one does
    rewards = torch.tensor([1.0, 0.1, 0.1, 0.1] + [1.0] * G)
    kwargs = trainer._zapo_kwargs()
    expected = zapo_advantages(rewards, G, se_per_group=se, te_per_row=te, step=1, total_steps=1, **kwargs)
    assert expected.advantages[G:].abs().min() > 0  # DAER rewards the easy group, with delta = q = 1
    assert_trained(result, expected.advantages)
    round_two = zapo_advantages(torch.tensor(ZAPO_ROUNDS[1]), G, se_per_group=statistics[1].groups["se"].cpu(),
                                te_per_row=statistics[1].rows["te"].cpu(), step=1, total_steps=1, **kwargs)
    torch.testing.assert_close(round_two.advantages[:G] * 3, expected.advantages[G:])  # q = 1/3 per round
    assert result["metrics"]["zapo/easy_groups"] == 1.0 and result["metrics"]["zapo/hard_groups"] == 0.0
