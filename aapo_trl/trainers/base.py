"""The glue every aapo-trl trainer shares on top of ``trl.GRPOTrainer`` (pinned to trl 1.16.0).

TRL owns the loop. We take three seams, calling ``super()`` and replacing one result each time:

* ``_calculate_rewards``: TRL returns the rewards gathered over every process (N_global x n_funcs).
  We keep that tensor (and the local inputs it was computed from) for the advantage step.
* ``_generate_and_score_completions``: after TRL has built the batch (and its own GRPO advantages),
  we compute our advantage on the *global* rewards, slice this process's rows exactly as TRL does
  (``process_index * local_rows``), and replace ``output["advantages"]`` and the completions table.
  An advantage is :meth:`~AdvantageTrainerMixin.group_statistics` (what depends on each group's own rows)
  then :meth:`~AdvantageTrainerMixin.batch_advantages` (every batch-level statistic, on exactly the batch
  given); dynamic sampling calls the first per round and the second once, on the trained batch.
* ``_compute_loss``: for ``loss_type in ("aapo", "gpg")``, TRL's own loss computation with the CE loss of
  AAPO Eq. 4 / GPG as its per-token term (see :func:`_cross_entropy_term`); any other loss type is TRL's.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.extras.profiling import profiling_context

from ..advantages import (
    combine_reward_functions,
    zero_advantage_groups,
    zero_final_advantage_groups,
)
from ..reference import push_peft_policy_without_merging
from ..ref_rollouts import completion_flags
from ..checkpointing import atomic_write_json, mark_checkpoint_complete, resolve_resume_checkpoint
from ..configs import CE_LOSS_TYPES, completion_is_unscorable
from ..model_card import ModelCardMixin
from ..dynamic_sampling import STATE_FILENAME as DYNAMIC_SAMPLING_STATE_FILENAME
from ..dynamic_sampling import STATE_FORMAT as DYNAMIC_SAMPLING_STATE_FORMAT
from ..dynamic_sampling import (
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
from ..greso import GRESO_STATE_FILENAME, GRESOChunk, GRESOFilter, GRESORepeatSampler, dataset_fingerprint
from ..prompt_truncation import keep_last_tokens
from ..validation import resolve_reward_funcs, validate_training_dataset


@dataclass
class ScoredBatch:
    """What TRL scored for this process, plus the rewards gathered over every process."""

    inputs: list[dict[str, Any]]
    prompts: list
    completions: list
    completion_ids: list[list[int]]
    rewards_per_func: torch.Tensor  # (N_global, n_funcs), NaN where a function returned None

    @property
    def num_local_rows(self) -> int:
        return len(self.prompts)


@dataclass
class _Round:
    """One dynamic-sampling round: TRL's output for this process (``None`` once no longer needed), the global
    rewards and group statistics, and the round's rows of TRL's completions table (global order)."""

    output: dict[str, Any] | None
    rewards: torch.Tensor  # (N_global,), NaN for unscorable rows
    statistics: GroupStatistics
    scored: ScoredBatch
    logged: dict[str, Any] = field(default_factory=dict)
    greso_chunk: GRESOChunk | None = None  # with GRESO: the round's prompts as GRESO drew them


def _ignore_side_channel(*args, **kwargs) -> None:
    return None


class AdvantageTrainerMixin(ModelCardMixin):
    """Mixed in before ``trl.GRPOTrainer``; subclasses implement :meth:`compute_advantages`."""

    _last_scored: ScoredBatch | None = None
    peft_push_without_merging = False  # set in __init__ for a PEFT policy on vLLM (push_peft_policy_without_merging)

    def __init__(self, model, reward_funcs=None, args=None, *more_args, **kwargs):
        on_error = getattr(args, "reward_errors", "error")
        reward_funcs = resolve_reward_funcs(reward_funcs, on_error=on_error, settings=args)  # named rewards: from args
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        if kwargs.get("environment_factory") is None:
            validate_training_dataset(kwargs.get("train_dataset"), funcs, "train_dataset")
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        if getattr(self, "vllm_generation", None) is not None and is_peft_model(self.model):
            # the frozen base stays bit-exact over training (no in-place merge/unmerge per weight push)
            self.peft_push_without_merging = push_peft_policy_without_merging(self.vllm_generation)
        self.greso_filter: GRESOFilter | None = None
        self._greso_sampler: GRESORepeatSampler | None = None
        if getattr(self.args, "greso", False):
            self._init_greso()
        self.refill_stream: PromptStream | None = None
        self.dynamic_sampling_exhausted_batches = 0
        if getattr(self.args, "dynamic_sampling", False):
            self._init_dynamic_sampling()

    # ---- GRESO pre-rollout filtering (aapo_trl.greso documents the protocol followed here) ---------------

    def _init_greso(self) -> None:
        dataset, args = self.train_dataset, self.args
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError("greso=True needs an indexable training dataset (GRESO keys its history on row indices).")
        self.greso_filter = GRESOFilter(
            seed=args.seed,
            dataset_size=len(dataset),
            dataset_fingerprint=dataset_fingerprint(dataset),
            p_easy=args.greso_p_init,
            p_hard=args.greso_p_init,
            target_easy=args.greso_easy_target,
            target_hard=args.greso_hard_target,
            step_size=args.greso_p_step,
            p_min=args.greso_p_min,
            p_max=args.greso_p_max,
            min_keep_probability=args.greso_min_keep_probability,
            correct_threshold=args.greso_correct_threshold,
        )
        self.add_callback(_GRESOStepCallback(self))

    def _get_train_sampler(self, dataset=None):
        if self.greso_filter is None:
            return super()._get_train_sampler(dataset)
        if self._greso_sampler is None:  # one sampler for the whole run: every pull makes decisions
            self._greso_sampler = GRESORepeatSampler(
                dataset if dataset is not None else self.train_dataset,
                mini_repeat_count=self.num_generations,
                batch_size=self.args.generation_batch_size // self.num_generations,
                repeat_count=self.num_iterations * self.args.steps_per_generation,
                shuffle=self.shuffle_dataset,
                seed=self.args.seed,
                greso_filter=self.greso_filter,
            )
        return self._greso_sampler

    def _record_greso_rollouts(self, rewards: torch.Tensor, num_generations: int) -> None:
        """The DataLoader's generation batch was rolled out (without dynamic sampling): GRESO learns from it."""
        (chunk,) = self._greso_sampler.mark_consumed()
        self._record_greso_chunk(chunk, rewards, num_generations)
        self._log_greso_skip_rate([chunk])

    def _record_greso_chunk(self, chunk: GRESOChunk, rewards: torch.Tensor, num_generations: int) -> None:
        """One history entry per rolled-out group of ``chunk``, with the GRESO epoch each prompt was drawn in."""
        self.greso_filter.record(chunk.prompt_ids, rewards.view(-1, num_generations), epoch=chunk.epochs)

    def _log_greso_skip_rate(self, chunks: list[GRESOChunk]) -> None:
        """The share of candidates skipped to fill a generation batch (its refill rounds' candidates included)."""
        examined = sum(chunk.examined for chunk in chunks)
        skipped = sum(chunk.skipped for chunk in chunks)
        self._metrics["train"]["greso/skip_rate"].append(skipped / examined if examined else 0.0)

    # ---- dynamic sampling (aapo_trl.dynamic_sampling documents the semantics followed here) ---------------

    def _init_dynamic_sampling(self) -> None:
        dataset, args = self.train_dataset, self.args
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                "dynamic_sampling=True needs an indexable training dataset: the extra rounds take rows by index."
            )
        accuracy_reward = args.dynamic_sampling_accuracy_reward
        if accuracy_reward is not None and accuracy_reward not in self.reward_func_names:
            raise ValueError(
                f"dynamic_sampling_accuracy_reward={accuracy_reward!r} is not one of the reward functions "
                f"{self.reward_func_names}"
            )
        if accuracy_reward is not None and args.dynamic_sampling_metric != "accuracy":
            raise ValueError(
                f"dynamic_sampling_accuracy_reward is only read by dynamic_sampling_metric='accuracy', "
                f"not {args.dynamic_sampling_metric!r}"
            )
        if self.greso_filter is None:  # with GRESO, refills come from GRESO's sampler (aapo_trl.dynamic_sampling)
            self.refill_stream = PromptStream(len(dataset), seed=args.seed, shuffle=self.shuffle_dataset)
        self._refill_fingerprint = dataset_fingerprint(dataset)
        self._refill_dataset = None  # the DataLoader's view of the dataset, built on first use

    def _refill_row(self, index: int) -> dict[str, Any]:
        """Row ``index`` as the training DataLoader yields it (same columns)."""
        if self._refill_dataset is None:
            dataset = self.train_dataset
            if hasattr(dataset, "column_names"):
                dataset = self._remove_unused_columns(dataset, description="training")
            self._refill_dataset = dataset
        return dict(self._refill_dataset[int(index)])

    def _group_signal(self, round_: _Round, num_generations: int) -> torch.Tensor:
        args = self.args
        correctness = advantages = None
        if args.dynamic_sampling_metric == "accuracy" and args.dynamic_sampling_accuracy_reward is not None:
            column = self.reward_func_names.index(args.dynamic_sampling_accuracy_reward)
            correctness = round_.scored.rewards_per_func[:, column].to(round_.rewards.device)
            correctness = correctness.masked_fill(torch.isnan(round_.rewards), float("nan"))
        if args.dynamic_sampling_metric == "final_advantage":
            advantages = self._advantages_of_groups_alone(round_, num_generations)
        return groups_with_signal(
            args.dynamic_sampling_metric,
            num_generations,
            rewards=round_.rewards,
            advantages=advantages,
            correctness=correctness,
            tolerance=args.dynamic_sampling_tolerance,
            correct_threshold=args.dynamic_sampling_correct_threshold,
        )

    def _advantages_of_groups_alone(self, round_: _Round, num_generations: int) -> torch.Tensor:
        """Each group's final advantage with the group alone as its batch: the signal of ``"final_advantage"``.

        Not the round's batch statistics (the round is not what is trained) nor the trained batch's (not chosen
        yet): a group's fate depends on its own rows only (aapo_trl.dynamic_sampling says what that implies).
        Nothing is logged: the metrics and warnings belong to the trained batch.
        """
        parts = []
        with self._metrics_discarded("train"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for group in range(round_.rewards.numel() // num_generations):
                alone = [(0, group)]
                parts.append(self.batch_advantages(
                    take_groups([round_.rewards], alone, num_generations),
                    take_group_statistics([round_.statistics], alone, num_generations),
                    num_generations,
                    "train",
                ))
        return torch.cat(parts)

    @contextmanager
    def _metrics_discarded(self, mode: str):
        kept = self._metrics[mode]
        self._metrics[mode] = defaultdict(list)
        try:
            yield
        finally:
            self._metrics[mode] = kept

    def _dynamic_sampling_round(self, inputs, greso_chunk: GRESOChunk | None = None) -> _Round:
        """One round: TRL's generation and scoring, the group statistics of every group, and GRESO's record.

        ``greso_chunk``: the GRESO-drawn prompts of a refill round; ``None`` for the DataLoader's batch.
        """
        num_generations = self.num_generations
        for column in (self._logs["prompt"], self._logs["completion"], self._logs["advantages"], self._logs["images"],
                       *self._logs["rewards"].values(), *self._logs["extra"].values()):
            column.clear()  # what TRL logs now is this round's rows only (_trained_completions_table)
        with self._generation_round():
            output, scored, rewards = self._generate_and_score(inputs)
            statistics = self.group_statistics(rewards, scored, output, num_generations, "train")
        logged = {
            "prompt": list(self._logs["prompt"]),
            "completion": list(self._logs["completion"]),
            "rewards": {name: list(values) for name, values in self._logs["rewards"].items()},
            "extra": {name: list(values) for name, values in self._logs["extra"].items()},
        }
        if self.greso_filter is not None:
            if greso_chunk is None:
                (greso_chunk,) = self._greso_sampler.mark_consumed()
            self._record_greso_chunk(greso_chunk, rewards, num_generations)
        return _Round(output, rewards, statistics, scored, logged, greso_chunk)

    def _draw_refill_prompts(self, count: int, rounds: list[_Round]) -> tuple[list[int], GRESOChunk | None]:
        """Dataset indices of the next refill round: from GRESO's sampler through its filter when GRESO is on
        (never a prompt already rolled out in this generation batch), else from the refill stream."""
        if self.greso_filter is None:
            return self.refill_stream.take(count), None
        rolled_out = {pid for round_ in rounds for pid in round_.greso_chunk.prompt_ids}
        chunk = self._greso_sampler.draw_refill(count, exclude=rolled_out)
        return list(chunk.prompt_ids), chunk

    def _dynamically_sampled_batch(self, inputs) -> dict[str, Any]:
        """DAPO's dynamic sampling around TRL's generation: rounds until every process holds its groups with signal,
        then the advantages of the trained batch (selection first, statistics second: aapo_trl.dynamic_sampling).

        Every decision comes from the gathered rewards and group statistics, so it is the same on every process,
        and every process runs the same number of rounds (each round is one collective call of TRL's code).
        """
        args, accelerator = self.args, self.accelerator
        num_generations = self.num_generations
        if len(inputs) % num_generations:  # pragma: no cover - the config refuses such batch sizes
            raise RuntimeError(f"the local generation batch ({len(inputs)} rows) does not hold whole groups")
        groups_per_process = len(inputs) // num_generations
        selection = RoundsSelection(accelerator.num_processes, groups_per_process)
        rounds = [self._dynamic_sampling_round(inputs)]
        selection.add_round(self._group_signal(rounds[-1], num_generations))
        exhausted = False
        while not selection.filled:
            if args.dynamic_sampling_max_rounds and selection.num_rounds >= args.dynamic_sampling_max_rounds:
                message = exhaustion_message(
                    self.state.global_step, selection, args.dynamic_sampling_max_rounds, args.dynamic_sampling_metric
                )
                if args.dynamic_sampling_on_exhaustion == "error":
                    raise DynamicSamplingExhausted(message)
                warnings.warn(f"{message} Training on them (on_exhaustion='train_kept').", stacklevel=2)
                exhausted = True
                break
            prompt_ids, greso_chunk = self._draw_refill_prompts(selection.groups_per_round, rounds)
            start = accelerator.process_index * groups_per_process
            local = prompt_ids[start : start + groups_per_process]
            refill = [self._refill_row(index) for index in local for _ in range(num_generations)]
            rounds.append(self._dynamic_sampling_round(refill, greso_chunk))
            selection.add_round(self._group_signal(rounds[-1], num_generations))
            # free the outputs this process can no longer train (neither kept groups nor the earliest fillers);
            # every round's global rewards and statistics stay: the trained batch spans every process's groups
            needed = {r for r, _, _ in selection.selection(accelerator.process_index, allow_filler=True)}
            for index, round_ in enumerate(rounds):
                if index not in needed:
                    round_.output = None

        chosen = selection.selection(accelerator.process_index, allow_filler=exhausted)
        rows = [(r, g * num_generations + k) for r, g, _ in chosen for k in range(num_generations)]
        batch = merge_generation_rows([round_.output for round_ in rounds], rows, self._tokenizer.pad_token_id)
        trained = trained_groups(selection, allow_filler=exhausted)
        rewards, advantages = self._trained_batch_advantages(rounds, trained, num_generations)
        batch["advantages"] = self._local_rows(advantages, len(rows)).to(batch["advantages"].device)
        filler = torch.tensor([is_filler for _, _, is_filler in chosen for _ in range(num_generations)])
        mask_filler_rows(batch, filler)
        device = accelerator.device
        batch["num_items_in_batch"] = accelerator.gather(loss_mask_tokens(batch).to(device)).sum()
        self._trained_completions_table(rounds, trained, advantages, num_generations)
        self._log_zero_advantage_metrics(rewards, advantages, num_generations, "train")
        if self.greso_filter is not None:
            self._log_greso_skip_rate([round_.greso_chunk for round_ in rounds])
        self.dynamic_sampling_exhausted_batches += exhausted
        self._log_dynamic_sampling_metrics(selection, exhausted)
        return batch

    def _trained_batch_advantages(
        self, rounds: list[_Round], trained: list[tuple[int, int, bool]], num_generations: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global rewards and final advantages of the trained batch (``trained``: ``(round, global group,
        is_filler)``), every batch-level statistic computed on its groups with signal; filler groups get 0."""
        rewards = take_groups([round_.rewards for round_ in rounds], [(r, g) for r, g, _ in trained], num_generations)
        kept = [(r, g) for r, g, is_filler in trained if not is_filler]
        advantages = torch.zeros_like(rewards)
        if kept:
            kept_rows = torch.tensor(
                [not is_filler for _, _, is_filler in trained for _ in range(num_generations)], device=rewards.device
            )
            statistics = take_group_statistics([round_.statistics for round_ in rounds], kept, num_generations)
            kept_rewards = take_groups([round_.rewards for round_ in rounds], kept, num_generations)
            advantages[kept_rows] = self.batch_advantages(kept_rewards, statistics, num_generations, "train").to(
                advantages.dtype
            )
        return rewards, advantages

    def _trained_completions_table(
        self, rounds: list[_Round], trained: list[tuple[int, int, bool]], advantages: torch.Tensor,
        num_generations: int,
    ) -> None:
        """TRL's completions table (``_logs``) holds the trained batch's rows and advantages, in its order."""
        rows = [(r, g * num_generations + k) for r, g, _ in trained for k in range(num_generations)]

        def column(get):
            return [get(rounds[r].logged)[i] if len(get(rounds[r].logged)) > i else None for r, i in rows]

        logs = self._logs
        for key in ("prompt", "completion"):
            logs[key].clear()
            logs[key].extend(column(lambda logged, key=key: logged[key]))
        for group in ("rewards", "extra"):
            names = list(dict.fromkeys(name for round_ in rounds for name in round_.logged[group]))
            logs[group].clear()
            for name in names:
                logs[group][name].extend(column(lambda logged, g=group, n=name: logged[g].get(n, [])))
        logs["advantages"].clear()
        logs["advantages"].extend(advantages.tolist())

    def _log_dynamic_sampling_metrics(self, selection: RoundsSelection, exhausted: bool) -> None:
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/rounds"].append(float(selection.num_rounds))
        metrics["dynamic_sampling/generated_groups"].append(float(selection.generated_groups))
        completions = selection.generated_groups * self.num_generations
        metrics["dynamic_sampling/generated_completions"].append(float(completions))
        metrics["dynamic_sampling/kept_fraction"].append(selection.groups_with_signal / selection.generated_groups)
        per_kept = completions_per_kept_group(selection, self.num_generations)
        if math.isfinite(per_kept):  # no group with signal trained (exhausted, 'train_kept'): nothing to average
            metrics["dynamic_sampling/completions_per_kept_group"].append(per_kept)
        metrics["dynamic_sampling/exhausted"].append(float(exhausted))
        metrics["dynamic_sampling/exhausted_total"].append(float(self.dynamic_sampling_exhausted_batches))

    def _dynamic_sampling_state(self) -> dict[str, Any]:
        return {
            "format": DYNAMIC_SAMPLING_STATE_FORMAT,
            "dataset_fingerprint": self._refill_fingerprint,
            # None with GRESO: its sampler draws the refills and is saved with GRESO's state
            "stream": None if self.refill_stream is None else self.refill_stream.state_dict(),
            "exhausted_batches": self.dynamic_sampling_exhausted_batches,
        }

    def _restore_dynamic_sampling_state(self, checkpoint: str) -> None:
        state_file = os.path.join(checkpoint, DYNAMIC_SAMPLING_STATE_FILENAME)
        if not os.path.exists(state_file):
            raise FileNotFoundError(
                f"dynamic_sampling=True but the checkpoint {checkpoint!r} holds no {DYNAMIC_SAMPLING_STATE_FILENAME}: "
                "it was not saved by a dynamic-sampling run. Resume from such a checkpoint, or start a new run."
            )
        with open(state_file, encoding="utf-8") as handle:
            state = json.load(handle)
        if state.get("format") != DYNAMIC_SAMPLING_STATE_FORMAT:
            raise ValueError(f"{state_file}: unknown format {state.get('format')!r}")
        if state.get("dataset_fingerprint") != self._refill_fingerprint:
            raise ValueError(f"{state_file} was saved for another training dataset (fingerprint differs)")
        if (state.get("stream") is None) != (self.refill_stream is None):
            raise ValueError(
                f"{state_file} was saved by a run {'without' if state.get('stream') is None else 'with'} a refill "
                f"stream, this run has {'one' if self.refill_stream is not None else 'none'} (greso differs)"
            )
        if self.refill_stream is not None:
            self.refill_stream.load_state_dict(state["stream"], source=state_file)
        self.dynamic_sampling_exhausted_batches = int(state["exhausted_batches"])

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            self._load_extra_state(checkpoint)
        return super().train(checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._save_extra_state(folder)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:  # last: a checkpoint without it was interrupted while saving
            mark_checkpoint_complete(folder, self.state.global_step, self._name)

    def _save_extra_state(self, checkpoint: str) -> None:
        """aapo-trl's own state (JSON / safetensors) beside the Trainer's; subclasses add theirs."""
        if self.greso_filter is not None and self.args.should_save:
            self.greso_filter.save_json(os.path.join(checkpoint, GRESO_STATE_FILENAME))
        if getattr(self.args, "dynamic_sampling", False) and self.args.should_save:
            atomic_write_json(os.path.join(checkpoint, DYNAMIC_SAMPLING_STATE_FILENAME), self._dynamic_sampling_state())

    def _load_extra_state(self, checkpoint: str) -> None:
        if self.greso_filter is not None:
            state_file = os.path.join(checkpoint, GRESO_STATE_FILENAME)
            if not os.path.exists(state_file):
                raise FileNotFoundError(
                    f"greso=True but the checkpoint {checkpoint!r} holds no {GRESO_STATE_FILENAME}: it was not "
                    "saved by a GRESO run. Resume from a GRESO checkpoint, or start a new run."
                )
            self.greso_filter.restore_json(state_file)
        if getattr(self.args, "dynamic_sampling", False):
            self._restore_dynamic_sampling_state(checkpoint)

    # ---- seams -------------------------------------------------------------------------------------

    def _tokenize_prompts(self, prompts: list):
        """TRL's tokenization, then ``max_prompt_length``'s cut (:mod:`aapo_trl.prompt_truncation`).

        Every consumer of the prompt ids (the policy's generation, AAPO's reference requests and batched rows, the
        returned batch) sees the cut ids, because they all come from here."""
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        limit = getattr(self.args, "max_prompt_length", None)
        if limit is None:
            return prompt_ids, images, multimodal_fields
        kept, cut = keep_last_tokens(prompt_ids, limit)
        if cut and (images is not None or multimodal_fields):
            raise ValueError(
                f"max_prompt_length={limit} would cut {cut} prompt(s) with images, whose image tokens must stay whole; "
                "raise max_prompt_length or set it to None."
            )
        if cut and getattr(self.args, "reference_source", None) == "cache":
            raise ValueError(
                f"max_prompt_length={limit} cuts {cut} prompt(s), but reference_source='cache' holds reference "
                "rewards sampled on whole prompts: the margin would compare answers to different prompts. Raise "
                "max_prompt_length, set it to None, or sample the reference online."
            )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["prompts/truncated_frac"].append(cut / max(len(kept), 1))
        return kept, images, multimodal_fields

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_scored = ScoredBatch(inputs, prompts, completions, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if self.model.training and getattr(self.args, "dynamic_sampling", False):
            return self._dynamically_sampled_batch(inputs)
        return self._generate_score_and_advantage(inputs)

    def _generate_score_and_advantage(self, inputs) -> dict[str, Any]:
        """One call of TRL's generation and scoring, with our advantage in place of TRL's (no dynamic sampling)."""
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        with self._generation_round():
            output, scored, rewards = self._generate_and_score(inputs)
            advantages = self.compute_advantages(rewards, scored, output, num_generations, mode)
        output["advantages"] = self._local_rows(advantages, scored.num_local_rows).to(output["advantages"].device)
        self._replace_logged_advantages(advantages)
        self._log_zero_advantage_metrics(rewards, advantages, num_generations, mode)
        if self.greso_filter is not None and mode == "train":
            self._record_greso_rollouts(rewards, num_generations)
        return output

    @contextmanager
    def _generation_round(self):
        """Around one generation round: TRL's generation and scoring and the group statistics of its rows
        (subclasses hook what must span both, e.g. ZAPO's statistics recorded during generation)."""
        yield

    def _generate_and_score(self, inputs) -> tuple[dict[str, Any], ScoredBatch, torch.Tensor]:
        """TRL's generation and scoring: its output for this process, what it scored, and the combined global
        rewards (NaN for unscorable rows)."""
        self._last_scored = None
        output = super()._generate_and_score_completions(inputs)
        scored = self._last_scored
        if scored is None:  # pragma: no cover - guards against a TRL change of the seam
            raise RuntimeError(
                "GRPOTrainer did not call _calculate_rewards; aapo-trl is pinned to trl==1.16.0, check the version."
            )
        mode = "train" if self.model.training else "eval"
        rewards = combine_reward_functions(scored.rewards_per_func, self.reward_weights)
        rewards = rewards.masked_fill(self._unscorable_completions(scored.completion_ids).to(rewards.device), float("nan"))
        self._metrics[mode]["unscorable/frac_rows"].append(torch.isnan(rewards).float().mean().item())
        return output, scored, rewards

    def _compute_loss(self, model, inputs):
        if self.loss_type not in CE_LOSS_TYPES:
            return super()._compute_loss(model, inputs)
        if getattr(self.args, "ce_off_policy_correction", "importance_weight") == "none":
            inputs = _without_importance_weight(inputs)
        with _cross_entropy_term(self):
            return super()._compute_loss(model, inputs)

    def _unscorable_completions(self, completion_ids: list[list[int]]) -> torch.Tensor:
        """Global bool per row, on the accelerator like the rewards: the completions left out under
        ``empty_completions`` / ``truncated_completions`` (both ``"score"`` by default: none).

        Such rows, like a row every reward function returned None for, are left out of their group's mean/std and
        get advantage 0 (ALGORITHMS.md section 1). The same rule applies to AAPO's reference completions.
        """
        end_tokens = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        empty, truncated = completion_flags(completion_ids, end_tokens)
        flags = [completion_is_unscorable(self.args, *row) for row in zip(empty, truncated)]
        return self.accelerator.gather(torch.tensor(flags, dtype=torch.bool, device=self.accelerator.device))

    # ---- hooks for subclasses ------------------------------------------------------------------------

    def compute_advantages(
        self, rewards: torch.Tensor, scored: ScoredBatch, output: dict, num_generations: int, mode: str
    ) -> torch.Tensor:
        """The final advantage of every row of the *global* batch of one generation round (1-D, length N_global)."""
        statistics = self.group_statistics(rewards, scored, output, num_generations, mode)
        return self.batch_advantages(rewards, statistics, num_generations, mode)

    def group_statistics(
        self, rewards: torch.Tensor, scored: ScoredBatch, output: dict, num_generations: int, mode: str
    ) -> GroupStatistics:
        """What the advantage needs besides the rewards and that depends on each group's own rows only (AAPO's
        reference rewards, ZAPO's entropies), for every row / group of one round's *global* batch. Collective
        work (reference sampling, forward passes) belongs here: it runs once per generation round."""
        return GroupStatistics()

    def batch_advantages(
        self, rewards: torch.Tensor, statistics: GroupStatistics, num_generations: int, mode: str
    ) -> torch.Tensor:
        """The final advantage of every row of a global batch from its rewards and :meth:`group_statistics`; every
        batch-level statistic is computed here, on exactly the batch given, and so are the method's metrics.
        Pure: no collective (dynamic sampling calls it on every process with the same trained batch)."""
        raise NotImplementedError

    # ---- helpers -------------------------------------------------------------------------------------

    def _local_rows(self, global_values: torch.Tensor, num_local_rows: int) -> torch.Tensor:
        start = self.accelerator.process_index * num_local_rows
        return global_values[start : start + num_local_rows]

    def _replace_logged_advantages(self, advantages: torch.Tensor) -> None:
        """TRL has just appended its GRPO advantages to the completions table; show ours instead."""
        logged = self._logs["advantages"]
        count = min(len(logged), advantages.numel())
        for _ in range(count):
            logged.pop()
        logged.extend(advantages[advantages.numel() - count :].tolist())

    def _log_zero_advantage_metrics(self, rewards, advantages, num_generations, mode) -> None:
        metrics = self._metrics[mode]
        metrics["zero_adv/frac_groups"].append(zero_advantage_groups(rewards, num_generations).float().mean().item())
        final_zero = zero_final_advantage_groups(advantages, num_generations)
        metrics["zero_adv/frac_groups_final"].append(final_zero.float().mean().item())
        metrics["zero_adv/all_zero_batch"].append(float(final_zero.all().item()))

    def _log_mean_rewards_per_func(self, prefix: str, rewards_per_func: torch.Tensor, mode: str) -> None:
        for index, name in enumerate(self.reward_func_names):
            self._metrics[mode][f"{prefix}/{name}/mean"].append(torch.nanmean(rewards_per_func[:, index]).item())

    @contextmanager
    def _muted_reward_side_channels(self):
        """Score extra rollouts (e.g. AAPO's reference) without touching the policy's logs.

        Reward functions receive ``log_extra``/``log_metric`` callbacks bound when ``_calculate_rewards``
        runs; pointing them at no-ops keeps reference scoring out of the completions table and metrics,
        and the captured policy batch is restored afterwards.
        """
        policy_batch = self._last_scored
        self._log_completion_extra = _ignore_side_channel
        self._log_metric = _ignore_side_channel
        try:
            with profiling_context(self, "reference_rewards"):
                yield
        finally:
            del self._log_completion_extra, self._log_metric  # back to the class methods
            self._last_scored = policy_batch


@contextmanager
def _cross_entropy_term(trainer: AdvantageTrainerMixin):
    """Let TRL's ``_compute_loss`` compute AAPO's Eq. 4 / GPG's CE loss as its per-token term.

    TRL's ``"cispo"`` term is ``-min(ratio, epsilon_high).detach() * A * log pi`` with ``ratio = pi / pi_old``,
    normalised by the completion tokens of the whole generation batch (``num_items_in_batch``), which is the
    paper's normaliser. With the upper clip removed it is the CE loss: on-policy (no old log-probs) the ratio is
    ``exp(log pi - log pi.detach()) == 1`` exactly, so loss and gradient are Eq. 4's; on stale samples the
    detached, unclipped ratio is the importance weight that keeps the gradient that of the current policy
    (``ce_off_policy_correction``); with ``importance_sampling_level="sequence"`` TRL's ratio, hence the weight, is
    one per completion, ``exp(mean_t log(pi / pi_old))`` (the configs warn, and refuse TRL's clip settings
    ``epsilon_high`` and ``delta``, which this term has no use for). Running TRL's code keeps all it adds around the term: the MoE router aux
    loss, the entropy bonus and its adaptive controller, the high-entropy token mask, the off-policy sequence
    mask, the vLLM importance-sampling correction and their metrics. ``loss_type`` and ``epsilon_high`` are
    read nowhere else during a loss computation; both are restored even if it raises, and the clip-ratio
    metric of the borrowed branch (always 0 without a clip) is not logged.
    """
    loss_type, epsilon_high = trainer.loss_type, trainer.epsilon_high
    trainer.loss_type, trainer.epsilon_high = "cispo", math.inf
    try:
        yield
    finally:
        trainer.loss_type, trainer.epsilon_high = loss_type, epsilon_high
        for metrics in trainer._metrics.values():
            metrics.pop("cispo_clip_ratio", None)


def _without_importance_weight(inputs: dict) -> dict:
    """``ce_off_policy_correction="none"``: the batch without ``old_per_token_logps``, so TRL's ratio is 1.

    The off-policy sequence mask falls back to the old log-probs when vLLM gave no sampling log-probs; they
    are handed over as such so that it still sees the drift it would have seen.
    """
    if inputs.get("old_per_token_logps") is None:
        return inputs
    inputs = dict(inputs)
    old_per_token_logps = inputs.pop("old_per_token_logps")
    inputs.setdefault("sampling_per_token_logps", old_per_token_logps)
    return inputs


class _GRESOStepCallback(TrainerCallback):
    """Once per optimizer step: adapt p_easy/p_hard and log the filter's metrics with that step."""

    def __init__(self, trainer: AdvantageTrainerMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        step_metrics = self.trainer.greso_filter.end_step()
        metrics = self.trainer._metrics["train"]
        for name in ("greso/p_easy", "greso/p_hard", "greso/epoch"):
            metrics[name].append(step_metrics[name])
