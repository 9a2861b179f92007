"""GPGTrainer (Chu et al. 2025), AAPO's main baseline, on the same CE-loss code path as AAPO."""

from __future__ import annotations

from trl import GRPOTrainer

from ..advantages import gpg_advantages
from ..configs import GPGConfig
from .base import AdvantageTrainerMixin


class GPGTrainer(AdvantageTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with GPG's corrected advantage ``alpha (r_i - mean) / F_norm``, alpha = B / (B - M)."""

    _tag_names = ["trl", "grpo", "gpg"]
    _name = "GPG"

    def __init__(self, model, reward_funcs=None, args: GPGConfig | None = None, *more_args, **kwargs):
        if args is None:
            args = GPGConfig(output_dir="gpg-output")
        if not isinstance(args, GPGConfig):
            raise TypeError(f"GPGTrainer needs a GPGConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)

    def batch_advantages(self, rewards, statistics, num_generations, mode):
        return gpg_advantages(rewards, num_generations, scale=self.scale_rewards)

