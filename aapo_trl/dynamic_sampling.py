"""Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476, section 3.2 and Eq. 11; verl's
``algorithm.filter_groups``): drop the groups that carry no signal and generate again until the batch is full.

This module is free of ``torch.distributed`` and of the trainer: the selection rules, the bookkeeping of the
rounds, the stream the extra prompts come from, and the merging of TRL's per-round batches. The trainer glue
is in :mod:`aapo_trl.trainers.base` (``AdvantageTrainerMixin._dynamically_sampled_batch``).

Semantics (what one training generation batch becomes)
------------------------------------------------------
* Round 1 is TRL's own generation batch (the DataLoader's prompts, after GRESO's pre-rollout filter if on).
  Every further round generates the same number of prompts by calling TRL's generation and scoring again
  (``_generate_and_score_completions``) -- i.e. ``gen_batch_size = train_batch_size`` in verl's terms. Without
  GRESO they come from :class:`PromptStream`; with GRESO from GRESO's own sampler (see Composition).
* A group has signal under ``metric`` (:func:`groups_with_signal`). The decision is made on the rewards and
  group statistics gathered over every process, so every process computes the same decisions.
* Each process trains exactly the groups it owned at the start (``groups_per_process``), filled with its own
  groups with signal in generation order (round by round, TRL's order within a round); rounds go on until
  *every* process is full. Rows are never moved between processes, so every process ends with the same number
  of rows as TRL's own batch and every collective of the loss step is matched. With one process this is DAPO's
  rule exactly (the first ``B`` groups with signal); with several, a process that is already full may discard
  groups with signal that another process's shortfall made the round generate (counted in ``kept_fraction``).
* ``max_rounds`` (verl's ``max_num_gen_batches``, 0 = no limit) counts every round including the first. When
  it is reached before every process is full, ``on_exhaustion="error"`` raises (verl's behaviour) and
  ``"train_kept"`` trains on the groups kept so far: the missing places are filled with groups without signal
  whose loss mask is zeroed (they contribute no token to any loss term or token count; a loss that averages
  over sequences still counts them, see :func:`mask_filler_rows`).

Selection first, statistics second (verl's DAPO loop, ALGORITHMS.md section 5)
------------------------------------------------------------------------------
The advantage of a row is split in two (``AdvantageTrainerMixin.group_statistics`` / ``batch_advantages``):

* *group statistics* depend on a group's own rows only (AAPO's reference rewards, ZAPO's semantic and token
  entropies). They need the round's generation output, so they are computed once per round, for every group
  generated, dropped ones included (:class:`GroupStatistics`).
* *batch statistics* depend on the batch (GPG's ``alpha = B / (B - M)``, ``scale_rewards="batch"``'s std, ZAPO's
  ``q = n_easy / (n_easy + alpha n_hard)``). They are computed once per generation batch, after the selection,
  on the trained groups gathered over every process (:func:`trained_groups`, :func:`take_groups`; the filler
  groups of an exhausted ``"train_kept"`` batch are left out and get advantage 0), and each process slices its
  rows, as in TRL. The advantage log (the completions table) and the ``zero_adv/*`` and method metrics
  (``gpg``/``aapo``/``zapo``) describe that trained batch. TRL's generation metrics (rewards, completion
  lengths) and ``unscorable/*`` average over every round generated, as ``dynamic_sampling/generated_*`` do.

The signal of ``"final_advantage"`` cannot come from the trained batch, which it is choosing. It is each
group's final advantage computed with the group alone as its batch (the batch statistics of a one-group batch:
GPG's alpha is 1, the batch std is the group's, ZAPO's delta is 1), so a group's fate depends on its own rows
only, never on the round it happened to be generated in. GPG's alpha, the batch std and ZAPO's delta scale a
group's advantage by a positive factor, so a group kept this way still has signal in the trained batch, except
at the edges: ZAPO with ``alpha=0`` gives hard groups ``delta = 1 - q = 0`` as soon as the trained batch holds
an easy group (a kept hard group then trains with advantage 0, as the paper's formula says), a magnitude close
to ``tolerance`` may cross it when a factor below 1 scales it down, and AAPO with ``scale_rewards="batch"``
scales only the group-relative part, not the margin.

Composition
-----------
* GRESO skips prompts before generation; dynamic sampling filters after. With GRESO, every round's prompts come
  from GRESO's sampler (:meth:`aapo_trl.greso.GRESORepeatSampler.draw_refill`): the same permutation stream as
  the DataLoader's batches, the same pre-rollout filter, recorded once in the same history, counted in the same
  skip statistics (``greso/skip_rate`` of a generation batch covers its refill candidates), and a prompt already
  rolled out in the generation batch is not drawn again (unless the batch has rolled out every prompt of the
  dataset). This is GRESO's own loop, built on DAPO's: each refill is the next batch of the data stream.
* ``num_iterations`` / ``steps_per_generation``: the selection happens once per generation batch, inside TRL's
  ``_generate_and_score_completions``; TRL then buffers, shuffles and splits the selected batch as its own.
  Every round is generated by the same policy (no optimizer step happens in between), so the old log-probs of
  all rounds are consistent.
* AAPO's references (online rollouts or the reference-reward cache) and ZAPO's entropies are group statistics:
  computed for every generated group, dropped ones included (``"final_advantage"`` needs them to decide), and a
  refill row carries its cache columns like any training row.
* Resume: the stream position (or GRESO's sampler state) is saved after whole generation batches; as for
  GRESO, an exact resume needs checkpoints at generation-batch boundaries (TRL does not save its buffered
  generations either).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .advantages import zero_advantage_groups, zero_final_advantage_groups

METRICS = ("reward", "accuracy", "final_advantage")
EXHAUSTION_POLICIES = ("error", "train_kept")
DEFAULT_SPREAD_TOLERANCE = 1e-6
DEFAULT_CORRECT_THRESHOLD = 0.95
STREAM_SEED_OFFSET = 104729
"""The refill stream's permutations are seeded with ``seed + STREAM_SEED_OFFSET`` so that they are not the
DataLoader's (seeded with ``seed``): otherwise the extra prompts of step k would be the prompts of step k+1."""

