"""Where AAPO's reference rollouts come from, and how they are sampled.

The reference must sample from the **reference weights** (the authors' public code sampled the policy
or took the prompt tokens as "completions"; ALGORITHMS.md section 2). ``AAPOConfig.reference_source``
picks one of these sources, each with ``sample(trainer, prompt_ids, num_generations)`` returning one
completion (token ids) per prompt row:

* ``"model"``: :class:`FrozenCopyReference` (a deep copy of the initial policy, or TRL's own
  ``ref_model`` when a KL term already made one) or :class:`PeftBaseReference` (the PEFT policy run
  with a frozen copy of its whole initial adapter, or with its adapters switched off when the initial adapter
  is a fresh LoRA, which adds nothing), sampled with transformers ``generate`` in eval mode (no dropout).
* ``"vllm_server"``: :class:`VLLMServerReference`, a second vLLM server started on the reference
  checkpoint (``trl vllm-serve --model BASE --port 8001``), reached through TRL's ``VLLMClient``. It
  never receives weights, except the policy's at ``ref_update_steps`` boundaries. By default its request is
  sent before the policy generates and collected for the advantages (:mod:`aapo_trl.reference_overlap`).
* ``"vllm_colocate"``: :class:`ColocatedVLLMReference`, the policy's colocated vLLM engine: the
  reference weights (a frozen copy kept on the CPU, or the PEFT base weights with the initial adapter's
  copy merged into a copy of them, the policy's adapter left out) are loaded
  into it, the reference samples are drawn, and TRL's ``_last_loaded_step`` is reset so that the
  next policy generation pushes the policy weights back.
* ``"cache"``: :class:`aapo_trl.ref_rollouts.CachedReference`, rewards precomputed by
  ``aapo-trl ref-rollouts`` (nothing is sampled during training). The trainer builds it itself:
  ``ref_rollouts`` sits above this module (its sampler reuses :func:`truncate_after_eos`), so nothing
  here imports it.

With a PEFT policy the ``"model"`` source need not sample at all: by default (``reference_generation``) the
trainer appends the reference's rows to the policy's own ``generate`` call, a block of rows per adapter
(:func:`adapter_row_blocks`, :func:`reference_rows_adapter`, :func:`resolve_reference_generation`), and
:meth:`PeftBaseReference.sample` is the separate path kept as the fallback.

Every sampler uses the policy's sampling settings (TRL's ``generation_config`` or its vLLM settings).
Nothing here imports vLLM: the vLLM sources only go through TRL's ``VLLMGeneration``/``VLLMClient``.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from transformers import GenerationConfig, PreTrainedModel
from trl.distributed import DistributedBackend
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.trainer.utils import create_model_from_path, get_config_model_id, pad, use_adapter

from .reference_overlap import (
    BackgroundReferenceRequests,
    PendingReferenceRequest,
    bound_request_time,
    reference_server_error,
)

logger = logging.getLogger(__name__)


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A detached, frozen deep copy of ``model`` that runs only its own weights.

    trl 1.16 patches forwards on the instance: ``add_fused_lm_head`` sets ``model.forward`` to a method whose
    closure calls the *original* model's forward, ``cast_lm_head_to_fp32`` sets ``lm_head.forward`` to a
    function that reads the original head's weight, Liger's kernels bind their forwards to the modules.
    ``copy.deepcopy`` rebinds a bound method's ``self`` but copies functions, closures included, as they are,
    so the "reference" would silently run the policy's weights. Every instance-level ``forward`` and forward
    hook of the copy is therefore rebuilt to refer to the copies of what it referred to.
    """
    memo: dict[int, object] = {}
    reference = copy.deepcopy(model, memo)
    originals = {id(module) for module in model.modules()}
    rebound = _Rebinder(memo, originals)
    for module in reference.modules():
        if "forward" in module.__dict__:
            module.forward = rebound(module.__dict__["forward"])
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                hooks[key] = rebound(hook)
        for patched in [module.__dict__.get("forward"), *module._forward_pre_hooks.values(),
                        *module._forward_hooks.values()]:
            if patched is not None and _refers_to(patched, originals, set()):
                raise RuntimeError(
                    f"the frozen reference copy of {type(module).__name__} still runs a forward patch ({patched!r}) "
                    "bound to the policy's modules"
                )
    reference.requires_grad_(False)
    reference.eval()
    return reference


class _Rebinder:
    """Rebuilds what a forward patch refers to with the deep copy's ``memo``, so that it refers to the copy.

    ``copy.deepcopy`` shares functions (closures included) instead of copying them; here bound methods,
    ``functools.partial`` and closures are rebuilt around the copies, and data in a closure that holds the
    original modules (a list of them...) is deep-copied with the same memo. Anything else is kept as is.
    """

    def __init__(self, memo: dict[int, object], originals: set[int]):
        self.memo, self.originals = memo, originals
        self.done: dict[int, object] = {}

    def __call__(self, value):
        if id(value) in self.memo:
            return self.memo[id(value)]
        if id(value) in self.done:
            return self.done[id(value)]
        if isinstance(value, types.MethodType):
            rebound = types.MethodType(self(value.__func__), self(value.__self__))
        elif isinstance(value, functools.partial):
            args = [self(arg) for arg in value.args]
            rebound = functools.partial(self(value.func), *args, **{k: self(v) for k, v in value.keywords.items()})
        elif isinstance(value, types.FunctionType) and value.__closure__:
            self.done[id(value)] = value  # a function that refers to itself keeps doing so
            contents = [_cell_contents(cell) for cell in value.__closure__]
            new_contents = [content if content is _EMPTY else self(content) for content in contents]
            if all(new is old for new, old in zip(new_contents, contents)):
                return value
            cells = tuple(types.CellType() if c is _EMPTY else types.CellType(c) for c in new_contents)
            rebound = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, cells)
            rebound.__kwdefaults__ = value.__kwdefaults__
            rebound.__qualname__ = value.__qualname__
            rebound.__dict__.update(value.__dict__)  # functools.wraps metadata
        elif _refers_to(value, self.originals, set()):
            return copy.deepcopy(value, self.memo)
        else:
            return value
        self.done[id(value)] = rebound
        return rebound


_EMPTY = object()


def _cell_contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return _EMPTY


