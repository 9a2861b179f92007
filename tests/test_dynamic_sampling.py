"""Dynamic sampling's pure parts on hand-built reward tables: the selection rules, the rounds and their
exhaustion paths, the refill stream and the merging of TRL's per-round batches; and the config fields."""

from __future__ import annotations

import math

import pytest
import torch

from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig
from aapo_trl.dynamic_sampling import (
    DynamicSamplingExhausted,
    GroupStatistics,
    PromptStream,
    RoundsSelection,
    completions_per_kept_group,
    exhaustion_message,
    groups_with_signal,
    loss_mask_tokens,
    mask_filler_rows,
    merge_generation_rows,
    take_group_statistics,
    take_groups,
    trained_groups,
)

nan = float("nan")


def rewards(*groups):
    return torch.tensor([value for group in groups for value in group], dtype=torch.float32)


# ---- selection rules ------------------------------------------------------------------------------------------------


def test_reward_metric_drops_zero_spread_groups_and_keeps_mixed_ones():
    table = rewards([0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.6])
    assert groups_with_signal("reward", 4, rewards=table).tolist() == [False, False, True, True]


def test_reward_metric_uses_a_tolerance_not_exact_equality():
    # float noise (e.g. 0.1 + 0.2 vs 0.3, or a sum of weighted rewards) is no signal
    noisy = torch.tensor([0.3, 0.1 + 0.2, 0.3, 0.3 + 1e-9], dtype=torch.float64)
    assert (noisy.max() - noisy.min()).item() > 0  # == 0 would keep this group
    assert groups_with_signal("reward", 4, rewards=noisy).tolist() == [False]
    spread = rewards([0.0, 0.0, 0.0, 1e-3])
    assert groups_with_signal("reward", 4, rewards=spread).tolist() == [True]
    assert groups_with_signal("reward", 4, rewards=spread, tolerance=1e-2).tolist() == [False]


def test_reward_metric_ignores_unscorable_rows():
    table = rewards([nan, 1, 1, 1], [nan, nan, nan, 0], [nan, 0, 1, nan])
    assert groups_with_signal("reward", 4, rewards=table).tolist() == [False, False, True]


def test_accuracy_metric_needs_both_correct_and_incorrect_answers():
    # combined reward with a length penalty: spread everywhere, but only the last group mixes right and wrong
    table = rewards([1.0, 0.9, 1.0, 0.95], [-1.0, -1.2, -1.0, -1.5], [1.0, -1.0, 1.0, 1.0])
    assert groups_with_signal("reward", 4, rewards=table).tolist() == [True, True, True]
    assert groups_with_signal("accuracy", 4, rewards=table, correct_threshold=0.5).tolist() == [False, False, True]


def test_accuracy_metric_reads_a_separate_correctness_column_and_skips_unscorable_rows():
    combined = rewards([0.7, 0.2, 0.7, 0.2], [0.5, 0.6, 0.5, 0.6])
    correctness = rewards([1, 1, 1, 1], [nan, 1, 0, nan])
    assert groups_with_signal(
        "accuracy", 4, rewards=combined, correctness=correctness, correct_threshold=0.95
    ).tolist() == [False, True]
    # an unscorable row is neither correct nor incorrect
    assert groups_with_signal(
        "accuracy", 4, rewards=combined, correctness=rewards([1, 1, 1, 1], [nan, 1, nan, nan])
    ).tolist() == [False, False]


def test_final_advantage_metric_keeps_groups_a_method_gave_signal():
    table = rewards([1, 1, 1, 1], [0, 0, 0, 0])
    # e.g. AAPO's margin lifts the all-correct group, the all-wrong one stays at zero
    advantages = rewards([0.3, 0.3, 0.3, 0.3], [0, 0, 1e-9, 0])
    assert groups_with_signal("reward", 4, rewards=table).tolist() == [False, False]
    assert groups_with_signal("final_advantage", 4, rewards=table, advantages=advantages).tolist() == [True, False]
    with pytest.raises(ValueError, match="final advantages"):
        groups_with_signal("final_advantage", 4, rewards=table)


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="dynamic_sampling_metric"):
        groups_with_signal("acc", 2, rewards=rewards([0, 1]))


# ---- rounds and selection -------------------------------------------------------------------------------------------


