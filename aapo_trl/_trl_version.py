"""The TRL release aapo-trl is written against, checked before anything imports TRL.

aapo-trl overrides private methods of ``trl.GRPOTrainer`` (``_calculate_rewards``,
``_generate_and_score_completions``, ``_compute_loss``) as they are in this release; under another TRL they
would fail deep inside a training step, or silently train something else. setup.cfg pins the same version
(tests/test_dependency_pins.py checks that the two agree).
"""

from __future__ import annotations

from importlib import metadata

SUPPORTED_TRL_VERSION = "1.16.0"


def unsupported_trl_message(installed: str | None) -> str | None:
    """Why the installed TRL cannot run aapo-trl, or None when it is the supported release."""
    if installed == SUPPORTED_TRL_VERSION:
        return None
    found = "TRL is not installed" if installed is None else f"TRL {installed} is installed"
    return (
        f"aapo-trl needs trl=={SUPPORTED_TRL_VERSION} ({found}): it overrides private GRPOTrainer methods of that "
        f"release. Install it with: pip install trl=={SUPPORTED_TRL_VERSION}"
    )


def installed_trl_version() -> str | None:
    try:
        return metadata.version("trl")
    except metadata.PackageNotFoundError:
        return None


def require_supported_trl() -> None:
    message = unsupported_trl_message(installed_trl_version())
    if message is not None:
        raise ImportError(message)