STATE_FILENAME = "dynamic_sampling_state.json"
STATE_FORMAT = "aapo_trl.dynamic_sampling/1"


# --------------------------------------------------------------------------------------------------------------------
# Selection rules
# --------------------------------------------------------------------------------------------------------------------


def mixed_correctness_groups(correctness: torch.Tensor, num_generations: int, correct_threshold: float) -> torch.Tensor:
    """One bool per group: at least one scorable row ``>= correct_threshold`` and at least one below it.

    ``correctness`` is 1-D, group by group, NaN for unscorable rows (they count as neither).
    """
    grouped = correctness.detach().view(-1, num_generations)
    scorable = ~torch.isnan(grouped)
    correct = scorable & (grouped >= correct_threshold)
    incorrect = scorable & (grouped < correct_threshold)
    return correct.any(dim=1) & incorrect.any(dim=1)


def groups_with_signal(
    metric: str,
    num_generations: int,
    *,
    rewards: torch.Tensor,
    advantages: torch.Tensor | None = None,
    correctness: torch.Tensor | None = None,
    tolerance: float = DEFAULT_SPREAD_TOLERANCE,
    correct_threshold: float = DEFAULT_CORRECT_THRESHOLD,
) -> torch.Tensor:
    """One bool per group of the (global) batch: True where the group is kept.

    * ``"reward"`` (DAPO's rule as verl's ``metric=seq_reward`` applies it): the combined reward of the group's
      scorable rows spreads by more than ``tolerance`` (max - min; a group with fewer than two scorable rows
      has no spread). A tolerance, not ``== 0``: rewards that differ by float noise carry no signal.
    * ``"accuracy"`` (DAPO Eq. 11, ``0 < |{correct}| < G``; verl's ``metric=acc``): ``correctness`` (per row,
      NaN = unscorable) has both a value ``>= correct_threshold`` and one below it.
    * ``"final_advantage"``: some final advantage of the group exceeds ``tolerance`` in magnitude, so under
      AAPO or ZAPO only the groups those methods leave at zero are dropped.
    """
    if metric == "reward":
        return ~zero_advantage_groups(rewards.detach(), num_generations, tol=tolerance)
    if metric == "accuracy":
        values = rewards if correctness is None else correctness
        return mixed_correctness_groups(values, num_generations, correct_threshold)
    if metric == "final_advantage":
        if advantages is None:
            raise ValueError("metric='final_advantage' needs the final advantages")
        return ~zero_final_advantage_groups(advantages.detach(), num_generations, tol=tolerance)
    raise ValueError(f"dynamic_sampling_metric must be one of {METRICS}, got {metric!r}")


