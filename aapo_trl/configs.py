"""Configurations of the AAPO and GPG trainers: TRL's ``GRPOConfig`` plus one field per paper knob.

Each field's help text names the paper and equation it comes from, so ``--help`` on the command line
says the same thing as this file. Defaults are the papers'; extensions beyond the papers are off by
default and say so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from .advantages import PAIRINGS
from .dynamic_sampling import EXHAUSTION_POLICIES as DYNAMIC_SAMPLING_EXHAUSTION
from .dynamic_sampling import METRICS as DYNAMIC_SAMPLING_METRICS
from .rewards import COSINE_LENGTH_UNITS
from .zapo_math import DIFFICULTY_KINDS, ENTROPY_COMBINES, TIME_SCHEDULES, check_zapo_options

CE_LOSS_TYPES = ("aapo", "gpg")
"""Loss types computed by aapo-trl itself: the token-normalised cross-entropy loss of AAPO Eq. 4 / GPG."""

CE_OFF_POLICY_CORRECTIONS = ("importance_weight", "none", "error")

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")  # TRL's; TRL itself refuses another value only at the first loss

CE_LOSS_CLIP_FIELDS = {
    "epsilon_high": "the upper bound of the ratio clip",
    "delta": "the upper bound of the two-sided clip (INTELLECT-2)",
}
"""TRL's clip settings of the clipped-ratio losses, which the CE losses (no clipped ratio) refuse when set."""

ZAPO_STATISTICS_SOURCES = ("generation", "forward")
"""Where ZAPO's DAER statistics come from: passes the step already runs, or ZAPO's own extra forward."""


def trains_on_stale_samples(config: GRPOConfig) -> bool:
    """True when an optimizer step can use completions sampled before an earlier step of the same rollout.

    That is TRL's own test for keeping the sampling policy's log-probs (``old_per_token_logps``): with
    ``num_iterations > 1`` or ``steps_per_generation > gradient_accumulation_steps`` a generation batch outlives
    the optimizer step it was sampled for.
    """
    return config.gradient_accumulation_steps % (config.steps_per_generation * config.num_iterations) != 0


def require_choice(config, name: str, choices) -> None:
    """A field that takes one of a few names: refuse anything else, naming the field and the choices."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _validate_common(config: GRPOConfig) -> None:
    config._validate_robustness()
    config._validate_ce_loss()
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
class GRESOArguments:
    """GRESO pre-rollout filtering (Zheng et al. 2025; ZAPO trains with it), available to every trainer.

    Mixed into each aapo-trl config so that ``greso=True`` works with GRPO, GPG, AAPO and ZAPO alike.
    """

    greso: bool = field(
        default=False,
        metadata={
            "help": "Skip prompts that were zero-variance in recent rollouts before generating for them (GRESO): a "
            "prompt with a run of z zero-variance rollouts is kept with probability max(p^z, 0.01)."
        },
    )
    greso_correct_threshold: float = field(
        default=0.95,
        metadata={"help": "A reward >= this counts as correct when GRESO tells all-correct from no-correct groups."},
    )
    greso_easy_target: float = field(
        default=0.25 / 3, metadata={"help": "Target share of easy (all-correct) zero-variance prompts (GRESO)."}
    )
    greso_hard_target: float = field(
        default=2 * 0.25 / 3, metadata={"help": "Target share of hard (no-correct) zero-variance prompts (GRESO)."}
    )
    greso_p_init: float = field(default=0.5, metadata={"help": "Initial p_easy and p_hard (GRESO)."})
    greso_p_step: float = field(default=0.01, metadata={"help": "Per-step adjustment of p_easy/p_hard (GRESO)."})
    greso_p_min: float = field(default=0.05, metadata={"help": "Lower clamp of p_easy/p_hard (GRESO)."})
    greso_p_max: float = field(default=0.95, metadata={"help": "Upper clamp of p_easy/p_hard (GRESO)."})
    greso_min_keep_probability: float = field(
        default=0.01, metadata={"help": "A prompt is never skipped with probability above 1 - this (GRESO)."}
    )


@dataclass
class DynamicSamplingArguments:
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, Sec. 3.2, Eq. 11; verl's
    ``algorithm.filter_groups``), available to every trainer; off by default (aapo_trl.dynamic_sampling)."""

    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "DAPO's dynamic sampling (Sec. 3.2; verl: algorithm.filter_groups.enable): drop the groups without "
            "signal under dynamic_sampling_metric and generate further rounds of prompts (from a checkpointed stream "
            "over the training data; with greso=True from GRESO's own stream, through its filter) until the "
            "generation batch holds as many groups with signal as configured. Selection first, statistics second "
            "(verl's DAPO loop): every batch-level statistic of the advantage (GPG's alpha, scale_rewards='batch''s "
            "std, ZAPO's q) is computed once, on the trained batch."
        },
    )
    dynamic_sampling_metric: str = field(
        default="reward",
        metadata={
            "help": "What a group needs to be kept: 'reward' (the combined reward spreads by more than "
            "dynamic_sampling_tolerance within the group; DAPO's rule as verl's metric=seq_reward applies it), "
            "'accuracy' (both correct and incorrect answers in the group, DAPO Eq. 11; verl's metric=acc; see "
            "dynamic_sampling_accuracy_reward), or 'final_advantage' (some final advantage of the group, computed "
            "with the group alone as its batch so that the choice never depends on the batch being chosen, exceeds "
            "dynamic_sampling_tolerance: under AAPO or ZAPO only the groups those methods leave at zero are "
            "dropped). Default 'reward'; ZAPOConfig's default is 'final_advantage' and it refuses 'reward' and "
            "'accuracy' while use_daer=True (they drop every zero-variance group before DAER sees it).",
            "choices": list(DYNAMIC_SAMPLING_METRICS),
        },
    )
    dynamic_sampling_max_rounds: int = field(
        default=0,
        metadata={
            "help": "Most generation rounds per generation batch, the first included (verl: "
            "algorithm.filter_groups.max_num_gen_batches); 0 = no limit."
        },
    )
    dynamic_sampling_on_exhaustion: str = field(
        default="error",
        metadata={
            "help": "When dynamic_sampling_max_rounds rounds leave the batch short: 'error' (verl's behaviour) stops "
            "with the step and the kept fraction; 'train_kept' trains on the groups kept so far (the missing places "
            "are groups without signal whose loss mask is zeroed), warns, and counts it in "
            "dynamic_sampling/exhausted.",
            "choices": list(DYNAMIC_SAMPLING_EXHAUSTION),
        },
    )
    dynamic_sampling_tolerance: float = field(
        default=1e-6,
        metadata={
            "help": "A spread (max - min reward, metric 'reward') or final advantage magnitude (metric "
            "'final_advantage') at or below this counts as zero: float noise is no signal (verl tests std > 0)."
        },
    )
    dynamic_sampling_accuracy_reward: str | None = field(
        default=None,
        metadata={
            "help": "metric 'accuracy': the reward function (by its logged name) whose value >= "
            "dynamic_sampling_correct_threshold means a correct answer, e.g. the accuracy reward when a length "
            "penalty is added to it (verl's 'acc' field); default: the combined reward."
        },
    )
    dynamic_sampling_correct_threshold: float = field(
        default=0.95,
        metadata={"help": "metric 'accuracy': a value >= this is a correct answer (as greso_correct_threshold)."},
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        self._validate_dynamic_sampling()

    def _validate_dynamic_sampling(self) -> None:
        if self.dynamic_sampling_metric not in DYNAMIC_SAMPLING_METRICS:
            raise ValueError(
                f"dynamic_sampling_metric must be one of {DYNAMIC_SAMPLING_METRICS}, "
                f"got {self.dynamic_sampling_metric!r}"
            )
        if self.dynamic_sampling_on_exhaustion not in DYNAMIC_SAMPLING_EXHAUSTION:
            raise ValueError(
                f"dynamic_sampling_on_exhaustion must be one of {DYNAMIC_SAMPLING_EXHAUSTION}, "
                f"got {self.dynamic_sampling_on_exhaustion!r}"
            )
        rounds = self.dynamic_sampling_max_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"dynamic_sampling_max_rounds must be a whole number >= 0 (0 = no limit), got {rounds!r}")
        tolerance = self.dynamic_sampling_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
            raise ValueError(f"dynamic_sampling_tolerance must be a finite number >= 0, got {tolerance!r}")
        threshold = self.dynamic_sampling_correct_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"dynamic_sampling_correct_threshold must be a finite number, got {threshold!r}")
        if not self.dynamic_sampling:
            return
        local_rows = self.per_device_train_batch_size * self.steps_per_generation
        if local_rows % self.num_generations:
            raise ValueError(
                f"dynamic_sampling needs whole groups on every process (rows are never moved between processes): "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) x steps_per_generation "
                f"({self.steps_per_generation}) = {local_rows} rows is not a multiple of num_generations "
                f"({self.num_generations}). Change per_device_train_batch_size or steps_per_generation."
            )


