"""The reference-reward cache: ``aapo-trl ref-rollouts`` and ``AAPOConfig(reference_source="cache")``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from _training import CPU_ARGS, Recorder, hashed_reward, prompt_dataset
from transformers import AutoTokenizer

from aapo_trl import ref_rollouts
from aapo_trl.advantages import aapo_advantages, combine_reward_functions
from aapo_trl.configs import AAPOConfig
from aapo_trl.models import load_model_and_tokenizer
from aapo_trl.ref_rollouts import (
    REF_COMPLETION_IDS,
    REF_REWARDS,
    REF_REWARDS_PER_FUNC,
    CachedReference,
    attach_ref_rollouts,
    build_ref_rollouts,
    cache_subset,
    load_ref_rollouts,
    row_key,
    tokenize_prompts,
)
from aapo_trl.trainers import AAPOTrainer

G = 3


def cache_config(tmp_path, **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path / "run"), per_device_train_batch_size=6, num_generations=G,
                  max_completion_length=6, max_steps=2)
    values.update(overrides)
    return AAPOConfig(**values)


# ------------------------------------------------------------------------------------------------------------
# The subset rule
# ------------------------------------------------------------------------------------------------------------


def test_subset_is_the_identity_when_k_equals_g_and_a_fresh_draw_per_epoch_when_larger():
    assert cache_subset(4, 4, seed=0, epoch=7, key="row_id:3") == [0, 1, 2, 3]
    draws = {}
    for epoch in range(6):
        for key in ("row_id:0", "row_id:1"):
            subset = cache_subset(10, 4, seed=0, epoch=epoch, key=key)
            assert len(subset) == 4 and len(set(subset)) == 4 and subset == sorted(subset)
            assert all(0 <= i < 10 for i in subset)
            assert subset == cache_subset(10, 4, seed=0, epoch=epoch, key=key)  # deterministic
            draws[epoch, key] = subset
    assert len({tuple(draws[e, "row_id:0"]) for e in range(6)}) > 1  # fresh each epoch
    assert any(draws[e, "row_id:0"] != draws[e, "row_id:1"] for e in range(6))  # per row
    assert cache_subset(10, 4, seed=1, epoch=0, key="row_id:0") != draws[0, "row_id:0"] or \
        cache_subset(10, 4, seed=2, epoch=0, key="row_id:0") != draws[0, "row_id:0"]  # per seed
    with pytest.raises(ValueError, match="--num-generations 4"):
        cache_subset(3, 4, seed=0, epoch=0, key="row_id:0")


def test_subset_is_the_same_in_another_process():
    """What every rank computes: a pure function of (seed, epoch, row id), independent of the process."""
    code = ("from aapo_trl.ref_rollouts import cache_subset; "
            "print([cache_subset(12, 5, seed=42, epoch=e, key=f'row_id:{r}') for e in range(3) for r in range(3)])")
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    here = [cache_subset(12, 5, seed=42, epoch=e, key=f"row_id:{r}") for e in range(3) for r in range(3)]
    assert other.stdout.strip().splitlines()[-1] == str(here)  # after any log line DeepSpeed prints on import


def test_row_key_uses_row_id_else_the_prompt():
    assert row_key({"row_id": 7, "prompt": "x"}) == "row_id:7"
    chat, reordered = [{"role": "user", "content": "a"}], [{"content": "a", "role": "user"}]
    assert row_key({"prompt": chat}) == row_key({"prompt": reordered})
    assert row_key({"prompt": "a"}) != row_key({"prompt": "b"})


# ------------------------------------------------------------------------------------------------------------
# Cache and online paths agree
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_path, tmp_path_factory):
    """K = G reference samples of the tiny model for the 6 test prompts, with their token ids."""
    model, tokenizer = load_model_and_tokenizer(tiny_model_path)
    output = tmp_path_factory.mktemp("cache")
    dataset = build_ref_rollouts(prompt_dataset(), output, num_generations=G, reward_funcs=[hashed_reward],
                                 model=model, tokenizer=tokenizer, max_completion_length=6, seed=5, batch_size=4,
                                 shard_size=4, save_completion_ids=True, progress=False)
    return output, dataset


@pytest.mark.slow
@pytest.mark.parametrize("truncated_completions", ["score", "unscorable"])
def test_cache_and_online_paths_give_identical_advantages(tiny_model_path, tmp_path, tiny_cache,
                                                         truncated_completions):
    output, cache = tiny_cache
    assert cache.column_names[: len(prompt_dataset().column_names)] == prompt_dataset().column_names
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    cached_ids = {tuple(ids): row[REF_COMPLETION_IDS]
                  for ids, row in zip(tokenize_prompts(tokenizer, cache["prompt"]), cache)}

    def run(source):
        config = cache_config(tmp_path, reference_source=source, truncated_completions=truncated_completions)
        trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config, train_dataset=cache)
        if source == "model":  # the online path, handed the very samples the cache was made of
            def sample(trainer_, prompt_ids, num_generations):
                start = trainer_.accelerator.process_index * len(prompt_ids)
                return [cached_ids[tuple(ids)][(start + i) % num_generations] for i, ids in enumerate(prompt_ids)]

            trainer.reference.sample = sample
        recorder = Recorder(trainer)
        trainer.train()
        return trainer, recorder.batches

    online_trainer, online = run("model")
    cached_trainer, cached = run("cache")
    assert cached_trainer.reference.kind == "cache" and len(online) == len(cached) == 2
    for online_batch, cached_batch in zip(online, cached):
        assert online_batch["completion_ids"] == cached_batch["completion_ids"]  # the same policy samples
        torch.testing.assert_close(online_batch["ref_rewards_per_func"], cached_batch["ref_rewards_per_func"],
                                   equal_nan=True)
        ref_rewards = combine_reward_functions(cached_batch["ref_rewards_per_func"], cached_trainer.reward_weights)
        expected = aapo_advantages(cached_batch["rewards"], ref_rewards, G)
        torch.testing.assert_close(cached_batch["advantages"], expected)
        torch.testing.assert_close(online_batch["advantages"], cached_batch["advantages"], rtol=0, atol=0)
    for name in ("aapo/ref_reward_mean", "rewards_ref/hashed_reward/mean", "aapo/ref_completion_mean_length"):
        assert name in cached_trainer.state.log_history[0], name
        assert online_trainer.state.log_history[0][name] == pytest.approx(
            cached_trainer.state.log_history[0][name], nan_ok=True), name


@pytest.mark.slow
def test_cache_draws_a_fresh_subset_each_epoch(tiny_model_path, tmp_path):
    """K = 5 > G = 3: each row's reference rewards are the cached ones picked by cache_subset(seed, epoch, row)."""
    rows = prompt_dataset(2).add_column("row_id", [10, 11])
    rows = rows.add_column(REF_REWARDS, [[r + j / 10 for j in range(5)] for r in range(2)])  # value -> index
    config = cache_config(tmp_path, reference_source="cache", max_steps=4, seed=3)  # 2 prompts a step: 1 epoch
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config, train_dataset=rows)
    seen = []
    read = trainer.reference.rewards

    def recording(trainer_, inputs, num_generations, mode):
        result = read(trainer_, inputs, num_generations, mode)
        seen.append((math.floor(trainer_.state.epoch), [row["row_id"] for row in inputs], result))
        return result

    trainer.reference.rewards = recording
    trainer.train()
    assert [epoch for epoch, _, _ in seen] == [0, 1, 2, 3]
    subsets = {}
    for epoch, row_ids, result in seen:
        for position, (row_id, index, reward) in enumerate(zip(row_ids, result["indices"], result["rewards"].tolist())):
            expected = cache_subset(5, G, seed=3, epoch=epoch, key=f"row_id:{row_id}")[position % G]
            assert index == expected
            assert reward == pytest.approx((row_id - 10) + expected / 10)
            subsets.setdefault(row_id, set()).add(tuple(result["indices"][position - position % G:][:G]))
        assert result["rewards_per_func"] is None and result["lengths"] is None  # a hand-made cache: rewards only
    assert all(len(draws) > 1 for draws in subsets.values())  # not the same G every epoch


