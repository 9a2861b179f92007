"""aapo-trl: AAPO and ZAPO advantage estimators on top of Hugging Face TRL."""

__version__ = "0.1.0"
