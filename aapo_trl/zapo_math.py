"""ZAPO's advantage maths: DAER for zero-advantage samples, TDAR for the rest (ALGORITHMS.md section 3).

ZAPO paper Eqs. 8-10 (Dual-level Adaptive Entropy Reward), Eqs. 11-13 (Temporally Dynamic Advantage
Reshaping) and the final combination after Eq. 13. Every function is pure and free of TRL; the
conventions are those of ``aapo_trl.advantages`` (1-D tensors ordered group by group, NaN reward =
unscorable, zero-advantage = spread <= ``ZERO_VARIANCE_TOL``).

The entropies come from ``aapo_trl.entropy``: SE(x) one per group (NaN where not computed or
undefined), TE(o_j) one per row (NaN for an empty response). A NaN entropy never makes a NaN
advantage: that row's DAER advantage is 0 and a warning says so.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from .advantages import ZERO_VARIANCE_TOL, _grouped, group_relative_advantages, zero_advantage_groups

CORRECT_THRESHOLD = 0.95
"""A response is correct when its reward is at least this (spec section 3: rewards 1 / 0.1 / 0)."""

ENTROPY_COMBINES = ("mean", "sum_of_logs")
TIME_SCHEDULES = ("linear_up", "none")
DIFFICULTY_KINDS = ("reward", "accuracy")


def check_zapo_options(
    *,
    total_steps: int | float | None = None,
    alpha: float = 2.0,
    beta: float = 5.0,
    entropy_combine: str = "mean",
    time_schedule: str = "linear_up",
    difficulty_kind: str = "reward",
    use_semantic_entropy: bool = True,
    use_token_entropy: bool = True,
    use_daer: bool = True,
) -> None:
    """Raise a ``ValueError`` for an invalid ZAPO option (configs can call this at construction).

    Both entropies switched off is an error only while DAER is on (it would have nothing to reward).
    ``total_steps=None`` skips that check (not known yet when a config is built).
    """
    if entropy_combine not in ENTROPY_COMBINES:
        raise ValueError(f"entropy_combine must be one of {ENTROPY_COMBINES}, got {entropy_combine!r}")
    if time_schedule not in TIME_SCHEDULES:
        raise ValueError(f"time_schedule must be one of {TIME_SCHEDULES}, got {time_schedule!r}")
    if difficulty_kind not in DIFFICULTY_KINDS:
        raise ValueError(f"difficulty_kind must be one of {DIFFICULTY_KINDS}, got {difficulty_kind!r}")
    if total_steps is not None and not total_steps > 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta!r}")
    if use_daer and not (use_semantic_entropy or use_token_entropy):
        raise ValueError("DAER needs at least one entropy: use_semantic_entropy and use_token_entropy are both off")


def _progress(step: int | float, total_steps: int | float) -> float:
    """``t / T`` clamped to [0, 1] (a step past T, e.g. extra epochs, keeps the final weight)."""
    if not total_steps > 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}")
    return min(max(float(step) / float(total_steps), 0.0), 1.0)


def classify_zero_advantage_groups(
    rewards: torch.Tensor, num_generations: int, correct_threshold: float = CORRECT_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Easy and hard zero-advantage groups (spec 3.1). Returns ``(easy, hard)``, bool ``(n_groups,)`` each.

    A response is correct when ``r >= correct_threshold``. Over the group's scorable (non-NaN) rows:
    easy = zero-advantage and every response correct (I = +1); hard = zero-advantage and no response
    correct (I = -1): all 0.1, all 0, any constant below the threshold. A group with no scorable
    response is neither, and so is a zero-advantage group that straddles the threshold within
    ``ZERO_VARIANCE_TOL`` (some but not all correct). A 0/0.1 mix has spread 0.1: it is not
    zero-advantage and GRPO already gives it an advantage.
    """
    grouped = _grouped(rewards, num_generations)
    zero = zero_advantage_groups(rewards, num_generations)
    scorable = ~torch.isnan(grouped)
    n_scorable = scorable.sum(dim=1)
    n_correct = ((grouped >= correct_threshold) & scorable).sum(dim=1)
    easy = zero & (n_scorable > 0) & (n_correct == n_scorable)
    hard = zero & (n_scorable > 0) & (n_correct == 0)
    return easy, hard