def _refers_to(value, ids: set[int], seen: set[int]) -> bool:
    """Whether ``value`` is, binds or closes over an object whose id is in ``ids``."""
    if id(value) in ids:
        return True
    if id(value) in seen:
        return False
    seen.add(id(value))
    if isinstance(value, types.MethodType):
        return _refers_to(value.__self__, ids, seen) or _refers_to(value.__func__, ids, seen)
    if isinstance(value, functools.partial):
        parts = [value.func, *value.args, *value.keywords.values()]
        return any(_refers_to(part, ids, seen) for part in parts)
    if isinstance(value, types.FunctionType) and value.__closure__:
        return any(_refers_to(_cell_contents(cell), ids, seen) for cell in value.__closure__)
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_refers_to(item, ids, seen) for item in value)
    if isinstance(value, dict):
        return any(_refers_to(item, ids, seen) for item in value.values())
    return False


def initial_policy_model(trainer) -> PreTrainedModel:
    """A frozen, not yet placed copy of the initial policy (see :func:`prepare_reference_model`).

    Under DeepSpeed ZeRO-3 the policy's parameters are already partitioned across the ranks when the
    trainer is built (``zero3_init_flag``), so a deep copy would hold each rank's empty shards; the copy is
    then loaded again from the policy's checkpoint, the way TRL builds its own ``ref_model``.
    """
    if not DistributedBackend(trainer.accelerator).is_zero3:
        return frozen_copy(trainer.model)
    model_id = get_config_model_id(trainer.model.config)
    if not model_id:
        raise ValueError(
            "Under DeepSpeed ZeRO-3 AAPO loads its frozen reference from the policy's checkpoint (a copy of the "
            "partitioned policy would be empty), but the policy has no checkpoint path (config._name_or_path is "
            "empty). Pass the model as a path or Hub id, or pass reference_model=."
        )
    init_kwargs = dict(trainer.args.model_init_kwargs or {})
    init_kwargs["device_map"] = None  # distributed training places the weights itself
    init_kwargs.setdefault("trust_remote_code", trainer.args.trust_remote_code)
    init_kwargs.setdefault("dtype", trainer.model.dtype)
    init_kwargs.setdefault("attn_implementation", trainer.model.config._attn_implementation)
    reference = create_model_from_path(model_id, **init_kwargs)
    reference.requires_grad_(False)
    return reference.eval()