# ------------------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------------------


def fake_trainer(num_funcs=1, weights=None, seed=0, truncated_completions="score"):
    accelerator = SimpleNamespace(process_index=0, device=torch.device("cpu"), gather=lambda t: t)
    return SimpleNamespace(
        accelerator=accelerator, state=SimpleNamespace(epoch=0.0),
        args=SimpleNamespace(seed=seed, truncated_completions=truncated_completions),
        reward_funcs=[object()] * num_funcs, reward_func_names=[f"f{i}" for i in range(num_funcs)],
        reward_weights=torch.tensor(weights or [1.0] * num_funcs),
    )


def group(prompt, **columns):
    return [{"prompt": prompt, **columns} for _ in range(G)]


def test_cached_reference_pairs_by_position_and_applies_the_truncation_policy():
    rows = group("p", ref_rewards=[0.0, 1.0, None], ref_rewards_per_func=[[0.0, 0.0], [0.5, 0.25], [None, None]],
                 ref_truncated=[False, True, False], ref_completion_lengths=[3, 6, 1])
    scored = CachedReference().rewards(fake_trainer(2, [1.0, 2.0]), rows, G, "train")
    assert scored["indices"] == [0, 1, 2]
    torch.testing.assert_close(scored["rewards"], torch.tensor([0.0, 1.0, float("nan")]), equal_nan=True)
    torch.testing.assert_close(scored["lengths"], torch.tensor([3.0, 6.0, 1.0]))
    strict_trainer = fake_trainer(2, [1.0, 2.0], truncated_completions="unscorable")
    strict = CachedReference().rewards(strict_trainer, rows, G, "train")
    torch.testing.assert_close(strict["rewards"], torch.tensor([0.0, float("nan"), float("nan")]), equal_nan=True)
    assert torch.isnan(strict["rewards_per_func"][1]).all()


