"""Where AAPO's reference rollouts come from, and how they are sampled.

The reference must sample from the **reference weights** (the authors' public code sampled the policy
or took the prompt tokens as "completions"; ALGORITHMS.md section 2). Two sources live here:

* :class:`FrozenCopyReference`: a deep copy of the initial policy (or TRL's own ``ref_model`` when a
  KL term already made one), frozen unless ``ref_update_steps`` copies the policy into it.
* :class:`PeftBaseReference`: the policy itself with its LoRA adapters switched off, which *is* the
  initial policy when only adapters are trained.

Both sample with the policy's sampling settings (``GRPOTrainer.generation_config``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from transformers import GenerationConfig, PreTrainedModel
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad, use_adapter


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A detached, frozen deep copy of ``model`` that runs its own forward.

    trl 1.16's ``add_fused_lm_head`` replaces ``model.forward`` by an instance attribute whose closure
    calls the *original* model's forward; a deep copy keeps that closure, so without removing it the
    "reference" would silently run the policy's weights.
    """
    reference = copy.deepcopy(model)
    reference.__dict__.pop("forward", None)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def _unwrapped_for_generation(trainer, model):
    """The same unwrapping (DeepSpeed ZeRO-3 gathering, generation kwargs) TRL applies to the policy."""
    return unwrap_model_for_generation(
        model,
        trainer.accelerator,
        gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
        generation_kwargs=getattr(trainer, "generation_kwargs", None),
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
    )


class FrozenCopyReference:
    """The reference is a separate model: a frozen copy of the initial policy."""

    kind = "frozen_copy"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @contextmanager
    def generation_model(self, trainer):
        with _unwrapped_for_generation(trainer, self.model) as unwrapped:
            yield unwrapped

    def load_policy_weights(self, trainer) -> None:
        """``ref_update_steps``: copy the current policy weights into the reference."""
        policy = trainer.accelerator.unwrap_model(trainer.model)
        reference = trainer.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            reference.load_state_dict(policy.state_dict())

    def parameters_fingerprint(self) -> torch.Tensor:
        """A cheap summary of the weights, used by tests and logs to show the reference did not move."""
        with torch.no_grad():
            return torch.stack([p.detach().float().double().sum() for p in self.model.parameters()])


class PeftBaseReference:
    """The reference is the PEFT policy with its adapters disabled (the base weights never train)."""

    kind = "peft_base"

    @contextmanager
    def generation_model(self, trainer):
        with _unwrapped_for_generation(trainer, trainer.model_wrapped) as unwrapped:
            # TRL loads an initial copy of a re-trained adapter under the name "ref"; use it when present.
            adapter = "ref" if "ref" in unwrapped.peft_config else None
            with use_adapter(unwrapped, adapter_name=adapter):
                yield unwrapped

    def load_policy_weights(self, trainer) -> None:
        raise ValueError(
            "ref_update_steps is not supported with PEFT: the reference is the adapter-free base model, which "
            "never changes. Train without peft_config to use reference updates."
        )


def make_reference(trainer) -> FrozenCopyReference | PeftBaseReference:
    """Pick the reference source for a freshly initialised (not yet accelerate-wrapped) GRPOTrainer."""
    if is_peft_model(trainer.model):
        return PeftBaseReference()
    if getattr(trainer, "ref_model", None) is not None:  # beta != 0: TRL already holds a frozen initial policy
        return FrozenCopyReference(trainer.ref_model)
    return FrozenCopyReference(frozen_copy(trainer.model))


def sampling_generation_config(trainer) -> GenerationConfig:
    """The policy's sampling settings as a transformers GenerationConfig.

    TRL builds one for transformers generation; with ``use_vllm`` it passes the same settings to vLLM
    instead, so we rebuild them from the trainer's attributes.
    """
    existing = getattr(trainer, "generation_config", None)
    if existing is not None:
        return existing
    kwargs = {
        "max_new_tokens": trainer.max_completion_length,
        "do_sample": True,
        "pad_token_id": trainer._tokenizer.pad_token_id,
        "eos_token_id": trainer.eos_token_ids,
        "temperature": trainer.temperature,
        "top_p": trainer.top_p,
        "top_k": trainer.top_k,
        "min_p": trainer.min_p,
        "repetition_penalty": trainer.repetition_penalty,
    }
    kwargs.update(trainer.args.generation_kwargs or {})
    return GenerationConfig(**kwargs, disable_compile=True)


def truncate_after_eos(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> list[list[int]]:
    """Cut each generated row after its first EOS token (kept), as TRL does for the policy."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    lengths = torch.full((completion_ids.size(0),), completion_ids.size(1), dtype=torch.long)
    has_eos = is_eos.any(dim=1).cpu()
    lengths[has_eos] = is_eos.int().argmax(dim=1).cpu()[has_eos] + 1
    rows = completion_ids.cpu().tolist()
    return [row[:length] for row, length in zip(rows, lengths.tolist())]


@torch.no_grad()
def sample_reference_completions(trainer, reference, prompt_ids: list[list[int]]) -> list[list[int]]:
    """One completion per prompt row, sampled from the reference weights with the policy's settings."""
    device = trainer.accelerator.device
    tokenizer = trainer._tokenizer
    prompts = [torch.tensor(ids) for ids in prompt_ids]
    input_ids = pad(prompts, padding_value=tokenizer.pad_token_id, padding_side="left").to(device)
    attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left").to(device)
    with reference.generation_model(trainer) as model:
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=sampling_generation_config(trainer)
        )
    return truncate_after_eos(generated[:, input_ids.size(1) :], trainer.eos_token_ids)
