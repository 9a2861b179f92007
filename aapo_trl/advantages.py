"""The advantage maths of GRPO, AAPO and GPG, and the cross-entropy policy loss they share.

Every function here is pure (tensors in, tensors out) and free of TRL so the formulas in
``docs/ALGORITHMS.md`` (sections 1, 2 and 4) can be checked line by line and unit-tested against its vectors.

Conventions shared by every function:

* ``rewards`` is a 1-D float tensor of ``num_prompts * num_generations`` rewards, ordered group by group
  (the order TRL gathers them in: the G completions of one prompt are contiguous).
* A NaN reward means *unscorable* (every reward function returned ``None`` for that row): it is
  excluded from its group's mean and std and its advantage is 0.
* A group is *zero-advantage* (zero-variance) when ``max r - min r <= ZERO_VARIANCE_TOL`` over its
  scorable rows; a group with fewer than two scorable rows is zero-advantage too.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4
"""Added to the group std before dividing, exactly as TRL's GRPOTrainer does (ALGORITHMS.md section 1)."""

ZERO_VARIANCE_TOL = 1e-6
"""Reward spread at or below which a group counts as zero-advantage (ALGORITHMS.md section 1)."""

SCALES = ("group", "batch", "none")
PAIRINGS = ("paired", "mean")


def _grouped(values: torch.Tensor, num_generations: int) -> torch.Tensor:
    if values.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of rewards, got shape {tuple(values.shape)}")
    if num_generations < 1 or values.numel() % num_generations != 0:
        raise ValueError(
            f"{values.numel()} rewards cannot be split into groups of num_generations={num_generations}"
        )
    return values.float().view(-1, num_generations)


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs; NaN where fewer than two values are present."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True) if dim is not None else valid.sum()
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    total = sq.sum(dim=dim, keepdim=True) if dim is not None else sq.sum()
    var = total / (count - 1).clamp(min=0)  # 0/0 -> NaN for a single value, as torch.std does
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    return var.sqrt()