UNSCORABLE_POLICIES = ("error", "unscorable")
TRUNCATION_POLICIES = ("score", "unscorable")
EMPTY_COMPLETION_POLICIES = ("score", "unscorable")


def completion_is_unscorable(config, empty: bool, truncated: bool) -> bool:
    """The ``empty_completions`` / ``truncated_completions`` rule for one completion, policy's or reference's alike.

    ``empty``: no token before its EOS (or pad); ``truncated``: cut at ``max_completion_length`` without an EOS. A
    config without these fields (TRL's own ``GRPOConfig``) scores both, as TRL does.
    """
    return (empty and getattr(config, "empty_completions", "score") == "unscorable") or (
        truncated and getattr(config, "truncated_completions", "score") == "unscorable"
    )


@dataclass
class RobustnessArguments:
    """What happens to rows that cannot be scored, in every aapo-trl config."""

    reward_errors: str = field(
        default="error",
        metadata={
            "help": "A reward function that raises on a row: 'error' stops with the function, row index and exception; "
            "'unscorable' makes that row unscorable (None, advantage 0) and counts it in reward_errors/<fn>/frac.",
            "choices": list(UNSCORABLE_POLICIES),
        },
    )
    truncated_completions: str = field(
        default="score",
        metadata={
            "help": "A completion cut at max_completion_length (no EOS): 'score' (default; the papers' and TRL's "
            "behaviour) scores it like any other completion, so an unfinished answer is penalised like a wrong one; "
            "'unscorable' (opt-in) gives it advantage 0 and keeps it out of its group's mean/std. Applied alike to "
            "AAPO's reference completions (online, and ref_truncated of a ref-rollouts cache). Rows every reward "
            "function returned None for are unscorable either way.",
            "choices": list(TRUNCATION_POLICIES),
        },
    )
    empty_completions: str = field(
        default="score",
        metadata={
            "help": "A completion with no token before its EOS (the model ended at once): 'score' (default; TRL's "
            "and both papers' behaviour) hands it to the reward functions like any other completion, so it gets the "
            "reward of no answer (0 for accuracy) and a negative advantage in a group with a right answer, which is "
            "how an immediate EOS is discouraged; 'unscorable' (opt-in, in no paper) gives it advantage 0 and keeps "
            "it out of its group's mean/std. Applied alike to AAPO's reference completions (online, and ref_empty "
            "of a ref-rollouts cache).",
            "choices": list(EMPTY_COMPLETION_POLICIES),
        },
    )

    def _validate_robustness(self) -> None:
        require_choice(self, "reward_errors", UNSCORABLE_POLICIES)
        require_choice(self, "truncated_completions", TRUNCATION_POLICIES)
        require_choice(self, "empty_completions", EMPTY_COMPLETION_POLICIES)


