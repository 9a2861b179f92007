"""AAPOTrainer: GRPO plus the advantage margin against a frozen reference model (AAPO paper, Eqs. 4-5)."""

from __future__ import annotations

import inspect
import json
import logging
import os

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context

from ..advantages import aapo_advantages, advantage_margins, combine_reward_functions, group_relative_advantages
from ..configs import AAPOConfig
from ..dynamic_sampling import GroupStatistics
from ..ref_rollouts import CachedReference, attach_ref_rollouts, load_ref_rollouts
from ..reference import (
    INITIAL_ADAPTER,
    FrozenCopyReference,
    PeftBaseReference,
    adapter_row_blocks,
    decode_completions,
    make_reference,
    reference_rows_adapter,
    resolve_reference_generation,
)
from ..validation import validate_tokenizers_match
from .base import AdvantageTrainerMixin, ScoredBatch

_GRPO_PARAMETERS = list(inspect.signature(GRPOTrainer.__init__).parameters)[1:]  # model, reward_funcs, args, ...
REFERENCE_STATE_FILENAME = "aapo_reference_state.json"
REFERENCE_WEIGHTS_FILENAME = "aapo_reference.safetensors"

logger = logging.getLogger(__name__)


class ReferenceUpdateCallback(TrainerCallback):
    """The "w reference update" ablation: copy the policy into the reference every N optimizer steps."""

    def __init__(self, trainer: "AAPOTrainer", every_steps: int):
        self.trainer = trainer
        self.every_steps = every_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step % self.every_steps == 0:
            self.trainer.reference.load_policy_weights(self.trainer)
            self.trainer.reference_updated_at_step = state.global_step


class _PushPolicyToReferenceServer(TrainerCallback):
    """On resume at a reference-update step: the reference server gets the resumed policy (= the reference then)."""

    def __init__(self, trainer: "AAPOTrainer"):
        self.trainer = trainer
        self.done = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.done:
            self.trainer.reference.load_policy_weights(self.trainer)
            self.done = True


