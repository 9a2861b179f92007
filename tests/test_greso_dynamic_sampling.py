"""GRESO under dynamic sampling (ALGORITHMS.md section 5): every prompt drawn, first round or refill, passes the same
pre-rollout filter, is never rolled out twice in one generation batch, and updates the same history once; GRESO's
skip statistics count the refill candidates. Real training runs of the tiny model (CPU)."""

from __future__ import annotations

import pytest

import dynamic_sampling_run as run
from aapo_trl.configs import GRPOBaselineConfig
from aapo_trl.trainers import GRPOBaselineTrainer

pytestmark = pytest.mark.slow


def test_refill_rounds_pass_gresos_filter_and_history(tiny_model_path, tmp_path):
    # p starts low: a prompt whose last rollout was all-right or all-wrong is mostly skipped from then on
    config = GRPOBaselineConfig(**dict(
        run.CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=run.GLOBAL_PROMPTS * run.NUM_GENERATIONS,
        num_generations=run.NUM_GENERATIONS, max_completion_length=3, max_steps=4, dynamic_sampling=True, seed=5,
        greso=True, greso_p_init=0.1, greso_p_min=0.05,
    ))
    trainer = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[run.kind_reward], args=config,
                                  train_dataset=run.dataset())
    greso = trainer.greso_filter
    decisions, refills, batches = [], [], []
    decide, refill_row, sample = greso.decide, trainer._refill_row, trainer._dynamically_sampled_batch

    def recording_decide(prompt_ids):
        kept = decide(prompt_ids)
        decisions.extend(zip((int(p) for p in prompt_ids), kept))
        return kept

    def recording_refill_row(index):
        refills[-1].append(int(index))
        return refill_row(index)

    def recording_batch(inputs):
        refills.append([])
        recorded_before = greso.num_recorded
        decided_before = len(decisions)
        first_round = sorted({row["row_id"] for row in inputs})
        batch = sample(inputs)
        batches.append({
            "first_round": first_round,
            "refills": sorted(set(refills[-1])),
            "refill_rows": list(refills[-1]),
            "kept_while_sampling": [pid for pid, kept in decisions[decided_before:] if kept],
            "skipped_while_sampling": [pid for pid, kept in decisions[decided_before:] if not kept],
            "recorded": greso.num_recorded - recorded_before,
            "rounds": trainer._metrics["train"]["dynamic_sampling/rounds"][-1],
            "skip_rate": trainer._metrics["train"]["greso/skip_rate"][-1],
        })
        return batch

    greso.decide = recording_decide
    trainer._refill_row = recording_refill_row
    trainer._dynamically_sampled_batch = recording_batch
    trainer.train()

    assert len(batches) == 4 and any(batch["refills"] for batch in batches), "some steps need refill rounds"
    for batch in batches:
        rolled_out = batch["first_round"] + batch["refills"]
        # every refill prompt is one GRESO decided to keep while this generation batch was being sampled
        assert batch["refills"] == sorted(set(batch["kept_while_sampling"]) & set(batch["refills"])), batch
        # no prompt twice in one generation batch (each refill prompt's rows are its G completions)
        assert len(set(rolled_out)) == len(rolled_out), batch
        assert len(batch["refill_rows"]) == len(batch["refills"]) * run.NUM_GENERATIONS
        # the history is updated once per rolled-out group, refills included
        assert batch["recorded"] == batch["rounds"] * run.GLOBAL_PROMPTS
    # the skip statistics of a generation batch count its refill candidates (GRESO skips some of them here)
    assert sum(len(batch["skipped_while_sampling"]) for batch in batches) > 0
    assert any(batch["skip_rate"] > 0 for batch in batches if batch["refills"])
    assert sum(len(entries) for entries in greso.history.values()) == greso.num_recorded