@dataclass
class RewardArguments:
    """Parameters of the named rewards (``reward_funcs: [cosine]``, ``accuracy_zapo``...), in every aapo-trl config.

    A reward named in ``reward_funcs`` is built from these fields (``aapo_trl.rewards.REWARD_SETTINGS``), so a
    recipe or the command line sets them; a reward passed as a function must have the same values. The cosine
    fields are open-r1's / open-rs's script arguments, with open-r1's defaults.
    """

    cosine_max_len: int = field(
        default=1000,
        metadata={"help": "cosine reward: the length (in cosine_length_unit) at which the cosine reaches its long-end "
                  "value; longer completions keep it (progress clipped at 1). open-r1 / open-rs: 1000."},
    )
    cosine_min_value_wrong: float = field(
        default=-1.0,
        metadata={"help": "cosine reward of a wrong answer (or none) of length 0. open-r1: -1.0; open-rs, whose code "
                  "AAPO's authors ran: 0.0."},
    )
    cosine_max_value_wrong: float = field(
        default=-0.5, metadata={"help": "cosine reward of a wrong answer (or none) at cosine_max_len and beyond."}
    )
    cosine_min_value_correct: float = field(
        default=0.5, metadata={"help": "cosine reward of a correct answer at cosine_max_len and beyond."}
    )
    cosine_max_value_correct: float = field(
        default=1.0, metadata={"help": "cosine reward of a correct answer of length 0."}
    )
    cosine_length_unit: str = field(
        default="tokens",
        metadata={"help": "What cosine_max_len counts: 'tokens' (completion tokens) or 'characters' (what open-r1 / "
                  "open-rs measure, len(content)).", "choices": list(COSINE_LENGTH_UNITS)},
    )
    correct_reward: float = field(
        default=1.0, metadata={"help": "accuracy_zapo / final_number_zapo: reward of a correct answer (ZAPO: 1)."}
    )
    incorrect_reward: float = field(
        default=0.1,
        metadata={"help": "accuracy_zapo / final_number_zapo: reward of a wrong but extractable answer (ZAPO: 0.1; "
                  "no answer: 0)."},
    )

    soft_punish_cache: int = field(
        default=4096,
        metadata={"help": "soft_overlong_punishment: the last tokens before max_completion_length over which the "
                  "penalty ramps from 0 to -1 (DAPO Eq. 13, L_cache; the paper: 4096; verl: overlong_buffer.len)."},
    )

    def __post_init__(self):
        self._validate_reward_arguments()
        if hasattr(super(), "__post_init__"):
            super().__post_init__()

    def _validate_reward_arguments(self) -> None:
        length = self.cosine_max_len
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"cosine_max_len must be a positive whole number ({self.cosine_length_unit}), got {length!r}")
        require_choice(self, "cosine_length_unit", COSINE_LENGTH_UNITS)
        for name in ("cosine_min_value_wrong", "cosine_max_value_wrong", "cosine_min_value_correct",
                     "cosine_max_value_correct", "correct_reward", "incorrect_reward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.correct_reward <= self.incorrect_reward:
            raise ValueError(
                f"correct_reward ({self.correct_reward}) must exceed incorrect_reward ({self.incorrect_reward})"
            )
        if getattr(self, "greso", False):
            _check_correctness_threshold(self, "greso_correct_threshold")


def _check_correctness_threshold(config, threshold_field: str) -> None:
    """A correct answer's reward must count as correct and a wrong one's must not (easy/hard groups)."""
    threshold = getattr(config, threshold_field)
    if config.correct_reward < threshold or config.incorrect_reward >= threshold:
        raise ValueError(
            f"correct_reward ({config.correct_reward}) must be >= {threshold_field} ({threshold}) and incorrect_reward "
            f"({config.incorrect_reward}) below it: a reward >= {threshold_field} counts as a correct answer when "
            "groups are classified as all-correct (easy) or no-correct (hard). Change the reward values or the "
            "threshold together."
        )


@dataclass
class CrossEntropyLossArguments:
    """How the CE losses (``loss_type`` ``"aapo"`` / ``"gpg"``) treat stale samples, in every aapo-trl config."""

    ce_off_policy_correction: str = field(
        default="importance_weight",
        metadata={
            "help": "Samples from an older policy reach the CE losses (loss_type 'aapo'/'gpg') when "
            "gradient_accumulation_steps is not a multiple of steps_per_generation * num_iterations (e.g. "
            "num_iterations > 1, or steps_per_generation > gradient_accumulation_steps). AAPO Eq. 4 and GPG are "
            "on-policy gradients (no ratio) and say nothing about such samples. 'importance_weight' (default): each "
            "token's term is weighted by pi/pi_old, detached and unclipped, so the gradient stays the on-policy one "
            "the papers define; on-policy the weight is exactly 1. 'none': no weight (verl's GPG loss with PPO "
            "mini-batches), a gradient biased towards the sampling policy. 'error': refuse such a configuration. "
            "With importance_sampling_level='sequence' (TRL's GSPO setting; opt-in, warned about) the weight is one "
            "per completion, exp(mean over its tokens of log(pi/pi_old)), detached and unclipped, on each of its "
            "tokens. The CE losses have no clipped ratio: TRL's epsilon is unused, and epsilon_high and delta are "
            "refused when set.",
            "choices": list(CE_OFF_POLICY_CORRECTIONS),
        },
    )

    def _validate_ce_loss(self) -> None:
        require_choice(self, "ce_off_policy_correction", CE_OFF_POLICY_CORRECTIONS)
        require_choice(self, "importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
        if self.loss_type not in CE_LOSS_TYPES:
            return
        for name, meaning in CE_LOSS_CLIP_FIELDS.items():
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)} is {meaning} of TRL's clipped-ratio losses, but loss_type="
                    f"{self.loss_type!r} is the CE loss of AAPO Eq. 4 / GPG, which has no clipped ratio (stale samples "
                    f"get the unclipped weight of ce_off_policy_correction). Leave {name} unset (None), or pick a "
                    "TRL loss_type such as 'grpo' or 'dapo'."
                )
        if self.importance_sampling_level == "sequence":
            warnings.warn(
                f"importance_sampling_level='sequence' with loss_type={self.loss_type!r}: the CE loss's importance "
                "weight of a stale completion (ce_off_policy_correction='importance_weight') is one per completion, "
                "TRL's sequence-level ratio exp(mean over its tokens of log(pi/pi_old)) (GSPO's length-normalised "
                "ratio), detached and unclipped, instead of each token's pi/pi_old: no longer the on-policy "
                "gradient. On-policy the weight is 1 either way. The loss still sums per-token terms over the "
                "batch's completion tokens (Eq. 4), so each sequence weighs by its length, not GSPO's per-sequence "
                "objective (TRL gives the same warning for its 'cispo' loss).",
                UserWarning,
                stacklevel=3,
            )
        if self.ce_off_policy_correction == "error" and trains_on_stale_samples(self):
            raise ValueError(
                f"ce_off_policy_correction='error' but loss_type={self.loss_type!r} would train on stale samples: "
                f"num_iterations={self.num_iterations}, steps_per_generation={self.steps_per_generation}, "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} (on-policy needs "
                "gradient_accumulation_steps to be a multiple of steps_per_generation * num_iterations). Change them, "
                "or set ce_off_policy_correction='importance_weight' (or 'none')."
            )