def daer_advantages(
    se_per_group: torch.Tensor,
    te_per_row: torch.Tensor,
    easy: torch.Tensor,
    hard: torch.Tensor,
    num_generations: int,
    step: int | float,
    total_steps: int | float,
    alpha: float = 2.0,
    entropy_combine: str = "mean",
    use_semantic_entropy: bool = True,
    use_token_entropy: bool = True,
    time_schedule: str = "linear_up",
) -> torch.Tensor:
    """DAER advantage ``rhat_j`` of every row (paper Eqs. 8-10, spec 3.4); 0 outside easy/hard groups.

    * ``E_j = (SE(x) + TE(o_j)) / 2`` (the paper); with one entropy switched off E_j is the other alone
      ("w/o SE" / "w/o TE" ablations);
    * ``r'_j = log(1 + E_j) * I`` with I = +1 (easy) / -1 (hard) (Eq. 8). Extension beyond the paper,
      off by default: ``entropy_combine="sum_of_logs"`` uses ``r'_j = (log(1+SE) + log(1+TE)) * I``;
    * ``q = n_easy / (n_easy + alpha * n_hard)`` with the group counts of this (global) batch;
      ``delta = q`` for easy, ``1 - q`` for hard (Eq. 10). The paper writes proportions p_easy, p_hard:
      the same ratio. Where ``n_easy = 0`` and ``alpha = 0`` (0/0) q is taken as 0;
    * ``rhat_j = r'_j * (t/T) * delta`` (Eq. 9) with t/T clamped to [0, 1] (``"linear_up"``) or
      replaced by 1 (``"none"``, an extension).

    rhat_j is the advantage itself (no group centring). ``se_per_group`` is ``(n_groups,)`` and may be NaN
    for groups that are neither easy nor hard; ``te_per_row`` is ``(N,)``. An entropy that is switched off
    is ignored (it may be all NaN). A row of an easy/hard group whose used entropy is NaN gets 0, with
    one warning. Returns float32 ``(N,)`` without NaN.
    """
    check_zapo_options(
        total_steps=total_steps,
        alpha=alpha,
        entropy_combine=entropy_combine,
        time_schedule=time_schedule,
        use_semantic_entropy=use_semantic_entropy,
        use_token_entropy=use_token_entropy,
    )
    te = te_per_row.float()
    if te.dim() != 1 or num_generations < 1 or te.numel() % num_generations != 0:
        raise ValueError(f"te_per_row of shape {tuple(te.shape)} cannot be split into groups of {num_generations}")
    n_groups = te.numel() // num_generations
    for name, value in (("se_per_group", se_per_group), ("easy", easy), ("hard", hard)):
        if value.shape != (n_groups,):
            raise ValueError(f"{name} must have one entry per group ({n_groups}), got shape {tuple(value.shape)}")
    easy = easy.to(device=te.device, dtype=torch.bool)
    hard = hard.to(device=te.device, dtype=torch.bool)
    if bool((easy & hard).any()):
        raise ValueError("a group cannot be both easy and hard")
    zeros = torch.zeros_like(te)
    n_easy, n_hard = int(easy.sum()), int(hard.sum())
    if n_easy + n_hard == 0:
        return zeros

    denominator = n_easy + alpha * n_hard
    q = n_easy / denominator if denominator > 0 else 0.0
    time_factor = _progress(step, total_steps) if time_schedule == "linear_up" else 1.0
    indicator = easy.float() - hard.float()  # +1 easy, -1 hard, 0 otherwise
    delta = torch.where(easy, torch.full_like(indicator, q), torch.full_like(indicator, 1.0 - q))

    se = se_per_group.to(device=te.device, dtype=torch.float32).repeat_interleave(num_generations)
    if entropy_combine == "sum_of_logs":
        log_term = zeros.clone()
        if use_semantic_entropy:
            log_term = log_term + torch.log1p(se)
        if use_token_entropy:
            log_term = log_term + torch.log1p(te)
    else:
        if use_semantic_entropy and use_token_entropy:
            entropy = (se + te) / 2
        else:
            entropy = se if use_semantic_entropy else te
        log_term = torch.log1p(entropy)

    rows_active = (easy | hard).repeat_interleave(num_generations)
    undefined = rows_active & ~torch.isfinite(log_term)
    if bool(undefined.any()):
        warnings.warn(
            f"DAER: {int(undefined.sum())} zero-advantage responses have an undefined entropy (empty response or "
            "NaN log-probs); their advantage is set to 0",
            RuntimeWarning,
            stacklevel=2,
        )
    rhat = log_term * (indicator * delta * time_factor).repeat_interleave(num_generations)
    return torch.where(rows_active & ~undefined, rhat, zeros)


def difficulty(
    rewards: torch.Tensor,
    num_generations: int,
    kind: str = "reward",
    correct_threshold: float = CORRECT_THRESHOLD,
) -> torch.Tensor:
    """Group difficulty d(x) (paper Eq. 11, spec 3.5), ``(n_groups,)`` float32.

    ``kind="reward"``: ``d = 1 - mean r`` (the paper); ``"accuracy"``: ``d = 1 - fraction correct``
    (``r >= correct_threshold``). Both over the scorable rows; NaN for a group without any.
    """
    if kind not in DIFFICULTY_KINDS:
        raise ValueError(f"difficulty kind must be one of {DIFFICULTY_KINDS}, got {kind!r}")
    grouped = _grouped(rewards, num_generations)
    if kind == "accuracy":
        grouped = torch.where(torch.isnan(grouped), grouped, (grouped >= correct_threshold).float())
    return 1.0 - torch.nanmean(grouped, dim=1)


def tdar_multiplier(
    difficulty: torch.Tensor, step: int | float, total_steps: int | float, beta: float = 5.0
) -> torch.Tensor:
    """TDAR factor ``1 + sigmoid(beta * (t/T) * (d - 0.5))`` per group (paper Eq. 12), t/T clamped to [0, 1].

    In (1, 2): 1.5 at t = 0 or d = 0.5, growing with difficulty as training progresses (beta > 0).
    """
    return 1.0 + torch.sigmoid(beta * _progress(step, total_steps) * (difficulty.float() - 0.5))