class AAPOTrainer(AdvantageTrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with AAPO's augmented advantage ``A_i + clip(r_i - r_ref_i, -0.2, 0.28)``.

    For every prompt row the reference model samples one response with the policy's sampling settings;
    the same reward functions and weights score it. Takes the same arguments as ``GRPOTrainer``;
    ``reward_funcs`` may also name functions of :mod:`aapo_trl.rewards` (``"format"``, ``"cosine"``...).
    ``args.reference_source`` says where the reference samples come from (:mod:`aapo_trl.reference`):
    a frozen deep copy of the initial policy or the PEFT policy with its initial adapter (``"model"``), a
    second vLLM server (``"vllm_server"``), the policy's colocated vLLM engine with the reference weights
    swapped in (``"vllm_colocate"``), or rewards precomputed by ``aapo-trl ref-rollouts`` (``"cache"``).
    With ``"vllm_server"`` the reference request is sent before the policy generates and collected when the
    advantages need it (``args.reference_request_overlap``, :mod:`aapo_trl.reference_overlap`).
    """

    _tag_names = ["trl", "grpo", "aapo"]
    _name = "AAPO"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: AAPOConfig | None = None,
        *more_args,
        reference_model=None,
        reference_processing_class=None,
        **kwargs,
    ):
        """``reference_model`` (a model or a path; optional): a frozen reference other than the initial policy,
        e.g. the SFT checkpoint the policy started from. It must share the policy's tokenizer (checked
        before anything is loaded); ``reference_processing_class`` is its tokenizer when it is a model."""
        if args is None:
            args = AAPOConfig(output_dir="aapo-output")
        if not isinstance(args, AAPOConfig):
            raise TypeError(f"AAPOTrainer needs an AAPOConfig, got {type(args).__name__}")
        if reference_model is not None:
            if args.reference_source != "model":
                raise ValueError(
                    f"reference_model is only used with reference_source='model', not {args.reference_source!r}."
                )
            _check_reference_tokenizer(model, kwargs.get("processing_class"), reference_model,
                                       reference_processing_class)
        if args.reference_source == "cache" and args.ref_rollouts_path is not None:
            more_args, kwargs = _with_ref_rollouts(args, more_args, kwargs)
        peft_reference = reference_model is None and args.reference_source in ("model", "vllm_colocate")
        if peft_reference and isinstance(model, torch.nn.Module) and is_peft_model(model) and (
                INITIAL_ADAPTER in model.peft_config):
            raise ValueError(
                f"The PEFT policy already has an adapter named {INITIAL_ADAPTER!r}, the name AAPO (like TRL's KL term) "
                "gives the frozen copy of the initial adapter it builds itself. Rename or delete that adapter."
            )
        if args.ref_update_steps is not None and _is_peft_run(model, more_args, kwargs):
            PeftBaseReference().load_policy_weights(None)  # raises the explanatory error before loading anything
        if args.reference_generation == "batched" and (reference_model is not None
                                                        or not _is_peft_run(model, more_args, kwargs)):
            raise ValueError(
                "reference_generation='batched' samples the reference in the PEFT policy's own generate call, so it "
                "needs a PEFT policy (a PeftModel or peft_config=) referenced by its own base or initial adapter, "
                "without reference_model=. Use reference_generation='auto' or 'separate'."
            )
        super().__init__(model, reward_funcs, args, *more_args, **kwargs)
        # Built here, before Trainer.train() wraps the policy with accelerate/DeepSpeed.
        if args.reference_source == "cache":
            self.reference = CachedReference()
        else:
            self.reference = make_reference(
                self, None if reference_model is None else _load_reference_model(reference_model, self.model)
            )
        # "batched": the reference's rows ride in the policy's generate call (_generate_single_turn)
        self.reference_generation = resolve_reference_generation(self)
        self._batched_reference: dict | None = None
        self.reference_updated_at_step = 0
        if args.ref_update_steps is not None:
            if is_peft_model(self.model):
                self.reference.load_policy_weights(self)  # pragma: no cover - caught above
            self.add_callback(ReferenceUpdateCallback(self, args.ref_update_steps))
        self._last_reference: dict | None = None
        self._pending_reference_request = None  # reference_request_overlap: sent before the policy generates

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # no reference request outlives training, also on an exception
            self._pending_reference_request = None
            if hasattr(self.reference, "close"):
                self.reference.close()

    # ---- the reference server's request, overlapped with the policy's generation (reference_request_overlap) -----

    def _tokenize_prompts(self, prompts: list):
        """TRL tokenizes the step's prompts right before the policy generates: the earliest the request can go."""
        tokenized = super()._tokenize_prompts(prompts)
        self._send_reference_request(tokenized[0])
        return tokenized

    def _send_reference_request(self, prompt_ids: list[list[int]]) -> None:
        """Ask the reference server now for the completions :meth:`_reference_rewards` will need.

        Only generation batches that need a reference get a request (TRL generates once per ``steps_per_generation
        * num_iterations`` steps; evaluation only with ``eval_reference_rollouts``); every process sends its own
        rows (gathered, as in the sequential path). A generation without tokenization (``rollout_func``) sends
        nothing and falls back to the sequential path.
        """
        self._pending_reference_request = None
        if not (self.args.reference_request_overlap and hasattr(self.reference, "send_request")):
            return
        training = self.model.training
        if not training and not self.args.eval_reference_rollouts:
            return
        num_generations = self.num_generations if training else self.num_generations_eval
        self._pending_reference_request = self.reference.send_request(self, prompt_ids, num_generations)

    # ---- the reference in checkpoints (ref_update_steps: the reference is no longer the initial policy) ----------

    def _weights_reference(self) -> FrozenCopyReference | None:
        """The reference whose weights live in this process (not a server's, not the PEFT policy's)."""
        weights = getattr(self.reference, "weights", self.reference)  # the colocated engine's frozen copy
        return weights if isinstance(weights, FrozenCopyReference) else None

    def _save_extra_state(self, checkpoint: str) -> None:
        super()._save_extra_state(checkpoint)
        if self.args.ref_update_steps is None:
            return
        from ..checkpointing import atomic_write_json

        state = {"updated_at_step": self.reference_updated_at_step, "source": self.reference.kind, "weights": None}
        weights_reference = self._weights_reference()
        if self.reference_updated_at_step > 0 and weights_reference is not None:
            tensors = weights_reference.state_dict(self)  # collective under ZeRO-3: every rank gathers
            if self.args.should_save:
                from safetensors.torch import save_file

                save_file(tensors, os.path.join(checkpoint, REFERENCE_WEIGHTS_FILENAME))
            state["weights"] = REFERENCE_WEIGHTS_FILENAME
        if self.args.should_save:
            atomic_write_json(os.path.join(checkpoint, REFERENCE_STATE_FILENAME), state)

    def _load_extra_state(self, checkpoint: str) -> None:
        super()._load_extra_state(checkpoint)
        if self.args.ref_update_steps is None:
            return
        path = os.path.join(checkpoint, REFERENCE_STATE_FILENAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"ref_update_steps is set but the checkpoint {checkpoint!r} holds no {REFERENCE_STATE_FILENAME}, so "
                "the updated reference cannot be restored (it would silently restart from the initial policy). Resume "
                "from a checkpoint saved by an AAPO run with ref_update_steps, or start a new run."
            )
        with open(path) as handle:
            state = json.load(handle)
        self.reference_updated_at_step = state["updated_at_step"]
        if self.reference_updated_at_step == 0:
            return  # still the initial policy
        weights_reference = self._weights_reference()
        if state.get("weights") and weights_reference is not None:
            from safetensors.torch import load_file

            weights_reference.load_state_dict(self, load_file(os.path.join(checkpoint, state["weights"])))
            return
        with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
            checkpoint_step = json.load(handle)["global_step"]
        if checkpoint_step == self.reference_updated_at_step:  # the reference is this checkpoint's policy
            self.add_callback(_PushPolicyToReferenceServer(self))
        else:
            logger.warning(
                "Resuming at step %d, but the reference server was last updated at step %d with weights this "
                "checkpoint does not hold; it keeps whatever it serves until the next update (step %d). Save "
                "checkpoints at multiples of ref_update_steps for an exact resume.", checkpoint_step,
                self.reference_updated_at_step,
                (checkpoint_step // self.args.ref_update_steps + 1) * self.args.ref_update_steps,
            )

    # ---- reference_generation="batched": one generate call for the policy's and the reference's rows ------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's transformers generation, with one reference row per prompt row appended when ``"batched"``.

        :func:`aapo_trl.reference.adapter_row_blocks` runs the policy's rows with the trained adapter and the
        reference's rows with the reference's (:func:`aapo_trl.reference.reference_rows_adapter`); TRL's padding,
        sampling settings and EOS truncation apply to every row alike. The policy's rows go back to TRL; the
        reference's wait for :meth:`_reference_rewards`.
        """
        wants_reference = self.model.training or self.args.eval_reference_rollouts
        if self.reference_generation != "batched" or not wants_reference:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        model = self.accelerator.unwrap_model(self.model)
        rows = len(prompt_ids)
        with adapter_row_blocks(model, [(model.active_adapter, rows), (reference_rows_adapter(model), rows)]):
            completion_ids, logprobs = super()._generate_single_turn(
                list(prompt_ids) + list(prompt_ids), images, multimodal_fields, num_generations, has_tool_images
            )
        self._batched_reference = {"prompt_ids": [list(ids) for ids in prompt_ids],
                                   "completion_ids": [list(ids) for ids in completion_ids[rows:]]}
        return completion_ids[:rows], None if logprobs is None else logprobs[:rows]

    def _sample_reference(self, prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
        """The reference completions of these prompt rows: the overlapped server request's answer, the rows of the
        batched generate call, or sampled now."""
        request, self._pending_reference_request = self._pending_reference_request, None
        if request is not None:
            return request.completions(self.accelerator, prompt_ids)
        if self.reference_generation != "batched":
            return self.reference.sample(self, prompt_ids, num_generations)
        batched, self._batched_reference = self._batched_reference, None
        if batched is None or batched["prompt_ids"] != prompt_ids:  # pragma: no cover - guards a TRL seam change
            raise RuntimeError(
                "reference_generation='batched': the policy's generate call did not produce the reference rows of "
                "these prompts; aapo-trl is pinned to trl==1.16.0, check the version (or use 'separate')."
            )
        return batched["completion_ids"]

    def group_statistics(self, rewards, scored: ScoredBatch, output, num_generations, mode):
        if mode == "eval" and not self.args.eval_reference_rollouts:
            return GroupStatistics()
        return GroupStatistics(rows={"ref_rewards": self._reference_rewards(scored, output, num_generations, mode)})

    def batch_advantages(self, rewards, statistics: GroupStatistics, num_generations, mode):
        if "ref_rewards" not in statistics.rows:  # evaluation without reference rollouts
            return group_relative_advantages(rewards, num_generations, scale=self.scale_rewards)
        ref_rewards = statistics.rows["ref_rewards"]
        args = self.args
        advantages = aapo_advantages(
            rewards,
            ref_rewards,
            num_generations,
            clip_low=args.margin_clip_low,
            clip_high=args.margin_clip_high,
            clip=args.margin_clip,
            pairing=args.margin_pairing,
            scale=self.scale_rewards,
        )
        margins = advantage_margins(rewards, ref_rewards, num_generations, pairing=args.margin_pairing)
        clipped = (margins < args.margin_clip_low) | (margins > args.margin_clip_high) if args.margin_clip else None
        metrics = self._metrics[mode]
        metrics["aapo/margin_mean"].append(margins.mean().item())
        metrics["aapo/margin_clipped_frac"].append(0.0 if clipped is None else clipped.float().mean().item())
        metrics["aapo/ref_reward_mean"].append(torch.nanmean(ref_rewards).item())
        return advantages

    def _reference_rewards(self, scored: ScoredBatch, output, num_generations: int, mode: str) -> torch.Tensor:
        """The reference reward of every row of the global batch, paired with the policy's rows by position."""
        if self.reference.kind == "cache":
            return self._cached_reference_rewards(scored, num_generations, mode)
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(output["prompt_ids"], output["prompt_mask"])]
        with profiling_context(self, "reference_generate"):
            ref_ids = self._sample_reference(prompt_ids, num_generations)
        if len(ref_ids) != len(prompt_ids):  # pragma: no cover - a sampler bug
            raise RuntimeError(f"the reference returned {len(ref_ids)} completions for {len(prompt_ids)} rows")
        ref_completions = decode_completions(self.processing_class, scored.prompts, prompt_ids, ref_ids,
                                             self._tools_per_row(len(ref_ids)))
        with self._muted_reward_side_channels():
            ref_per_func = self._calculate_rewards(scored.inputs, scored.prompts, ref_completions, ref_ids)
        # the policy's empty_completions and truncated_completions rules apply to the reference too
        unscorable = self._unscorable_completions(ref_ids).to(ref_per_func.device)
        ref_per_func = ref_per_func.masked_fill(unscorable.unsqueeze(1), float("nan"))
        self._log_mean_rewards_per_func("rewards_ref", ref_per_func, mode)
        lengths = torch.tensor([float(len(ids)) for ids in ref_ids], device=self.accelerator.device)
        self._metrics[mode]["aapo/ref_completion_mean_length"].append(
            self.accelerator.gather(lengths).mean().item()
        )
        ref_rewards = combine_reward_functions(ref_per_func, self.reward_weights)
        self._last_reference = {
            "source": self.reference.kind,
            "completion_ids": ref_ids,
            "completions": ref_completions,
            "rewards_per_func": ref_per_func,
            "rewards": ref_rewards,
        }
        return ref_rewards

    def _tools_per_row(self, rows: int) -> list:
        """The tools TRL parses each row's completion with: its environment's (``environment_factory``), else
        ``tools``."""
        if self.environment_factories is not None:
            return [self._env_tools[name] for name in self._batch_environments]
        return [self.tools] * rows

    def _cached_reference_rewards(self, scored: ScoredBatch, num_generations: int, mode: str) -> torch.Tensor:
        """``reference_source="cache"``: the ``ref_rewards`` column of the batch rows (aapo_trl.ref_rollouts)."""
        with profiling_context(self, "reference_rewards"):
            cached = self.reference.rewards(self, scored.inputs, num_generations, mode)
        if cached["rewards_per_func"] is not None:
            self._log_mean_rewards_per_func("rewards_ref", cached["rewards_per_func"], mode)
        if cached["lengths"] is not None:
            self._metrics[mode]["aapo/ref_completion_mean_length"].append(cached["lengths"].mean().item())
        self._last_reference = {"source": "cache", "completion_ids": [], "completions": [], **cached}
        return cached["rewards"]