def prepare_reference_model(trainer, model: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen reference the way TRL places its ``ref_model``.

    DeepSpeed: an inference engine (TRL's ``prepare_deepspeed``): sharded like the policy under ZeRO-3,
    a full copy per rank under ZeRO-1/2. FSDP: wrapped like the policy. Otherwise: on the accelerator's
    device, unwrapped (it never receives gradients, so it needs no DDP).
    """
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(model, trainer.accelerator)
    return model.to(trainer.accelerator.device)


@contextmanager
def writable_gathered(trainer, params):
    """Gather ZeRO-3 shards so they can be written; yields whether this rank writes.

    Under ZeRO-3 only rank 0's writes are kept (and scattered back on exit); elsewhere every rank
    writes its own full copy.
    """
    if DistributedBackend(trainer.accelerator).is_zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
            yield trainer.accelerator.process_index == 0
    else:
        yield True


def _unwrapped_for_generation(trainer, model):
    """The same unwrapping (DeepSpeed ZeRO-3 gathering, generation kwargs) TRL applies to the policy."""
    return unwrap_model_for_generation(
        model,
        trainer.accelerator,
        gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
        generation_kwargs=getattr(trainer, "generation_kwargs", None),
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
    )


def _fingerprint(parameters) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([p.detach().float().double().sum().cpu() for p in parameters])


class FrozenCopyReference:
    """The reference is a separate model: a frozen copy of the initial policy."""

    kind = "frozen_copy"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @contextmanager
    def generation_model(self, trainer):
        with _unwrapped_for_generation(trainer, self.model) as unwrapped:
            yield unwrapped

    def sample(self, trainer, prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
        return sample_reference_completions(trainer, self, prompt_ids)

    def named_weights(self, trainer):
        """``(name, tensor)`` in the checkpoint's naming (what vLLM's ``load_weights`` expects)."""
        dist = DistributedBackend(trainer.accelerator)
        for name, param in trainer.accelerator.unwrap_model(self.model).named_parameters():
            with dist.gather_params([param]):
                yield name.replace("_checkpoint_wrapped_module.", ""), param.data

    def load_policy_weights(self, trainer) -> None:
        """``ref_update_steps``: copy the current policy weights into the reference.

        The reference need not sit on the policy's device (``vllm_colocate`` keeps it on the CPU), so each
        policy tensor is brought onto its reference tensor's device first. Under ZeRO-3 both are gathered and
        rank 0 writes, as in TRL's ``SyncRefModelCallback.sync_target_model``.
        """
        policy = trainer.accelerator.unwrap_model(trainer.model)
        reference = trainer.accelerator.unwrap_model(self.model)
        pairs = list(zip(reference.parameters(), policy.parameters(), strict=True))
        with torch.no_grad(), writable_gathered(trainer, [p for pair in pairs for p in pair]) as writes:
            if writes:
                for target, source in pairs:
                    target.data.copy_(source.data.to(target.device))

    def state_dict(self, trainer) -> dict[str, torch.Tensor]:
        """The full reference weights on the CPU, gathered from ZeRO-3 shards (every rank must call it)."""
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.named_weights(trainer)}

    def load_state_dict(self, trainer, tensors: dict[str, torch.Tensor]) -> None:
        """Load weights saved by :meth:`state_dict` (every rank must call it under ZeRO-3)."""
        reference = trainer.accelerator.unwrap_model(self.model)
        params = dict(reference.named_parameters())
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"the saved reference weights do not fit the reference model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        with torch.no_grad(), writable_gathered(trainer, params.values()) as writes:
            if writes:
                for name, param in params.items():
                    param.data.copy_(tensors[name].to(param.device, param.dtype))

    def parameters_fingerprint(self) -> torch.Tensor:
        """A cheap summary of the weights, used by tests and logs to show the reference did not move."""
        return _fingerprint(self.model.parameters())


INITIAL_ADAPTER = "ref"  # TRL's name for the frozen copy of the initial adapter (GRPOTrainer with beta != 0)


def adapter_is_identity(model, adapter: str) -> bool:
    """Whether the PEFT ``adapter`` provably leaves ``model`` computing its base model.

    Only a plain LoRA adapter (no DoRA, no LoRA bias, no trainable tokens) in which every LoRA pair has an all-zero
    factor (PEFT's default initialisation, a fresh ``peft_config``: B = 0 for linear layers, A = 0 for embeddings)
    and whose ``modules_to_save`` copies still equal the modules they copy. Anything else (an SFT adapter, a resumed
    run, ``init_lora_weights=False``, PiSSA, which moves part of the base weights into the adapter, trainable-token
    deltas, whatever their values) is not. Read when the trainer is built, before DeepSpeed partitions anything:
    PEFT creates the adapter tensors outside ``zero.Init``, so they are whole (a ``modules_to_save`` copy of a
    partitioned module compares unequal, so it is not called the identity).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if not _is_plain_lora(model.peft_config[adapter]):
        return False
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for factors in ((module.lora_A, module.lora_B), (module.lora_embedding_A, module.lora_embedding_B)):
                if adapter in factors[0] and not any(_all_zero(f[adapter]) for f in factors):
                    return False
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            copy_state = module.modules_to_save[adapter].state_dict()
            original_state = module.original_module.state_dict()
            if copy_state.keys() != original_state.keys() or not all(
                torch.equal(copy_state[key], original_state[key]) for key in copy_state
            ):
                return False
    return True


def _all_zero(module_or_tensor) -> bool:
    return not any(p.detach().count_nonzero() for p in _parameters(module_or_tensor))


def _is_plain_lora(config) -> bool:
    """A LoRA adapter whose effect is ``scaling * B @ A`` added to each weight (no DoRA, bias or trainable tokens)."""
    from peft import LoraConfig

    return isinstance(config, LoraConfig) and not (
        config.use_dora or getattr(config, "lora_bias", False) or getattr(config, "trainable_token_indices", None)
    )


def _parameters(module_or_tensor):
    if isinstance(module_or_tensor, torch.nn.Module):
        return list(module_or_tensor.parameters())
    return [module_or_tensor]


def _tied_embeddings_adapted(model, adapter: str) -> str | None:
    """Which of the tied input and output embeddings of ``model`` the PEFT ``adapter`` changes (None: untied, or
    neither)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    def base_weight(module):
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            module = module.original_module
        return getattr(module, "weight", None)

    def adapts(module) -> bool:
        if isinstance(module, BaseTunerLayer):
            return adapter in module._all_available_adapter_names()
        return isinstance(module, AuxiliaryTrainingWrapper) and adapter in module._adapters

    base = model.get_base_model()
    embeddings = {"the input embeddings": base.get_input_embeddings(), "the output embeddings": base.get_output_embeddings()}
    if any(module is None for module in embeddings.values()):
        return None
    weights = [base_weight(module) for module in embeddings.values()]
    if weights[0] is None or weights[0] is not weights[1]:
        return None
    return next((name for name, module in embeddings.items() if adapts(module)), None)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run ``model`` in eval mode (no dropout), then give every module back the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def keep_initial_adapter(model) -> None:
    """Make the PEFT policy able to run as it is now (step 0): a frozen copy of its active adapter, named "ref".

    The copy is the whole adapter, taken with PEFT's own state-dict API (``get_peft_model_state_dict`` /
    ``set_peft_model_state_dict``): LoRA factors of linear and embedding layers, DoRA magnitudes, trainable-token
    deltas, ``modules_to_save`` copies, whatever the adapter type keeps. Its parameters are frozen and its config
    has no dropout (``lora_dropout=0``): the reference is the initial policy, not a dropout sample of it. The
    policy's adapter stays active and trainable. When TRL already added a "ref" adapter (``beta != 0`` with a
    ``PeftModel``, copied by the name pattern ``.default.``, which misses embedding-LoRA and trainable-token
    tensors), it is replaced by this copy, which TRL's KL term then reads too. Nothing is copied when the adapter
    is provably the identity (:func:`adapter_is_identity`): the policy with adapters off *is* then the initial
    policy.

    A LoRA ``bias`` other than ``"none"`` trains the base model's biases, which the reference shares: refused.
    """
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    if getattr(config, "bias", "none") != "none":
        raise ValueError(
            f"The PEFT adapter {adapter!r} has bias={config.bias!r}, which trains the base model's own biases; AAPO's "
            "PEFT reference runs on those base weights, so it would move with the policy. Use bias='none' (LoRA "
            "biases of their own: lora_bias=True), or pass reference_model= (the initial policy, merged)."
        )
    made_by_trl = INITIAL_ADAPTER in model.peft_config
    if not made_by_trl and adapter_is_identity(model, adapter):
        return
    if len(model.active_adapters) > 1:
        raise NotImplementedError(
            f"AAPO's PEFT reference copies one active adapter; this model has {model.active_adapters}. Merge them, "
            "or pass reference_model= (the initial policy, merged)."
        )
    if made_by_trl:
        model.delete_adapter(INITIAL_ADAPTER)
    try:
        model.add_adapter(INITIAL_ADAPTER, _without_dropout(config))
    except ValueError as error:  # e.g. peft < 0.20 with target_parameters allows a single adapter (peft#3340)
        raise ValueError(
            f"AAPO's reference must be the initial policy, i.e. the base model plus the adapter {adapter!r} as it is "
            f"now, but PEFT could not add a frozen copy of that adapter ({error}). Upgrade peft, or pass "
            "reference_model= (the initial policy, merged)."
        ) from error
    copy_adapter_weights(model, adapter, INITIAL_ADAPTER)
    model.set_adapter(adapter)  # the policy keeps training its own adapter
    model.set_requires_grad(INITIAL_ADAPTER, requires_grad=False)


def _without_dropout(config):
    """A copy of a PEFT adapter config whose adapter applies no dropout (the frozen reference's copy)."""
    config = copy.deepcopy(config)  # nothing shared: PEFT may complete an adapter's config when it adds it
    if hasattr(config, "lora_dropout"):
        config.lora_dropout = 0.0
    return config


def copy_adapter_weights(model, source: str, target: str) -> None:
    """Load every tensor of the PEFT adapter ``source`` into the adapter ``target`` (same config), PEFT's way.

    ``get_peft_model_state_dict`` lists what the adapter type saves (what ``save_pretrained`` writes and
    ``PeftModel.from_pretrained`` loads), so nothing of the adapter is left at ``target``'s fresh initialisation.
    The base model's weights are not part of it (``save_embedding_layers=False``). A tensor that did not arrive is
    an error, never a silently fresh reference.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=source, save_embedding_layers=False)
    with torch.no_grad():
        loaded = set_peft_model_state_dict(model, state, adapter_name=target)
    copied = get_peft_model_state_dict(model, adapter_name=target, save_embedding_layers=False)
    differing = sorted(key for key in state if key not in copied or not torch.equal(copied[key], state[key]))
    if loaded.unexpected_keys or differing or copied.keys() != state.keys():
        raise RuntimeError(
            f"copying the PEFT adapter {source!r} into {target!r} left tensors behind: differing {differing[:5]}, "
            f"unexpected {list(loaded.unexpected_keys)[:5]}, only in the copy {sorted(copied.keys() - state.keys())[:5]}"
        )


def peft_weights_for_vllm(model, adapters: Sequence[str], dist) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of the PEFT ``model`` with ``adapters`` applied, under the checkpoint's names, computed out of place.

    Each LoRA layer's base weight plus the plain-LoRA deltas of ``adapters`` it holds, and for each
    ``modules_to_save`` wrapper the copy of the first of ``adapters`` it holds, else its original module;
    ``adapters=()`` gives the base model. No parameter is modified: PEFT's ``merge_adapter`` / ``unmerge_adapter``
    (W + BA - BA) leaves the base weights up to a rounding step away from where they were (a bf16 ulp per
    element for a bf16 base, every time), so the frozen base, and with it a reference that is the base, would
    drift with every weight push. Parameters are gathered one layer at a time under DeepSpeed ZeRO-3.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    adapters = tuple(adapters)
    for adapter in adapters:
        if not _is_plain_lora(model.peft_config[adapter]):
            raise NotImplementedError(f"out-of-place LoRA deltas need plain LoRA adapters; {adapter!r} is not")
    for name, param in model.named_parameters():
        if model.prefix in name:
            continue  # the LoRA tensors themselves
        if ".original_module." in name or ".modules_to_save." in name:
            wrapper_name, _, rest = name.partition(".original_module." if ".original_module." in name
                                                   else ".modules_to_save.")
            wrapper = model.get_submodule(wrapper_name)
            kept = next((adapter for adapter in adapters if adapter in wrapper.modules_to_save), None)
            copy_of = None if ".original_module." in name else rest.split(".", 1)[0]
            if copy_of != kept:
                continue  # the original when a copy stands in for it, and every other adapter's copy
        vllm_name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace("original_module.", "")
        vllm_name = re.sub(r"modules_to_save\.[^.]+\.", "", vllm_name).replace("_checkpoint_wrapped_module.", "")
        owner = model.get_submodule(name.removesuffix(".base_layer.weight")) if name.endswith(
            ".base_layer.weight") else None
        deltas = [a for a in adapters if isinstance(owner, LoraLayer) and a in owner.scaling]
        if deltas:
            with dist.gather_params(list(owner.parameters())):
                weight = param.data
                for adapter in deltas:  # PEFT's `weight += delta`: the sum at the delta's precision, rounded once
                    weight = (weight + owner.get_delta_weight(adapter)).to(param.dtype)
                yield vllm_name, weight
        else:
            with dist.gather_params([param]):
                yield vllm_name, param.data


def push_peft_policy_without_merging(vllm_generation) -> bool:
    """Make TRL push a PEFT policy to vLLM without merging its adapter into the base weights in place.

    TRL's ``VLLMGeneration._iter_named_params`` merges the adapters, reads the weights and unmerges them, which moves
    every adapted base weight by a rounding step per push (:func:`peft_weights_for_vllm`): the policy's frozen base,
    and AAPO's PEFT reference (that base), drift from the initial model over training. Here the merged weights are
    computed out of place (one layer at a time) for the active plain-LoRA adapters; the "ref" adapter's copies are
    never pushed. Not under FSDP or for other adapter types (DoRA, LoRA bias, trainable tokens), where TRL's own
    path is kept, with the "ref" adapter's ``modules_to_save`` copies filtered out of it (vLLM does not know their
    names). Returns whether the out-of-place push was installed.
    """
    model = vllm_generation.model
    iterate = vllm_generation._iter_named_params
    adapters = [a for a in model.active_adapters if a != INITIAL_ADAPTER]
    dist = vllm_generation._dist
    if not dist.is_fsdp and not getattr(model.base_model, "merged", False) and all(
        _is_plain_lora(model.peft_config[adapter]) for adapter in adapters
    ):
        vllm_generation._iter_named_params = lambda: peft_weights_for_vllm(model, adapters, dist)
        return True
    initial_copy = f"modules_to_save.{INITIAL_ADAPTER}."

    def policy_named_params():
        for name, tensor in iterate():
            if initial_copy not in name:  # filtered after TRL's gathers: every rank keeps the same collectives
                yield name, tensor

    vllm_generation._iter_named_params = policy_named_params
    return False


class PeftBaseReference:
    """The reference is the PEFT policy as it was at step 0, run on the policy's own base weights.

    That is the policy with its adapters disabled when the initial adapter is provably the identity (a fresh
    LoRA ``peft_config``), else the policy with the frozen copy of its initial adapter ("ref", see
    :func:`keep_initial_adapter`) active. It samples in eval mode, without dropout (LoRA's or the base model's),
    as the frozen-copy reference does: TRL samples the policy in training mode, but the reference is the initial
    policy itself, not a dropout sample of it.
    """

    kind = "peft_base"

    @contextmanager
    def generation_model(self, trainer):
        with _unwrapped_for_generation(trainer, trainer.model_wrapped) as unwrapped:
            adapter = INITIAL_ADAPTER if INITIAL_ADAPTER in unwrapped.peft_config else None
            with use_adapter(unwrapped, adapter_name=adapter), eval_mode(unwrapped):
                yield unwrapped

    def sample(self, trainer, prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
        return sample_reference_completions(trainer, self, prompt_ids)

    @staticmethod
    def check_checkpoint_weights(model) -> None:
        """Raise where :meth:`named_weights` cannot describe this PEFT model's reference as the weights of a checkpoint
        (what ``vllm_colocate`` loads into the engine): the "ref" copy is not a plain LoRA, or it changes one of the
        embeddings the model ties."""
        if INITIAL_ADAPTER not in model.peft_config:
            return
        reason = None
        if not _is_plain_lora(model.peft_config[INITIAL_ADAPTER]):
            reason = ("the reference is the base model plus a frozen copy of the initial adapter, which vllm_colocate "
                      "merges for plain LoRA adapters only (no DoRA, LoRA bias or trainable tokens)")
        elif tied := _tied_embeddings_adapted(model, INITIAL_ADAPTER):
            reason = (f"the model ties its input and output embeddings and the initial adapter changes {tied}; vLLM "
                      "loads the tied pair as one tensor, so it would run another model")
        if reason:
            raise NotImplementedError(
                f"reference_source='vllm_colocate': {reason}. Use reference_source='model', or serve the merged "
                "initial model with reference_source='vllm_server'."
            )

    def named_weights(self, trainer):
        """The reference weights of the PEFT policy under the checkpoint's names, the policy's adapter left alone:
        the base weights, plus the frozen "ref" adapter's LoRA deltas (merged, so without dropout) and
        ``modules_to_save`` copies if it has one."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.check_checkpoint_weights(model)
        adapters = (INITIAL_ADAPTER,) if INITIAL_ADAPTER in model.peft_config else ()
        yield from peft_weights_for_vllm(model, adapters, DistributedBackend(trainer.accelerator))

    def load_policy_weights(self, trainer) -> None:
        raise ValueError(
            "ref_update_steps is not supported with PEFT: the reference is the initial policy kept inside the PEFT "
            "model (its base weights, plus a frozen copy of the initial adapter unless that adapter was fresh), "
            "which cannot be replaced by the current policy. Train without peft_config to use reference updates."
        )