@pytest.mark.parametrize(
    ("rows", "trainer", "message"),
    [
        (group("p", solution="1"), fake_trainer(), "have no 'ref_rewards' column"),
        (group("p", ref_rewards=[0.0, 1.0]), fake_trainer(), "--num-generations 3"),
        (group("p", ref_rewards=[0.0] * 3, ref_rewards_per_func=[[0.0]] * 3), fake_trainer(2), "scored with 1 reward"),
        (group("p", ref_rewards=[1.0] * 3, ref_rewards_per_func=[[1.0, 1.0]] * 3), fake_trainer(2, [1.0, 2.0]),
         "scored with other weights"),
        (group("p", ref_rewards=[0.0] * 3)[:2] + group("q", ref_rewards=[0.0] * 3)[:1], fake_trainer(),
         "do not share one prompt"),
    ],
)
def test_cached_reference_errors(rows, trainer, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        CachedReference().rewards(trainer, rows, G, "train")


@pytest.mark.slow
def test_training_without_the_column_fails_at_the_first_batch_with_a_clear_error(tiny_model_path, tmp_path):
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(),
                          args=cache_config(tmp_path, reference_source="cache", max_steps=1))
    with pytest.raises(ValueError, match="aapo-trl ref-rollouts --num-generations K"):
        trainer.train()


def test_attach_matches_rows_by_prompt_and_refuses_a_cache_of_other_prompts():
    dataset = prompt_dataset(4)
    cache = prompt_dataset(6).add_column(REF_REWARDS, [[float(i)] * G for i in range(6)])
    cache = cache.select([5, 3, 1, 0, 2, 4])  # any order, more prompts than the dataset
    attached = attach_ref_rollouts(dataset, cache)
    assert list(attached["prompt"]) == list(dataset["prompt"])
    assert [values[0] for values in attached[REF_REWARDS]] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="2 of the 6 prompts of train_dataset are not in the reference cache"):
        attach_ref_rollouts(prompt_dataset(6), cache.select(range(4)))
    with pytest.raises(FileNotFoundError, match="no ref-rollouts output"):
        load_ref_rollouts("/nonexistent/cache")


# ------------------------------------------------------------------------------------------------------------
# The command line, end to end (offline, tiny model, built-in arithmetic set)
# ------------------------------------------------------------------------------------------------------------

CLI_ARGS = ["--model", "tiny", "--dataset", "arithmetic", "--dataset-levels", "add1", "--max-samples", "5",
            "--num-generations", "4", "--reward-funcs", "final_number", "format", "--reward-weights", "1", "0.5",
            "--max-completion-length", "8", "--temperature", "0.9", "--seed", "3", "--shard-size", "2",
            "--batch-size", "2", "--no-progress"]


def ref_rollouts_cli(output, *extra):
    from aapo_trl.cli import main

    return main(["ref-rollouts", *CLI_ARGS, "--output-dir", str(output), *extra])


