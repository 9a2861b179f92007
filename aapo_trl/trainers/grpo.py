"""GRPO baseline with the metrics every aapo-trl trainer logs."""

from __future__ import annotations

from trl import GRPOTrainer

from ..advantages import group_relative_advantages
from .base import AdvantageTrainerMixin


class GRPOBaselineTrainer(AdvantageTrainerMixin, GRPOTrainer):
    """Plain GRPO (TRL's advantage and loss) that logs the same ``zero_adv/*`` metrics as AAPO and GPG."""

    _tag_names = ["trl", "grpo"]
    _name = "GRPO"

    def batch_advantages(self, rewards, statistics, num_generations, mode):
        return group_relative_advantages(rewards, num_generations, scale=self.scale_rewards)