@dataclass
class PromptLengthArguments:
    """``max_prompt_length``, which TRL 1.16 dropped and the papers' TRL 0.16 recipes set, in every aapo-trl config."""

    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the last max_prompt_length tokens of each tokenized prompt (chat template applied), "
            "dropping tokens on the LEFT, as the papers' TRL 0.16 did (prompt_ids[:, -max_prompt_length:]): the end "
            "of the prompt, where the question and the generation prompt are, is what the model answers. The same "
            "truncated ids go to the policy's generation, to AAPO's reference (which samples on the policy's prompt "
            "ids) and to the loss. None (default, TRL 1.16's behaviour): prompts are never cut. With "
            "reference_source='cache', a prompt that would be cut is an error: the cache was sampled on whole prompts."
        },
    )

    def __post_init__(self):
        length = self.max_prompt_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"max_prompt_length must be a positive number of tokens or None, got {length!r}")
        if hasattr(super(), "__post_init__"):
            super().__post_init__()


@dataclass
class GRPOBaselineConfig(
    PromptLengthArguments, CrossEntropyLossArguments, RewardArguments, RobustnessArguments, DynamicSamplingArguments,
    GRESOArguments, GRPOConfig,
):
    """TRL's ``GRPOConfig`` plus the GRESO switch, for the GRPO and GRESO baselines."""

    def __post_init__(self):
        super().__post_init__()
        self._validate_robustness()
        self._validate_ce_loss()