class DynamicSamplingExhausted(RuntimeError):
    """``dynamic_sampling_max_rounds`` rounds did not fill the batch and ``on_exhaustion="error"``."""


@dataclass
class RoundsSelection:
    """The rounds of one generation batch and which groups each process trains. Pure bookkeeping.

    ``groups_per_process``: groups each process owns in every round (= trains in the end). Feed each round's
    global signal (one bool per group, TRL's gathered order: process 0's groups first) to :meth:`add_round`.
    """

    num_processes: int
    groups_per_process: int
    signals: list[list[bool]] = field(default_factory=list)

    def __post_init__(self):
        if self.num_processes < 1 or self.groups_per_process < 1:
            raise ValueError(
                f"num_processes ({self.num_processes}) and groups_per_process ({self.groups_per_process}) must be >= 1"
            )

    @property
    def num_rounds(self) -> int:
        return len(self.signals)

    @property
    def groups_per_round(self) -> int:
        return self.num_processes * self.groups_per_process

    def add_round(self, signal: torch.Tensor | Sequence[bool]) -> None:
        values = [bool(x) for x in (signal.tolist() if isinstance(signal, torch.Tensor) else signal)]
        if len(values) != self.groups_per_round:
            raise ValueError(f"a round has {self.groups_per_round} groups, got a signal for {len(values)}")
        self.signals.append(values)

    def _local(self, process_index: int, want_signal: bool) -> list[tuple[int, int]]:
        start = process_index * self.groups_per_process
        return [
            (round_index, group)
            for round_index, signal in enumerate(self.signals)
            for group in range(self.groups_per_process)
            if signal[start + group] == want_signal
        ]

    def kept_groups(self, process_index: int) -> list[tuple[int, int]]:
        """``(round, local group)`` of this process's groups with signal, in generation order."""
        return self._local(process_index, True)

    @property
    def generated_groups(self) -> int:
        return self.num_rounds * self.groups_per_round

    @property
    def groups_with_signal(self) -> int:
        return sum(sum(signal) for signal in self.signals)

    @property
    def trained_groups_with_signal(self) -> int:
        """Groups with signal that end up trained (at most ``groups_per_process`` per process)."""
        return sum(
            min(len(self.kept_groups(p)), self.groups_per_process) for p in range(self.num_processes)
        )

    @property
    def filled(self) -> bool:
        """Every process has ``groups_per_process`` groups with signal (the same answer on every process)."""
        return all(len(self.kept_groups(p)) >= self.groups_per_process for p in range(self.num_processes))

    def selection(self, process_index: int, *, allow_filler: bool = False) -> list[tuple[int, int, bool]]:
        """This process's ``groups_per_process`` groups: ``(round, local group, is_filler)``.

        Its first groups with signal; when the batch is not filled and ``allow_filler`` (exhaustion under
        ``"train_kept"``), the missing places are its earliest groups without signal, flagged as filler.
        """
        kept = self.kept_groups(process_index)[: self.groups_per_process]
        chosen = [(r, g, False) for r, g in kept]
        missing = self.groups_per_process - len(chosen)
        if missing:
            if not allow_filler:
                raise DynamicSamplingExhausted(
                    f"process {process_index} holds {len(chosen)} of {self.groups_per_process} groups with signal"
                )
            chosen += [(r, g, True) for r, g in self._local(process_index, False)[:missing]]
        return sorted(chosen)


def exhaustion_message(step: int, selection: RoundsSelection, max_rounds: int, metric: str) -> str:
    kept = selection.trained_groups_with_signal
    wanted = selection.groups_per_round
    return (
        f"dynamic sampling: at global step {step}, {selection.num_rounds} rounds (dynamic_sampling_max_rounds="
        f"{max_rounds}) generated {selection.generated_groups} groups but only {kept} of the {wanted} groups the batch "
        f"needs have signal under dynamic_sampling_metric={metric!r} (kept fraction "
        f"{selection.groups_with_signal / selection.generated_groups:.3f}). The data may be too easy or too hard for "
        "the policy: raise dynamic_sampling_max_rounds (0 = no limit), or set "
        "dynamic_sampling_on_exhaustion='train_kept' to train on the groups kept so far."
    )


