"""Dynamic sampling inside real training runs (tiny model, CPU): every trainer, composition with GRESO,
num_iterations / steps_per_generation, PEFT and the AAPO reference cache, the exhaustion paths, 2 processes,
and a kill-and-resume that trains the same groups as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dynamic_sampling_run as run
from aapo_trl.advantages import group_relative_advantages
from aapo_trl.checkpointing import CHECKPOINT_MARKER
from aapo_trl.dynamic_sampling import STATE_FILENAME, DynamicSamplingExhausted
from aapo_trl.greso import GRESO_STATE_FILENAME

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("dynamic_sampling_run.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
CPU_2PROC = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu_2proc.yaml"
MIXED = {i for i, kind in enumerate(run.KINDS) if kind == "mixed"}


def train(algorithm, model_path, out_dir, **overrides) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    run.main(algorithm, str(model_path), str(out_dir), json.dumps(overrides))
    return json.loads((out_dir / "rank0.json").read_text())


def assert_full_of_signal(result, groups=run.GLOBAL_PROMPTS):
    for batch in result["batches"]:
        assert batch["rows"] == groups * run.NUM_GENERATIONS
        assert set(batch["prompts"]) <= MIXED, batch  # only the prompts whose groups carry signal
        assert batch["filler_rows"] == 0
        assert batch["metrics"]["dynamic_sampling/rounds"] >= 1


@pytest.mark.parametrize("algorithm", ["grpo", "gpg", "aapo", "zapo"])
def test_every_trainer_trains_a_full_batch_of_groups_with_signal(algorithm, tiny_model_path, tmp_path):
    # ZAPO's metric is 'final_advantage': without DAER only the mixed groups have a non-zero final advantage
    result = train(algorithm, tiny_model_path, tmp_path, **({"use_daer": False} if algorithm == "zapo" else {}))
    assert len(result["batches"]) == 3
    assert_full_of_signal(result)
    metrics = result["batches"][0]["metrics"]
    rounds = metrics["dynamic_sampling/rounds"]
    assert metrics["dynamic_sampling/generated_groups"] == rounds * run.GLOBAL_PROMPTS
    assert metrics["dynamic_sampling/completions_per_kept_group"] == pytest.approx(rounds * run.NUM_GENERATIONS)
    assert 0 < metrics["dynamic_sampling/kept_fraction"] <= 1
    for name in ("rounds", "generated_groups", "kept_fraction", "completions_per_kept_group", "exhausted_total"):
        assert f"dynamic_sampling/{name}" in result["logged_keys"]


def test_final_advantage_metric_keeps_the_groups_zapo_gives_signal(tiny_model_path, tmp_path):
    by_reward = train("zapo", tiny_model_path, tmp_path / "reward", dynamic_sampling_metric="reward", use_daer=False)
    by_advantage = train("zapo", tiny_model_path, tmp_path / "advantage")  # ZAPO's default metric
    assert_full_of_signal(by_reward)
    # ZAPO's entropy rewards give zero-variance groups an advantage: nothing needs dropping, one round each
    assert {b["metrics"]["dynamic_sampling/rounds"] for b in by_advantage["batches"]} == {1.0}
    assert any(set(b["prompts"]) - MIXED for b in by_advantage["batches"])


def test_composes_with_greso_num_iterations_and_steps_per_generation(tiny_model_path, tmp_path):
    result = train("grpo", tiny_model_path, tmp_path, greso=True, num_iterations=2, steps_per_generation=2,
                   per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=4)
    # one generation batch feeds steps_per_generation x num_iterations = 4 optimizer steps
    assert len(result["batches"]) == 1
    assert_full_of_signal(result)
    assert {"greso/skip_rate", "greso/p_easy", "dynamic_sampling/rounds"} <= set(result["logged_keys"])
    # GRESO's history holds every rolled-out group, the refill rounds' included
    generated = result["batches"][0]["metrics"]["dynamic_sampling/generated_groups"]
    assert sum(result["greso_history"].values()) == generated


def test_composes_with_peft(tiny_model_path, tmp_path):
    from peft import LoraConfig

    from aapo_trl.configs import GRPOBaselineConfig
    from aapo_trl.trainers import GRPOBaselineTrainer

    config = GRPOBaselineConfig(**dict(run.CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=8,
                                       num_generations=2, max_completion_length=3, max_steps=2,
                                       dynamic_sampling=True, seed=5))
    trainer = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[run.kind_reward], args=config,
                                  train_dataset=run.dataset(),
                                  peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(entry["dynamic_sampling/kept_fraction"] < 1 for entry in trainer.state.log_history[:2])


def test_aapo_reference_cache_is_read_for_the_refill_rows(tiny_model_path, tmp_path):
    from aapo_trl.configs import AAPOConfig
    from aapo_trl.ref_rollouts import REF_REWARDS
    from aapo_trl.trainers import AAPOTrainer

    rows = run.dataset()
    rows = rows.add_column(REF_REWARDS, [[0.5, 0.5] for _ in range(len(rows))])
    config = AAPOConfig(**dict(run.CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=8,
                               num_generations=2, max_completion_length=3, max_steps=1, dynamic_sampling=True,
                               seed=5, reference_source="cache"))
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[run.kind_reward], args=config, train_dataset=rows)
    read, seen = trainer.reference.rewards, []

    def recording(trainer_, inputs, num_generations, mode):
        seen.append([row["row_id"] for row in inputs[::num_generations]])
        return read(trainer_, inputs, num_generations, mode)

    trainer.reference.rewards = recording
    trainer.train()
    rounds = trainer.state.log_history[0]["dynamic_sampling/rounds"]
    assert rounds > 1 and len(seen) == rounds  # the reference rewards of every round's groups, refills included
    assert all(len(round_ids) == run.GLOBAL_PROMPTS for round_ids in seen)


def test_exhaustion_stops_with_the_step_and_kept_fraction(tiny_model_path, tmp_path):
    with pytest.raises(DynamicSamplingExhausted, match=r"global step 0, 1 rounds .*\(kept fraction 0\.\d+\)"):
        train("grpo", tiny_model_path, tmp_path, dynamic_sampling_max_rounds=1, seed=0)


def test_exhaustion_can_train_on_the_kept_groups(tiny_model_path, tmp_path):
    with pytest.warns(UserWarning, match="train_kept"):
        result = train("grpo", tiny_model_path, tmp_path, dynamic_sampling_max_rounds=1, seed=0,
                       dynamic_sampling_on_exhaustion="train_kept")
    exhausted = [b for b in result["batches"] if b["metrics"]["dynamic_sampling/exhausted"] == 1.0]
    assert exhausted, "seed 0 draws a first batch without a full set of mixed prompts"
    for batch in exhausted:
        assert batch["rows"] == run.GLOBAL_PROMPTS * run.NUM_GENERATIONS  # the batch keeps its size
        kept = sum(p in MIXED for p in batch["prompts"]) // run.NUM_GENERATIONS
        assert batch["filler_rows"] == batch["rows"] - kept * run.NUM_GENERATIONS
        assert batch["num_items_in_batch"] == kept * run.NUM_GENERATIONS * 3  # filler tokens are not counted
    assert result["batches"][-1]["metrics"]["dynamic_sampling/exhausted_total"] == len(exhausted)


@pytest.mark.parametrize("algorithm, port", [("grpo", 29541), ("gpg", 29542)])
def test_two_processes_end_every_round_with_the_same_rows(tiny_model_path, tmp_path, algorithm, port):
    out = tmp_path / "two"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [str(ACCELERATE), "launch", "--config_file", str(CPU_2PROC), "--num_processes", "2",
               "--main_process_port", str(port), str(SCRIPT), algorithm, str(tiny_model_path), str(out), "{}"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 3
    for batch0, batch1 in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert batch0["metrics"] == batch1["metrics"]  # one global decision
        assert batch0["rows"] == batch1["rows"] == run.GLOBAL_PROMPTS // 2 * run.NUM_GENERATIONS
        assert batch0["num_items_in_batch"] == batch1["num_items_in_batch"]
        assert set(batch0["prompts"]) | set(batch1["prompts"]) <= MIXED
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # the trained batch over both processes holds mixed groups only: GPG's alpha = B / (B - 0) = 1 there, whatever
    # share of zero-variance groups each round generated (the advantages are computed after the selection)
    mixed = group_relative_advantages(torch.tensor([1.0, 0.0]), run.NUM_GENERATIONS).abs()[0].item()
    for rank in ranks:
        for batch in rank["batches"]:
            assert batch["advantages"] == pytest.approx([mixed, -mixed] * (len(batch["advantages"]) // 2), abs=1e-5)


def _start(out_dir, model_path, pause_after=0, resume=False, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    overrides = json.dumps({"max_steps": 6, "save_strategy": "steps", "save_steps": 2, **extra})
    command = [sys.executable, str(SCRIPT), "grpo", str(model_path), str(out_dir), overrides, str(pause_after),
               "resume" if resume else "fresh"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]


@pytest.mark.parametrize("greso", [False, True])
def test_killed_and_resumed_run_trains_the_same_groups(tiny_model_path, tmp_path, greso):
    # with GRESO the refill rounds come from GRESO's sampler, whose state is GRESO's checkpoint file
    _finish(_start(tmp_path / "a", tiny_model_path, greso=greso))
    victim = _start(tmp_path / "b", tiny_model_path, pause_after=3, greso=greso)
    deadline, printed = time.time() + 300, ""
    import select

    while not ((tmp_path / "b" / "checkpoint-2" / CHECKPOINT_MARKER).exists() and "PAUSED AT 3" in printed):
        assert time.time() < deadline and victim.poll() is None, victim.communicate()[1][-4000:]
        if select.select([victim.stdout], [], [], 0.2)[0]:
            printed += victim.stdout.readline()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _finish(_start(tmp_path / "b", tiny_model_path, resume=True, greso=greso))

    uninterrupted = json.loads((tmp_path / "a" / "rank0.json").read_text())
    resumed = json.loads((tmp_path / "b" / "rank0.json").read_text())
    # the resumed run starts at step 2: its batches are the uninterrupted run's from step 2 on
    assert [b["step"] for b in resumed["batches"]] == [2, 3, 4, 5]
    later = [b for b in uninterrupted["batches"] if b["step"] >= 2]
    assert [(b["prompts"], b["metrics"]) for b in resumed["batches"]] == [(b["prompts"], b["metrics"]) for b in later]
    for step in ("3", "4", "5", "6"):
        assert resumed["losses"][step] == pytest.approx(uninterrupted["losses"][step], abs=1e-6)
    assert any(b["metrics"]["dynamic_sampling/rounds"] > 1 for b in later), "the resumed steps include refills"
    for step in (4, 6):
        state_a = json.loads((tmp_path / "a" / f"checkpoint-{step}" / STATE_FILENAME).read_text())
        state_b = json.loads((tmp_path / "b" / f"checkpoint-{step}" / STATE_FILENAME).read_text())
        assert state_a == state_b
        if greso:
            assert state_a["stream"] is None
            greso_a = json.loads((tmp_path / "a" / f"checkpoint-{step}" / GRESO_STATE_FILENAME).read_text())
            greso_b = json.loads((tmp_path / "b" / f"checkpoint-{step}" / GRESO_STATE_FILENAME).read_text())
            assert greso_a == greso_b
        else:
            assert state_a["stream"]["drawn"] > 0