def test_one_process_keeps_the_first_groups_with_signal_in_generation_order():
    rounds = RoundsSelection(num_processes=1, groups_per_process=3)
    rounds.add_round([False, True, False])
    assert not rounds.filled
    rounds.add_round([True, False, False])
    assert not rounds.filled
    rounds.add_round([True, True, True])
    assert rounds.filled
    assert rounds.selection(0) == [(0, 1, False), (1, 0, False), (2, 0, False)]
    assert rounds.generated_groups == 9 and rounds.groups_with_signal == 5
    assert rounds.trained_groups_with_signal == 3
    assert completions_per_kept_group(rounds, 4) == 9 * 4 / 3


def test_every_process_ends_with_its_quota_and_rounds_go_on_until_all_are_full():
    rounds = RoundsSelection(num_processes=2, groups_per_process=2)
    rounds.add_round([True, True, False, False])  # process 0 full, process 1 empty
    assert not rounds.filled
    rounds.add_round([True, False, True, False])  # process 1 has one
    assert not rounds.filled
    rounds.add_round([False, False, True, True])
    assert rounds.filled
    assert rounds.selection(0) == [(0, 0, False), (0, 1, False)]
    assert rounds.selection(1) == [(1, 0, False), (2, 0, False)]
    assert len(rounds.selection(0)) == len(rounds.selection(1)) == 2
    # process 0's signal group of round 2 was generated for process 1's shortfall and is not trained
    assert rounds.groups_with_signal == 6 and rounds.trained_groups_with_signal == 4


def test_exhaustion_refuses_without_filler_and_fills_with_masked_groups_when_allowed():
    rounds = RoundsSelection(num_processes=2, groups_per_process=2)
    rounds.add_round([True, False, False, False])
    rounds.add_round([False, False, False, True])
    with pytest.raises(DynamicSamplingExhausted):
        rounds.selection(0)
    assert rounds.selection(0, allow_filler=True) == [(0, 0, False), (0, 1, True)]
    assert rounds.selection(1, allow_filler=True) == [(0, 0, True), (1, 1, False)]
    message = exhaustion_message(7, rounds, max_rounds=2, metric="reward")
    assert "global step 7" in message and "kept fraction 0.250" in message and "2 of the 4" in message
    assert "dynamic_sampling_max_rounds" in message and "train_kept" in message


def test_no_group_with_signal_at_all_gives_an_infinite_cost_per_kept_group():
    rounds = RoundsSelection(num_processes=1, groups_per_process=2)
    rounds.add_round([False, False])
    assert rounds.selection(0, allow_filler=True) == [(0, 0, True), (0, 1, True)]
    assert math.isinf(completions_per_kept_group(rounds, 8))


def test_a_round_of_the_wrong_size_is_refused():
    rounds = RoundsSelection(num_processes=2, groups_per_process=2)
    with pytest.raises(ValueError, match="4 groups"):
        rounds.add_round([True, True])


# ---- the refill stream ----------------------------------------------------------------------------------------------


def test_stream_walks_whole_permutations_and_resumes_from_its_state():
    stream = PromptStream(5, seed=3)
    first = stream.take(5)
    assert sorted(first) == list(range(5))
    head = stream.take(2)
    saved = stream.state_dict()
    rest = stream.take(6)
    assert sorted(head + rest[:3]) == list(range(5))  # the second pass completes before a third starts
    resumed = PromptStream(5, seed=3)
    resumed.load_state_dict(saved)
    assert resumed.take(6) == rest
    assert PromptStream(5, seed=3, shuffle=False).take(7) == [0, 1, 2, 3, 4, 0, 1]


def test_stream_order_is_not_the_dataloaders():
    generator = torch.Generator().manual_seed(0)  # TRL's RepeatSampler with seed 0
    dataloader_order = torch.randperm(50, generator=generator).tolist()
    assert PromptStream(50, seed=0).take(50) != dataloader_order