# ---- AAPO-LoRA: the reference's rows in the policy's own generate call (reference_generation="batched") ---------

BASE_ROWS = "__base__"  # PEFT's name for mixed-batch rows that run the base model, every adapter off
MIXED_BATCH_MODULES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def reference_rows_adapter(model) -> str:
    """The adapter PEFT's mixed batches give the reference's rows: the frozen initial adapter, or none (the base).

    The same choice as :meth:`PeftBaseReference.generation_model`: "ref" when :func:`keep_initial_adapter` (or
    TRL's ``beta != 0``) made that copy, else the adapters-off base.
    """
    return INITIAL_ADAPTER if INITIAL_ADAPTER in model.peft_config else BASE_ROWS


def mixed_batch_unsupported(model) -> str | None:
    """Why the policy's and the reference's rows of this PEFT model cannot share a mixed-adapter batch (None: they can).

    PEFT 0.21 runs a row with the adapter named for it in LoRA layers (plain LoRA: ``_mixed_batch_forward`` refuses
    DoRA, and variants such as aLoRA take another path) and in ``modules_to_save`` copies of Linear, Embedding and
    Conv modules only; adapters must not be merged into the base weights, and a row carries a single adapter.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if len(model.active_adapters) != 1:
        return f"the policy has several active adapters ({model.active_adapters}); a mixed-batch row runs one"
    adapters = [model.active_adapter] + ([INITIAL_ADAPTER] if INITIAL_ADAPTER in model.peft_config else [])
    for adapter in adapters:
        if not _is_plain_lora(model.peft_config[adapter]):
            return (f"the adapter {adapter!r} is not a plain LoRA (DoRA, LoRA bias, trainable tokens or another "
                    "tuner), which PEFT's mixed-adapter batches do not run")
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if module.merged:
                return f"adapters are merged into {name}; PEFT runs mixed-adapter batches on unmerged adapters only"
            variants = sorted(set(adapters) & set(getattr(module, "lora_variant", {})))
            if variants:
                return f"{name} runs a LoRA variant for {variants}, which mixed-adapter batches do not support"
        elif isinstance(module, ModulesToSaveWrapper) and not isinstance(module.original_module, MIXED_BATCH_MODULES):
            return (f"modules_to_save holds {name} ({type(module.original_module).__name__}); PEFT mixes adapters per "
                    "row only in Linear, Embedding and Conv modules")
    return None


def active_base_dropout(model) -> str | None:
    """The first dropout of the PEFT ``model``'s base model that training mode turns on (None: there is none).

    Dropout modules with ``p > 0`` outside the LoRA layers' own ``lora_dropout``, and attention modules with a
    non-zero ``attention_dropout`` (transformers applies it functionally in training mode).
    """
    for name, module in model.named_modules():
        if ".lora_dropout." in f".{name}.":
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name}: p={module.p}"
        attention_dropout = getattr(module, "attention_dropout", None)
        if isinstance(attention_dropout, float) and attention_dropout > 0:
            return f"{name}.attention_dropout={attention_dropout}"
    return None


def batched_reference_unsupported(trainer) -> str | None:
    """Why this trainer cannot sample its reference rows in the policy's generate call (None: it can, exactly)."""
    if not isinstance(trainer.reference, PeftBaseReference):
        return ("the reference is not the PEFT policy's own base or initial adapter (no PEFT policy, reference_model= "
                f"given, or reference_source={trainer.args.reference_source!r})")
    if trainer.use_vllm or trainer.use_transformers_continuous_batching:
        return "the policy does not generate with transformers generate (use_vllm or continuous batching)"
    if trainer.tools or trainer.rollout_func is not None:
        return "the policy generates with tools or a rollout_func, which the reference does not use"
    if trainer._is_vlm:
        return "the policy is a vision-language model (the reference samples text prompts only)"
    dropout = active_base_dropout(trainer.accelerator.unwrap_model(trainer.model))
    if dropout:
        return (f"the base model applies dropout in training mode ({dropout}), which a shared forward would apply to "
                "the reference's rows too (the separate path samples the reference in eval mode)")
    generation_config = getattr(trainer, "generation_config", None)
    if generation_config is not None and max(generation_config.num_beams or 1,
                                             generation_config.num_return_sequences or 1) > 1:
        return ("the policy's generation_kwargs ask for beams or several sequences per prompt row (num_beams or "
                "num_return_sequences > 1), which expand the rows of one generate call")
    return mixed_batch_unsupported(trainer.accelerator.unwrap_model(trainer.model))


