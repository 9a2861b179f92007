"""The glue every aapo-trl trainer shares on top of ``trl.GRPOTrainer`` (pinned to trl 1.16.0).

TRL owns the loop. We take three seams, calling ``super()`` and replacing one result each time:

* ``_calculate_rewards``: TRL returns the rewards gathered over every process (N_global x n_funcs).
  We keep that tensor (and the local inputs it was computed from) for the advantage step.
* ``_generate_and_score_completions``: after TRL has built the batch (and its own GRPO advantages),
  we compute our advantage on the *global* rewards, slice this process's rows exactly as TRL does
  (``process_index * local_rows``), and replace ``output["advantages"]`` and the completions table.
* ``_compute_loss``: for ``loss_type in ("aapo", "gpg")``, TRL's own loss computation with the CE loss of
  AAPO Eq. 4 / GPG as its per-token term (see :func:`_cross_entropy_term`); any other loss type is TRL's.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.extras.profiling import profiling_context

from ..advantages import (
    combine_reward_functions,
    zero_advantage_groups,
    zero_final_advantage_groups,
)
from ..checkpointing import mark_checkpoint_complete, resolve_resume_checkpoint
from ..configs import CE_LOSS_TYPES
from ..model_card import ModelCardMixin
from ..greso import GRESO_STATE_FILENAME, GRESOFilter, GRESORepeatSampler, dataset_fingerprint
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


def _ignore_side_channel(*args, **kwargs) -> None:
    return None


class AdvantageTrainerMixin(ModelCardMixin):
    """Mixed in before ``trl.GRPOTrainer``; subclasses implement :meth:`compute_advantages`."""

    _last_scored: ScoredBatch | None = None

    def __init__(self, model, reward_funcs=None, args=None, *more_args, **kwargs):
        on_error = getattr(args, "reward_errors", "error")
        reward_funcs = resolve_reward_funcs(reward_funcs, on_error=on_error, settings=args)  # named rewards: from args
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        if kwargs.get("environment_factory") is None:
            validate_training_dataset(kwargs.get("train_dataset"), funcs, "train_dataset")
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        self.greso_filter: GRESOFilter | None = None
        self._greso_sampler: GRESORepeatSampler | None = None
        if getattr(self.args, "greso", False):
            self._init_greso()

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
        (chunk,) = self._greso_sampler.mark_consumed()
        self.greso_filter.record(chunk.prompt_ids, rewards.view(-1, num_generations), epoch=chunk.epochs)
        # the share of candidates skipped to fill this generation batch (decided when the DataLoader pulled it)
        self._metrics["train"]["greso/skip_rate"].append(chunk.skip_rate)

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

    def _load_extra_state(self, checkpoint: str) -> None:
        if self.greso_filter is not None:
            state_file = os.path.join(checkpoint, GRESO_STATE_FILENAME)
            if not os.path.exists(state_file):
                raise FileNotFoundError(
                    f"greso=True but the checkpoint {checkpoint!r} holds no {GRESO_STATE_FILENAME}: it was not "
                    "saved by a GRESO run. Resume from a GRESO checkpoint, or start a new run."
                )
            self.greso_filter.restore_json(state_file)

    # ---- seams -------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_scored = ScoredBatch(inputs, prompts, completions, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._last_scored = None
        output = super()._generate_and_score_completions(inputs)
        scored = self._last_scored
        if scored is None:  # pragma: no cover - guards against a TRL change of the seam
            raise RuntimeError(
                "GRPOTrainer did not call _calculate_rewards; aapo-trl is pinned to trl==1.16.0, check the version."
            )
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = combine_reward_functions(scored.rewards_per_func, self.reward_weights)
        rewards = rewards.masked_fill(self._unscorable_completions(scored.completion_ids).to(rewards.device), float("nan"))
        self._metrics[mode]["unscorable/frac_rows"].append(torch.isnan(rewards).float().mean().item())
        advantages = self.compute_advantages(rewards, scored, output, num_generations, mode)
        output["advantages"] = self._local_rows(advantages, scored.num_local_rows).to(output["advantages"].device)
        self._replace_logged_advantages(advantages)
        self._log_zero_advantage_metrics(rewards, advantages, num_generations, mode)
        if self.greso_filter is not None and mode == "train":
            self._record_greso_rollouts(rewards, num_generations)
        return output

    def _compute_loss(self, model, inputs):
        if self.loss_type not in CE_LOSS_TYPES:
            return super()._compute_loss(model, inputs)
        if getattr(self.args, "ce_off_policy_correction", "importance_weight") == "none":
            inputs = _without_importance_weight(inputs)
        with _cross_entropy_term(self):
            return super()._compute_loss(model, inputs)

    def _unscorable_completions(self, completion_ids: list[list[int]]) -> torch.Tensor:
        """Global bool per row, on the accelerator like the rewards: empty completions, and truncated ones when
        ``truncated_completions="unscorable"``.

        Such rows carry no usable answer: like a row every reward function returned None for, they are
        left out of their group's mean/std and get advantage 0 (ALGORITHMS.md section 1).
        """
        end_tokens = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        truncated_unscorable = getattr(self.args, "truncated_completions", "score") == "unscorable"
        flags = []
        for ids in completion_ids:
            empty = all(token in end_tokens for token in ids)
            truncated = not ids or ids[-1] not in end_tokens
            flags.append(empty or (truncated and truncated_unscorable))
        return self.accelerator.gather(torch.tensor(flags, device=self.accelerator.device))

    # ---- hooks for subclasses ------------------------------------------------------------------------

    def compute_advantages(
        self, rewards: torch.Tensor, scored: ScoredBatch, output: dict, num_generations: int, mode: str
    ) -> torch.Tensor:
        """The final advantage of every row of the *global* batch (1-D, length N_global)."""
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
    (``ce_off_policy_correction``). Running TRL's code keeps all it adds around the term: the MoE router aux
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
