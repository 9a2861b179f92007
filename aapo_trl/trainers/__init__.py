from .aapo import AAPOTrainer, ReferenceUpdateCallback
from .base import AdvantageTrainerMixin, ScoredBatch
from .gpg import GPGTrainer
from .grpo import GRPOBaselineTrainer
from .zapo import ZAPOTrainer

__all__ = [
    "AAPOTrainer",
    "AdvantageTrainerMixin",
    "GPGTrainer",
    "GRPOBaselineTrainer",
    "ReferenceUpdateCallback",
    "ScoredBatch",
    "ZAPOTrainer",
]
