"""aapo-trl: AAPO and ZAPO advantage estimators on top of Hugging Face TRL."""

__version__ = "0.1.0"

from ._trl_version import require_supported_trl

require_supported_trl()  # before TRL is imported: a clear error instead of a failure inside an overridden method

from .configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig  # noqa: E402
from .trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer, ZAPOTrainer  # noqa: E402

__all__ = [
    "AAPOConfig",
    "AAPOTrainer",
    "GPGConfig",
    "GPGTrainer",
    "GRPOBaselineConfig",
    "GRPOBaselineTrainer",
    "ZAPOConfig",
    "ZAPOTrainer",
    "__version__",
]
