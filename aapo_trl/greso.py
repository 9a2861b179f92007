"""GRESO pre-rollout filtering (ALGORITHMS.md section 3.7; Zheng et al. 2025, used by the ZAPO paper).

Two pieces, both free of ``torch.distributed``:

* :class:`GRESOFilter` -- the per-prompt reward history, the adaptive probabilities ``p_easy`` /
  ``p_hard``, the keep/skip decisions and their RNG, and the JSON checkpoint of all of it.
* :class:`GRESORepeatSampler` -- a drop-in for TRL's ``RepeatSampler`` that asks the filter about
  every candidate prompt before it is rolled out and fills each generation batch with kept prompts
  only, in exactly RepeatSampler's index layout.

The rule
--------
Every prompt (key: its index in the training dataset, as the sampler yields it) keeps a history of
``(greso_epoch, mean group reward, kind)`` for each rollout, ``kind`` being ``"easy"`` (zero-variance
and every scorable response correct), ``"hard"`` (zero-variance and no scorable response correct) or
``"mixed"`` (anything else, including a group with no scorable response). Zero variance is
:func:`aapo_trl.advantages.zero_advantage_groups`, correct is ``reward >= correct_threshold``
(default 0.95): :func:`classify_zero_variance_groups` is the one place that classifies, and ZAPO's
easy/hard split should call it too so that the two can never disagree.

Before rollout a prompt is kept with probability ``max(p ** z, min_keep_probability)`` where ``z``
is the length of the newest run of consecutive rollouts of the same zero-variance kind and
``p = p_easy`` (easy run) or ``p_hard`` (hard run); a prompt without history, or whose newest rollout
was mixed, is always kept. One uniform draw per candidate, drawn whatever the outcome, from the
filter's own ``random.Random``.

``p_easy`` and ``p_hard`` start at 0.5. Once per optimizer step (:meth:`GRESOFilter.end_step`) the
*shares* of the step are computed over the groups recorded since the previous ``end_step`` (= the
prompts rolled out for this step, after filtering, counted once per rollout):
``easy_share = n_easy / n_groups`` and ``hard_share = n_hard / n_groups``. If any of those rollouts
came from GRESO epoch >= 1 (i.e. after the first pass over the data, GRESO's ``epoch > 0``), each
``p`` moves by ``step_size`` (0.01): down when its share is ``>=`` its target (easy
``target_zero_variance / 3``, hard ``2 * target_zero_variance / 3``, ``target_zero_variance = 0.25``),
up otherwise, clamped to ``[p_min, p_max] = [0.05, 0.95]``. A step that rolled nothing out (e.g. the
second of ``num_iterations`` steps on one generation batch) does not move ``p``.

GRESO epoch
-----------
The sampler walks seeded permutations of the dataset; each permutation is one *GRESO epoch* (0-based,
:attr:`GRESOFilter.epoch`). Because filtered prompts are replaced by later candidates, a Trainer epoch
(one ``__iter__`` of the sampler, always exactly ``len(sampler)`` indices so that the HF Trainer's
step accounting holds) and a GRESO epoch drift apart: the permutation position carries over from one
Trainer epoch to the next, and a new permutation is drawn whenever the current one is used up, in the
middle of a generation batch if need be. A candidate already rolled out in the same generation batch (met
again after such a pass boundary) is passed over without a decision, so a generation batch never holds a
prompt twice unless it holds every prompt of the dataset. The permutations are ``torch.randperm`` from
a ``torch.Generator`` seeded with ``seed``, drawn lazily, exactly as ``RepeatSampler`` draws one per
``__iter__``: with nothing filtered the sampler yields RepeatSampler's indices for every epoch when
``batch_size`` divides the dataset size (otherwise for the first epoch; RepeatSampler then drops the
``n % batch_size`` tail of each epoch while GRESO carries it over).

Dynamic sampling's refill rounds draw from the same stream (:meth:`GRESORepeatSampler.draw_refill`): every
prompt drawn, first round or refill, passes the same filter and is recorded once (ALGORITHMS.md section 5).

Every rank builds the same sampler (same seed) around its own filter; the trainer records the
*gathered* (global) rewards on every rank, so every rank's filter holds the same state and makes the
same decisions without any communication.

Trainer protocol (what the trainer must call, when, with what)
--------------------------------------------------------------
1. ``__init__`` (every rank)::

       self.greso = GRESOFilter(seed=args.seed, dataset_size=len(train_dataset),
                                dataset_fingerprint=dataset_fingerprint(train_dataset), ...)

2. ``_get_train_sampler`` (build it ONCE and return the same object on every later call)::

       GRESORepeatSampler(dataset, mini_repeat_count=self.num_generations,
                          batch_size=self.args.generation_batch_size // self.num_generations,
                          repeat_count=self.num_iterations * self.args.steps_per_generation,
                          shuffle=self.shuffle_dataset, seed=self.args.seed, greso_filter=self.greso)

   Nothing but the training DataLoader may iterate it (every pull makes decisions).
3. After every *training* generation (once per generation batch, i.e. once per chunk the sampler
   yielded; never for evaluation), on every rank, with the gathered rewards of the whole generation
   batch, unscorable rows NaN (``combine_reward_functions``, not TRL's nansum)::

       chunk, = self._greso_sampler.mark_consumed()        # GRESOChunk, in TRL's gathered order
       self.greso.record(chunk.prompt_ids, rewards.view(-1, G), epoch=chunk.epochs)
       log chunk.skip_rate (the share of candidates skipped to fill this generation batch)

   ``chunk.prompt_ids`` are the dataset indices of the generation batch's groups in the order TRL
   gathers them (rank 0's slice first), so ``rewards.view(-1, G)[i]`` belongs to
   ``chunk.prompt_ids[i]``. Plain GRESO may drop zero-variance groups after this call; ZAPO keeps them.
4. Once per optimizer step, after the step, on every rank: ``metrics = self.greso.end_step()``.
5. At every checkpoint, main process only, into the checkpoint folder (after the step, e.g. in
   ``_save_checkpoint``): ``self.greso.save_json(os.path.join(ckpt, GRESO_STATE_FILENAME))``.
   For an exact resume, checkpoint at generation-batch boundaries only (``save_steps`` a multiple of
   ``num_iterations * steps_per_generation / gradient_accumulation_steps``): TRL does not save its
   buffered generations, so it cannot resume inside a generation batch exactly either.
6. On resume, every rank, BEFORE the train dataloader is first iterated (e.g. at the top of
   ``train()``, after resolving ``resume_from_checkpoint``):
   ``self.greso.restore_json(os.path.join(ckpt, GRESO_STATE_FILENAME))``. It checks the dataset
   size / fingerprint, restores the filter and, through it, the sampler (now if it is already built,
   else when it is built).

Exact resume
------------
Decisions are made when the DataLoader pulls indices, and it pulls ahead of training (accelerate's
``DataLoaderShard`` fetches one batch ahead; the HF Trainer fetches ``gradient_accumulation_steps``
batches at the start of each step; DataLoader workers prefetch more), so at a checkpoint the sampler
has decided more chunks than the trainer consumed. The saved state therefore holds the chunks decided
in the current Trainer epoch (consumed and pending), the permutation, its position and the
``torch.Generator`` state, and the filter RNG state. After a restore, the first ``__iter__`` replays
the saved chunks of the interrupted Trainer epoch -- the consumed ones are the batches that
``transformers`` skips with ``accelerate.skip_first_batches`` (which pulls and discards them), the
pending ones are yielded as decided -- and then continues deciding from the saved position and RNG.
(The consumed chunks are replayed with their real indices rather than placeholders, so the stream is
the uninterrupted one whatever number of batches the Trainer skips; ``mark_consumed`` is bookkeeping
for the trainer and for telling a finished epoch from an interrupted one, not a skip count.)
Pulls then happen at the same points relative to ``record``/``end_step`` as in the uninterrupted run,
so every later decision sees the same filter state and the run continues identically. If the saved
Trainer epoch was finished, the first ``__iter__`` starts the next one instead. Which of the two is
decided by the Trainer epoch passed to :meth:`GRESORepeatSampler.set_epoch` when it reaches the
sampler (transformers and accelerate call it before every epoch; it does not reach a sampler wrapped
in ``SkipBatchSampler(BatchSamplerShard(...))``, i.e. a multi-process mid-epoch resume, which is a
replay anyway), else by the saved state (finished = every chunk consumed and the epoch's iterator
exhausted).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Collection, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from .checkpointing import atomic_write_json
from .zapo_math import classify_zero_advantage_groups

greso_state_filename = "greso_state.json"
"""File name of the GRESO state inside a checkpoint folder."""
GRESO_STATE_FILENAME = greso_state_filename

STATE_FORMAT = "aapo_trl.greso/1"

EASY, HARD, MIXED = "easy", "hard", "mixed"
KINDS = (EASY, HARD, MIXED)

DEFAULT_CORRECT_THRESHOLD = 0.95
DEFAULT_MAX_PASSES_PER_CHUNK = 1000


# --------------------------------------------------------------------------------------------------------------------
# Classification (shared with ZAPO)
# --------------------------------------------------------------------------------------------------------------------


def classify_zero_variance_groups(
    rewards: torch.Tensor, num_generations: int, correct_threshold: float = DEFAULT_CORRECT_THRESHOLD
) -> torch.Tensor:
    """One int per group: ``+1`` easy, ``-1`` hard, ``0`` otherwise (ALGORITHMS.md sections 3.1 and 3.7).

    ``rewards`` is 1-D, group by group, NaN for unscorable rows. Easy: zero-advantage
    (:func:`~aapo_trl.advantages.zero_advantage_groups`) and every scorable reward ``>= correct_threshold``.
    Hard: zero-advantage and no scorable reward ``>= correct_threshold``. A group without any scorable
    row is zero-advantage but neither easy nor hard (0): it says nothing about the prompt's difficulty.
    """
    easy, hard = classify_zero_advantage_groups(rewards.detach(), num_generations, correct_threshold)
    return easy.long() - hard.long()


def dataset_fingerprint(dataset: Any, columns: Sequence[str] = ("row_id",)) -> str:
    """A stable content fingerprint of a training dataset, for :class:`GRESOFilter`'s resume check.

    Hashes the dataset size and, for a ``datasets.Dataset`` that has every column in ``columns``
    (the project's datasets carry ``row_id``), those columns; otherwise every row's JSON. Unlike
    ``datasets.Dataset._fingerprint`` it does not change between runs for an in-memory dataset.
    """
    digest = hashlib.sha256()
    digest.update(f"n={len(dataset)}".encode())
    names = getattr(dataset, "column_names", None)
    if names is not None and columns and all(c in names for c in columns):
        for column in columns:
            digest.update(json.dumps([column, list(dataset[column])], default=str).encode())
    else:
        for row in dataset:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()[:32]


# --------------------------------------------------------------------------------------------------------------------
# The filter
# --------------------------------------------------------------------------------------------------------------------


class GRESOStateError(ValueError):
    """A GRESO state file that does not belong to this run (other dataset, other sampler layout, bad format)."""


class GRESOFilter:
    """GRESO's per-prompt history, adaptive skip probabilities and keep/skip decisions. Pure state.

    Args:
        seed: seeds the decision RNG (``random.Random``).
        dataset_size: number of rows of the training dataset (set by the sampler when left ``None``);
            a saved state for another size refuses to load.
        dataset_fingerprint: optional identity of the dataset (see :func:`dataset_fingerprint`); a
            saved state with another fingerprint refuses to load.
        p_easy, p_hard: initial skip bases (0.5).
        target_zero_variance: GRESO's target share of zero-variance prompts (0.25); the easy target is
            a third of it, the hard target two thirds, unless ``target_easy`` / ``target_hard`` are given.
        step_size: how far ``p`` moves per optimizer step (0.01).
        p_min, p_max: clamp of ``p`` (0.05, 0.95).
        min_keep_probability: floor of the keep probability (0.01).
        correct_threshold: a reward at or above it is a correct response (0.95, as ZAPO).
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        dataset_size: int | None = None,
        dataset_fingerprint: str | None = None,
        p_easy: float = 0.5,
        p_hard: float = 0.5,
        target_zero_variance: float = 0.25,
        target_easy: float | None = None,
        target_hard: float | None = None,
        step_size: float = 0.01,
        p_min: float = 0.05,
        p_max: float = 0.95,
        min_keep_probability: float = 0.01,
        correct_threshold: float = DEFAULT_CORRECT_THRESHOLD,
    ):
        if not 0.0 <= p_min <= p_max <= 1.0:
            raise ValueError(f"need 0 <= p_min <= p_max <= 1, got p_min={p_min}, p_max={p_max}")
        if not 0.0 <= min_keep_probability <= 1.0:
            raise ValueError(f"min_keep_probability must be in [0, 1], got {min_keep_probability}")
        if step_size < 0:
            raise ValueError(f"step_size must be >= 0, got {step_size}")
        for name, value in (("p_easy", p_easy), ("p_hard", p_hard)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.seed = int(seed)
        self.dataset_size = None if dataset_size is None else int(dataset_size)
        self.dataset_fingerprint = dataset_fingerprint
        self.target_easy = target_zero_variance / 3 if target_easy is None else float(target_easy)
        self.target_hard = 2 * target_zero_variance / 3 if target_hard is None else float(target_hard)
        self.step_size = float(step_size)
        self.p_min = float(p_min)
        self.p_max = float(p_max)
        self.min_keep_probability = float(min_keep_probability)
        self.correct_threshold = float(correct_threshold)

        self.p_easy = float(p_easy)
        self.p_hard = float(p_hard)
        self.epoch = 0
        """The current GRESO epoch: the index of the permutation the sampler is drawing candidates from."""
        self.history: dict[int, list[tuple[int, float, str]]] = {}
        """prompt id -> [(greso_epoch, mean reward (NaN when unscorable), kind), ...], oldest first."""
        self.rng = random.Random(self.seed)

        self._run: dict[int, tuple[str, int]] = {}  # prompt id -> (kind, length) of its newest run
        # Cumulative counters.
        self.num_decided = 0
        self.num_skipped = 0
        self.num_skipped_easy = 0
        self.num_skipped_hard = 0
        self.num_recorded = 0
        self.num_updates = 0
        # Window of decisions since the last metrics() call.
        self._window_decided = 0
        self._window_skipped = 0
        # Groups recorded since the last end_step().
        self._step_groups = 0
        self._step_easy = 0
        self._step_hard = 0
        self._step_epoch = -1
        self.last_easy_share = float("nan")
        self.last_hard_share = float("nan")

        self._sampler: GRESORepeatSampler | None = None
        self._pending_sampler_state: dict | None = None
        self._pending_source: str | None = None

    # -- config ------------------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The hyper-parameters (everything fixed at construction), JSON-serialisable."""
        return {
            "seed": self.seed,
            "target_easy": self.target_easy,
            "target_hard": self.target_hard,
            "step_size": self.step_size,
            "p_min": self.p_min,
            "p_max": self.p_max,
            "min_keep_probability": self.min_keep_probability,
            "correct_threshold": self.correct_threshold,
        }

    # -- decisions ---------------------------------------------------------------------------------------------------

    def run_length(self, prompt_id: int) -> tuple[str | None, int]:
        """``(kind, z)`` of the prompt's newest run of same-kind rollouts; ``(None, 0)`` without history."""
        return self._run.get(int(prompt_id), (None, 0))

    def keep_probability(self, prompt_id: int) -> float:
        """``max(p ** z, min_keep_probability)`` for the newest easy/hard run of ``z`` rollouts.

        1.0 for a prompt without history or whose newest rollout was mixed.
        """
        kind, z = self.run_length(prompt_id)
        if kind is None or kind == MIXED or z == 0:
            return 1.0
        p = self.p_easy if kind == EASY else self.p_hard
        return max(p**z, self.min_keep_probability)

    def _decide_one(self, prompt_id: int) -> bool:
        u = self.rng.random()  # always drawn: the RNG stream does not depend on the outcomes
        keep = u < self.keep_probability(prompt_id)
        self.num_decided += 1
        self._window_decided += 1
        if not keep:
            self.num_skipped += 1
            self._window_skipped += 1
            if self._run.get(int(prompt_id), (None, 0))[0] == EASY:
                self.num_skipped_easy += 1
            else:
                self.num_skipped_hard += 1
        return keep

    def decide(self, prompt_ids: Sequence[int]) -> list[bool]:
        """Keep (True) or skip (False) each candidate, in order, one RNG draw per candidate."""
        return [self._decide_one(int(pid)) for pid in prompt_ids]

    # -- recording ---------------------------------------------------------------------------------------------------

    def record(
        self,
        prompt_ids: Sequence[int],
        group_rewards: torch.Tensor,
        epoch: int | Sequence[int] | None = None,
    ) -> list[str]:
        """Append one history entry per rolled-out group; returns the kinds.

        ``group_rewards`` is ``(n_groups, G)`` (NaN = unscorable), row ``i`` for ``prompt_ids[i]``.
        ``epoch`` is the GRESO epoch each prompt was drawn in (an int for all, one per prompt -- use
        :attr:`GRESOChunk.epochs` -- or ``None`` for :attr:`epoch`). Also feeds the step shares of
        :meth:`end_step`. Call on every rank with the same (gathered) rewards.
        """
        rewards = torch.as_tensor(group_rewards).detach().float().cpu()
        if rewards.dim() != 2:
            raise ValueError(f"group_rewards must be (n_groups, num_generations), got shape {tuple(rewards.shape)}")
        ids = [int(pid) for pid in prompt_ids]
        if len(ids) != rewards.size(0):
            raise ValueError(f"{len(ids)} prompt ids for {rewards.size(0)} reward groups")
        if epoch is None:
            epochs = [self.epoch] * len(ids)
        elif isinstance(epoch, int):
            epochs = [int(epoch)] * len(ids)
        else:
            epochs = [int(e) for e in epoch]
            if len(epochs) != len(ids):
                raise ValueError(f"{len(epochs)} epochs for {len(ids)} prompt ids")
        if not ids:
            return []
        codes = classify_zero_variance_groups(rewards.flatten(), rewards.size(1), self.correct_threshold).tolist()
        valid = ~torch.isnan(rewards)
        counts = valid.sum(dim=1)
        sums = torch.where(valid, rewards, torch.zeros_like(rewards)).sum(dim=1)
        kinds = []
        for pid, ep, code, count, total in zip(ids, epochs, codes, counts.tolist(), sums.tolist()):
            kind = EASY if code > 0 else HARD if code < 0 else MIXED
            mean = total / count if count > 0 else float("nan")
            self.history.setdefault(pid, []).append((ep, mean, kind))
            previous_kind, z = self._run.get(pid, (None, 0))
            self._run[pid] = (kind, z + 1 if kind == previous_kind else 1)
            kinds.append(kind)
            self._step_groups += 1
            self._step_easy += kind == EASY
            self._step_hard += kind == HARD
            self._step_epoch = max(self._step_epoch, ep)
        self.num_recorded += len(ids)
        return kinds

    # -- adaptation --------------------------------------------------------------------------------------------------

    def _move(self, p: float, share: float, target: float) -> float:
        p = p - self.step_size if share >= target else p + self.step_size
        return round(min(max(p, self.p_min), self.p_max), 12)  # rounding keeps 0.5 - 0.01 * k exact-looking

    def update_probabilities(self, easy_share: float, hard_share: float) -> None:
        """GRESO's rule, unconditionally: each ``p`` steps down if its share ``>=`` its target, else up; clamped."""
        self.p_easy = self._move(self.p_easy, float(easy_share), self.target_easy)
        self.p_hard = self._move(self.p_hard, float(hard_share), self.target_hard)
        self.num_updates += 1

    def end_step(self) -> dict[str, float]:
        """Close an optimizer step: adapt ``p`` from the step's shares, reset them, return the metrics.

        The shares are over the groups recorded since the previous call; ``p`` moves only when there
        were some and at least one came from GRESO epoch >= 1. Call once per optimizer step on every rank.
        """
        if self._step_groups > 0:
            self.last_easy_share = self._step_easy / self._step_groups
            self.last_hard_share = self._step_hard / self._step_groups
            if self._step_epoch >= 1:
                self.update_probabilities(self.last_easy_share, self.last_hard_share)
        self._step_groups = self._step_easy = self._step_hard = 0
        self._step_epoch = -1
        return self.metrics()

    def metrics(self, reset: bool = True) -> dict[str, float]:
        """``greso/skip_rate`` (of the decisions since the previous call), ``p_easy``, ``p_hard``, epoch, shares."""
        skip_rate = self._window_skipped / self._window_decided if self._window_decided else 0.0
        out = {
            "greso/skip_rate": skip_rate,
            "greso/p_easy": self.p_easy,
            "greso/p_hard": self.p_hard,
            "greso/epoch": float(self.epoch),
            "greso/easy_share": self.last_easy_share,
            "greso/hard_share": self.last_hard_share,
            "greso/tracked_prompts": float(len(self.history)),
        }
        if reset:
            self._window_decided = self._window_skipped = 0
        return out

    @property
    def skip_rate(self) -> float:
        """Share of the decisions since the last :meth:`metrics` call that skipped (0.0 when none)."""
        return self._window_skipped / self._window_decided if self._window_decided else 0.0

    # -- sampler link ------------------------------------------------------------------------------------------------

    def _attach_sampler(self, sampler: GRESORepeatSampler) -> None:
        if self._sampler is not None and self._sampler is not sampler:
            warnings.warn(
                "a second GRESORepeatSampler was attached to this GRESOFilter; only the newest one is checkpointed "
                "(build the sampler once and reuse it)",
                stacklevel=3,
            )
        self._sampler = sampler
        if self._pending_sampler_state is not None:
            state, source = self._pending_sampler_state, self._pending_source
            self._pending_sampler_state = self._pending_source = None
            sampler.load_sampler_state_dict(state, source=source)

    # -- state -------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: filter state plus the attached sampler's. JSON-serialisable."""
        version, internal, gauss = self.rng.getstate()
        sampler_state = self._sampler.sampler_state_dict() if self._sampler is not None else self._pending_sampler_state
        return {
            "format": STATE_FORMAT,
            "dataset_size": self.dataset_size,
            "dataset_fingerprint": self.dataset_fingerprint,
            "config": self.config(),
            "p_easy": self.p_easy,
            "p_hard": self.p_hard,
            "epoch": self.epoch,
            "rng_state": [version, list(internal), gauss],
            "history": {
                str(pid): [[ep, None if math.isnan(mean) else mean, kind] for ep, mean, kind in entries]
                for pid, entries in self.history.items()
            },
            "counters": {
                "num_decided": self.num_decided,
                "num_skipped": self.num_skipped,
                "num_skipped_easy": self.num_skipped_easy,
                "num_skipped_hard": self.num_skipped_hard,
                "num_recorded": self.num_recorded,
                "num_updates": self.num_updates,
                "window_decided": self._window_decided,
                "window_skipped": self._window_skipped,
                "step_groups": self._step_groups,
                "step_easy": self._step_easy,
                "step_hard": self._step_hard,
                "step_epoch": self._step_epoch,
                "last_easy_share": None if math.isnan(self.last_easy_share) else self.last_easy_share,
                "last_hard_share": None if math.isnan(self.last_hard_share) else self.last_hard_share,
            },
            "sampler": sampler_state,
        }

    def _check_identity(self, state: dict, source: str) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise GRESOStateError(f"{source} is not a GRESO state (format {found!r}, expected {STATE_FORMAT!r})")
        saved_size, saved_fp = state.get("dataset_size"), state.get("dataset_fingerprint")
        size_differs = self.dataset_size is not None and saved_size is not None and saved_size != self.dataset_size
        fp_differs = (
            self.dataset_fingerprint is not None and saved_fp is not None and saved_fp != self.dataset_fingerprint
        )
        if size_differs or fp_differs:
            raise GRESOStateError(
                f"GRESO state {source} belongs to another training dataset: it was saved for "
                f"dataset_size={saved_size}, dataset_fingerprint={saved_fp!r}, but this run's dataset has "
                f"dataset_size={self.dataset_size}, dataset_fingerprint={self.dataset_fingerprint!r}"
            )

    def load_state_dict(self, state: dict[str, Any], *, source: str = "<state dict>") -> None:
        """Restore :meth:`state_dict` (also the sampler's, now if attached, else when one attaches).

        Refuses (:class:`GRESOStateError`, naming ``source`` and both fingerprints) a state saved for
        another dataset. The hyper-parameters of this instance win over the saved ones (a warning
        says which differ), as the HF Trainer does with its arguments.
        """
        self._check_identity(state, source)
        saved_config = state.get("config", {})
        differing = sorted(
            k for k, v in self.config().items() if k != "seed" and k in saved_config and saved_config[k] != v
        )
        if differing:
            warnings.warn(
                f"GRESO state {source} was saved with other hyper-parameters ({', '.join(differing)}); "
                "using this run's values",
                stacklevel=2,
            )
        if self.dataset_size is None:
            self.dataset_size = state.get("dataset_size")
        if self.dataset_fingerprint is None:
            self.dataset_fingerprint = state.get("dataset_fingerprint")
        self.p_easy = float(state["p_easy"])
        self.p_hard = float(state["p_hard"])
        self.epoch = int(state["epoch"])
        version, internal, gauss = state["rng_state"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        self.history = {}
        self._run = {}
        for key, entries in state["history"].items():
            pid = int(key)
            parsed = []
            for ep, mean, kind in entries:
                if kind not in KINDS:
                    raise GRESOStateError(f"GRESO state {source}: unknown kind {kind!r} for prompt {pid}")
                parsed.append((int(ep), float("nan") if mean is None else float(mean), kind))
                previous_kind, z = self._run.get(pid, (None, 0))
                self._run[pid] = (kind, z + 1 if kind == previous_kind else 1)
            self.history[pid] = parsed
        c = state["counters"]
        self.num_decided = int(c["num_decided"])
        self.num_skipped = int(c["num_skipped"])
        self.num_skipped_easy = int(c["num_skipped_easy"])
        self.num_skipped_hard = int(c["num_skipped_hard"])
        self.num_recorded = int(c["num_recorded"])
        self.num_updates = int(c["num_updates"])
        self._window_decided = int(c["window_decided"])
        self._window_skipped = int(c["window_skipped"])
        self._step_groups = int(c["step_groups"])
        self._step_easy = int(c["step_easy"])
        self._step_hard = int(c["step_hard"])
        self._step_epoch = int(c["step_epoch"])
        self.last_easy_share = float("nan") if c["last_easy_share"] is None else float(c["last_easy_share"])
        self.last_hard_share = float("nan") if c["last_hard_share"] is None else float(c["last_hard_share"])
        sampler_state = state.get("sampler")
        if sampler_state is None:
            self._pending_sampler_state = self._pending_source = None
        elif self._sampler is not None:
            self._sampler.load_sampler_state_dict(sampler_state, source=source)
        else:
            self._pending_sampler_state, self._pending_source = sampler_state, source

    # -- JSON files --------------------------------------------------------------------------------------------------

    def save_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

        A crash at any point leaves either the previous file or the new one, never a partial file.
        Plain JSON (no pickle, no NaN literals). Call on the main process only.
        """
        atomic_write_json(path, self.state_dict())

    @staticmethod
    def read_json(path: str | os.PathLike) -> dict[str, Any]:
        """Parse a GRESO state file (no validation beyond JSON; see :meth:`load_state_dict`)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GRESO state at {path} (was the checkpoint written with GRESO enabled?)")
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def restore_json(self, path: str | os.PathLike) -> None:
        """:meth:`read_json` + :meth:`load_state_dict` into this instance (the one the sampler is attached to)."""
        self.load_state_dict(self.read_json(path), source=os.fspath(path))

    @classmethod
    def load_json(
        cls,
        path: str | os.PathLike,
        *,
        expected_dataset_size: int | None = None,
        expected_fingerprint: str | None = None,
    ) -> GRESOFilter:
        """A new filter with the saved hyper-parameters and state; checks the expected dataset identity.

        Prefer :meth:`restore_json` on the filter a sampler is already attached to.
        """
        state = cls.read_json(path)
        source = os.fspath(path)
        config = dict(state.get("config", {})) if isinstance(state, dict) else {}
        known = {"seed", "target_easy", "target_hard", "step_size", "p_min", "p_max", "min_keep_probability",
                 "correct_threshold"}
        config = {k: v for k, v in config.items() if k in known}
        new = cls(dataset_size=expected_dataset_size, dataset_fingerprint=expected_fingerprint, **config)
        new.load_state_dict(state, source=source)
        return new


# --------------------------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRESOChunk:
    """One generation batch as the sampler decided it.

    ``prompt_ids``: the ``batch_size`` kept dataset indices, in yield order (= TRL's gathered group
    order); ``epochs``: the GRESO epoch each was drawn in; ``examined`` / ``skipped``: candidates
    decided / skipped to fill it (``skipped_easy`` + ``skipped_hard`` = ``skipped``).
    """

    prompt_ids: tuple[int, ...]
    epochs: tuple[int, ...]
    examined: int
    skipped: int
    skipped_easy: int
    skipped_hard: int

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.examined if self.examined else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ids": list(self.prompt_ids),
            "epochs": list(self.epochs),
            "examined": self.examined,
            "skipped": self.skipped,
            "skipped_easy": self.skipped_easy,
            "skipped_hard": self.skipped_hard,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GRESOChunk:
        return cls(
            prompt_ids=tuple(int(x) for x in d["ids"]),
            epochs=tuple(int(x) for x in d["epochs"]),
            examined=int(d["examined"]),
            skipped=int(d["skipped"]),
            skipped_easy=int(d["skipped_easy"]),
            skipped_hard=int(d["skipped_hard"]),
        )


class GRESORepeatSampler(Sampler[int]):
    """TRL's ``RepeatSampler`` with GRESO pre-rollout filtering (see the module docstring).

    Same arguments as ``trl.trainer.utils.RepeatSampler`` (``batch_size`` = unique prompts per
    generation batch, ``mini_repeat_count`` = ``num_generations``, ``repeat_count`` =
    ``num_iterations * steps_per_generation``) plus ``greso_filter``. Each ``__iter__`` yields
    ``len(self)`` indices: ``len(data_source) // batch_size`` chunks of ``batch_size`` kept prompts,
    each index repeated ``mini_repeat_count`` times and each chunk ``repeat_count`` times, exactly
    RepeatSampler's layout. ``max_passes_per_chunk`` bounds how many permutations one chunk may go
    through before the sampler gives up (everything is being filtered).

    Its state is checkpointed through the filter (:meth:`GRESOFilter.state_dict`); the methods are
    deliberately not named ``state_dict``/``load_state_dict`` so that a ``torchdata`` StatefulDataLoader
    does not mistake it for a sampler that restores its own position.
    """

    def __init__(
        self,
        data_source: Sized,
        mini_repeat_count: int,
        batch_size: int = 1,
        repeat_count: int = 1,
        shuffle: bool = True,
        seed: int | None = None,
        *,
        greso_filter: GRESOFilter,
        max_passes_per_chunk: int = DEFAULT_MAX_PASSES_PER_CHUNK,
    ):
        if mini_repeat_count < 1 or batch_size < 1 or repeat_count < 1:
            raise ValueError(
                f"mini_repeat_count ({mini_repeat_count}), batch_size ({batch_size}) and repeat_count "
                f"({repeat_count}) must be >= 1"
            )
        if not isinstance(greso_filter, GRESOFilter):
            raise TypeError(f"greso_filter must be a GRESOFilter, got {type(greso_filter).__name__}")
        self.data_source = data_source
        self.mini_repeat_count = int(mini_repeat_count)
        self.batch_size = int(batch_size)
        self.repeat_count = int(repeat_count)
        self.num_samples = len(data_source)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.max_passes_per_chunk = int(max_passes_per_chunk)
        self.greso_filter = greso_filter
        if greso_filter.dataset_size is None:
            greso_filter.dataset_size = self.num_samples
        elif greso_filter.dataset_size != self.num_samples:
            raise GRESOStateError(
                f"the GRESOFilter was built for dataset_size={greso_filter.dataset_size}, "
                f"but the sampler's dataset has {self.num_samples} rows"
            )

        # Same generator as RepeatSampler: unseeded (torch's default seed) when seed is None.
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

        self._perm: list[int] = []
        self._perm_pos = 0
        self._pass_index = -1  # index of the permutation in self._perm; -1 before the first one
        self._trainer_epoch = -1  # index of the current Trainer epoch (one per __iter__)
        self._chunks: list[GRESOChunk] = []  # chunks decided in the current Trainer epoch
        self._consumed = 0  # how many of them the trainer has marked consumed
        self._exhausted = False  # the current Trainer epoch's iterator yielded its last index
        self._resume_pending = False
        self._epoch_hint: int | None = None
        greso_filter._attach_sampler(self)

    # -- sizes -------------------------------------------------------------------------------------------------------

    @property
    def num_chunks_per_epoch(self) -> int:
        """Generation batches per Trainer epoch (as RepeatSampler: the partial last batch is dropped)."""
        return self.num_samples // self.batch_size

    @property
    def chunk_length(self) -> int:
        """Indices yielded per generation batch: ``batch_size * mini_repeat_count * repeat_count``."""
        return self.batch_size * self.mini_repeat_count * self.repeat_count

    def __len__(self) -> int:
        return self.num_chunks_per_epoch * self.chunk_length

    # -- epochs ------------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Called by transformers/accelerate with the Trainer epoch before each ``__iter__``.

        Only used right after a restore, to tell a resumed epoch (replay) from a new one.
        """
        if self._resume_pending:
            self._epoch_hint = int(epoch)

    def _begin_trainer_epoch(self) -> None:
        if self._resume_pending:
            self._resume_pending = False
            hint, self._epoch_hint = self._epoch_hint, None
            saved = self._trainer_epoch
            if saved >= 0:
                if hint is not None:
                    if hint < saved:
                        raise GRESOStateError(
                            f"the restored GRESO state is at Trainer epoch {saved}, but training resumes at epoch "
                            f"{hint}: the GRESO state file comes from a later checkpoint than the trainer state"
                        )
                    replay = hint == saved
                else:
                    finished = self._exhausted and self._consumed >= self.num_chunks_per_epoch
                    replay = not finished
                if replay:
                    self._exhausted = False
                    return
            if hint is not None:
                self._trainer_epoch = hint - 1
        self._trainer_epoch += 1
        self._chunks = []
        self._consumed = 0
        self._exhausted = False

    def __iter__(self) -> Iterator[int]:
        self._begin_trainer_epoch()
        for index in range(self.num_chunks_per_epoch):
            chunk = self._chunks[index] if index < len(self._chunks) else self._decide_chunk()
            ids = chunk.prompt_ids
            for _ in range(self.repeat_count):
                for pid in ids:
                    for _ in range(self.mini_repeat_count):
                        yield pid
        self._exhausted = True

    # -- deciding ----------------------------------------------------------------------------------------------------

    def _next_permutation(self) -> None:
        if self.shuffle:
            self._perm = torch.randperm(self.num_samples, generator=self.generator).tolist()
        else:
            self._perm = list(range(self.num_samples))
        self._perm_pos = 0
        self._pass_index += 1
        self.greso_filter.epoch = self._pass_index

    def _decide_chunk(self) -> GRESOChunk:
        chunk = self._decide(self.batch_size)
        self._chunks.append(chunk)
        return chunk

    def draw_refill(self, count: int, exclude: Collection[int] = ()) -> GRESOChunk:
        """``count`` more prompts for a dynamic-sampling refill round (aapo_trl.dynamic_sampling), decided exactly
        as the DataLoader's batches: the next candidates of the same permutation stream, through the same filter
        (so the filter's skip counters include them). ``exclude``: the prompts already rolled out in this generation
        batch, passed over without a decision (a prompt is never rolled out twice in one generation batch, unless
        it has rolled out every prompt of the dataset). Not yielded by ``__iter__``; record its rollouts with
        :meth:`GRESOFilter.record` and ``epoch=chunk.epochs``. Its position is part of :meth:`sampler_state_dict`.
        """
        if count < 1:
            raise ValueError(f"a refill draws at least one prompt, got count={count}")
        return self._decide(count, exclude)

    def _decide(self, count: int, exclude: Collection[int] = ()) -> GRESOChunk:
        flt = self.greso_filter
        ids: list[int] = []
        epochs: list[int] = []
        rolled_out = {int(pid) for pid in exclude}
        examined = skipped = skipped_easy = skipped_hard = 0
        passes_started = 0
        while len(ids) < count:
            if self._pass_index < 0 or self._perm_pos >= len(self._perm):
                if passes_started >= self.max_passes_per_chunk:
                    raise RuntimeError(
                        f"GRESO skipped every candidate of {passes_started} passes over the {self.num_samples} "
                        f"prompts while filling one generation batch ({len(ids)}/{count} kept); "
                        f"min_keep_probability={flt.min_keep_probability} is too low for this dataset"
                    )
                self._next_permutation()
                passes_started += 1
            pid = self._perm[self._perm_pos]
            self._perm_pos += 1
            if pid in rolled_out:
                if len(rolled_out) < self.num_samples:
                    continue  # already rolled out in this generation batch (a pass boundary was crossed)
                rolled_out.clear()  # every prompt was: the generation batch starts over
            kind_before = flt.run_length(pid)[0]
            examined += 1
            if flt.decide([pid])[0]:
                ids.append(pid)
                epochs.append(self._pass_index)
                rolled_out.add(pid)
            else:
                skipped += 1
                skipped_easy += kind_before == EASY
                skipped_hard += kind_before == HARD
        return GRESOChunk(tuple(ids), tuple(epochs), examined, skipped, skipped_easy, skipped_hard)

    # -- consumption -------------------------------------------------------------------------------------------------

    @property
    def num_consumed(self) -> int:
        """Chunks of the current Trainer epoch marked consumed."""
        return self._consumed

    @property
    def pending_chunks(self) -> tuple[GRESOChunk, ...]:
        """Chunks decided (pulled by the DataLoader) but not yet marked consumed."""
        return tuple(self._chunks[self._consumed :])

    def mark_consumed(self, num_chunks: int = 1) -> list[GRESOChunk]:
        """The trainer has taken the next ``num_chunks`` generation batches (call once per generation).

        Returns those chunks, oldest first: ``chunk.prompt_ids`` are the dataset indices of the
        generation batch's groups in TRL's gathered order. Raises if the DataLoader has not yielded them.
        """
        if num_chunks < 0:
            raise ValueError(f"num_chunks must be >= 0, got {num_chunks}")
        if self._consumed + num_chunks > len(self._chunks):
            raise RuntimeError(
                f"mark_consumed({num_chunks}) but only {len(self._chunks) - self._consumed} generation batch(es) "
                "were yielded and not yet consumed (call it once per training generation, never for evaluation)"
            )
        out = self._chunks[self._consumed : self._consumed + num_chunks]
        self._consumed += num_chunks
        return list(out)

    # -- state -------------------------------------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "mini_repeat_count": self.mini_repeat_count,
            "repeat_count": self.repeat_count,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def sampler_state_dict(self) -> dict[str, Any]:
        """JSON-serialisable sampler state (normally saved through :meth:`GRESOFilter.state_dict`)."""
        return {
            "layout": self._layout(),
            "pass_index": self._pass_index,
            "perm": list(self._perm),
            "perm_pos": self._perm_pos,
            "generator_state": self.generator.get_state().tolist(),
            "trainer_epoch": self._trainer_epoch,
            "chunks": [chunk.to_json() for chunk in self._chunks],
            "consumed": self._consumed,
            "exhausted": self._exhausted,
        }

    def load_sampler_state_dict(self, state: dict[str, Any], *, source: str = "<state dict>") -> None:
        """Restore :meth:`sampler_state_dict`; the next ``__iter__`` resumes (see the module docstring)."""
        saved_layout = state.get("layout", {})
        layout = self._layout()
        differing = {k: (saved_layout.get(k), v) for k, v in layout.items() if saved_layout.get(k) != v}
        if differing:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in differing.items())
            raise GRESOStateError(
                f"GRESO state {source} was saved by a sampler with another layout ({detail}); an exact resume "
                "needs the same dataset, num_generations, generation batch size, num_iterations, "
                "steps_per_generation, shuffle and seed"
            )
        if self._trainer_epoch >= 0 and not self._exhausted:
            warnings.warn(
                "restoring GRESO state into a sampler whose current epoch is still being iterated; restore it before "
                "the train dataloader is first iterated (the next __iter__ resumes from the restored state)",
                stacklevel=3,
            )
        self._pass_index = int(state["pass_index"])
        self._perm = [int(x) for x in state["perm"]]
        self._perm_pos = int(state["perm_pos"])
        self.generator.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))
        self._trainer_epoch = int(state["trainer_epoch"])
        self._chunks = [GRESOChunk.from_json(c) for c in state["chunks"]]
        self._consumed = int(state["consumed"])
        self._exhausted = bool(state["exhausted"])
        if self._consumed > len(self._chunks):
            raise GRESOStateError(
                f"GRESO state {source}: {self._consumed} chunks consumed but {len(self._chunks)} decided"
            )
        if self._pass_index >= 0:
            self.greso_filter.epoch = self._pass_index
        self._resume_pending = True
        self._epoch_hint = None
