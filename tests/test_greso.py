"""GRESO pre-rollout filtering (ALGORITHMS.md section 3.7): the spec vectors, the skip statistics, the
adaptation of p_easy/p_hard, the sampler's layout against TRL's RepeatSampler, and an exact resume through
accelerate's real DataLoaderShard / skip_first_batches driven the way transformers' Trainer drives them."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
from trl.trainer.utils import RepeatSampler

import aapo_trl.greso as greso_module
from aapo_trl.advantages import zero_advantage_groups
from aapo_trl.greso import (
    EASY,
    GRESO_STATE_FILENAME,
    HARD,
    MIXED,
    GRESOFilter,
    GRESORepeatSampler,
    GRESOStateError,
    classify_zero_variance_groups,
    dataset_fingerprint,
    greso_state_filename,
)

nan = float("nan")
EASY_ROW = [1.0, 1.0, 1.0, 1.0]
HARD_ROW = [0.1, 0.1, 0.1, 0.1]
MIXED_ROW = [1.0, 0.1, 1.0, 0.0]


def record_kinds(flt: GRESOFilter, pid: int, rows: list[list[float]], epoch: int = 0) -> None:
    for row in rows:
        flt.record([pid], torch.tensor([row]), epoch=epoch)


# ----------------------------------------------------------------------------------------------------------------------
# Spec vectors and the run length
# ----------------------------------------------------------------------------------------------------------------------


def test_constant_file_name():
    assert greso_state_filename == GRESO_STATE_FILENAME == "greso_state.json"


def test_spec_vectors():
    flt = GRESOFilter(seed=0)
    assert flt.keep_probability(5) == 1.0  # no history
    record_kinds(flt, 1, [EASY_ROW] * 3)
    assert flt.run_length(1) == (EASY, 3)
    assert flt.keep_probability(1) == pytest.approx(0.125)  # p = 0.5, z = 3
    record_kinds(flt, 2, [HARD_ROW] * 7)
    assert flt.keep_probability(2) == pytest.approx(0.01)  # 0.5 ** 7 = 0.0078 -> floor 0.01


def test_run_length_counts_only_the_newest_run_of_one_kind():
    flt = GRESOFilter(seed=0, p_easy=0.5, p_hard=0.3)
    record_kinds(flt, 0, [EASY_ROW, EASY_ROW, MIXED_ROW])
    assert flt.run_length(0) == (MIXED, 1)
    assert flt.keep_probability(0) == 1.0  # a mixed rollout resets
    record_kinds(flt, 0, [EASY_ROW])
    assert flt.keep_probability(0) == pytest.approx(0.5)  # z = 1: the easy run before the mixed one is gone
    record_kinds(flt, 3, [EASY_ROW] * 3 + [HARD_ROW] * 2)
    assert flt.run_length(3) == (HARD, 2)
    assert flt.keep_probability(3) == pytest.approx(0.3**2)  # the hard run uses p_hard
    assert [kind for _, _, kind in flt.history[3]] == [EASY] * 3 + [HARD] * 2


def test_classification_matches_zero_advantage_groups_and_is_nan_aware():
    rewards = torch.tensor(
        [
            EASY_ROW,
            HARD_ROW,
            [0.0, 0.0, 0.0, 0.0],  # no extractable answer: hard
            MIXED_ROW,
            [0.1, 0.1, 0.1, 0.1 + 1e-7],  # within the zero-variance tolerance: hard
            [1.0, nan, 1.0, 1.0],  # scorable rows all correct: easy
            [nan, nan, 0.1, nan],  # one scorable row: zero-advantage, hard
            [nan, nan, nan, nan],  # nothing scorable: neither
            [0.5, 0.5, 0.5, 0.5],  # zero variance, nobody correct
        ]
    )
    kinds = classify_zero_variance_groups(rewards.flatten(), 4, correct_threshold=0.95).tolist()
    assert kinds == [1, -1, -1, 0, -1, 1, -1, 0, -1]
    zero = zero_advantage_groups(rewards.flatten(), 4).tolist()
    assert all(z for z, k in zip(zero, kinds) if k != 0)  # easy/hard only among zero-advantage groups
    assert classify_zero_variance_groups(torch.tensor([0.9, 0.9]), 2, correct_threshold=0.8).tolist() == [1]

    flt = GRESOFilter(seed=0)
    got = flt.record(list(range(9)), rewards, epoch=4)
    assert got == [EASY, HARD, HARD, MIXED, HARD, EASY, HARD, MIXED, HARD]
    epoch, mean, kind = flt.history[5][0]
    assert (epoch, kind) == (4, EASY) and mean == pytest.approx(1.0)
    assert math.isnan(flt.history[7][0][1])  # all-NaN group: NaN mean, stays in rotation
    assert flt.keep_probability(7) == 1.0


def test_record_validates_shapes():
    flt = GRESOFilter(seed=0)
    with pytest.raises(ValueError, match="prompt ids"):
        flt.record([0, 1], torch.ones(3, 4))
    with pytest.raises(ValueError, match="n_groups, num_generations"):
        flt.record([0], torch.ones(4))
    with pytest.raises(ValueError, match="epochs"):
        flt.record([0, 1], torch.ones(2, 4), epoch=[0])


# ----------------------------------------------------------------------------------------------------------------------
# Skip statistics
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_skip_rate_follows_p_to_the_run_length(k):
    flt = GRESOFilter(seed=1234)
    easy, mixed = list(range(100)), list(range(100, 200))
    for epoch in range(k):
        flt.record(easy, torch.tensor([EASY_ROW] * 100), epoch=epoch)
        flt.record(mixed, torch.tensor([MIXED_ROW] * 100), epoch=epoch)
    rounds = 30
    skipped_easy = kept_mixed = 0
    for _ in range(rounds):
        decisions = flt.decide(easy + mixed)
        skipped_easy += sum(not d for d in decisions[:100])
        kept_mixed += sum(decisions[100:])
    n = 100 * rounds
    expected = 1 - 0.5**k
    tolerance = 5 * math.sqrt(expected * (1 - expected) / n)  # 5 binomial standard deviations
    assert abs(skipped_easy / n - expected) < tolerance
    assert kept_mixed == n  # mixed prompts are never skipped
    assert flt.num_decided == 2 * n
    metrics = flt.metrics()
    assert metrics["greso/skip_rate"] == pytest.approx(skipped_easy / (2 * n))
    assert flt.metrics()["greso/skip_rate"] == 0.0  # the window was reset


def test_decide_draws_once_per_candidate_whatever_the_outcome():
    a, b = GRESOFilter(seed=7), GRESOFilter(seed=7)
    record_kinds(a, 0, [EASY_ROW] * 5)  # a skips prompt 0 often, b always keeps it
    for _ in range(50):
        a.decide([0, 1])
        b.decide([0, 1])
    assert a.rng.getstate() == b.rng.getstate()


# ----------------------------------------------------------------------------------------------------------------------
# p_easy / p_hard adaptation
# ----------------------------------------------------------------------------------------------------------------------


def test_no_update_during_the_first_greso_epoch():
    flt = GRESOFilter(seed=0)
    flt.record(range(4), torch.tensor([EASY_ROW, EASY_ROW, HARD_ROW, MIXED_ROW]), epoch=0)
    metrics = flt.end_step()
    assert (flt.p_easy, flt.p_hard, flt.num_updates) == (0.5, 0.5, 0)
    assert metrics["greso/easy_share"] == pytest.approx(0.5)
    assert metrics["greso/hard_share"] == pytest.approx(0.25)


def test_update_direction_and_step_size():
    flt = GRESOFilter(seed=0)
    # 1 easy out of 4 (0.25 >= 0.0833: skip more easy), no hard (0 < 0.1667: skip fewer hard)
    flt.record(range(4), torch.tensor([EASY_ROW, MIXED_ROW, MIXED_ROW, MIXED_ROW]), epoch=[0, 1, 1, 1])
    flt.end_step()
    assert (flt.p_easy, flt.p_hard) == (0.49, 0.51)
    # no easy, 3 hard of 4
    flt.record(range(4), torch.tensor([HARD_ROW, HARD_ROW, HARD_ROW, MIXED_ROW]), epoch=2)
    flt.end_step()
    assert (flt.p_easy, flt.p_hard) == (0.5, 0.5)
    # a step with nothing rolled out leaves p alone
    flt.end_step()
    assert (flt.p_easy, flt.p_hard, flt.num_updates) == (0.5, 0.5, 2)


def test_share_equal_to_target_decreases_p():
    flt = GRESOFilter(seed=0, target_easy=0.25, target_hard=0.5)
    flt.update_probabilities(easy_share=0.25, hard_share=0.5)
    assert (flt.p_easy, flt.p_hard) == (0.49, 0.49)
    flt = GRESOFilter(seed=0)
    assert flt.target_easy == pytest.approx(0.25 / 3) and flt.target_hard == pytest.approx(2 * 0.25 / 3)


def test_clamps():
    flt = GRESOFilter(seed=0)
    for _ in range(100):
        flt.update_probabilities(easy_share=1.0, hard_share=0.0)
    assert (flt.p_easy, flt.p_hard) == (0.05, 0.95)
    flt.update_probabilities(easy_share=0.0, hard_share=1.0)
    assert (flt.p_easy, flt.p_hard) == (0.06, 0.94)


# ----------------------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------------------


def test_same_layout_as_repeat_sampler_when_nothing_is_filtered():
    kwargs = dict(mini_repeat_count=2, batch_size=3, repeat_count=2, shuffle=True, seed=42)
    data = list(range(12))  # batch_size divides the size: identical for every epoch
    ours = GRESORepeatSampler(data, **kwargs, greso_filter=GRESOFilter(seed=0))
    trl = RepeatSampler(data, **kwargs)
    assert len(ours) == len(trl)
    for _ in range(3):
        assert list(ours) == list(trl)

    data = list(range(11))  # the tail is carried over instead of dropped: identical for the first epoch
    ours = GRESORepeatSampler(data, **kwargs, greso_filter=GRESOFilter(seed=0))
    trl = RepeatSampler(data, **kwargs)
    assert len(ours) == len(trl) and list(ours) == list(trl)

    ours = GRESORepeatSampler(data, 2, 3, 2, shuffle=False, greso_filter=GRESOFilter(seed=0))
    assert list(ours) == list(RepeatSampler(data, 2, 3, 2, shuffle=False))


def test_filtered_prompts_are_absent_and_each_epoch_has_len_indices():
    n, bs, mini, rep = 20, 4, 3, 2
    flt = GRESOFilter(seed=0, p_easy=0.0, min_keep_probability=0.0)  # an easy prompt is never kept
    banned = {0, 3, 7, 11, 19}
    for pid in banned:
        record_kinds(flt, pid, [EASY_ROW])
    sampler = GRESORepeatSampler(list(range(n)), mini, bs, rep, seed=3, greso_filter=flt)
    for _ in range(4):
        indices = list(sampler)
        assert len(indices) == len(sampler) == (n // bs) * bs * mini * rep
        assert banned.isdisjoint(indices)
        chunk_len = bs * mini * rep
        for start in range(0, len(indices), chunk_len):  # RepeatSampler's layout inside every chunk
            chunk = indices[start : start + chunk_len]
            unique = chunk[::mini][:bs]
            expected = [pid for _ in range(rep) for pid in unique for _ in range(mini)]
            assert chunk == expected
    # 5 generation batches of 4 per Trainer epoch out of 15 allowed prompts: the passes run ahead
    assert flt.epoch >= 5
    assert flt.num_skipped > 0


def test_a_new_greso_epoch_starts_when_the_permutation_wraps():
    n, bs = 10, 2
    flt = GRESOFilter(seed=0, p_easy=0.0, min_keep_probability=0.0)
    for pid in range(5):
        record_kinds(flt, pid, [EASY_ROW])
    sampler = GRESORepeatSampler(list(range(n)), 1, bs, 1, seed=0, greso_filter=flt)
    assert flt.epoch == 0
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(2 * bs)]  # two chunks: 4 of the 5 allowed prompts
    assert flt.epoch == 0 and set(first) <= set(range(5, 10))
    rest = list(iterator)  # 3 more chunks need 6 prompts: the first pass has 1 left
    assert flt.epoch == 1
    chunks = sampler.mark_consumed(5)
    assert [c.epochs for c in chunks][:2] == [(0, 0), (0, 0)]
    assert 1 in chunks[2].epochs
    assert len(first) + len(rest) == len(sampler)
    assert sum(c.examined for c in chunks) == sum(c.skipped for c in chunks) + 5 * bs
    assert all(c.skipped == c.skipped_easy for c in chunks)


def test_determinism_and_decision_identity_across_ranks():
    def build():
        flt = GRESOFilter(seed=11)
        for pid in range(0, 30, 2):
            record_kinds(flt, pid, [EASY_ROW] * 2)
        for pid in range(1, 30, 4):
            record_kinds(flt, pid, [HARD_ROW])
        return flt, GRESORepeatSampler(list(range(30)), 2, 4, 3, seed=5, greso_filter=flt)

    (fa, sa), (fb, sb) = build(), build()
    for _ in range(3):
        assert list(sa) == list(sb)
    assert fa.state_dict() == fb.state_dict()
    assert fa.num_skipped > 0


def test_everything_filtered_raises_instead_of_looping():
    flt = GRESOFilter(seed=0, p_easy=0.0, min_keep_probability=0.0)
    for pid in range(6):
        record_kinds(flt, pid, [EASY_ROW])
    sampler = GRESORepeatSampler(list(range(6)), 1, 2, 1, seed=0, greso_filter=flt, max_passes_per_chunk=5)
    with pytest.raises(RuntimeError, match="skipped every candidate of 5 passes"):
        list(sampler)


def test_mark_consumed_cannot_run_ahead_of_the_dataloader():
    sampler = GRESORepeatSampler(list(range(8)), 2, 2, 1, seed=0, greso_filter=GRESOFilter(seed=0))
    with pytest.raises(RuntimeError, match="mark_consumed"):
        sampler.mark_consumed()
    iterator = iter(sampler)
    next(iterator)
    (chunk,) = sampler.mark_consumed()
    assert len(chunk.prompt_ids) == 2 and sampler.num_consumed == 1 and sampler.pending_chunks == ()


def test_filter_and_sampler_must_agree_on_the_dataset_size():
    with pytest.raises(GRESOStateError, match="dataset_size=5"):
        GRESORepeatSampler(list(range(6)), 1, 2, greso_filter=GRESOFilter(dataset_size=5))


# ----------------------------------------------------------------------------------------------------------------------
# Exact resume through accelerate's DataLoaderShard and skip_first_batches, driven like transformers' Trainer
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    num_prompts: int = 23
    num_generations: int = 2
    num_processes: int = 2
    per_device_batch: int = 2
    steps_per_generation: int = 2
    num_iterations: int = 1

    @property
    def grad_accum(self) -> int:  # TRL's default: steps_per_generation = gradient_accumulation_steps
        return self.steps_per_generation

    @property
    def unique_prompts(self) -> int:  # generation_batch_size // num_generations
        return self.per_device_batch * self.steps_per_generation * self.num_processes // self.num_generations

    @property
    def generate_every(self) -> int:
        return self.steps_per_generation * self.num_iterations


def scripted_rewards(pid: int, k: int, num_generations: int) -> list[float]:
    """The k-th rollout of prompt pid: always easy, hard-then-learnt, always mixed, or mostly easy."""
    mixed = [1.0] + [0.1] * (num_generations - 1)
    kind = pid % 4
    if kind == 0:
        return [1.0] * num_generations
    if kind == 1:
        return [0.1] * num_generations if k < 3 else mixed
    if kind == 2:
        return mixed
    return mixed if k % 3 == 2 else [1.0] * num_generations


class SimRank:
    def __init__(self, layout: Layout, rank: int):
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        self.dataset = list(range(layout.num_prompts))  # an item is its own index: batches show the indices
        self.filter = GRESOFilter(seed=17, dataset_fingerprint=dataset_fingerprint(self.dataset))
        self.sampler = GRESORepeatSampler(  # built exactly as GRPOTrainer._get_train_sampler builds RepeatSampler
            self.dataset,
            mini_repeat_count=layout.num_generations,
            batch_size=layout.unique_prompts,
            repeat_count=layout.num_iterations * layout.steps_per_generation,
            shuffle=True,
            seed=99,
            greso_filter=self.filter,
        )
        loader = DataLoader(
            self.dataset,
            batch_size=layout.per_device_batch * layout.steps_per_generation,
            sampler=self.sampler,
            collate_fn=list,
        )
        self.loader = prepare_data_loader(
            loader, num_processes=layout.num_processes, process_index=rank, put_on_device=False
        )


def simulate(layout: Layout, max_steps: int, tmp_path, save_at=(), resume_step=None):
    """transformers 5.23's _inner_training_loop/_run_epoch with TRL's generate-every-N logic, on P simulated ranks.

    Returns ({global_step: prompt ids generated at that step}, final per-rank filter states). With
    ``save_at`` the main process writes the GRESO state after those steps; with ``resume_step`` every
    rank restores it first and the loop resumes as Trainer(resume_from_checkpoint=...) does.
    """
    from accelerate import skip_first_batches

    ranks = [SimRank(layout, r) for r in range(layout.num_processes)]
    G, GA = layout.num_generations, layout.grad_accum
    global_step = 0
    if resume_step is not None:
        for rank in ranks:
            rank.filter.restore_json(tmp_path / f"ckpt-{resume_step}" / GRESO_STATE_FILENAME)
        global_step = resume_step
    steps_per_epoch = len(ranks[0].loader) // GA
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    epochs_trained = global_step // steps_per_epoch
    batches_to_skip = (global_step % steps_per_epoch) * GA
    trace: dict[int, tuple[int, ...]] = {}
    trl_step = 0  # GRPOTrainer._step: not checkpointed, restarts at 0 on resume
    for epoch in range(epochs_trained, num_epochs):
        iterators = []
        first_update = 0
        for rank in ranks:
            loader = rank.loader
            if resume_step is not None and epoch == epochs_trained and batches_to_skip > 0:
                loader = skip_first_batches(loader, batches_to_skip)
                first_update = batches_to_skip // GA
            loader.set_epoch(epoch)
            inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
            if hasattr(inner, "set_epoch"):
                inner.set_epoch(epoch)
            iterators.append(iter(loader))
        for _ in range(first_update, steps_per_epoch):
            batches = [[next(it) for _ in range(GA)] for it in iterators]  # Trainer.get_batch_samples
            for micro in range(GA):
                if trl_step % layout.generate_every == 0:  # GRPOTrainer._prepare_inputs generates
                    gathered = [index for rank_batches in batches for index in rank_batches[micro]]
                    prompt_ids = gathered[::G]
                    assert gathered == [pid for pid in prompt_ids for _ in range(G)]
                    k = [len(ranks[0].filter.history.get(pid, ())) for pid in prompt_ids]
                    rewards = torch.tensor([scripted_rewards(pid, kk, G) for pid, kk in zip(prompt_ids, k)])
                    for rank in ranks:
                        (chunk,) = rank.sampler.mark_consumed()
                        assert list(chunk.prompt_ids) == prompt_ids  # TRL's gathered order, same on every rank
                        rank.filter.record(chunk.prompt_ids, rewards, epoch=chunk.epochs)
                    trace[global_step] = tuple(prompt_ids)
                trl_step += 1
            for rank in ranks:
                rank.filter.end_step()
            global_step += 1
            if global_step in save_at:
                ranks[0].filter.save_json(tmp_path / f"ckpt-{global_step}" / GRESO_STATE_FILENAME)
            if global_step >= max_steps:
                return trace, [rank.filter.state_dict() for rank in ranks]
    return trace, [rank.filter.state_dict() for rank in ranks]


@pytest.mark.parametrize(
    "layout, max_steps, saves",
    [
        (Layout(), 13, (1, 3, 5, 7, 10, 12)),  # 5 steps per epoch; 5 and 10 are epoch ends
        (Layout(num_processes=1, per_device_batch=4), 13, (2, 5, 9)),
        (Layout(num_iterations=2), 26, (2, 4, 10, 14, 20)),  # a generation batch spans 2 steps
    ],
    ids=["2-ranks", "1-rank", "num_iterations-2"],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, layout, max_steps, saves):
    full_trace, full_states = simulate(layout, max_steps, tmp_path, save_at=saves)
    assert all(state == full_states[0] for state in full_states)  # identical on every rank
    assert full_states[0]["counters"]["num_skipped"] > 0  # the filter did filter
    assert full_states[0]["counters"]["num_updates"] > 0  # and p adapted after the first GRESO epoch
    for step in saves:
        trace, states = simulate(layout, max_steps, tmp_path, resume_step=step)
        assert trace == {s: ids for s, ids in full_trace.items() if s >= step}, f"resumed at step {step}"
        assert states == full_states, f"resumed at step {step}"


def test_resumed_epoch_is_replayed_without_set_epoch_and_a_finished_one_is_not(tmp_path):
    def build():
        flt = GRESOFilter(seed=3)
        for pid in range(0, 10, 3):
            record_kinds(flt, pid, [EASY_ROW])
        return flt, GRESORepeatSampler(list(range(10)), 1, 2, 1, seed=1, greso_filter=flt)

    flt, sampler = build()
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(5)]  # 3 chunks decided (the third half pulled)
    sampler.mark_consumed(2)
    path = tmp_path / "mid" / GRESO_STATE_FILENAME
    flt.save_json(path)
    rest = list(iterator)

    flt2, sampler2 = build()
    flt2.restore_json(path)
    assert list(sampler2) == first + rest  # no set_epoch: replay the interrupted epoch, then continue
    assert sampler2.num_consumed == 2

    sampler.mark_consumed(3)  # the whole epoch was consumed and its iterator exhausted
    flt.save_json(tmp_path / "end" / GRESO_STATE_FILENAME)
    following = list(sampler)
    flt3, sampler3 = build()
    flt3.restore_json(tmp_path / "end" / GRESO_STATE_FILENAME)
    assert list(sampler3) == following

    flt4, sampler4 = build()  # set_epoch, when it arrives, wins
    flt4.restore_json(tmp_path / "end" / GRESO_STATE_FILENAME)
    sampler4.set_epoch(0)
    assert list(sampler4) == first + rest
    flt.save_json(tmp_path / "epoch1" / GRESO_STATE_FILENAME)  # the sampler is in Trainer epoch 1 now
    flt5, sampler5 = build()
    flt5.restore_json(tmp_path / "epoch1" / GRESO_STATE_FILENAME)
    sampler5.set_epoch(0)  # the trainer resumes from an older checkpoint than the GRESO state
    with pytest.raises(GRESOStateError, match="later checkpoint"):
        list(sampler5)


def test_state_restored_before_or_after_the_sampler_is_built():
    flt = GRESOFilter(seed=2)
    sampler = GRESORepeatSampler(list(range(9)), 2, 3, 1, seed=4, greso_filter=flt)
    record_kinds(flt, 4, [EASY_ROW] * 2)
    iterator = iter(sampler)
    [next(iterator) for _ in range(7)]
    state = json.loads(json.dumps(flt.state_dict()))
    expected_rest = list(iterator)

    early = GRESOFilter(seed=2)
    early.load_state_dict(state)  # before the sampler exists (the trainer loads in train())
    late_sampler = GRESORepeatSampler(list(range(9)), 2, 3, 1, seed=4, greso_filter=early)
    assert list(late_sampler)[7:] == expected_rest
    assert early.state_dict()["history"] == state["history"]


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def small_filter() -> tuple[GRESOFilter, GRESORepeatSampler]:
    flt = GRESOFilter(seed=5, dataset_fingerprint="sha256:abc")
    sampler = GRESORepeatSampler(list(range(8)), 2, 2, 1, seed=0, greso_filter=flt)
    flt.record([1, 2], torch.tensor([[1.0, 1.0], [nan, nan]]), epoch=0)
    iterator = iter(sampler)
    next(iterator)
    return flt, sampler


def test_state_round_trips_through_json(tmp_path):
    flt, _ = small_filter()
    path = tmp_path / GRESO_STATE_FILENAME
    flt.save_json(path)
    clone = GRESOFilter(seed=999, dataset_fingerprint="sha256:abc")
    GRESORepeatSampler(list(range(8)), 2, 2, 1, seed=0, greso_filter=clone)
    clone.restore_json(path)
    strip = lambda state: {k: v for k, v in state.items() if k != "config"}  # noqa: E731 (the seed differs)
    assert strip(clone.state_dict()) == strip(flt.state_dict())
    assert clone.rng.random() == flt.rng.random()
    loaded = GRESOFilter.load_json(path, expected_fingerprint="sha256:abc", expected_dataset_size=8)
    assert loaded.history.keys() == flt.history.keys() and loaded.p_easy == flt.p_easy


def test_save_is_atomic_and_plain_json(tmp_path, monkeypatch):
    flt, _ = small_filter()
    path = tmp_path / "ckpt" / GRESO_STATE_FILENAME
    flt.save_json(path)
    assert os.listdir(path.parent) == [GRESO_STATE_FILENAME]  # no temp file left behind
    text = path.read_text()

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    state = json.loads(text, parse_constant=no_constants)  # strict JSON: no NaN/Infinity
    assert state["history"]["2"][0][1] is None  # the NaN mean
    assert state["format"] == "aapo_trl.greso/1"
    assert b"\x80" not in path.read_bytes() and "pickle" not in text  # no pickled payloads

    flt.record([3], torch.tensor([[1.0, 1.0]]), epoch=0)

    def crash(src, dst):
        raise OSError("simulated crash before os.replace")

    monkeypatch.setattr(greso_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        flt.save_json(path)
    assert path.read_text() == text  # the previous checkpoint is intact
    assert os.listdir(path.parent) == [GRESO_STATE_FILENAME]
    monkeypatch.undo()
    assert "3" not in GRESOFilter.read_json(path)["history"]
    flt.save_json(path)
    assert "3" in GRESOFilter.read_json(path)["history"]


def test_state_of_another_dataset_is_refused_with_both_fingerprints(tmp_path):
    flt, _ = small_filter()
    path = tmp_path / GRESO_STATE_FILENAME
    flt.save_json(path)
    other = GRESOFilter(seed=5, dataset_fingerprint="sha256:def")
    with pytest.raises(GRESOStateError) as info:
        other.restore_json(path)
    message = str(info.value)
    assert str(path) in message and "sha256:abc" in message and "sha256:def" in message
    with pytest.raises(GRESOStateError, match="dataset_size=8.*dataset_size=9"):
        GRESOFilter.load_json(path, expected_dataset_size=9)
    with pytest.raises(GRESOStateError, match="sha256:zzz"):
        GRESOFilter.load_json(path, expected_fingerprint="sha256:zzz")
    with pytest.raises(FileNotFoundError, match="no GRESO state"):
        GRESOFilter.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(GRESOStateError, match="is not a GRESO state"):
        other.restore_json(tmp_path / "bad.json")


def test_sampler_layout_change_is_refused(tmp_path):
    flt, _ = small_filter()
    path = tmp_path / GRESO_STATE_FILENAME
    flt.save_json(path)
    other = GRESOFilter(seed=5, dataset_fingerprint="sha256:abc")
    GRESORepeatSampler(list(range(8)), 4, 2, 1, seed=0, greso_filter=other)  # num_generations 2 -> 4
    with pytest.raises(GRESOStateError, match="mini_repeat_count: saved 2 vs now 4"):
        other.restore_json(path)


def test_dataset_fingerprint_is_stable_and_content_based():
    from datasets import Dataset

    a = Dataset.from_dict({"row_id": [3, 1, 2], "prompt": ["x", "y", "z"]})
    b = Dataset.from_dict({"row_id": [3, 1, 2], "prompt": ["x", "y", "z"]})
    c = Dataset.from_dict({"row_id": [1, 3, 2], "prompt": ["y", "x", "z"]})
    assert dataset_fingerprint(a) == dataset_fingerprint(b) != dataset_fingerprint(c)
    assert dataset_fingerprint([1, 2]) != dataset_fingerprint([2, 1])


# ----------------------------------------------------------------------------------------------------------------------
# Dynamic sampling's refill rounds draw through GRESO (ALGORITHMS.md section 5)
# ----------------------------------------------------------------------------------------------------------------------


def test_a_refill_never_draws_a_prompt_greso_skips_and_counts_its_skips():
    flt = GRESOFilter(seed=0, p_easy=0.0, p_hard=0.0, p_min=0.0, min_keep_probability=0.0)  # easy/hard runs: skip
    sampler = GRESORepeatSampler(list(range(10)), 2, 3, 1, seed=1, greso_filter=flt)
    always_skipped = {0, 1, 2, 3, 4, 5}
    for pid in always_skipped:
        record_kinds(flt, pid, [EASY_ROW if pid % 2 else HARD_ROW])
    decided, skipped = flt.num_decided, flt.num_skipped
    chunks = [sampler.draw_refill(2, exclude=()) for _ in range(6)]
    drawn = [pid for chunk in chunks for pid in chunk.prompt_ids]
    assert drawn and not set(drawn) & always_skipped
    assert flt.num_decided - decided == sum(chunk.examined for chunk in chunks)  # the filter's counters see refills
    assert flt.num_skipped - skipped == sum(chunk.skipped for chunk in chunks) > 0
    assert all(chunk.skipped_easy + chunk.skipped_hard == chunk.skipped for chunk in chunks)
    assert sampler.pending_chunks == ()  # refills are not the DataLoader's chunks


def test_a_generation_batch_never_holds_a_prompt_twice_across_pass_boundaries():
    sampler = GRESORepeatSampler(list(range(10)), 2, 3, 1, seed=4, greso_filter=GRESOFilter(seed=0))
    boundaries = 0
    for _ in range(20):  # steps of one DataLoader-like chunk and two refills: 9 of the 10 prompts
        passes = sampler._pass_index
        step = list(sampler._decide(3).prompt_ids)
        for _ in range(2):
            chunk = sampler.draw_refill(3, exclude=step)
            step += chunk.prompt_ids
        boundaries += sampler._pass_index != passes
        assert len(set(step)) == len(step) == 9, step
    assert boundaries >= 10  # most steps crossed into a new permutation
    # a generation batch larger than the dataset cannot avoid repeats: it starts over instead of stalling
    assert len(sampler.draw_refill(4, exclude=range(10)).prompt_ids) == 4


def test_refills_resume_from_the_saved_state_with_identical_prompts(tmp_path):
    def build():
        flt = GRESOFilter(seed=0)
        return flt, GRESORepeatSampler(list(range(10)), 2, 3, 1, seed=4, greso_filter=flt)

    flt, sampler = build()
    rewards = torch.tensor([EASY_ROW[:2]] * 3)
    for _ in range(3):
        flt.record(sampler.draw_refill(3).prompt_ids, rewards)
    flt.save_json(tmp_path / GRESO_STATE_FILENAME)
    later = [sampler.draw_refill(3, exclude=[1, 2]) for _ in range(4)]
    resumed_flt, resumed = build()
    resumed_flt.restore_json(tmp_path / GRESO_STATE_FILENAME)
    assert [resumed.draw_refill(3, exclude=[1, 2]) for _ in range(4)] == later
