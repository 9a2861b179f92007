"""ZAPOTrainer: entropy advantages for zero-advantage samples (DAER) and difficulty reshaping (TDAR).

The maths is in :mod:`aapo_trl.zapo_math` and :mod:`aapo_trl.entropy`; this file only gathers what
they need. DAER needs, for the rows of zero-advantage groups only, three things under pi_old: the
per-token log-probs, the per-token entropies and the mean-pooled final-layer hidden states of the
completion tokens. Where they come from (``zapo_statistics_source``):

* ``"generation"`` (default): from a pass the step runs anyway, recorded for every row of the generation
  round before the rewards say which rows need them. When TRL runs its no-grad old-log-prob forward over
  the completions (stale samples, vLLM's importance-sampling correction), that pass also computes the
  entropies and a backbone hook pools the hidden states. Otherwise, on transformers' ``generate``, forward
  hooks on the policy read each decoding step's logits (log-prob of the sampled token and entropy under
  ``softmax(logits / temperature)``, as TRL's training path scores them) and the hidden state of each
  token fed back (``_GenerationRecorder``). That needs each decoding step to run exactly the rows
  ``generate`` returns, in their order: plain sampling or greedy decoding, one sequence per prompt row. Beam
  search, several sequences per row, contrastive search, assisted generation, ... expand or reorder the rows
  (:func:`generation_statistics_unsupported`), so their rounds take the forward pass (logged once, and
  ``zapo/stats_forward_frac`` says so each step); a recording whose steps do not cover the returned rows one
  to one is discarded the same way.
* ``"forward"``, and the rows the first could not collect: ZAPO's own no-grad forward over those rows,
  through TRL's fused LM head (log-probs and entropies without materialising logits) with a forward hook
  on the backbone pooling the hidden states during the same pass.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode
from transformers.trainer_utils import has_length
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models.utils import disable_gradient_checkpointing

from ..configs import ZAPOConfig, trains_on_stale_samples
from ..devices import run_on_cpu
from ..dynamic_sampling import GroupStatistics
from ..entropy import (
    generation_sequence_statistics,
    group_semantic_entropies,
    mean_pool_completion_states,
    sequence_mean,
    temperature_scaled_token_statistics,
)
from ..zapo_math import classify_zero_advantage_groups, zapo_advantages
from .base import AdvantageTrainerMixin, ScoredBatch

logger = logging.getLogger(__name__)

# the decoding loops that run one forward per new token over exactly the rows they return, never reordering them
ROW_PRESERVING_GENERATION_MODES = (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH)


@dataclass
class CollectedStatistics:
    """DAER's statistics of this process's rows of one generation round, taken from a pass the step ran anyway."""

    seq_logps: torch.Tensor  # (B,) mean completion log-prob
    token_entropy: torch.Tensor  # (B,) mean token entropy
    embeddings: torch.Tensor  # (B, D) L2-normalised mean final hidden state
    lengths: torch.Tensor  # (B,) completion tokens the statistics cover
    available: torch.Tensor  # (B,) bool: False where the rows must go through the forward pass
    source: str  # "generation" or "old_logps_forward"


# generate's name for the KV cache in the model's keyword arguments: ``past_key_values`` up to transformers 5.23,
# ``cache`` from 5.24 (whose forward takes no other; an unknown keyword would be swallowed by ``**kwargs``)
KV_CACHE_ARGUMENTS = ("cache", "past_key_values")


def generation_statistics_unsupported(generation_config: GenerationConfig | None) -> str | None:
    """Why hooks on ``generate`` with this configuration cannot give each returned row its statistics (None: they can).

    The recorder reads one decoding step per new token over the very rows ``generate`` returns. Beams (the rows
    of a step are the beams, reordered at every step and reduced to the best ones at the end), several sequences
    per prompt row, and the other decoding loops (contrastive search, assisted generation, DoLa, ...) break that.
    """
    if generation_config is None:
        return None
    if (generation_config.num_beams or 1) > 1:
        return f"beam search (num_beams={generation_config.num_beams}) expands and reorders the rows at every step"
    if (generation_config.num_return_sequences or 1) > 1:
        return (f"num_return_sequences={generation_config.num_return_sequences} expands each prompt row into several "
                "sequences")
    mode = generation_config.get_generation_mode()
    if mode not in ROW_PRESERVING_GENERATION_MODES:
        return f"the generation mode {mode.value} does not run one decoding step per new token over the returned rows"
    return None


def _backbone_of(model):
    """The policy's causal LM (under any PEFT wrapper) and its backbone (whose output is the final hidden state)."""
    if is_peft_model(model):
        model = model.get_base_model()
    return model, model.base_model