# --------------------------------------------------------------------------------------------------------------------
# Selection first, statistics second
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class GroupStatistics:
    """The inputs of an advantage, besides the rewards, that depend on each group's own rows only.

    ``rows``: tensors whose first dimension is the rows of a (global) batch, group by group; ``groups``: tensors
    whose first dimension is its groups. E.g. AAPO's reference rewards (rows), ZAPO's token entropies (rows) and
    semantic entropies (groups).
    """

    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, torch.Tensor] = field(default_factory=dict)


def trained_groups(selection: RoundsSelection, *, allow_filler: bool) -> list[tuple[int, int, bool]]:
    """The trained batch over every process, in TRL's gathered order (process 0's groups first):
    ``(round, global group index within the round, is_filler)``. The same list on every process."""
    return [
        (round_index, process * selection.groups_per_process + group, is_filler)
        for process in range(selection.num_processes)
        for round_index, group, is_filler in selection.selection(process, allow_filler=allow_filler)
    ]


def take_groups(per_round: Sequence[torch.Tensor], groups: Sequence[tuple[int, int]], width: int) -> torch.Tensor:
    """Concatenate ``groups`` (``(round, group)``) of per-round tensors whose first dimension holds ``width``
    entries per group (``num_generations`` for row tensors, 1 for group tensors), in the order given."""
    if not groups:
        reference = per_round[0]
        return reference.new_empty((0, *reference.shape[1:]))
    return torch.cat([per_round[r][g * width : (g + 1) * width] for r, g in groups])


def take_group_statistics(
    per_round: Sequence[GroupStatistics], groups: Sequence[tuple[int, int]], num_generations: int
) -> GroupStatistics:
    """:func:`take_groups` for every tensor of the rounds' :class:`GroupStatistics` (every round has the same keys)."""
    first = per_round[0]
    return GroupStatistics(
        rows={k: take_groups([s.rows[k] for s in per_round], groups, num_generations) for k in first.rows},
        groups={k: take_groups([s.groups[k] for s in per_round], groups, 1) for k in first.groups},
    )


# --------------------------------------------------------------------------------------------------------------------
# Batch surgery on TRL's generation outputs
# --------------------------------------------------------------------------------------------------------------------

_LEFT_PADDED = {"prompt_ids": "pad", "prompt_mask": 0}
_RIGHT_PADDED = {
    "completion_ids": "pad",
    "completion_mask": 0,
    "old_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "importance_sampling_ratio": 0.0,
    "tool_mask": 1,
}
_PER_ROW = {"advantages"}
_RECOMPUTED = {"num_items_in_batch"}


