"""AAPOTrainer: GRPO plus the advantage margin against a frozen reference model (AAPO paper, Eqs. 4-5)."""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.extras.profiling import profiling_context

from ..advantages import aapo_advantages, advantage_margins, combine_reward_functions, group_relative_advantages
from ..configs import AAPOConfig
from ..reference import PeftBaseReference, make_reference, sample_reference_completions
from .base import AdvantageTrainerMixin, ScoredBatch


class ReferenceUpdateCallback(TrainerCallback):
    """The "w reference update" ablation: copy the policy into the reference every N optimizer steps."""

    def __init__(self, trainer: "AAPOTrainer", every_steps: int):
        self.trainer = trainer
        self.every_steps = every_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step % self.every_steps == 0:
            self.trainer.reference.load_policy_weights(self.trainer)
            self.trainer.reference_updated_at_step = state.global_step


class AAPOTrainer(AdvantageTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with AAPO's augmented advantage ``A_i + clip(r_i - r_ref_i, -0.2, 0.28)``.

    For every prompt row the reference model samples one response with the policy's sampling settings;
    the same reward functions and weights score it. Takes the same arguments as ``GRPOTrainer``;
    ``reward_funcs`` may also name functions of :mod:`aapo_trl.rewards` (``"format"``, ``"cosine"``...).
    The reference is a frozen deep copy of the initial policy, or the PEFT base with adapters disabled.
    """

    _tag_names = ["trl", "grpo", "aapo"]
    _name = "AAPO"

    def __init__(self, model, reward_funcs=None, args: AAPOConfig | None = None, *more_args, **kwargs):
        if args is None:
            args = AAPOConfig(output_dir="aapo-output")
        if not isinstance(args, AAPOConfig):
            raise TypeError(f"AAPOTrainer needs an AAPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        # Built here, before Trainer.train() wraps the policy with accelerate/DeepSpeed.
        self.reference = make_reference(self)
        self.reference_updated_at_step = 0
        if args.ref_update_steps is not None:
            if isinstance(self.reference, PeftBaseReference):
                self.reference.load_policy_weights(self)  # raises the explanatory error before any compute
            self.add_callback(ReferenceUpdateCallback(self, args.ref_update_steps))
        self._last_reference: dict | None = None

    def compute_advantages(self, rewards, scored: ScoredBatch, output, num_generations, mode):
        if mode == "eval" and not self.args.eval_reference_rollouts:
            return group_relative_advantages(rewards, num_generations, scale=self.scale_rewards)
        ref_rewards = self._reference_rewards(scored, output, mode)
        args = self.args
        advantages = aapo_advantages(
            rewards,
            ref_rewards,
            num_generations,
            clip_low=args.margin_clip_low,
            clip_high=args.margin_clip_high,
            clip=args.margin_clip,
            pairing=args.margin_pairing,
            scale=self.scale_rewards,
        )
        margins = advantage_margins(rewards, ref_rewards, num_generations, pairing=args.margin_pairing)
        clipped = (margins < args.margin_clip_low) | (margins > args.margin_clip_high) if args.margin_clip else None
        metrics = self._metrics[mode]
        metrics["aapo/margin_mean"].append(margins.mean().item())
        metrics["aapo/margin_clipped_frac"].append(0.0 if clipped is None else clipped.float().mean().item())
        metrics["aapo/ref_reward_mean"].append(torch.nanmean(ref_rewards).item())
        return advantages

    def _reference_rewards(self, scored: ScoredBatch, output, mode) -> torch.Tensor:
        """Sample one reference completion per local row, score it, and gather over processes."""
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(output["prompt_ids"], output["prompt_mask"])]
        with profiling_context(self, "reference_generate"):
            ref_ids = sample_reference_completions(self, self.reference, prompt_ids)
        texts = self.processing_class.batch_decode(ref_ids, skip_special_tokens=True)
        if is_conversational({"prompt": scored.prompts[0]}):
            ref_completions = [[{"role": "assistant", "content": text}] for text in texts]
        else:
            ref_completions = texts
        with self._muted_reward_side_channels():
            ref_per_func = self._calculate_rewards(scored.inputs, scored.prompts, ref_completions, ref_ids)
        self._log_mean_rewards_per_func("rewards_ref", ref_per_func, mode)
        lengths = torch.tensor([float(len(ids)) for ids in ref_ids], device=self.accelerator.device)
        self._metrics[mode]["aapo/ref_completion_mean_length"].append(
            self.accelerator.gather(lengths).mean().item()
        )
        self._last_reference = {"completion_ids": ref_ids, "completions": ref_completions, "rewards_per_func": ref_per_func}
        return combine_reward_functions(ref_per_func, self.reward_weights)