def tdar_reshape(
    advantages: torch.Tensor,
    rewards: torch.Tensor,
    num_generations: int,
    step: int | float,
    total_steps: int | float,
    beta: float = 5.0,
    difficulty_kind: str = "reward",
    correct_threshold: float = CORRECT_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TDAR (paper Eqs. 11-13, spec 3.5): ``A~_j = A_j * m(x)`` where ``|A_j| > ZERO_VARIANCE_TOL``, else A_j.

    Returns ``(reshaped (N,), multiplier_per_row (N,))``; the per-row multiplier is the factor actually
    applied (1 for rows left unchanged), so ``reshaped == advantages * multiplier_per_row``.
    """
    if advantages.shape != rewards.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    d = difficulty(rewards, num_generations, kind=difficulty_kind, correct_threshold=correct_threshold)
    per_row = tdar_multiplier(d, step, total_steps, beta=beta).repeat_interleave(num_generations)
    per_row = per_row.to(advantages.device)
    applied = advantages.abs() > ZERO_VARIANCE_TOL
    multiplier = torch.where(applied, per_row, torch.ones_like(per_row))
    return torch.where(applied, advantages * multiplier, advantages), multiplier


class ZAPOAdvantages(NamedTuple):
    """Everything ``zapo_advantages`` computed; all row tensors are ``(N,)``, group tensors ``(n_groups,)``."""

    advantages: torch.Tensor
    """The final A_bar (what the loss uses)."""
    grpo_advantages: torch.Tensor
    """A, the plain group-relative advantage."""
    daer: torch.Tensor
    """rhat per row: 0 outside easy/hard groups, for unscorable rows and when DAER is off."""
    tdar_multiplier: torch.Tensor
    """The TDAR factor applied per row: 1 where A = 0 and when TDAR is off."""
    easy: torch.Tensor
    hard: torch.Tensor


def zapo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    se_per_group: torch.Tensor,
    te_per_row: torch.Tensor,
    step: int | float,
    total_steps: int | float,
    *,
    alpha: float = 2.0,
    beta: float = 5.0,
    correct_threshold: float = CORRECT_THRESHOLD,
    difficulty_kind: str = "reward",
    use_daer: bool = True,
    use_tdar: bool = True,
    entropy_combine: str = "mean",
    use_semantic_entropy: bool = True,
    use_token_entropy: bool = True,
    time_schedule: str = "linear_up",
    scale: str = "group",
) -> ZAPOAdvantages:
    """ZAPO's final advantage (spec 3.6, paper after Eq. 13): ``A_bar_j = A~_j if A_j != 0 else rhat_j``.

    A is ``group_relative_advantages(rewards, num_generations, scale)``; A~ is TDAR's reshaping of it
    (``use_tdar=False``: A~ = A, the "w/o TDAR" ablation); rhat is DAER's advantage for rows of easy /
    hard zero-advantage groups (``use_daer=False``: those rows keep 0, the "w/o DAER" ablation). A row
    with A = 0 in a group that is not zero-advantage gets rhat = 0, i.e. stays 0. Unscorable rows
    (NaN reward) get 0. ``se_per_group`` may be NaN for groups that are not zero-advantage (and
    everywhere when it is switched off or DAER is off); likewise ``te_per_row``.
    """
    check_zapo_options(
        total_steps=total_steps,
        alpha=alpha,
        beta=beta,
        entropy_combine=entropy_combine,
        time_schedule=time_schedule,
        difficulty_kind=difficulty_kind,
        use_semantic_entropy=use_semantic_entropy,
        use_token_entropy=use_token_entropy,
        use_daer=use_daer,
    )
    grpo = group_relative_advantages(rewards, num_generations, scale=scale)
    easy, hard = classify_zero_advantage_groups(rewards, num_generations, correct_threshold=correct_threshold)
    unscorable = torch.isnan(rewards.float())

    if use_tdar:
        reshaped, multiplier = tdar_reshape(
            grpo,
            rewards,
            num_generations,
            step,
            total_steps,
            beta=beta,
            difficulty_kind=difficulty_kind,
            correct_threshold=correct_threshold,
        )
    else:
        reshaped, multiplier = grpo, torch.ones_like(grpo)

    if use_daer:
        daer = daer_advantages(
            se_per_group,
            te_per_row.to(grpo.device),
            easy,
            hard,
            num_generations,
            step,
            total_steps,
            alpha=alpha,
            entropy_combine=entropy_combine,
            use_semantic_entropy=use_semantic_entropy,
            use_token_entropy=use_token_entropy,
            time_schedule=time_schedule,
        ).masked_fill(unscorable, 0.0)
    else:
        daer = torch.zeros_like(grpo)

    final = torch.where(grpo.abs() > ZERO_VARIANCE_TOL, reshaped, daer).masked_fill(unscorable, 0.0)
    return ZAPOAdvantages(final, grpo, daer, multiplier, easy, hard)
