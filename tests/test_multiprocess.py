"""AAPO and ZAPO under `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` (2 CPU processes):
a prompt group spanning both processes gets the same advantages as in a single process."""

import pytest
import torch
from _launch import assert_same_as_single_process, launch

from aapo_trl.advantages import aapo_advantages, combine_reward_functions

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_aapo_group_spanning_two_processes(tiny_model_path, tmp_path, single_process_run):
    single = single_process_run("aapo")
    double = launch("aapo", 2, tiny_model_path, tmp_path / "two")
    assert_same_as_single_process(single, double)
    weights = torch.ones(1)
    rewards = combine_reward_functions(torch.tensor(single[0]["rewards_per_func"]), weights)
    ref_rewards = combine_reward_functions(torch.tensor(single[0]["ref_rewards_per_func"]), weights)
    expected = aapo_advantages(rewards, ref_rewards, num_generations=2)
    assert expected.abs().sum() > 0, "the test needs non-trivial advantages"
    assert single[0]["local_advantages"] == pytest.approx(expected.tolist())


def test_zapo_group_spanning_two_processes(tiny_model_path, tmp_path, single_process_run):
    single = single_process_run("zapo")
    double = launch("zapo", 2, tiny_model_path, tmp_path / "two")
    assert_same_as_single_process(single, double)
    # greedy decoding makes every group zero-variance: every advantage is DAER's, computed from statistics
    # gathered across processes (the spanning group's embeddings come from both ranks)
    for key in ("seq_logps", "token_entropy", "embeddings"):
        for rank in double:
            torch.testing.assert_close(torch.tensor(rank["entropy_inputs"][key]),
                                       torch.tensor(single[0]["entropy_inputs"][key]), atol=1e-4, rtol=1e-4,
                                       equal_nan=True)
    assert any(abs(a) > 0 for a in single[0]["local_advantages"]), "DAER should give zero-variance groups a signal"