def combine_reward_functions(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions, as TRL combines them (``sum_then_normalize``).

    ``rewards_per_func`` is ``(N, num_funcs)`` with NaN where a function returned ``None``. A function
    that returned ``None`` contributes nothing; a row where every function returned ``None`` is NaN
    (unscorable).
    """
    if rewards_per_func.dim() != 2 or rewards_per_func.size(1) != weights.numel():
        raise ValueError(
            f"rewards_per_func of shape {tuple(rewards_per_func.shape)} does not match {weights.numel()} weights"
        )
    weights = weights.to(device=rewards_per_func.device, dtype=rewards_per_func.dtype)
    combined = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    return combined.masked_fill(unscorable, float("nan"))


def zero_advantage_groups(rewards: torch.Tensor, num_generations: int, tol: float = ZERO_VARIANCE_TOL) -> torch.Tensor:
    """One bool per group: True where the group's scorable rewards spread by at most ``tol`` (``ZERO_VARIANCE_TOL``)."""
    grouped = _grouped(rewards, num_generations)
    valid = ~torch.isnan(grouped)
    inf = torch.tensor(float("inf"), device=grouped.device)
    spread = torch.where(valid, grouped, -inf).amax(dim=1) - torch.where(valid, grouped, inf).amin(dim=1)
    few_scorable = valid.sum(dim=1) < 2
    return few_scorable | (spread <= tol)


def group_relative_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """GRPO advantage ``A_i = (r_i - mean_group r) / (std_group r + 1e-4)`` (ALGORITHMS.md section 1).

    ``scale="group"`` divides by the group std (TRL's default), ``"batch"`` by the std of the whole
    batch, ``"none"`` skips the division (Dr. GRPO). Unscorable rows get 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    grouped = _grouped(rewards, num_generations)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (_nanstd(grouped, dim=1) + STD_EPS)
    elif scale == "batch":
        centred = centred / (_nanstd(grouped.flatten()) + STD_EPS)
    # NaN comes from unscorable rows and from groups with a single scorable row (std undefined):
    # neither carries a learning signal.
    return torch.nan_to_num(centred.flatten(), nan=0.0)


def advantage_margins(
    rewards: torch.Tensor, ref_rewards: torch.Tensor, num_generations: int, pairing: str = "paired"
) -> torch.Tensor:
    """AAPO's raw margin ``r_i - r_ref_i`` (paired by index) or ``r_i - mean_group r_ref`` (``"mean"``).

    An unscorable policy or reference reward gives margin 0 (ALGORITHMS.md section 2).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if rewards.shape != ref_rewards.shape:
        raise ValueError(
            f"policy rewards {tuple(rewards.shape)} and reference rewards {tuple(ref_rewards.shape)} differ in shape"
        )
    grouped = _grouped(rewards, num_generations)
    ref_grouped = _grouped(ref_rewards, num_generations)
    if pairing == "mean":
        ref_grouped = torch.nanmean(ref_grouped, dim=1, keepdim=True).expand_as(grouped)
    return torch.nan_to_num((grouped - ref_grouped).flatten(), nan=0.0)


def aapo_advantages(
    rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    num_generations: int,
    clip_low: float = -0.2,
    clip_high: float = 0.28,
    clip: bool = True,
    pairing: str = "paired",
    scale: str = "group",
) -> torch.Tensor:
    """AAPO (ALGORITHMS.md section 2): ``A_aapo_i = A_i + clip(r_i - r_ref_i, clip_low, clip_high)``.

    ``A_i`` is the GRPO advantage; ``clip=False`` is the paper's "w/o clip" ablation. An unscorable
    policy row keeps advantage 0: its margin is undefined.
    """
    if clip and clip_low > clip_high:
        raise ValueError(f"clip_low ({clip_low}) must not exceed clip_high ({clip_high})")
    base = group_relative_advantages(rewards, num_generations, scale=scale)
    margin = advantage_margins(rewards, ref_rewards, num_generations, pairing=pairing)
    if clip:
        margin = margin.clamp(min=clip_low, max=clip_high)
    return (base + margin).masked_fill(torch.isnan(rewards.float()), 0.0)


def gpg_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """GPG's corrected advantage (ALGORITHMS.md section 4): ``alpha * (r_i - mean_group r) / F_norm``.

    ``alpha = B / (B - M)`` with B the number of samples in the batch and M the number in
    zero-advantage groups; every advantage is 0 when every group is zero-advantage (M = B).
    ``F_norm`` is the group std + 1e-4 (``scale="group"``) or 1 (``"none"``).
    """
    if scale not in ("group", "none"):
        raise ValueError(f"GPG supports scale 'group' or 'none', got {scale!r}")
    base = group_relative_advantages(rewards, num_generations, scale=scale)
    zero_groups = zero_advantage_groups(rewards, num_generations)
    total = rewards.numel()
    in_zero_groups = int(zero_groups.sum()) * num_generations
    if in_zero_groups == total:
        return torch.zeros_like(base)
    return base * (total / (total - in_zero_groups))


def zero_final_advantage_groups(
    advantages: torch.Tensor, num_generations: int, tol: float = ZERO_VARIANCE_TOL
) -> torch.Tensor:
    """One bool per group: True where every final advantage of the group is at most ``tol`` in magnitude."""
    return _grouped(advantages, num_generations).abs().amax(dim=1) <= tol


def cross_entropy_policy_loss(
    per_token_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor | float
) -> torch.Tensor:
    """The CE loss of AAPO (paper Eq. 4) and GPG: ``-sum_i sum_t A_i log pi(o_i,t) / normalizer``.

    No importance ratio, no clipping, no KL. ``normalizer`` is the number of completion tokens the
    loss is averaged over (the whole batch's, in the paper). ``advantages`` is ``(B,)`` or ``(B, T)``.
    The trainers compute it as the per-token term of TRL's loss (``trainers/base.py``); this is the
    formula they are tested against.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return -(advantages * per_token_logps * mask).sum() / normalizer