def _with_ref_rollouts(args: AAPOConfig, more_args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Attach the cache at ``args.ref_rollouts_path`` to the train (and eval) dataset, positional or keyword."""
    cache = load_ref_rollouts(args.ref_rollouts_path)
    more_args, kwargs = list(more_args), dict(kwargs)
    targets = [("train_dataset", True), ("eval_dataset", args.eval_reference_rollouts)]
    for name, needed in targets:
        position = _GRPO_PARAMETERS.index(name) - 3  # after model, reward_funcs, args
        if position < len(more_args):
            dataset, put = more_args[position], lambda value, p=position: more_args.__setitem__(p, value)
        else:
            dataset, put = kwargs.get(name), lambda value, n=name: kwargs.__setitem__(n, value)
        if dataset is None or not needed:
            continue
        if isinstance(dataset, dict):  # several eval sets
            put({key: attach_ref_rollouts(value, cache, f"{name}[{key!r}]") for key, value in dataset.items()})
        else:
            put(attach_ref_rollouts(dataset, cache, name))
    return tuple(more_args), kwargs


def _is_peft_run(model, more_args: tuple, kwargs: dict) -> bool:
    """Whether the policy will be a PEFT model (a PeftModel, or a peft_config given to the trainer)."""
    if isinstance(model, torch.nn.Module) and is_peft_model(model):
        return True
    position = _GRPO_PARAMETERS.index("peft_config") - 3
    peft_config = more_args[position] if position < len(more_args) else kwargs.get("peft_config")
    return peft_config is not None


def _tokenizer_of(model_or_path, processing_class):
    from transformers import AutoTokenizer

    if processing_class is not None:
        return processing_class
    path = model_or_path if isinstance(model_or_path, str) else getattr(model_or_path, "name_or_path", None)
    if not path:
        raise ValueError("pass reference_processing_class (or processing_class) so the tokenizers can be compared")
    return AutoTokenizer.from_pretrained(path)


def _check_reference_tokenizer(policy, policy_processing_class, reference, reference_processing_class) -> None:
    validate_tokenizers_match(
        _tokenizer_of(policy, policy_processing_class), _tokenizer_of(reference, reference_processing_class)
    )


def _load_reference_model(reference, policy):
    """A frozen reference in the policy's dtype (loaded here when given as a path); placed by make_reference."""
    from transformers import AutoModelForCausalLM

    if isinstance(reference, str):
        reference = AutoModelForCausalLM.from_pretrained(reference, dtype=policy.dtype)
    reference.requires_grad_(False)
    return reference.eval()