@pytest.mark.slow
def test_cli_writes_the_training_dataset_plus_scored_reference_samples(tiny_model_path, tmp_path):
    from aapo_trl.data import load_prompt_dataset
    from aapo_trl.rewards import get_reward_funcs

    assert ref_rollouts_cli(tmp_path / "out") == 0
    cache = load_ref_rollouts(tmp_path / "out")
    training = load_prompt_dataset("arithmetic", levels=["add1"], max_samples=5, seed=3)
    assert cache.column_names[: len(training.column_names)] == training.column_names
    assert cache.select_columns(training.column_names).to_list() == training.to_list()
    for column in (REF_REWARDS, REF_REWARDS_PER_FUNC, "ref_truncated", "ref_completion_lengths", "ref_completions"):
        assert all(len(values) == 4 for values in cache[column]), column
    # the rewards are those of the named functions and weights, on the stored completions
    funcs = get_reward_funcs(["final_number", "format"])
    for row in cache:
        completions = [[{"role": "assistant", "content": text}] for text in row["ref_completions"]]
        for index, func in enumerate(funcs):
            expected = func(completions=completions, solution=[row["solution"]] * 4)
            assert [pf[index] for pf in row[REF_REWARDS_PER_FUNC]] == expected
        per_func = torch.tensor([[math.nan if v is None else v for v in pf] for pf in row[REF_REWARDS_PER_FUNC]])
        combined = combine_reward_functions(per_func, torch.tensor([1.0, 0.5]))
        assert [None if math.isnan(v) else v for v in combined.tolist()] == row[REF_REWARDS]
    meta = json.loads((tmp_path / "out" / "ref_rollouts.json").read_text())
    assert meta["settings"]["reward_funcs"] == ["final_number", "format"] and meta["settings"]["num_generations"] == 4
    assert meta["summary"]["num_prompts"] == 5 and meta["summary"]["num_completions"] == 20
    assert len(list((tmp_path / "out" / "shards").glob("*.parquet"))) == 3


@pytest.mark.slow
def test_cli_resumes_after_an_interruption_and_matches_an_uninterrupted_run(tiny_model_path, tmp_path, monkeypatch):
    assert ref_rollouts_cli(tmp_path / "whole") == 0
    whole = load_ref_rollouts(tmp_path / "whole")

    write_shard, writes = ref_rollouts._write_shard, []

    def killed_after_first_shard(path, rows):
        if writes:
            raise KeyboardInterrupt("killed")
        writes.append(path)
        write_shard(path, rows)

    monkeypatch.setattr(ref_rollouts, "_write_shard", killed_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        ref_rollouts_cli(tmp_path / "resumed")
    assert len(list((tmp_path / "resumed" / "shards").glob("*.parquet"))) == 1
    assert not (tmp_path / "resumed" / "dataset").exists()
    with pytest.raises(FileNotFoundError, match="run the same aapo-trl ref-rollouts command again"):
        load_ref_rollouts(tmp_path / "resumed")

    monkeypatch.setattr(ref_rollouts, "_write_shard", write_shard)
    sampled = []
    sample = ref_rollouts.TransformersSampler.sample
    monkeypatch.setattr(ref_rollouts.TransformersSampler, "sample",
                        lambda self, ids, k, seeds: (sampled.append(len(ids)), sample(self, ids, k, seeds))[1])
    assert ref_rollouts_cli(tmp_path / "resumed") == 0
    assert sampled == [2, 1]  # the finished shard was not sampled again
    resumed = load_ref_rollouts(tmp_path / "resumed")
    assert resumed.to_list() == whole.to_list()

    # other settings do not mix with the shards already there
    with pytest.raises(ValueError, match="temperature: 0.9 -> 0.7"):
        ref_rollouts_cli(tmp_path / "resumed", "--temperature", "0.7")


@pytest.mark.slow
def test_cli_reads_a_training_recipe_and_training_uses_the_cache(tiny_model_path, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: tiny\ndataset_name: arithmetic\ndataset_levels: [add1]\nmax_train_samples: 4\nseed: 3\n"
        "reward_funcs: [final_number, format]\nreward_weights: [1.0, 0.5]\nnum_generations: 2\n"
        "max_completion_length: 8\ntemperature: 0.9\n"
    )
    from aapo_trl.cli import main

    with pytest.raises(SystemExit, match="below the recipe's num_generations 2"):
        main(["ref-rollouts", "--config", str(recipe), "--num-generations", "1", "--output-dir", str(tmp_path / "c")])
    assert main(["ref-rollouts", "--config", str(recipe), "--num-generations", "4", "--output-dir",
                 str(tmp_path / "cache"), "--no-progress"]) == 0
    settings = json.loads((tmp_path / "cache" / "ref_rollouts.json").read_text())["settings"]
    assert settings["temperature"] == 0.9 and settings["max_completion_length"] == 8 and settings["model"] == "tiny"

    # aapo-trl train with the same recipe, the cache attached by prompt: K = 4 > G = 2
    assert main(["train", "--algorithm", "aapo", "--config", str(recipe), "--output_dir", str(tmp_path / "run"),
                 "--reference_source", "cache", "--ref_rollouts_path", str(tmp_path / "cache"),
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps", "2",
                 "--report_to", "none", "--save_strategy", "no", "--truncated_completions", "score",
                 "--logging_steps", "1",
                 "--bf16", "false", "--use_cpu", "true"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    logged = [entry for entry in metrics["log_history"] if "aapo/ref_reward_mean" in entry]
    assert len(logged) == 2 and all("rewards_ref/final_number/mean" in entry for entry in logged)
