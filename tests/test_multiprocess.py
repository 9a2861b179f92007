"""AAPO and ZAPO under `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml` (2 CPU processes):
a prompt group spanning both processes gets the same advantages as in a single process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aapo_trl.advantages import aapo_advantages, combine_reward_functions

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCRIPT = Path(__file__).with_name("multiprocess_run.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
CPU_2PROC = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu_2proc.yaml"


def launch(algorithm: str, num_processes: int, model_path, out_dir: Path) -> list[dict]:
    out_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [str(ACCELERATE), "launch", "--config_file", str(CPU_2PROC), "--num_processes", str(num_processes),
               "--main_process_port", "29533", str(SCRIPT), algorithm, str(model_path), str(out_dir)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")), key=lambda r: r["rank"])


def assert_same_as_single_process(single, double):
    assert [r["world_size"] for r in double] == [2, 2]
    for rank in double:  # every rank saw the whole gathered batch, identical to the single-process batch
        assert rank["rewards_per_func"] == single[0]["rewards_per_func"]
        assert rank["ref_rewards_per_func"] == single[0]["ref_rewards_per_func"]
    assert len(double[0]["local_advantages"]) == 3  # rows 0-2 on rank 0: the group of rows 2 and 3 spans ranks
    stitched = double[0]["local_advantages"] + double[1]["local_advantages"]
    assert stitched == pytest.approx(single[0]["local_advantages"], abs=1e-5)
    assert double[0]["logged"] == pytest.approx(single[0]["logged"], abs=1e-5)


def test_aapo_group_spanning_two_processes(tiny_model_path, tmp_path):
    single = launch("aapo", 1, tiny_model_path, tmp_path / "one")
    double = launch("aapo", 2, tiny_model_path, tmp_path / "two")
    assert_same_as_single_process(single, double)
    weights = torch.ones(1)
    rewards = combine_reward_functions(torch.tensor(single[0]["rewards_per_func"]), weights)
    ref_rewards = combine_reward_functions(torch.tensor(single[0]["ref_rewards_per_func"]), weights)
    expected = aapo_advantages(rewards, ref_rewards, num_generations=2)
    assert expected.abs().sum() > 0, "the test needs non-trivial advantages"
    assert single[0]["local_advantages"] == pytest.approx(expected.tolist())


def test_zapo_group_spanning_two_processes(tiny_model_path, tmp_path):
    single = launch("zapo", 1, tiny_model_path, tmp_path / "one")
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