def test_stream_state_of_another_run_is_refused():
    saved = PromptStream(5, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_samples: saved 5 vs now 6"):
        PromptStream(6, seed=3).load_state_dict(saved)


# ---- merging TRL's per-round outputs --------------------------------------------------------------------------------


def _output(prompt_width, completion_width, rows, first_advantage):
    return {
        "prompt_ids": torch.arange(rows * prompt_width).view(rows, prompt_width) + 100,
        "prompt_mask": torch.ones(rows, prompt_width, dtype=torch.long),
        "completion_ids": torch.arange(rows * completion_width).view(rows, completion_width) + 500,
        "completion_mask": torch.ones(rows, completion_width, dtype=torch.long),
        "advantages": torch.arange(rows, dtype=torch.float32) + first_advantage,
        "old_per_token_logps": None,
        "num_items_in_batch": torch.tensor(rows * completion_width),
    }


def test_merge_pads_prompts_left_and_completions_right_and_keeps_row_order():
    a, b = _output(2, 3, 2, 0.0), _output(3, 1, 2, 10.0)
    merged = merge_generation_rows([a, b], [(1, 1), (0, 0)], pad_token_id=0)
    assert merged["prompt_ids"].tolist() == [[103, 104, 105], [0, 100, 101]]
    assert merged["prompt_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert merged["completion_ids"].tolist() == [[501, 0, 0], [500, 501, 502]]
    assert merged["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert merged["advantages"].tolist() == [11.0, 0.0]
    assert merged["old_per_token_logps"] is None and "num_items_in_batch" not in merged
    assert loss_mask_tokens(merged).item() == 4


def test_filler_rows_leave_the_loss_mask_and_token_count():
    merged = merge_generation_rows([_output(2, 3, 2, 1.0)], [(0, 0), (0, 1)], pad_token_id=0)
    mask_filler_rows(merged, torch.tensor([False, True]))
    assert merged["completion_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert merged["advantages"].tolist() == [1.0, 0.0]
    assert loss_mask_tokens(merged).item() == 3


def test_merge_ignores_freed_outputs_no_row_refers_to():
    a, b = _output(2, 3, 2, 0.0), _output(3, 1, 2, 10.0)
    merged = merge_generation_rows([None, b], [(1, 0)], pad_token_id=0)
    assert merged["completion_ids"].tolist() == [[500]] and merged["advantages"].tolist() == [10.0]
    assert merge_generation_rows([a, None], [(0, 1)], pad_token_id=0)["prompt_ids"].tolist() == [[102, 103]]


def test_a_round_left_out_of_the_selection_is_never_needed_again():
    """What lets the trainer free a round's tensors as soon as no process can train its rows."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        rounds = RoundsSelection(num_processes=2, groups_per_process=3)
        dropped: set[tuple[int, int]] = set()  # (process, round) freed
        for _ in range(6):
            rounds.add_round((torch.rand(6, generator=generator) < 0.3).tolist())
            needed = {p: {r for r, _, _ in rounds.selection(p, allow_filler=True)} for p in (0, 1)}
            for process in (0, 1):
                assert not {r for p, r in dropped if p == process} & needed[process]
                dropped |= {(process, r) for r in range(rounds.num_rounds) if r not in needed[process]}


def test_merge_refuses_outputs_it_cannot_pad():
    output = dict(_output(2, 2, 2, 0.0), pixel_values=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="pixel_values"):
        merge_generation_rows([output], [(0, 0)], pad_token_id=0)


# ---- selection first, statistics second ------------------------------------------------------------------------------


def test_trained_groups_span_every_process_in_trls_gathered_order():
    selection = RoundsSelection(num_processes=2, groups_per_process=2)
    selection.add_round([True, False, False, True])  # process 0: groups 0, 1; process 1: groups 2, 3
    selection.add_round([True, True, True, False])
    assert trained_groups(selection, allow_filler=False) == [(0, 0, False), (1, 0, False), (0, 3, False), (1, 2, False)]
    short = RoundsSelection(num_processes=1, groups_per_process=2)
    short.add_round([False, True])
    with pytest.raises(DynamicSamplingExhausted):
        trained_groups(short, allow_filler=False)
    assert trained_groups(short, allow_filler=True) == [(0, 0, True), (0, 1, False)]


def test_take_groups_concatenates_rows_and_groups_of_several_rounds():
    round_rows = [torch.arange(6.0), torch.arange(10.0, 16.0)]  # 3 groups of 2 rows per round
    assert take_groups(round_rows, [(1, 2), (0, 0)], 2).tolist() == [14.0, 15.0, 0.0, 1.0]
    assert take_groups(round_rows, [], 2).shape == (0,)
    statistics = [GroupStatistics(rows={"te": r}, groups={"se": r[::2] * 100}) for r in round_rows]
    taken = take_group_statistics(statistics, [(1, 2), (0, 0)], 2)
    assert taken.rows["te"].tolist() == [14.0, 15.0, 0.0, 1.0]
    assert taken.groups["se"].tolist() == [1400.0, 0.0]


# ---- config -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class", [GRPOBaselineConfig, AAPOConfig, GPGConfig, ZAPOConfig])
def test_every_config_has_the_fields_off_by_default(config_class, tmp_path):
    config = config_class(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8)
    assert config.dynamic_sampling is False
    # ZAPO keeps what DAER gives signal: dropping zero-variance groups by reward would discard what DAER exists to use
    assert config.dynamic_sampling_metric == ("final_advantage" if config_class is ZAPOConfig else "reward")
    assert config.dynamic_sampling_max_rounds == 0
    assert config.dynamic_sampling_on_exhaustion == "error"
    assert config.dynamic_sampling_tolerance > 0


@pytest.mark.parametrize("field, value, message", [
    ("dynamic_sampling_metric", "acc", "dynamic_sampling_metric must be one of"),
    ("dynamic_sampling_on_exhaustion", "skip", "dynamic_sampling_on_exhaustion must be one of"),
    ("dynamic_sampling_max_rounds", -1, "dynamic_sampling_max_rounds must be"),
    ("dynamic_sampling_tolerance", -1e-6, "dynamic_sampling_tolerance must be"),
    ("dynamic_sampling_correct_threshold", math.nan, "dynamic_sampling_correct_threshold must be"),
])
def test_bad_fields_are_refused_by_name(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        GRPOBaselineConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, **{field: value})


@pytest.mark.parametrize("metric", ["reward", "accuracy"])
def test_zapo_refuses_a_metric_that_drops_what_daer_uses(metric, tmp_path):
    settings = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, dynamic_sampling=True,
                    dynamic_sampling_metric=metric)
    with pytest.raises(ValueError, match=f"dynamic_sampling_metric='{metric}' with use_daer=True"):
        ZAPOConfig(**settings)
    assert ZAPOConfig(**settings, use_daer=False).dynamic_sampling_metric == metric  # the 'w/o DAER' ablation
    assert ZAPOConfig(**dict(settings, dynamic_sampling=False)).dynamic_sampling is False  # not read then


def test_local_batches_must_hold_whole_groups(tmp_path, monkeypatch):
    # two processes of 2 rows: TRL accepts the 4-row generation batch, but each process would hold half a group
    monkeypatch.setattr(GRPOBaselineConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="whole groups on every process"):
        GRPOBaselineConfig(output_dir=str(tmp_path), use_cpu=True, dynamic_sampling=True, num_generations=4,
                           per_device_train_batch_size=2)
    GRPOBaselineConfig(output_dir=str(tmp_path), use_cpu=True, dynamic_sampling=False, num_generations=4,
                       per_device_train_batch_size=2)
    GRPOBaselineConfig(output_dir=str(tmp_path), use_cpu=True, dynamic_sampling=True, num_generations=4,
                       per_device_train_batch_size=2, steps_per_generation=2, gradient_accumulation_steps=2)


# ---- DAPO's overlong reward shaping, as a named reward --------------------------------------------------------------


def test_soft_overlong_punishment_is_trls_reward_built_from_the_config(tmp_path):
    from trl.rewards import get_soft_overlong_punishment

    from aapo_trl.rewards import get_reward_funcs

    config = GRPOBaselineConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8,
                                max_completion_length=10, soft_punish_cache=4)
    (reward,) = get_reward_funcs(["soft_overlong_punishment"], config)
    lengths = [[1] * n for n in (3, 6, 7, 9, 10)]
    assert reward(completion_ids=lengths) == get_soft_overlong_punishment(10, 4)(lengths) == [0, 0, -0.25, -0.75, -1]
    assert reward.parameters() == {"max_completion_len": 10, "soft_punish_cache": 4}


@pytest.mark.parametrize("max_length, cache, message", [
    (10, 11, r"soft_punish_cache \(11\) must not exceed max_completion_length \(10\)"),
    (10, 0, "soft_punish_cache must be a positive token count"),
])
def test_soft_overlong_punishment_refuses_a_cache_it_cannot_ramp_over(max_length, cache, message, tmp_path):
    from aapo_trl.rewards import get_reward_funcs

    config = GRPOBaselineConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8,
                                max_completion_length=max_length, soft_punish_cache=cache)
    with pytest.raises(ValueError, match=message):
        get_reward_funcs(["soft_overlong_punishment"], config)