@dataclass
class AAPOConfig(
    PromptLengthArguments, CrossEntropyLossArguments, RewardArguments, RobustnessArguments, DynamicSamplingArguments,
    GRESOArguments, GRPOConfig,
):
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

        > Parameters that control where the reference samples come from

        reference_source (`str`, *optional*, defaults to `"model"`):
            `"model"`: transformers `generate` on a frozen copy of the initial policy (with PEFT: the policy with
            a frozen copy of its initial adapter; adapters off when that adapter is a fresh LoRA, which adds
            nothing). `"vllm_server"`: a second vLLM server that serves the reference weights
            (`trl vllm-serve --model BASE --port 8001`); it never receives weight updates unless `ref_update_steps`
            pushes the policy into it. `"vllm_colocate"`: the policy's colocated vLLM engine (`use_vllm=True,
            vllm_mode="colocate"`) with the reference weights loaded into it for reference generation; the policy
            weights are pushed back before the next policy generation. `"cache"`: the `ref_rewards` column written
            by `aapo-trl ref-rollouts` (see `ref_rollouts_path`).
        reference_generation (`str`, *optional*, defaults to `"auto"`):
            With a PEFT policy and `reference_source="model"` on transformers generation, `"batched"` samples the
            reference's completions in the policy's own `generate` call, one row per prompt row next to the policy's
            (reference rows run the adapters-off base, or the frozen copy of the initial adapter `"ref"`): the same
            weights and sampling settings per row as `"separate"`, which runs a second `generate` call for the
            reference. `"auto"` (the default) is `"batched"` wherever it applies (plain LoRA adapters, unmerged, no
            vLLM, tools, vision inputs, beams or dropout in the base model) and `"separate"` elsewhere; an explicit
            `"batched"` that cannot apply is an error. Either way the reference samples without dropout. The batched
            call's generation batch is twice as tall (twice the KV cache of one call); set `"separate"` where that
            memory matters more than the time (docs/RESULTS.md, section 2).
        reference_vllm_server_base_url (`str`, *optional*):
            Base URL of the reference vLLM server (e.g. `"http://localhost:8001"`); overrides host and port.
        reference_vllm_server_host (`str`, *optional*):
            Host of the reference vLLM server (used with `reference_vllm_server_port`).
        reference_vllm_server_port (`int`, *optional*, defaults to `8001`):
            Port of the reference vLLM server.
        reference_vllm_group_port (`int`, *optional*, defaults to `51217`):
            Port of the NCCL group that pushes the policy into the reference server (`ref_update_steps` only).
        reference_vllm_server_timeout (`float`, *optional*, defaults to `240.0`):
            Seconds to wait for the reference server to come up.
        reference_request_overlap (`bool`, *optional*, defaults to `True`):
            With `reference_source="vllm_server"`: send the reference request as soon as the step's prompts are
            tokenized, before the policy generates, from a background thread, and collect it when the advantages
            need it, so the reference costs `max(0, reference time - policy generation and scoring time)`. Same
            request (prompts, sampling settings), same results. `False`: the sequential path, the request is sent
            after the policy's completions are scored. Read by no other source.
        reference_request_timeout (`float`, *optional*, defaults to `1800.0`):
            With `reference_source="vllm_server"`: seconds the reference server has to answer one reference
            request (from when it is sent; also the read time-out of every HTTP call to it, which is not retried).
            Past it, training stops with an error naming the server, on every process, instead of hanging.
        ref_rollouts_path (`str`, *optional*):
            Output folder of `aapo-trl ref-rollouts`. With `reference_source="cache"`, its `ref_rewards` column is
            attached to the training (and evaluation) rows with the same prompt. Not needed when the training
            dataset already has a `ref_rewards` column.

        > Parameters that control the loss

        loss_type (`str`, *optional*, defaults to `"aapo"`):
            `"aapo"`: the CE loss of AAPO Eq. 4, `-sum_i sum_t A_i log pi(o_i,t) / sum_i |o_i|`, no ratio, no clip,
            no KL. Any TRL loss type (`"grpo"`, `"dapo"`, ...) also works with the augmented advantage.
        ce_off_policy_correction (`str`, *optional*, defaults to `"importance_weight"`):
            Stale samples in the CE loss (`gradient_accumulation_steps` not a multiple of `steps_per_generation *
            num_iterations`, e.g. `num_iterations > 1`): `"importance_weight"` weights each token by the detached,
            unclipped `pi / pi_old` (exactly 1 on-policy), `"none"` trains on them unweighted, `"error"` refuses
            such a configuration. With `importance_sampling_level="sequence"` (opt-in, warned about) the weight is
            TRL's sequence-level ratio, one per completion. The CE loss has no clipped ratio: `epsilon_high` and
            `delta` are refused when set, `epsilon` is unused.
    """

    loss_type: str = field(
        default="aapo",
        metadata={
            "help": "'aapo': the CE loss of AAPO Eq. 4 (sum of A_i * log-prob over tokens, divided by the number of "
            "completion tokens in the batch; no ratio, no clipping, no KL), computed as the per-token term of TRL's "
            "loss so that TRL's additions (entropy bonus, top_entropy_quantile, router aux loss, ...) apply; stale "
            "samples: see ce_off_policy_correction. Any TRL loss_type ('grpo', 'dapo', 'dr_grpo', ...) also works "
            "with the augmented advantage."
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

    REFERENCE_SOURCES = ("model", "vllm_server", "vllm_colocate", "cache")  # not a field: no annotation
    reference_source: str = field(
        default="model",
        metadata={
            "help": "Where AAPO's reference samples come from. 'model': transformers generate on the frozen initial "
            "policy (PEFT: a frozen copy of the initial adapter, or adapters off for a fresh LoRA). 'vllm_server': "
            "a second vLLM server serving the reference "
            "weights (trl vllm-serve --model BASE --port 8001), never updated unless ref_update_steps. "
            "'vllm_colocate': the policy's colocated vLLM engine with the reference weights swapped in (needs "
            "use_vllm=True, vllm_mode='colocate'). 'cache': the ref_rewards column written by aapo-trl ref-rollouts.",
            "choices": list(REFERENCE_SOURCES),
        },
    )
    REFERENCE_GENERATIONS = ("auto", "batched", "separate")  # not a field: no annotation
    reference_generation: str = field(
        default="auto",
        metadata={
            "help": "PEFT policy with reference_source='model': 'batched' samples the reference rows in the policy's "
            "own generate call (reference rows run the adapters-off base or the frozen initial adapter 'ref'; same "
            "weights and sampling settings per row as 'separate'); 'separate' runs a second generate call for the "
            "reference (half the generation batch, hence half its KV cache). 'auto' (the default): 'batched' where "
            "it applies (plain unmerged LoRA, transformers generation, no tools, vision inputs, beams or dropout in the "
            "base model), else 'separate'. An explicit 'batched' that cannot apply is an error. Either way the "
            "reference samples without dropout (the policy keeps TRL's training-mode dropout).",
            "choices": list(REFERENCE_GENERATIONS),
        },
    )
    reference_vllm_server_base_url: str | None = field(
        default=None,
        metadata={
            "help": "Base URL of the reference vLLM server (e.g. http://localhost:8001) for reference_source="
            "'vllm_server'; overrides reference_vllm_server_host/port."
        },
    )
    reference_vllm_server_host: str | None = field(
        default=None,
        metadata={"help": "Host of the reference vLLM server (reference_source='vllm_server'), with its port."},
    )
    reference_vllm_server_port: int = field(
        default=8001, metadata={"help": "Port of the reference vLLM server (reference_source='vllm_server')."}
    )
    reference_vllm_group_port: int = field(
        default=51217,
        metadata={
            "help": "Port of the NCCL group that pushes the policy weights into the reference server; only used "
            "with ref_update_steps (the policy's server uses vllm_group_port)."
        },
    )
    reference_vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Seconds to wait for the reference vLLM server to be up."}
    )
    reference_request_overlap: bool = field(
        default=True,
        metadata={
            "help": "reference_source='vllm_server': send the reference request as soon as the step's prompts are "
            "tokenized (before the policy generates), from a background thread, and collect it when the advantages "
            "need it; the reference then costs max(0, reference time - policy generation and scoring time). Same "
            "request and results. False: send it after the policy is scored (sequential)."
        },
    )
    reference_request_timeout: float = field(
        default=1800.0,
        metadata={
            "help": "reference_source='vllm_server': seconds the reference server has to answer a reference request "
            "(from when it is sent; also the read time-out of each HTTP call to it, not retried). Past it, training "
            "stops with an error naming the server instead of hanging."
        },
    )
    ref_rollouts_path: str | None = field(
        default=None,
        metadata={
            "help": "Output of aapo-trl ref-rollouts (reference_source='cache'): its ref_rewards column is attached to "
            "the training rows with the same prompt. Not needed when the dataset already has a ref_rewards column."
        },
    )

    @property
    def reference_server_url(self) -> str | None:
        """The reference vLLM server's base URL, from ``reference_vllm_server_base_url`` or host and port."""
        if self.reference_vllm_server_base_url:
            return self.reference_vllm_server_base_url.rstrip("/")
        if self.reference_vllm_server_host:
            return f"http://{self.reference_vllm_server_host}:{self.reference_vllm_server_port}"
        return None

    def _validate_reference_source(self) -> None:
        """Fail at configuration time on reference settings that cannot work together."""
        from urllib.parse import urlparse

        source, url = self.reference_source, self.reference_server_url
        require_choice(self, "reference_source", self.REFERENCE_SOURCES)
        if source != "vllm_server" and url is not None:
            raise ValueError(
                f"A reference vLLM server is configured ({url}) but reference_source={source!r}: set "
                "reference_source='vllm_server' to sample the reference there, or drop reference_vllm_server_*."
            )
        if source != "cache" and self.ref_rollouts_path is not None:
            raise ValueError(
                f"ref_rollouts_path is set but reference_source={source!r}: set reference_source='cache' to train on "
                "the precomputed reference rewards, or drop ref_rollouts_path."
            )
        if source == "vllm_server":
            if url is None:
                raise ValueError(
                    "reference_source='vllm_server' needs the reference server's address: set "
                    "reference_vllm_server_base_url (e.g. http://localhost:8001) or reference_vllm_server_host and "
                    "reference_vllm_server_port, after starting it with `trl vllm-serve --model <BASE> --port 8001`."
                )
            if self.use_vllm and self.vllm_mode == "server":
                policy_url = self.vllm_server_base_url or f"http://{self.vllm_server_host}:{self.vllm_server_port}"

                def where(address):
                    parsed = urlparse(address)
                    local = parsed.hostname in ("localhost", "127.0.0.1", "0.0.0.0", "::1")
                    return ("localhost" if local else parsed.hostname, parsed.port, parsed.path.rstrip("/"))

                if where(policy_url) == where(url):
                    raise ValueError(
                        f"The reference server ({url}) is the policy's vLLM server ({policy_url}): it holds the "
                        "policy's weights, so the margin would compare the policy with itself. Serve the reference "
                        "model on a second server (another port) and point reference_vllm_server_base_url at it."
                    )
                if self.ref_update_steps is not None and self.reference_vllm_group_port == self.vllm_group_port:
                    raise ValueError(
                        f"reference_vllm_group_port and vllm_group_port are both {self.vllm_group_port}: the policy "
                        "and reference weight-transfer groups need different ports."
                    )
        if source == "vllm_colocate" and not (self.use_vllm and self.vllm_mode == "colocate"):
            raise ValueError(
                "reference_source='vllm_colocate' swaps the reference weights into the policy's colocated vLLM "
                f"engine, so it needs use_vllm=True and vllm_mode='colocate' (got use_vllm={self.use_vllm}, "
                f"vllm_mode={self.vllm_mode!r}). With a vLLM server for the policy, use reference_source="
                "'vllm_server' and a second server for the reference."
            )
        require_choice(self, "reference_generation", self.REFERENCE_GENERATIONS)
        if self.reference_generation == "batched" and (source != "model" or self.use_vllm):
            raise ValueError(
                "reference_generation='batched' samples the reference in the PEFT policy's own transformers generate "
                f"call, so it needs reference_source='model' and use_vllm=False (got reference_source={source!r}, "
                f"use_vllm={self.use_vllm}). Use reference_generation='auto' or 'separate'."
            )
        if not isinstance(self.reference_request_overlap, bool):
            raise ValueError(
                f"reference_request_overlap must be True or False, got {self.reference_request_overlap!r}"
            )
        timeout = self.reference_request_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"reference_request_timeout must be a positive number of seconds, got {timeout!r}")
        if source == "cache" and self.ref_update_steps is not None:
            raise ValueError(
                "ref_update_steps cannot be used with reference_source='cache': the cache holds rewards of the initial "
                "reference model, sampled once; a reference that follows the policy must be sampled online."
            )

    def __post_init__(self):
        super().__post_init__()
        _validate_common(self)
        self._validate_reference_source()
        require_choice(self, "margin_pairing", PAIRINGS)
        if self.margin_clip and self.margin_clip_low > self.margin_clip_high:
            raise ValueError(
                f"margin_clip_low ({self.margin_clip_low}) must not exceed margin_clip_high ({self.margin_clip_high})"
            )
        if self.ref_update_steps is not None and self.ref_update_steps < 1:
            raise ValueError(f"ref_update_steps must be a positive number of steps or None, got {self.ref_update_steps}")


@dataclass
class GPGConfig(
    PromptLengthArguments, CrossEntropyLossArguments, RewardArguments, RobustnessArguments, DynamicSamplingArguments,
    GRESOArguments, GRPOConfig,
):
    r"""
    Configuration of [`GPGTrainer`], the GPG baseline (Chu et al. 2025) on AAPO's CE-loss code path.

    Parameters:
        loss_type (`str`, *optional*, defaults to `"gpg"`):
            `"gpg"`: the same CE loss as AAPO Eq. 4, `-sum_i sum_t A_i log pi / tokens`, with GPG's corrected
            advantage `A_i = alpha (r_i - mean) / F_norm`, `alpha = B / (B - M)`. Any TRL loss type also works.
        ce_off_policy_correction (`str`, *optional*, defaults to `"importance_weight"`):
            Stale samples in the CE loss (see [`AAPOConfig`]): detached, unclipped `pi / pi_old` per token (per
            completion with `importance_sampling_level="sequence"`); `epsilon_high` and `delta` are refused.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            `F_norm`: `"group"` divides by the group std + 1e-4, `"none"` by 1.
    """

    loss_type: str = field(
        default="gpg",
        metadata={
            "help": "'gpg': the CE loss shared with AAPO (sum of A_i * log-prob over tokens / completion tokens in the "
            "batch) with GPG's corrected advantage; stale samples: see ce_off_policy_correction. Any TRL loss_type "
            "also works."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _validate_common(self)
        if self.scale_rewards not in ("group", "none"):
            raise ValueError(f"GPG supports scale_rewards 'group' or 'none', got {self.scale_rewards!r}")


@dataclass
class ZAPOConfig(
    PromptLengthArguments, CrossEntropyLossArguments, RewardArguments, RobustnessArguments, DynamicSamplingArguments,
    GRESOArguments, GRPOConfig,
):
    r"""
    Configuration of [`ZAPOTrainer`]: every [`trl.GRPOConfig`] field plus the ZAPO knobs below. Defaults are the
    paper's (ZAPO, section 4 and appendix B). The TDAR coefficient is named `tdar_beta` because `beta` is TRL's KL
    coefficient (0 here, as in the paper).

    Parameters:
        > Parameters that control DAER, the entropy advantage of zero-advantage samples (Eqs. 8-10)

        alpha (`float`, *optional*, defaults to `2.0`):
            Weight of hard groups in q = n_easy / (n_easy + alpha n_hard) (Eq. 10). The paper uses 2 for
            Qwen2.5-Math-1.5B and 5 for DeepSeek-R1-Distill-Qwen-1.5B and Qwen2.5-Math-7B.
        use_daer (`bool`, defaults to `True`): `False` is the "w/o DAER" ablation (zero-advantage rows stay 0).
        use_semantic_entropy / use_token_entropy (`bool`, default `True`): the "w/o SE" / "w/o TE" ablations.
        entropy_combine (`str`, defaults to `"mean"`): `"mean"`: E = (SE + TE) / 2, r' = log(1 + E) I (paper);
            `"sum_of_logs"` (extension): r' = (log(1 + SE) + log(1 + TE)) I.
        daer_time_schedule (`str`, defaults to `"linear_up"`): `"linear_up"` scales DAER by t / T (paper);
            `"none"` (extension) uses 1. T is the run's total optimizer steps: `max_steps`, else what `train()`
            computes from the training set's length, batch, gradient accumulation, `steps_per_generation`,
            `num_iterations` and `num_train_epochs`. `evaluate()` before `train()` uses that same planned total;
            a training set without a length (an `IterableDataset`) needs `max_steps`.

        > Parameters that control TDAR, difficulty reshaping of non-zero advantages (Eqs. 11-13)

        tdar_beta (`float`, *optional*, defaults to `5.0`): beta of Eq. 12.
        use_tdar (`bool`, defaults to `True`): `False` is the "w/o TDAR" ablation.
        difficulty (`str`, defaults to `"reward"`): d(x) = 1 - mean reward (paper) or `"accuracy"`: 1 - fraction
            correct.

        dynamic_sampling_metric (`str`, defaults to `"final_advantage"`): with `dynamic_sampling=True`, a group is
            kept when its final advantage (DAER included) is non-zero, so DAER's zero-variance groups are trained;
            `"reward"` / `"accuracy"` (the other configs' choices) are refused while `use_daer=True`.

        > Parameters that control rewards and the semantic-entropy clustering

        correct_reward / incorrect_reward (`float`, defaults `1.0` / `0.1`): the values of the `accuracy_zapo` /
            `final_number_zapo` rewards named in `reward_funcs` (fields of [`RewardArguments`], in every config).
        correct_threshold (`float`, defaults to `0.95`): a reward >= this is "correct" (easy/hard classification);
            `correct_reward` must reach it and `incorrect_reward` must stay below it.
        kmeans_max_clusters (`int`, defaults to `4`), kmeans_min_silhouette (`float`, `0.1`),
        kmeans_identical_distance (`float`, `0.02`): the K selection rule of the semantic entropy.
        entropy_forward_batch_size (`int`, *optional*): micro-batch of the extra no-grad forward pass (default: the
            per-device train batch size).
        zapo_statistics_source (`str`, defaults to `"generation"`): where DAER's per-response statistics under
            pi_old (mean log-prob, mean token entropy, mean-pooled final hidden state) come from. `"generation"`:
            from passes the step runs anyway -- TRL's no-grad old-log-prob forward when it runs
            (`num_iterations > 1`, `steps_per_generation` beyond the gradient accumulation, vLLM's
            importance-sampling correction), else hooks on transformers' `generate` while the policy samples, the
            hidden state of the token sampled last coming from one more backbone step on `generate`'s KV cache:
            the same statistics as the forward pass, every completion token included. Rows it cannot collect
            take ZAPO's forward pass: the whole round under vLLM without the correction, continuous batching,
            tools, a custom `rollout_func`, and `generation_kwargs` that expand or reorder the rows of a decoding
            step (beams, `num_return_sequences > 1`, any decoding mode but sampling and greedy; logged once);
            under FSDP or DeepSpeed ZeRO-3 (no extra backbone step on sharded parameters) the rows whose last token
            was sampled at the last decoding step; and any round whose recorded steps do not match the returned
            rows one to one. `zapo/stats_forward_frac` logs the share of rows that took the forward pass.
            `"forward"`: always ZAPO's own extra no-grad forward (the reference implementation).
    """

    loss_type: str = field(
        default="grpo",
        metadata={"help": "TRL loss type; ZAPO uses the GRPO clipped surrogate (paper Eq. 1), epsilon 0.2, no KL."},
    )
    dynamic_sampling_metric: str = field(
        default="final_advantage",
        metadata={
            "help": "dynamic_sampling=True: what a group needs to be kept. ZAPO's default 'final_advantage' keeps the "
            "groups whose final advantage (DAER included), computed with the group alone as its batch, exceeds "
            "dynamic_sampling_tolerance, so the zero-variance groups DAER rewards are trained (ALGORITHMS.md "
            "section 5). 'reward' and 'accuracy' drop every zero-variance group before DAER sees it: refused while "
            "use_daer=True (allowed for the 'w/o DAER' ablation).",
            "choices": list(DYNAMIC_SAMPLING_METRICS),
        },
    )
    alpha: float = field(
        default=2.0,
        metadata={"help": "DAER: q = n_easy / (n_easy + alpha * n_hard) (ZAPO Eq. 10). Paper: 2 for Qwen2.5-Math-1.5B, "
                  "5 for DeepSeek-R1-Distill-Qwen-1.5B and Qwen2.5-Math-7B."},
    )
    tdar_beta: float = field(
        default=5.0, metadata={"help": "TDAR: A * (1 + sigmoid(beta * t/T * (d - 0.5))) (ZAPO Eq. 12); 5 in the paper."}
    )
    correct_threshold: float = field(
        default=0.95, metadata={"help": "A reward >= this counts as correct (easy/hard groups, accuracy difficulty)."}
    )
    difficulty: str = field(
        default="reward",
        metadata={"help": "TDAR difficulty d(x): 'reward' = 1 - mean reward (paper), 'accuracy' = 1 - share correct.",
                  "choices": list(DIFFICULTY_KINDS)},
    )
    use_daer: bool = field(default=True, metadata={"help": "DAER on zero-advantage samples (False: 'w/o DAER')."})
    use_tdar: bool = field(default=True, metadata={"help": "TDAR on non-zero advantages (False: 'w/o TDAR')."})
    use_semantic_entropy: bool = field(default=True, metadata={"help": "SE term of DAER (False: 'w/o SE')."})
    use_token_entropy: bool = field(default=True, metadata={"help": "TE term of DAER (False: 'w/o TE')."})
    entropy_combine: str = field(
        default="mean",
        metadata={"help": "'mean': r' = log(1 + (SE+TE)/2) (paper); 'sum_of_logs' (extension): log(1+SE) + log(1+TE).",
                  "choices": list(ENTROPY_COMBINES)},
    )
    daer_time_schedule: str = field(
        default="linear_up",
        metadata={"help": "'linear_up': DAER scaled by t/T (paper); 'none' (extension): no time factor. T: max_steps, "
                  "else the total train() plans from the dataset, batch and epochs (evaluate() uses it too).",
                  "choices": list(TIME_SCHEDULES)},
    )
    kmeans_max_clusters: int = field(default=4, metadata={"help": "Largest K tried for the semantic entropy."})
    kmeans_min_silhouette: float = field(
        default=0.1, metadata={"help": "Below this best silhouette score, the group is one cluster (K = 1)."}
    )
    kmeans_identical_distance: float = field(
        default=0.02, metadata={"help": "All pairwise cosine distances below this: one cluster (K = 1)."}
    )
    entropy_forward_batch_size: int | None = field(
        default=None,
        metadata={"help": "Micro-batch of the extra no-grad forward pass (default: per_device_train_batch_size)."},
    )
    zapo_statistics_source: str = field(
        default="generation",
        metadata={"help": "DAER's statistics under pi_old: 'generation' = from passes the step already runs (TRL's "
                  "old-log-prob forward when it runs, else hooks on transformers' generate, the token sampled last "
                  "fed through one more backbone step on generate's cache: the forward pass's values), falling "
                  "back to ZAPO's extra forward for rows it cannot collect (vLLM without the importance-sampling "
                  "correction, tools, rollout_func, beams or num_return_sequences > 1 or a decoding mode other than "
                  "sampling/greedy in generation_kwargs, the rows ending at the last step under FSDP/ZeRO-3; "
                  "zapo/stats_forward_frac logs the share); 'forward' = always ZAPO's own extra no-grad forward pass "
                  "(the reference implementation).",
                  "choices": list(ZAPO_STATISTICS_SOURCES)},
    )

    def __post_init__(self):
        super().__post_init__()
        _validate_common(self)
        check_zapo_options(
            alpha=self.alpha,
            beta=self.tdar_beta,
            entropy_combine=self.entropy_combine,
            time_schedule=self.daer_time_schedule,
            difficulty_kind=self.difficulty,
            use_semantic_entropy=self.use_semantic_entropy,
            use_token_entropy=self.use_token_entropy,
            use_daer=self.use_daer,
        )
        if self.kmeans_max_clusters < 1:
            raise ValueError(f"kmeans_max_clusters must be >= 1, got {self.kmeans_max_clusters}")
        require_choice(self, "zapo_statistics_source", ZAPO_STATISTICS_SOURCES)
        _check_correctness_threshold(self, "correct_threshold")
        if self.dynamic_sampling and self.use_daer and self.dynamic_sampling_metric != "final_advantage":
            raise ValueError(
                f"dynamic_sampling_metric={self.dynamic_sampling_metric!r} with use_daer=True: that metric drops every "
                "zero-variance group before DAER, which exists to train them, sees it (and their entropies would "
                "still be paid for). Use dynamic_sampling_metric='final_advantage' (ZAPO's default), or "
                "use_daer=False for the 'w/o DAER' ablation."
            )
