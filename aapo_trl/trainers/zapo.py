"""ZAPOTrainer: entropy advantages for zero-advantage samples (DAER) and difficulty reshaping (TDAR).

The maths is in :mod:`aapo_trl.zapo_math` and :mod:`aapo_trl.entropy`; this file only gathers what
they need. DAER needs, for the rows of zero-advantage groups only, three things under pi_old: the
per-token log-probs, the per-token entropies and the mean-pooled final-layer hidden states of the
completion tokens. TRL's fused LM head returns the first two without materialising logits but no
hidden states, so a forward hook on the backbone pools them during the same (no-grad) pass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from transformers.trainer_utils import has_length
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context

from ..configs import ZAPOConfig
from ..devices import run_on_cpu
from ..entropy import group_semantic_entropies, mean_pool_completion_states, sequence_mean
from ..zapo_math import classify_zero_advantage_groups, zapo_advantages
from .base import AdvantageTrainerMixin, ScoredBatch


class ZAPOTrainer(AdvantageTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with ZAPO's advantage: TDAR on non-zero advantages, DAER on zero-advantage rows.

    Takes the same arguments as ``GRPOTrainer``; ``reward_funcs`` may name functions of
    :mod:`aapo_trl.rewards` (the paper's reward is ``"accuracy_zapo"``: 1 right, 0.1 wrong, 0 no answer).
    """

    _tag_names = ["trl", "grpo", "zapo"]
    _name = "ZAPO"
    _planned_total_steps: int | None = None

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

    def compute_advantages(self, rewards, scored: ScoredBatch, output, num_generations, mode):
        args = self.args
        step, total = self.current_step(), self.total_steps()
        easy, hard = classify_zero_advantage_groups(rewards, num_generations, args.correct_threshold)
        metrics = self._metrics[mode]
        metrics["zapo/easy_groups"].append(float(easy.sum()))
        metrics["zapo/hard_groups"].append(float(hard.sum()))
        se = torch.full((easy.numel(),), float("nan"), device=rewards.device)
        te = torch.full_like(rewards, float("nan"))
        needs_entropy = easy | hard
        if args.use_daer and bool(needs_entropy.any()):
            se, te, k = self._entropies(scored, output, needs_entropy, num_generations, step)
            metrics["zapo/se_mean"].append(_nanmean(se))
            metrics["zapo/te_mean"].append(_nanmean(te))
            metrics["zapo/k_mean"].append(_nanmean(k))
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

    def _entropies(self, scored: ScoredBatch, output, needs_entropy, num_generations, step):
        """SE per group, TE per row and K per group for the (global) groups flagged in ``needs_entropy``."""
        rows_needed = needs_entropy.repeat_interleave(num_generations)
        local_needed = self._local_rows(rows_needed, scored.num_local_rows)
        seq_logps, token_entropy, embeddings = self._completion_statistics(output, local_needed)
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
        num_local = local_needed.numel()
        hidden_size = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
        seq_logps = torch.full((num_local,), float("nan"), device=device)
        token_entropy = torch.full((num_local,), float("nan"), device=device)
        embeddings = torch.full((num_local, hidden_size), float("nan"), device=device)

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
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = model.get_base_model()
        backbone = model.base_model
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