def resolve_reference_generation(trainer) -> str:
    """``AAPOConfig.reference_generation`` as it runs: "batched" or "separate" ("auto": batched where it applies)."""
    requested = trainer.args.reference_generation
    if requested == "separate":
        return "separate"
    reason = batched_reference_unsupported(trainer)
    if reason is None:
        return "batched"
    if requested == "batched":
        raise ValueError(
            "reference_generation='batched' samples the reference in the PEFT policy's own generate call, but "
            f"{reason}. Use reference_generation='auto' (batched where it applies) or 'separate'."
        )
    return "separate"


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names  # what PEFT's own pre-forward hook does (peft.tuners.lora.model)
    return args, kwargs


def _add_adapter_to_row_blocks(module, args, kwargs, output, blocks):
    """Add each block's LoRA delta to its rows of ``module``'s adapters-off output, as PEFT's plain forward would.

    The arithmetic is PEFT 0.21's vanilla ``Linear.forward`` (input cast to the adapter's dtype, ``lora_B(lora_A(
    dropout(x))) * scaling`` added to the base output in the base output's dtype), on a view of the block's rows.
    """
    x = args[0] if args else kwargs["x"]
    if x.size(0) != blocks[-1][2]:
        raise RuntimeError(
            f"adapter_row_blocks: a forward of {x.size(0)} rows inside blocks of {blocks[-1][2]} rows in all; the rows "
            "were expanded or reordered (beams, several sequences per row), so the blocks no longer hold one adapter"
        )
    for adapter, start, stop in blocks:
        if adapter not in module.lora_A:  # the base's rows, or an adapter that does not target this layer
            continue
        lora_A = module.lora_A[adapter]
        rows = module._cast_input_dtype(x[start:stop], lora_A.weight.dtype)
        delta = module.lora_B[adapter](lora_A(module.lora_dropout[adapter](rows))) * module.scaling[adapter]
        output[start:stop] += delta
    return output