class _GenerationRecorder:
    """Forward hooks that record ZAPO's per-token statistics while transformers' ``generate`` samples.

    ``generate`` runs the model once per decoding step: the prefill (step 0) and then one forward per new
    token, whose input is the token sampled at the step before. At step ``s`` the causal LM's logits give the
    distribution of completion token ``s``: its entropy is recorded at once, its log-probs are kept until step
    ``s + 1`` feeds the sampled token back (the token is only known then), and the backbone's output at that
    step is the final hidden state of token ``s``. ``generate`` never feeds back the token it sampled last:
    its log-prob is read from the returned completion, and its hidden state comes from one more backbone step
    on ``generate``'s own KV cache (``finish(feed_last_token=True)``; one decoding step without the LM head).
    Memory: two floats and one hidden state per token, plus one step's log-probs.
    """

    def __init__(self, model, temperature: float):
        self.temperature = temperature
        self.steps = 0
        self.consistent = True  # False: a forward that is not one decoding step (chunked prefill, synced GPUs ...)
        self.token_logps: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []
        self.fed_tokens: list[torch.Tensor] = []
        self.hidden_states: list[torch.Tensor] = []
        self._pending_log_probs: torch.Tensor | None = None
        self._last_hidden: torch.Tensor | None = None
        self._last_step_inputs: dict | None = None  # the last step's cache, mask and positions, to feed one more token
        causal_lm, backbone = _backbone_of(model)
        self._backbone = backbone
        self.hidden_size = causal_lm.config.get_text_config().hidden_size
        self._handles = [
            backbone.register_forward_hook(self._on_backbone),
            causal_lm.register_forward_hook(self._on_step, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _on_backbone(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self._last_hidden = hidden[:, -1].detach()

    def _on_step(self, module, args, kwargs, output) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if input_ids is None or logits is None or self._last_hidden is None:
            self.consistent = False
            return
        if self.steps > 0:
            if input_ids.size(1) != 1:
                self.consistent = False
                return
            token = input_ids[:, -1]
            self.token_logps.append(self._pending_log_probs.gather(1, token.unsqueeze(1)).squeeze(1))
            self.fed_tokens.append(token)
            self.hidden_states.append(self._last_hidden)
        self._pending_log_probs, entropy = temperature_scaled_token_statistics(logits[:, -1], self.temperature)
        self.entropies.append(entropy)
        self._last_hidden = None
        self._last_step_inputs = {name: kwargs.get(name) for name in ("attention_mask", "position_ids")}
        for cache_argument in KV_CACHE_ARGUMENTS:
            if kwargs.get(cache_argument) is not None:
                self._last_step_inputs["cache"] = (cache_argument, kwargs[cache_argument])
        self.steps += 1

    def _hidden_of_last_token(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Final hidden state of ``tokens`` (B,), fed as the next step after ``generate``'s last, on its KV cache.

        ``None`` when the last step's inputs are not the plain ones this continues (a cache, 2-D position ids and
        a 2-D attention mask or none, which ``generate`` passes when no prompt is padded): those rows then go
        through the forward pass.
        """
        inputs, self._last_step_inputs = self._last_step_inputs, None
        if inputs is None or "cache" not in inputs or inputs["position_ids"] is None:
            return None
        mask, positions = inputs["attention_mask"], inputs["position_ids"]
        if positions.dim() != 2 or (mask is not None and mask.dim() != 2):
            return None
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], dim=1)
        output = self._backbone(
            input_ids=tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=positions[:, -1:] + 1,
            use_cache=True,
            **dict([inputs["cache"]]),  # under the name generate passed it (the model's forward takes only that one)
        )
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        return hidden[:, -1].detach()

    def finish(
        self, completion_ids: list[list[int]], pad_token_id: int, feed_last_token: bool
    ) -> CollectedStatistics | None:
        """The statistics of the ``completion_ids`` ``generate`` returned (each cut after its first EOS).

        ``feed_last_token``: run the one backbone step that gives the hidden state of the token sampled last (it
        must run where a forward may: not under sharded parameters, whose gathering is collective). ``None`` when
        the recorded steps are not exactly one per generated token (the whole round then goes through the
        forward pass); rows whose fed-back tokens differ from their completion, or whose last token's hidden
        state is unknown, are marked unavailable (the forward pass computes them).
        """
        if not completion_ids or self._pending_log_probs is None:
            return None
        device = self._pending_log_probs.device
        lengths = torch.tensor([len(ids) for ids in completion_ids], device=device)
        steps = self.steps
        if not self.consistent or steps != int(lengths.max()):
            return None
        rows = len(completion_ids)
        if self._pending_log_probs.size(0) != rows or any(step.size(0) != rows for step in self.entropies):
            return None  # the steps ran over other rows than those returned (beams, several sequences per row)
        tokens = torch.full((len(completion_ids), steps), pad_token_id, dtype=torch.long, device=device)
        for row, ids in enumerate(completion_ids):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        last_logps = self._pending_log_probs.gather(1, tokens[:, -1:]).squeeze(1)
        self._pending_log_probs = None
        token_logps = torch.stack([*self.token_logps, last_logps], dim=1)
        entropies = torch.stack(self.entropies, dim=1)
        hidden_states, fed_tokens = list(self.hidden_states), list(self.fed_tokens)
        last_hidden = self._hidden_of_last_token(tokens[:, -1]) if feed_last_token else None
        if last_hidden is not None:
            hidden_states.append(last_hidden)
            fed_tokens.append(tokens[:, -1])
        if hidden_states:
            hidden = torch.stack(hidden_states, dim=1)
            fed = torch.stack(fed_tokens, dim=1)
        else:  # a single step and no last feed: no hidden state at all
            hidden = token_logps.new_empty((len(completion_ids), 0, self.hidden_size))
            fed = tokens[:, :0]
        fed_mask = torch.arange(fed.size(1), device=device).unsqueeze(0) < lengths.unsqueeze(1)
        matches = ((fed == tokens[:, : fed.size(1)]) | ~fed_mask).all(dim=1)
        seq_logps, token_entropy, embeddings, pooled = generation_sequence_statistics(
            token_logps, entropies, hidden, lengths
        )
        return CollectedStatistics(
            seq_logps, token_entropy, embeddings, lengths, available=matches & (pooled == lengths), source="generation"
        )


class ZAPOTrainer(AdvantageTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with ZAPO's advantage: TDAR on non-zero advantages, DAER on zero-advantage rows.

    Takes the same arguments as ``GRPOTrainer``; ``reward_funcs`` may name functions of
    :mod:`aapo_trl.rewards` (the paper's reward is ``"accuracy_zapo"``: 1 right, 0.1 wrong, 0 no answer).
    """

    _tag_names = ["trl", "grpo", "zapo"]
    _name = "ZAPO"
    _planned_total_steps: int | None = None
    _statistics_capture: str | None = None  # the pass of this round that records DAER's statistics, until it has
    _collected_statistics: CollectedStatistics | None = None  # what it recorded, for this round's advantages
    _logged_generation_fallback = False  # the generation config's reason to take the forward pass, said once

    def __init__(self, model, reward_funcs=None, args: ZAPOConfig | None = None, *more_args, **kwargs):
        if args is None:
            args = ZAPOConfig(output_dir="zapo-output")
        if not isinstance(args, ZAPOConfig):
            raise TypeError(f"ZAPOTrainer needs a ZAPOConfig, got {type(args).__name__}")
        train_dataset = kwargs.get("train_dataset")
        if args.max_steps is None or args.max_steps <= 0:
            if train_dataset is not None and not hasattr(train_dataset, "__len__"):
                raise ValueError(
                    "ZAPO scales DAER and TDAR by t / T and needs the total number of training steps T, but "
                    "max_steps is not set and the training dataset has no length (an IterableDataset). "
                    "Set max_steps (the paper trains for 1000 steps)."
                )
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)

    # ---- time -----------------------------------------------------------------------------------------

    def total_steps(self) -> int:
        """T of the paper: the run's total optimizer steps.

        During training, the Trainer's value (``state.max_steps``). Before ``train()`` has started (``evaluate()``
        first), the total the run plans: ``max_steps`` when set, else what ``train()`` will compute from the
        training set's length, batch, gradient accumulation, ``steps_per_generation``, ``num_iterations`` and
        epochs -- Trainer's own ``set_initial_training_values`` on the training DataLoader, the very call
        ``train()`` makes, so evaluation and training use the same T.
        """
        if self.state.max_steps and self.state.max_steps > 0:
            return int(self.state.max_steps)
        if self.args.max_steps is not None and self.args.max_steps > 0:
            return int(self.args.max_steps)
        if self.train_dataset is None or not has_length(self.train_dataset):
            raise ValueError(
                "ZAPO needs the total number of training steps T (t / T scales DAER and TDAR): set max_steps, "
                "or give the trainer a training dataset with a length so that the Trainer can compute it."
            )
        if self._planned_total_steps is None:
            *_, max_steps = self.set_initial_training_values(self.args, self.get_train_dataloader())
            self._planned_total_steps = int(max_steps)
        return self._planned_total_steps

    def current_step(self) -> int:
        """t of the paper: the optimizer step being computed, counted from 1 (so t / T reaches 1 at the end)."""
        return self.state.global_step + 1

    # ---- advantage --------------------------------------------------------------------------------------

    def group_statistics(self, rewards, scored: ScoredBatch, output, num_generations, mode):
        """DAER's entropies (SE and K per group, TE per row; NaN where not computed) of the zero-advantage groups."""
        easy, hard = classify_zero_advantage_groups(rewards, num_generations, self.args.correct_threshold)
        se = torch.full((easy.numel(),), float("nan"), device=rewards.device)
        te = torch.full_like(rewards, float("nan"))
        k = se.clone()
        needs_entropy = easy | hard
        if self.args.use_daer and bool(needs_entropy.any()):
            se, te, k = self._entropies(scored, output, needs_entropy, num_generations, self.current_step())
        return GroupStatistics(rows={"te": te}, groups={"se": se, "k": k})

    def batch_advantages(self, rewards, statistics: GroupStatistics, num_generations, mode):
        """ZAPO's advantage of a batch: q (n_easy, n_hard) is this batch's."""
        args = self.args
        step, total = self.current_step(), self.total_steps()
        easy, hard = classify_zero_advantage_groups(rewards, num_generations, args.correct_threshold)
        metrics = self._metrics[mode]
        metrics["zapo/easy_groups"].append(float(easy.sum()))
        metrics["zapo/hard_groups"].append(float(hard.sum()))
        se, te = statistics.groups["se"], statistics.rows["te"]
        if args.use_daer and bool((easy | hard).any()):
            metrics["zapo/se_mean"].append(_nanmean(se))
            metrics["zapo/te_mean"].append(_nanmean(te))
            metrics["zapo/k_mean"].append(_nanmean(statistics.groups["k"]))
        result = zapo_advantages(
            rewards, num_generations, se_per_group=se, te_per_row=te, step=step, total_steps=total,
            **self._zapo_kwargs(),
        )
        zero_rows = (result.easy | result.hard).repeat_interleave(num_generations)
        nonzero_rows = result.grpo_advantages.abs() > 1e-6
        if bool(zero_rows.any()):
            metrics["zapo/daer_adv_abs_mean"].append(result.daer[zero_rows].abs().mean().item())
        if bool(nonzero_rows.any()):
            metrics["zapo/tdar_multiplier_mean"].append(result.tdar_multiplier[nonzero_rows].mean().item())
        self._last_zapo = result
        return result.advantages

    def _zapo_kwargs(self) -> dict:
        args = self.args
        return dict(
            alpha=args.alpha,
            beta=args.tdar_beta,
            correct_threshold=args.correct_threshold,
            difficulty_kind=args.difficulty,
            use_daer=args.use_daer,
            use_tdar=args.use_tdar,
            entropy_combine=args.entropy_combine,
            use_semantic_entropy=args.use_semantic_entropy,
            use_token_entropy=args.use_token_entropy,
            time_schedule=args.daer_time_schedule,
            scale=self.scale_rewards,
        )

    # ---- where DAER's statistics come from (zapo_statistics_source) ----------------------------------------

    @contextmanager
    def _generation_round(self):
        """One generation round; its statistics are recorded by a pass it runs anyway and used by its advantages."""
        self._statistics_capture = self._statistics_capture_plan()
        self._collected_statistics = None
        try:
            with super()._generation_round():
                yield
        finally:
            self._statistics_capture = None
            self._collected_statistics = None

    def _statistics_capture_plan(self) -> str | None:
        """``"old_logps_forward"``, ``"generation"`` or ``None`` (ZAPO's own forward pass computes them)."""
        if self.args.zapo_statistics_source == "forward" or not self.args.use_daer:
            return None
        # TRL 1.16.0 runs the no-grad old-log-prob forward over the completions exactly on this condition
        # (``_generate_and_score_completions``), before the reference log-probs.
        if trains_on_stale_samples(self.args) or (self.use_vllm and self.vllm_importance_sampling_correction):
            return "old_logps_forward"
        if self.use_vllm or self.use_transformers_continuous_batching or self.tools or self.rollout_func is not None:
            return None  # no hook into the sampling loop, or more than one generation per completion
        reason = generation_statistics_unsupported(getattr(self, "generation_config", None))
        if reason is not None:
            if not self._logged_generation_fallback:
                logger.warning(
                    "zapo_statistics_source='generation': %s, so DAER's statistics come from ZAPO's own no-grad "
                    "forward pass over the zero-advantage groups (zapo/stats_forward_frac).", reason
                )
                self._logged_generation_fallback = True
            return None
        return "generation"

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        if self._statistics_capture != "generation":
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self._statistics_capture = None  # one sampling call per round
        recorder = _GenerationRecorder(self.accelerator.unwrap_model(self.model), self.temperature)
        try:
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        finally:
            recorder.remove()
        # generate() ran under no_grad with gradient checkpointing off (which drops the KV cache); so does its last step
        with profiling_context(self, "zapo_generation_statistics"), torch.no_grad(), disable_gradient_checkpointing(
            self.model, self.args.gradient_checkpointing_kwargs
        ):
            self._collected_statistics = recorder.finish(
                completion_ids, self._tokenizer.pad_token_id, feed_last_token=not self._parameters_sharded()
            )
        return completion_ids, logprobs

    def _parameters_sharded(self) -> bool:
        """FSDP or ZeRO-3: a forward outside TRL's generation context gathers parameters collectively."""
        if self.is_fsdp_enabled:
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's old-log-prob pass, when it runs, also yields DAER's statistics for every row of the round."""
        if self._statistics_capture != "old_logps_forward" or model is not self.model or torch.is_grad_enabled():
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._statistics_capture = None
        entropy_requested = kwargs.pop("compute_entropy", False)
        batch_size = kwargs.get("batch_size") or input_ids.size(0)
        completion_mask = attention_mask[:, -logits_to_keep:]
        with self._pooled_hidden_states(completion_mask, batch_size) as pooled:
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, compute_entropy=True, **kwargs
            )
        self._collected_statistics = CollectedStatistics(
            seq_logps=sequence_mean(logps, completion_mask),
            token_entropy=sequence_mean(entropies, completion_mask),
            embeddings=torch.cat(pooled),
            lengths=completion_mask.sum(dim=1),
            available=torch.ones(completion_mask.size(0), dtype=torch.bool, device=completion_mask.device),
            source="old_logps_forward",
        )
        return logps, entropies if entropy_requested else None, aux_loss

    def _undefined_statistics(self, num_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NaN log-likelihoods, token entropies and embeddings for ``num_local`` rows (NaN = not computed)."""
        device = self.accelerator.device
        hidden_size = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
        return (
            torch.full((num_local,), float("nan"), device=device),
            torch.full((num_local,), float("nan"), device=device),
            torch.full((num_local, hidden_size), float("nan"), device=device),
        )

    def _statistics_from_round(self, output, local_needed: torch.Tensor):
        """This round's collected statistics of the rows in ``local_needed`` (NaN elsewhere) and which rows they cover.

        A row is covered when what was collected matches the batch TRL built: the same completion length, or
        an empty completion mask (``mask_truncated_completions``), whose statistics are NaN as in the forward pass.
        """
        device = self.accelerator.device
        num_local = local_needed.numel()
        seq_logps, token_entropy, embeddings = self._undefined_statistics(num_local)
        covered = torch.zeros(num_local, dtype=torch.bool, device=device)
        stats = self._collected_statistics
        if stats is None or stats.lengths.numel() != num_local:
            return seq_logps, token_entropy, embeddings, covered
        lengths = output["completion_mask"].sum(dim=1).to(device)
        emptied = lengths == 0
        matching = stats.available.to(device) & (stats.lengths.to(device) == lengths)
        covered = local_needed.to(device) & (matching | emptied)
        rows = covered & ~emptied
        seq_logps[rows] = stats.seq_logps.to(device)[rows].float()
        token_entropy[rows] = stats.token_entropy.to(device)[rows].float()
        embeddings[rows] = stats.embeddings.to(device)[rows].float()
        return seq_logps, token_entropy, embeddings, covered

    def _entropies(self, scored: ScoredBatch, output, needs_entropy, num_generations, step):
        """SE per group, TE per row and K per group for the (global) groups flagged in ``needs_entropy``."""
        rows_needed = needs_entropy.repeat_interleave(num_generations)
        local_needed = self._local_rows(rows_needed, scored.num_local_rows).to(self.accelerator.device)
        seq_logps, token_entropy, embeddings, covered = self._statistics_from_round(output, local_needed)
        # every process takes part: the forward pass (if any process has uncovered rows) is collective under ZeRO-3
        missing = local_needed & ~covered
        forward = self._completion_statistics(output, missing)
        seq_logps = torch.where(missing, forward[0], seq_logps)
        token_entropy = torch.where(missing, forward[1], token_entropy)
        embeddings = torch.where(missing.unsqueeze(1), forward[2], embeddings)
        counts = self.accelerator.gather(torch.stack([missing.sum(), local_needed.sum()]).view(1, 2)).sum(dim=0)
        self._metrics["train" if self.model.training else "eval"]["zapo/stats_forward_frac"].append(
            (counts[0] / counts[1].clamp(min=1)).item()
        )
        seq_logps = self.accelerator.gather(seq_logps)
        token_entropy = self.accelerator.gather(token_entropy)
        embeddings = self.accelerator.gather(embeddings)
        self._last_entropy_inputs = {"seq_logps": seq_logps, "token_entropy": token_entropy, "embeddings": embeddings}

        # K-Means needs the CPU: one transfer for the whole batch, SE and K back on the batch's device
        se, k = run_on_cpu(
            group_semantic_entropies,
            embeddings,
            seq_logps,
            num_generations,
            compute=needs_entropy,
            step=step,
            base_seed=self.args.seed,
            max_clusters=self.args.kmeans_max_clusters,
            min_silhouette=self.args.kmeans_min_silhouette,
            identical_distance=self.args.kmeans_identical_distance,
        )
        k = torch.where(needs_entropy, k.float(), torch.full_like(se, float("nan")))
        te = torch.where(rows_needed, token_entropy, torch.full_like(token_entropy, float("nan")))
        return se, te, k

    @torch.no_grad()
    def _completion_statistics(self, output, local_needed: torch.Tensor):
        """The no-grad forward pass under pi_old, on this process's rows flagged in ``local_needed``.

        Returns per local row: mean completion log-prob, mean token entropy and the L2-normalised mean
        completion hidden state (NaN for rows not computed). Every process runs the same number of
        forward micro-batches (padding with a repeated row) so DeepSpeed ZeRO-3's parameter gathering,
        a collective, stays in step.
        """
        device = self.accelerator.device
        seq_logps, token_entropy, embeddings = self._undefined_statistics(local_needed.numel())

        rows = local_needed.nonzero().flatten().to(device)
        count = torch.tensor([rows.numel()], device=device)
        most = int(self.accelerator.gather(count).max())
        if most == 0:
            return seq_logps, token_entropy, embeddings
        padded = torch.cat([rows, rows.new_zeros(most - rows.numel())]) if rows.numel() < most else rows

        completion_ids = output["completion_ids"][padded]
        completion_mask = output["completion_mask"][padded]
        input_ids = torch.cat([output["prompt_ids"][padded], completion_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"][padded], completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        batch_size = self.args.entropy_forward_batch_size or self.args.per_device_train_batch_size

        with profiling_context(self, "zapo_entropy_forward"), self._pooled_hidden_states(
            completion_mask, batch_size
        ) as pooled:
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, compute_entropy=True
            )
        real = slice(0, rows.numel())
        seq_logps[rows] = sequence_mean(logps, completion_mask)[real].float()
        token_entropy[rows] = sequence_mean(entropies, completion_mask)[real].float()
        embeddings[rows] = torch.cat(pooled)[real].to(device)
        return seq_logps, token_entropy, embeddings

    @contextmanager
    def _pooled_hidden_states(self, completion_mask: torch.Tensor, batch_size: int):
        """Mean-pool the backbone's last hidden states over the completion tokens of each forward chunk."""
        _, backbone = _backbone_of(self.accelerator.unwrap_model(self.model))
        pooled: list[torch.Tensor] = []
        completion_length = completion_mask.size(1)

        def pool(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            start = len(pooled) * batch_size
            mask = completion_mask[start : start + hidden.size(0)]
            pooled.append(mean_pool_completion_states(hidden[:, -completion_length:].detach(), mask))

        handle = backbone.register_forward_hook(pool)
        try:
            yield pooled
        finally:
            handle.remove()


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return valid.mean().item() if valid.numel() else math.nan
