"""Configurations of the AAPO and GPG trainers: TRL's ``GRPOConfig`` plus one field per paper knob.

Each field's help text names the paper and equation it comes from, so ``--help`` on the command line
says the same thing as this file. Defaults are the papers'; extensions beyond the papers are off by
default and say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from .advantages import PAIRINGS

CE_LOSS_TYPES = ("aapo", "gpg")
"""Loss types computed by aapo-trl itself: the token-normalised cross-entropy loss of AAPO Eq. 4 / GPG."""


def _validate_ce_loss(config: GRPOConfig) -> None:
    if config.loss_type in CE_LOSS_TYPES and config.beta != 0.0:
        raise ValueError(
            f"loss_type={config.loss_type!r} is the CE loss of AAPO/GPG, which has no KL term, but beta={config.beta}. "
            "Set beta=0.0, or pick a TRL loss_type (e.g. 'grpo', 'dapo') to train with a KL penalty."
        )
    if config.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"multi_objective_aggregation={config.multi_objective_aggregation!r} is not supported: AAPO, GPG and "
            "ZAPO compute advantages from the weighted sum of the reward functions ('sum_then_normalize')."
        )


@dataclass
class AAPOConfig(GRPOConfig):
    r"""
    Configuration of [`AAPOTrainer`]: every [`trl.GRPOConfig`] field plus the AAPO knobs below.

    Parameters:
        > Parameters that control the advantage margin (AAPO paper, Eq. 5)

        margin_clip (`bool`, *optional*, defaults to `True`):
            Clip the margin `r_i - r_ref_i` to `[margin_clip_low, margin_clip_high]`. `False` is the paper's
            "AAPO w/o clip" ablation.
        margin_clip_low (`float`, *optional*, defaults to `-0.2`):
            Lower clip of the margin (delta_low in the paper).
        margin_clip_high (`float`, *optional*, defaults to `0.28`):
            Upper clip of the margin (delta_high in the paper).
        margin_pairing (`str`, *optional*, defaults to `"paired"`):
            `"paired"` (paper): margin against the reference response with the same index in the group. `"mean"`
            (extension, not in the paper): margin against the mean reward of the reference group.

        > Parameters that control the reference model

        ref_update_steps (`int`, *optional*):
            Copy the policy into the reference every N optimizer steps (the paper's "w reference update"
            ablation: 20 steps at 1.5B, 100 at 7B). `None` (paper default) keeps the reference frozen.
        eval_reference_rollouts (`bool`, *optional*, defaults to `False`):
            Also sample reference rollouts during evaluation. Off by default: evaluation losses then use the
            GRPO advantage without margin.

        > Parameters that control the loss

        loss_type (`str`, *optional*, defaults to `"aapo"`):
            `"aapo"`: the CE loss of AAPO Eq. 4, `-sum_i sum_t A_i log pi(o_i,t) / sum_i |o_i|`, no ratio, no clip,
            no KL. Any TRL loss type (`"grpo"`, `"dapo"`, ...) also works with the augmented advantage.
    """

    loss_type: str = field(
        default="aapo",
        metadata={
            "help": "'aapo': the CE loss of AAPO Eq. 4 (sum of A_i * log-prob over tokens, divided by the number of "
            "completion tokens in the batch; no ratio, no clipping, no KL). Any TRL loss_type ('grpo', 'dapo', "
            "'dr_grpo', ...) also works with the augmented advantage."
        },
    )
    margin_clip: bool = field(
        default=True,
        metadata={"help": "Clip the margin r_i - r_ref_i (AAPO Eq. 5). False is the paper's 'AAPO w/o clip' ablation."},
    )
    margin_clip_low: float = field(default=-0.2, metadata={"help": "Lower margin clip, delta_low (AAPO paper: -0.2)."})
    margin_clip_high: float = field(
        default=0.28, metadata={"help": "Upper margin clip, delta_high (AAPO paper: 0.28)."}
    )
    margin_pairing: str = field(
        default="paired",
        metadata={
            "help": "'paired' (paper): margin against the reference response with the same group index. 'mean' "
            "(extension, not in the paper): margin against the reference group's mean reward.",
            "choices": list(PAIRINGS),
        },
    )
    ref_update_steps: int | None = field(
        default=None,
        metadata={
            "help": "Copy the policy into the reference every N optimizer steps (AAPO ablation 'w reference update': "
            "20 for 1.5B, 100 for 7B). None (paper default) keeps the reference frozen."
        },
    )
    eval_reference_rollouts: bool = field(
        default=False,
        metadata={"help": "Also sample reference rollouts in evaluation (off: eval uses the GRPO advantage)."},
    )

    def __post_init__(self):
        super().__post_init__()
        _validate_ce_loss(self)
        if self.margin_pairing not in PAIRINGS:
            raise ValueError(f"margin_pairing must be one of {PAIRINGS}, got {self.margin_pairing!r}")
        if self.margin_clip and self.margin_clip_low > self.margin_clip_high:
            raise ValueError(
                f"margin_clip_low ({self.margin_clip_low}) must not exceed margin_clip_high ({self.margin_clip_high})"
            )
        if self.ref_update_steps is not None and self.ref_update_steps < 1:
            raise ValueError(f"ref_update_steps must be a positive number of steps or None, got {self.ref_update_steps}")


@dataclass
class GPGConfig(GRPOConfig):
    r"""
    Configuration of [`GPGTrainer`], the GPG baseline (Chu et al. 2025) on AAPO's CE-loss code path.

    Parameters:
        loss_type (`str`, *optional*, defaults to `"gpg"`):
            `"gpg"`: the same CE loss as AAPO Eq. 4, `-sum_i sum_t A_i log pi / tokens`, with GPG's corrected
            advantage `A_i = alpha (r_i - mean) / F_norm`, `alpha = B / (B - M)`. Any TRL loss type also works.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            `F_norm`: `"group"` divides by the group std + 1e-4, `"none"` by 1.
    """

    loss_type: str = field(
        default="gpg",
        metadata={
            "help": "'gpg': the CE loss shared with AAPO (sum of A_i * log-prob over tokens / completion tokens in the "
            "batch) with GPG's corrected advantage. Any TRL loss_type also works."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _validate_ce_loss(self)
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"GPG supports scale_rewards 'group' or 'none', got {self.scale_rewards!r}")