def _runs_row_blocks(module, adapters) -> bool:
    """A plain LoRA ``Linear`` (PEFT's own class, no variant for these adapters): its rows are sliced, not gathered."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return type(module) is LoraLinear and not set(adapters) & set(module.lora_variant)


@contextmanager
def adapter_row_blocks(model, blocks: list[tuple[str, int]]):
    """Run consecutive blocks of rows of every forward of the PEFT ``model`` with one adapter each.

    ``blocks`` lists ``(adapter, rows)`` in batch order; the adapter ``"__base__"`` runs the rows with every adapter
    off. This is PEFT's mixed-adapter batch (``generate(adapter_names=...)``) for rows grouped by adapter, at the
    cost of a plain LoRA layer: PEFT's per-row path builds index lists in Python, gathers every adapter's rows and
    scatters them back in every LoRA layer at every decoding step (on a GPU, host-to-device copies of the
    indices each time); here each plain LoRA ``Linear`` runs its base layer on the whole batch and adds each
    adapter's delta to a view of its block. Other adapted modules (LoRA embeddings or convolutions,
    ``modules_to_save`` copies) keep PEFT's per-row path.

    PEFT's ``generate(adapter_names=...)`` also refuses a model in training mode (mixed batches cannot be
    trained). TRL samples the policy in training mode, under ``no_grad``: the hooks here keep each row's computation
    what it would be alone, with the mode left alone, so the policy's rows go through their adapter's LoRA dropout as
    in TRL's own call. The reference's rows have none: the frozen "ref" adapter is made without dropout
    (:func:`keep_initial_adapter`) and the ``"__base__"`` rows run no adapter; a base model with dropout of its own
    does not get here (:func:`batched_reference_unsupported`).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    spans, adapter_names, start = [], [], 0
    for adapter, rows in blocks:
        spans.append((adapter, start, start + rows))
        adapter_names += [adapter] * rows
        start += rows
    adapters = [adapter for adapter, _ in blocks]
    add_blocks = functools.partial(_add_adapter_to_row_blocks, blocks=spans)
    per_row = functools.partial(_inject_adapter_names, adapter_names=adapter_names)
    handles, switched_off = [], []
    try:
        for module in model.modules():
            if isinstance(module, LoraLayer) and _runs_row_blocks(module, adapters):
                switched_off.append((module, module._disable_adapters))
                module._disable_adapters = True  # PEFT's forward returns the base layer's output; the hook adds
                handles.append(module.register_forward_hook(add_blocks, with_kwargs=True))
            elif isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                handles.append(module.register_forward_pre_hook(per_row, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, disabled in switched_off:
            module._disable_adapters = disabled


def _reference_server_generation_class():
    """TRL's ``VLLMGeneration`` subclass for the reference server, built on first use (TRL imports vLLM lazily)."""
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    class ReferenceServerGeneration(VLLMGeneration):
        """TRL's vLLM server generation, pointed at the *reference* server.

        Generation (gathering the prompts, one request with ``n = num_generations`` per unique prompt,
        broadcasting and slicing the answers) is TRL's own ``VLLMGeneration.generate``. The only change is
        that the weight-transfer group is not opened for a frozen reference, which never receives weights:
        :meth:`open_weight_transfer` opens it at start-up with ``ref_update_steps`` only.
        """

        def _init_vllm(self):
            if self.mode != "server":  # pragma: no cover - only built in server mode
                raise ValueError("the reference server generation only runs in server mode")
            self.weight_transfer_ready = False
            if self.accelerator.is_main_process:
                try:
                    self.vllm_client = VLLMClient(
                        base_url=self.server_base_url,
                        group_port=self.group_port,
                        connection_timeout=self.server_timeout,
                    )
                except ImportError as error:
                    raise ImportError(
                        "reference_source='vllm_server' talks to the reference server through TRL's VLLMClient, which "
                        "needs vLLM installed in the training environment: pip install 'aapo-trl[vllm]'."
                    ) from error
            self.accelerator.wait_for_everyone()

        def open_weight_transfer(self):
            """Open the weight-transfer group with the server (TRL's ``init_communicator``, main process)."""
            if not self.weight_transfer_ready:
                if self.accelerator.is_main_process:
                    self.vllm_client.init_communicator(device=self.accelerator.device)
                self.weight_transfer_ready = True

        def sync_weights(self):
            self.open_weight_transfer()
            super().sync_weights()

    return ReferenceServerGeneration


class VLLMServerReference:
    """The reference is a second vLLM server, started on the reference checkpoint.

    Start it next to the policy's server, e.g. on GPU 1 while the policy's ``trl vllm-serve`` uses GPU 0::

        CUDA_VISIBLE_DEVICES=1 trl vllm-serve --model BASE --port 8001

    (``BASE``: the initial policy; with PEFT, the base model the adapters sit on, merged with the initial
    adapter unless that one is fresh). The trainer only
    asks it for completions; with ``ref_update_steps`` it also pushes the policy weights into it, through
    its own weight-transfer group (``reference_vllm_group_port``), at those steps only.
    """

    kind = "vllm_server"

    def __init__(self, trainer):
        args = trainer.args
        self.base_url = args.reference_server_url
        generation_class = _reference_server_generation_class()
        self.generation = generation_class(
            model=trainer.model,  # only read by ref_update_steps pushes: the current policy
            accelerator=trainer.accelerator,
            processing_class=trainer.processing_class,
            mode="server",
            server_base_url=self.base_url,
            group_port=args.reference_vllm_group_port,
            server_timeout=args.reference_vllm_server_timeout,
            repetition_penalty=trainer.repetition_penalty,
            temperature=trainer.temperature,
            top_p=trainer.top_p,
            top_k=trainer.top_k,
            min_p=trainer.min_p,
            max_completion_length=trainer.max_completion_length,
            logprobs=None,  # the reference only needs its tokens
            generation_kwargs=args.generation_kwargs,
        )
        self.weight_updates = 0
        self.request_timeout = args.reference_request_timeout
        client = getattr(self.generation, "vllm_client", None)  # main process only
        if client is not None:
            bound_request_time(client.session, self.request_timeout)
        self.background_requests = BackgroundReferenceRequests(self.generation, self.base_url, self.request_timeout)
        self._check_served_model(trainer)
        if args.ref_update_steps is not None:
            self._open_weight_transfer()
        policy = trainer.model
        if is_peft_model(policy) and not adapter_is_identity(policy, policy.active_adapter):
            logger.warning(
                "The PEFT policy starts with a trained adapter (%r), so the reference server at %s must serve the "
                "base model merged with that adapter (the initial policy), not the base model alone.",
                policy.active_adapter, self.base_url,
            )

    def _open_weight_transfer(self) -> None:
        """``ref_update_steps``: open the weight transfer at start-up, so that a setup that cannot push weights fails
        before any step is spent rather than at the first update. TRL's transfer is vLLM's NCCL engine: CUDA on
        the trainer's side and a server started with ``--weight-transfer-config '{"backend": "nccl"}'``."""
        try:
            self.generation.open_weight_transfer()
        except Exception as error:
            raise ValueError(
                f"ref_update_steps with reference_source='vllm_server' pushes the policy's weights into the reference "
                f"server at {self.base_url} through TRL's weight transfer (vLLM's NCCL engine), which needs CUDA GPUs "
                f"on both sides and a server started with `trl vllm-serve --model BASE --port PORT "
                f"--weight-transfer-config '{{\"backend\": \"nccl\"}}'`. Opening it failed: {error}. Without GPUs, use "
                f"reference_source='model' or 'vllm_colocate' for reference updates, or train without ref_update_steps "
                f"(a frozen reference server needs no transfer)."
            ) from error

    def _check_served_model(self, trainer) -> None:
        client = getattr(self.generation, "vllm_client", None)
        policy_name = getattr(getattr(trainer.model, "config", None), "_name_or_path", None)
        served = getattr(client, "model", None)
        if client is not None and policy_name and served and str(served) != str(policy_name):
            logger.warning(
                "The reference vLLM server at %s serves %r but the policy was initialised from %r; AAPO's reference "
                "must be the initial policy (with PEFT: its base model).", self.base_url, served, policy_name
            )

    def sample(self, trainer, prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
        """The sequential path (``reference_request_overlap=False``): TRL's ``VLLMGeneration.generate``, now."""
        try:
            _, completion_ids, _, _ = self.generation.generate(
                prompts=prompt_ids, images=None, num_generations=num_generations
            )
        except Exception as error:
            raise reference_server_error(self.base_url, self.request_timeout, error) from error
        return [list(ids) for ids in completion_ids]

    def send_request(self, trainer, prompt_ids: list[list[int]], num_generations: int) -> PendingReferenceRequest:
        """The overlapped path (``reference_request_overlap``): the same request as :meth:`sample`, sent now from a
        background thread and collected later with ``.completions(accelerator, prompt_ids)``. Collective."""
        return self.background_requests.send(trainer.accelerator, prompt_ids, num_generations)

    def close(self) -> None:
        """Cancel the reference requests not yet sent (end of training, or an exception)."""
        self.background_requests.close()

    def load_policy_weights(self, trainer) -> None:
        """``ref_update_steps``: push the current policy weights into the reference server.

        Runs on the training thread between steps (``on_step_end``), after the step's reference request was
        collected and before the next one is sent, so the next request sees the new weights; a request still on the
        wire (none in normal operation) is waited for first.
        """
        if is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
            PeftBaseReference().load_policy_weights(trainer)  # raises the explanatory error
        self.background_requests.wait_idle()
        self.generation.model = trainer.model
        self.generation.sync_weights()
        self.weight_updates += 1


def _colocated_load_weights(vllm_generation, named_weights) -> None:
    """Load ``(name, tensor)`` pairs into the colocated engine, the way TRL's ``sync_weights`` does."""
    model = vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    for name, tensor in named_weights:
        model.load_weights([(name, tensor)])


class ColocatedVLLMReference:
    """The reference samples on the policy's colocated vLLM engine, with the reference weights swapped in.

    ``sample`` loads the reference weights into the engine (waking it first in sleep mode), resets the
    prefix cache (its KV blocks were computed with the policy's weights), generates with TRL's
    ``VLLMGeneration.generate`` and finally sets ``trainer._last_loaded_step = -1``: TRL's next policy
    generation sees a step it has not loaded and pushes the policy weights back (``sync_weights``).
    Each generation batch therefore costs two weight loads into the engine.

    The reference weights are a frozen copy kept on the CPU (no accelerator memory), or, with PEFT, the policy's
    base weights with the frozen initial adapter's LoRA deltas merged into copies of them
    (:meth:`PeftBaseReference.named_weights`): merged weights run no dropout.
    """

    kind = "vllm_colocate"

    def __init__(self, weights: FrozenCopyReference | PeftBaseReference):
        self.weights = weights
        self.weight_loads = 0

    @property
    def model(self):
        return getattr(self.weights, "model", None)

    def parameters_fingerprint(self) -> torch.Tensor:
        return self.weights.parameters_fingerprint()

    def load_policy_weights(self, trainer) -> None:
        self.weights.load_policy_weights(trainer)

    def load_into_engine(self, trainer) -> None:
        vllm_generation = trainer.vllm_generation
        if vllm_generation.enable_sleep_mode:
            from trl.generation.vllm_generation import empty_cache

            empty_cache()
            vllm_generation.llm.wake_up(tags=["weights"])
            # TRL re-pushes the *policy* when it finds the weights asleep; they are awake, with the reference's
            vllm_generation._llm_weights_sleeping = False
        _colocated_load_weights(vllm_generation, self.weights.named_weights(trainer))
        vllm_generation.llm.reset_prefix_cache()
        self.weight_loads += 1

    def sample(self, trainer, prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
        try:
            self.load_into_engine(trainer)
            _, completion_ids, _, _ = trainer.vllm_generation.generate(
                prompts=prompt_ids, images=None, num_generations=num_generations
            )
        finally:
            # The engine holds (some of) the reference weights: the next policy generation must reload the policy.
            trainer._last_loaded_step = -1
        return [list(ids) for ids in completion_ids]


def make_reference(trainer, reference_model: torch.nn.Module | None = None):
    """Pick the sampled reference source for a freshly initialised (not yet accelerate-wrapped) AAPO trainer.

    ``reference_model``: an explicit frozen reference (already loaded) instead of the initial policy.
    ``reference_source="cache"`` samples nothing: the trainer reads :class:`aapo_trl.ref_rollouts.CachedReference`.
    """
    source = getattr(trainer.args, "reference_source", "model")
    if source == "cache":
        raise ValueError(
            "reference_source='cache' samples no reference: use aapo_trl.ref_rollouts.CachedReference (AAPOTrainer "
            "does)."
        )
    if source == "vllm_server":
        return VLLMServerReference(trainer)
    dist = DistributedBackend(trainer.accelerator)
    if reference_model is not None:
        weights = FrozenCopyReference(prepare_reference_model(trainer, reference_model))
    elif is_peft_model(trainer.model):
        keep_initial_adapter(trainer.model)
        weights = PeftBaseReference()
        if source == "vllm_colocate":  # before any step is spent
            weights.check_checkpoint_weights(trainer.model)
    elif getattr(trainer, "ref_model", None) is not None:  # beta != 0: TRL already holds (and placed) one
        weights = FrozenCopyReference(trainer.ref_model)
    elif source == "vllm_colocate":  # only its weights are read: off the accelerator unless sharded
        reference = initial_policy_model(trainer)
        weights = FrozenCopyReference(reference if dist.is_zero3 else reference.to("cpu"))
    else:
        weights = FrozenCopyReference(prepare_reference_model(trainer, initial_policy_model(trainer)))
    if source == "vllm_colocate":
        if dist.is_fsdp:
            raise NotImplementedError(
                "reference_source='vllm_colocate' is not supported with FSDP; use reference_source='vllm_server' or "
                "'model'."
            )
        return ColocatedVLLMReference(weights)
    return weights


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


def decode_completions(processing_class, prompts: list, prompt_ids: list[list[int]],
                       completion_ids: list[list[int]], tools: list | None = None) -> list:
    """Completions for the reward functions, built from token ids exactly as TRL builds the policy's.

    trl 1.16's ``GRPOTrainer._generate``: text prompts get ``batch_decode(ids, skip_special_tokens=True)``;
    conversational prompts get one assistant message each, parsed with TRL's ``parse_response`` (the prompt's tokens
    as prefix, the prompt's tools; a trailing EOS string stripped, empty content made ``""``, plain decoding when
    parsing fails) when the tokenizer carries a response template (``response_template``, or the legacy
    ``response_schema``), else ``{"role": "assistant", "content": batch_decode(...)}``. ``tools``: one list per
    row (TRL's ``tools``, or the row's environment's), none by default. Every reference source (frozen copy, PEFT,
    vLLM, the reference server, the cache builder) goes through here, so a reward function reads the reference's
    completion in the form it reads the policy's.
    """
    from trl.chat_template_utils import parse_response
    from trl.data_utils import is_conversational

    if not is_conversational({"prompt": prompts[0]}):
        return processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    from transformers import ProcessorMixin

    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        contents = processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        return [[{"role": "assistant", "content": content}] for content in contents]
    tools = tools if tools is not None else [[]] * len(completion_ids)  # TRL's `tools` without tools: []
    return [[parse_response(tokenizer, list(ids), prefix=list(prefix), tools=row_tools)]
            for ids, prefix, row_tools in zip(completion_ids, prompt_ids, tools, strict=True)]


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


__all__ = [
    "ColocatedVLLMReference",
    "FrozenCopyReference",
    "PeftBaseReference",
    "VLLMServerReference",
    "adapter_is_identity",
    "adapter_row_blocks",
    "batched_reference_unsupported",
    "copy_adapter_weights",
    "decode_completions",
    "eval_mode",
    "frozen_copy",
    "peft_weights_for_vllm",
    "push_peft_policy_without_merging",
    "initial_policy_model",
    "keep_initial_adapter",
    "make_reference",
    "mixed_batch_unsupported",
    "prepare_reference_model",
    "reference_rows_adapter",
    "resolve_reference_generation",
    "sample_reference_completions",
    "sampling_generation_config",
    "truncate_after_eos",
]