def _pad_to(tensor: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    missing = width - tensor.size(1)
    if missing <= 0:
        return tensor
    padding = tensor.new_full((tensor.size(0), missing), value)
    return torch.cat([padding, tensor] if left else [tensor, padding], dim=1)


def merge_generation_rows(
    outputs: Sequence[dict[str, Any]], rows: Sequence[tuple[int, int]], pad_token_id: int
) -> dict[str, Any]:
    """One batch of TRL's ``_generate_and_score_completions`` layout from rows of several of its outputs.

    ``rows`` are ``(output index, row index)``; outputs no row refers to may be ``None`` (freed). Token tensors
    are padded to a common width (prompts on the left, completions on the right, as TRL pads them).
    ``num_items_in_batch`` is left out: it is a global count the caller recomputes. A key this function does not
    know (e.g. multimodal inputs) raises.
    """
    used = sorted({o for o, _ in rows})
    if not used:
        raise ValueError("merge_generation_rows needs at least one row")
    keys = set(outputs[used[0]])
    for output in (outputs[o] for o in used[1:]):
        if set(output) != keys:
            raise ValueError(f"generation rounds returned different keys: {sorted(keys)} vs {sorted(output)}")
    unknown = keys - set(_LEFT_PADDED) - set(_RIGHT_PADDED) - _PER_ROW - _RECOMPUTED
    if unknown:
        raise ValueError(
            f"dynamic_sampling cannot merge the generation outputs {sorted(unknown)} (e.g. multimodal inputs); "
            "train such data without dynamic_sampling"
        )
    merged: dict[str, Any] = {}
    for key in sorted(keys - _RECOMPUTED):
        tensors = {o: outputs[o][key] for o in used}
        if tensors[used[0]] is None:
            merged[key] = None
            continue
        if key in _PER_ROW or tensors[used[0]].dim() == 1:
            merged[key] = torch.stack([tensors[o][r] for o, r in rows])
            continue
        left = key in _LEFT_PADDED
        value = (_LEFT_PADDED if left else _RIGHT_PADDED)[key]
        value = pad_token_id if value == "pad" else value
        width = max(t.size(1) for t in tensors.values())
        padded = {o: _pad_to(t, width, value, left) for o, t in tensors.items()}
        merged[key] = torch.stack([padded[o][r] for o, r in rows])
    return merged


def mask_filler_rows(batch: dict[str, Any], filler: torch.Tensor) -> None:
    """Zero the completion mask (and advantage) of the filler rows, in place.

    TRL builds its loss mask (and the token count ``num_items_in_batch``) from ``completion_mask``, so these
    rows add no token to any term of the loss. A loss that averages per sequence over the batch (``"grpo"``)
    still divides by the number of rows: the step is then scaled by the kept share of the batch.
    """
    if not bool(filler.any()):
        return
    keep = (~filler).to(batch["completion_mask"].dtype).unsqueeze(1)
    batch["completion_mask"] = batch["completion_mask"] * keep
    batch["advantages"] = batch["advantages"].masked_fill(filler.to(batch["advantages"].device), 0.0)


def loss_mask_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """This process's completion tokens that enter the loss (TRL's ``loss_mask.sum()``)."""
    mask = batch["completion_mask"]
    if batch.get("tool_mask") is not None:
        mask = mask * batch["tool_mask"]
    return mask.sum()


# --------------------------------------------------------------------------------------------------------------------
# The refill stream
# --------------------------------------------------------------------------------------------------------------------


class PromptStream:
    """Dataset indices for the extra rounds, in a sampler's order: seeded permutations walked one after another
    (``torch.randperm`` from a ``torch.Generator``, as TRL's ``RepeatSampler``; in dataset order without
    ``shuffle``). Its position (permutation, offset, generator state) is JSON state, saved in every checkpoint,
    so a resumed run draws the same extra prompts as an uninterrupted one.

    It is separate from the DataLoader's sampler so that the Trainer's epochs, ``max_steps`` accounting and
    ``skip_first_batches`` resume are untouched; it is seeded with ``seed + STREAM_SEED_OFFSET`` so that its
    order is not the DataLoader's.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"the refill stream needs a non-empty dataset, got {num_samples} rows")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed + STREAM_SEED_OFFSET)
        self._perm: list[int] = []
        self._pos = 0
        self.passes = 0
        self.drawn = 0

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self._pos >= len(self._perm):
                if self.shuffle:
                    self._perm = torch.randperm(self.num_samples, generator=self.generator).tolist()
                else:
                    self._perm = list(range(self.num_samples))
                self._pos = 0
                self.passes += 1
            taken = self._perm[self._pos : self._pos + count - len(out)]
            self._pos += len(taken)
            out += taken
        self.drawn += len(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "perm": list(self._perm),
            "pos": self._pos,
            "passes": self.passes,
            "drawn": self.drawn,
            "generator_state": self.generator.get_state().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "<state>") -> None:
        layout = {"num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle}
        differing = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if differing:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in differing.items())
            raise ValueError(f"dynamic sampling state {source} belongs to another run ({detail})")
        self._perm = [int(x) for x in state["perm"]]
        self._pos = int(state["pos"])
        self.passes = int(state["passes"])
        self.drawn = int(state["drawn"])
        self.generator.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))


def completions_per_kept_group(selection: RoundsSelection, num_generations: int) -> float:
    """Completions generated for each group with signal that is trained (inf when none is)."""
    trained = selection.trained_groups_with_signal
    return selection.generated_groups * num_generations / trained if trained else math.inf
