"""The glue every aapo-trl trainer shares on top of ``trl.GRPOTrainer`` (pinned to trl 1.16.0).

TRL owns the loop. We take three seams, calling ``super()`` and replacing one result each time:

* ``_calculate_rewards``: TRL returns the rewards gathered over every process (N_global x n_funcs).
  We keep that tensor (and the local inputs it was computed from) for the advantage step.
* ``_generate_and_score_completions``: after TRL has built the batch (and its own GRPO advantages),
  we compute our advantage on the *global* rewards, slice this process's rows exactly as TRL does
  (``process_index * local_rows``), and replace ``output["advantages"]`` and the completions table.
* ``_compute_loss``: the CE loss of AAPO Eq. 4 / GPG for ``loss_type in ("aapo", "gpg")``; any other
  loss type is TRL's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from trl.extras.profiling import profiling_context

from ..advantages import (
    combine_reward_functions,
    cross_entropy_policy_loss,
    zero_advantage_groups,
    zero_final_advantage_groups,
)
from ..configs import CE_LOSS_TYPES


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


class AdvantageTrainerMixin:
    """Mixed in before ``trl.GRPOTrainer``; subclasses implement :meth:`compute_advantages`."""

    _last_scored: ScoredBatch | None = None

    def __init__(self, model, reward_funcs=None, args=None, *more_args, **kwargs):
        super().__init__(model, resolve_reward_funcs(reward_funcs), args, *more_args, **kwargs)

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
        advantages = self.compute_advantages(rewards, scored, output, num_generations, mode)
        output["advantages"] = self._local_rows(advantages, scored.num_local_rows).to(output["advantages"].device)
        self._replace_logged_advantages(advantages)
        self._log_zero_advantage_metrics(rewards, advantages, num_generations, mode)
        return output

    def _compute_loss(self, model, inputs):
        if self.loss_type not in CE_LOSS_TYPES:
            return super()._compute_loss(model, inputs)
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        forward_kwargs = {key: inputs[key] for key in _MULTIMODAL_KEYS if key in inputs}
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            inputs["completion_ids"].size(1),
            compute_entropy=True,
            **forward_kwargs,
        )
        mode = "train" if self.model.training else "eval"
        # The paper divides by the completion tokens of the whole batch. `num_items_in_batch` counts the
        # generation batch over all processes; DDP averages gradients over processes and the batch is
        # split into steps_per_generation micro-batches, accumulated over the accumulation window.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss = cross_entropy_policy_loss(per_token_logps, inputs["advantages"], mask, normalizer)
        totals = self.accelerator.reduce(
            torch.stack([(entropies * mask).sum(), mask.sum().float()]).detach(), reduction="sum"
        )
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss

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


_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def resolve_reward_funcs(reward_funcs):
    """Registry names (``"format"``, ``"cosine"``, ...) become our reward functions; anything else is TRL's."""
    from ..rewards import REWARD_REGISTRY

    if reward_funcs is None:
        return None
    as_list = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    resolved = [REWARD_REGISTRY.get(f, f) if isinstance(f, str) else f for f in as_list]
    return resolved if isinstance(reward_funcs, list) else resolved[0]
