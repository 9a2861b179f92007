"""AAPO's reference is the policy as it was at step 0, whatever the policy arrives as or TRL patches into it.

* PEFT: a policy that arrives with a trained adapter (an SFT LoRA, a resumed run) is referenced with a frozen copy
  of that adapter; adapters-off only when the initial adapter provably adds nothing (a fresh LoRA).
* TRL's forward patches (fused LM head, fp32 LM head) on the frozen copy run the copy's weights, not the policy's.
* ``ref_update_steps`` copies the policy into a reference on another device (``vllm_colocate`` keeps it on the CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _training import (
    lora,
    make_aapo_trainer,
    peft_policy_with_a_trained_adapter,
    perturb_adapter_,
)
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from aapo_trl.reference import (
    ColocatedVLLMReference,
    FrozenCopyReference,
    PeftBaseReference,
    frozen_copy,
)

INPUT_IDS = torch.tensor([[1, 5, 9, 13, 20, 7], [3, 3, 8, 2, 11, 4]])


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    return model(input_ids=INPUT_IDS).logits.float()


@torch.no_grad()
def reference_logits(trainer) -> torch.Tensor:
    """The logits of the model the reference samples with."""
    with trainer.reference.generation_model(trainer) as model:
        return logits_of(model)


# ------------------------------------------------------------------------------------------------------------
# PEFT: the reference is the initial policy, not the adapter-free base
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.04])  # beta != 0: TRL itself already adds the "ref" adapter
def test_peft_policy_with_a_trained_adapter_is_referenced_as_it_was_at_step_0(tiny_model_path, tmp_path, beta):
    policy = peft_policy_with_a_trained_adapter(tiny_model_path)
    initial = logits_of(policy)
    with policy.disable_adapter():
        base = logits_of(policy)
    assert (initial - base).abs().max() > 1e-2, "the trained adapter must change what the model says"

    trainer = make_aapo_trainer(policy, tmp_path, beta=beta, loss_type="aapo" if beta == 0 else "grpo")
    assert isinstance(trainer.reference, PeftBaseReference)
    perturb_adapter_(trainer.model, seed=2)  # the policy trains its own adapter from here on
    assert (logits_of(trainer.model) - initial).abs().max() > 1e-2

    torch.testing.assert_close(reference_logits(trainer), initial)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)
    assert trainer.model.active_adapter == "default"


@pytest.mark.slow
@pytest.mark.parametrize(("init_lora_weights", "identity"), [(True, True), (False, False)])
def test_fresh_peft_config_is_referenced_with_adapters_off_only_when_the_adapter_adds_nothing(
        tiny_model_path, tmp_path, init_lora_weights, identity):
    base = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_path))
    trainer = make_aapo_trainer(str(tiny_model_path), tmp_path, peft_config=lora(init_lora_weights=init_lora_weights))
    initial = logits_of(trainer.model)
    # PEFT's default LoRA initialisation (B = 0) is the base model; init_lora_weights=False is not
    assert torch.allclose(initial, base) == identity
    perturb_adapter_(trainer.model, seed=3)

    torch.testing.assert_close(reference_logits(trainer), initial)
    assert ("ref" not in trainer.model.peft_config) == identity  # adapters off, no copy, when provably equal


@pytest.mark.slow
def test_colocated_peft_reference_weights_are_the_merged_initial_policy(tiny_model_path, tmp_path):
    """vllm_colocate loads PeftBaseReference.named_weights into the engine: base + the initial adapter, merged."""
    policy = peft_policy_with_a_trained_adapter(tiny_model_path)
    initial = copy.deepcopy(policy).merge_and_unload()
    trainer = make_aapo_trainer(policy, tmp_path)
    perturb_adapter_(trainer.model, seed=2)

    weights = dict(trainer.reference.named_weights(trainer))
    expected = dict(initial.named_parameters())
    assert set(weights) == set(expected)  # vLLM's names: no LoRA tensors, no PEFT prefixes
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, expected[name])
    assert any(not torch.equal(weights[n], p) for n, p in
               AutoModelForCausalLM.from_pretrained(tiny_model_path).named_parameters())  # not the base


def test_peft_weights_for_vllm_merge_out_of_place_and_leave_the_base_bit_exact(tiny_model_path):
    """The policy push of a PEFT policy (push_peft_policy_without_merging): the merged weights without touching the
    base, where PEFT's in-place merge/unmerge round trip moves a bf16 base by a rounding step."""
    from peft import LoraConfig, get_peft_model
    from trl.distributed import DistributedBackend

    from aapo_trl.reference import peft_weights_for_vllm

    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                      task_type="CAUSAL_LM")
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16), lora)
    perturb_adapter_(policy, seed=3)
    with torch.no_grad():
        policy.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.25)
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    merged = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    base = {n: p for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_path,
                                                                  dtype=torch.bfloat16).named_parameters()}
    dist = DistributedBackend(Accelerator())

    pushed = dict(peft_weights_for_vllm(policy, ["default"], dist))
    assert set(pushed) == set(merged)  # vLLM's names: no LoRA tensors, no PEFT prefixes
    for name in merged:
        assert torch.equal(pushed[name], merged[name]), name  # the same arithmetic as PEFT's merge
    assert all(torch.equal(p, base_before[n]) for n, p in policy.named_parameters())  # nothing moved
    base_only = dict(peft_weights_for_vllm(policy, [], dist))
    assert set(base_only) == set(base) and all(torch.equal(base_only[n], base[n]) for n in base)

    policy.merge_adapter()  # what TRL's own push does, for contrast
    policy.unmerge_adapter()
    drifted = [n for n, p in policy.named_parameters() if not torch.equal(p, base_before[n])]
    assert drifted and all(".base_layer." in n for n in drifted)


# ------------------------------------------------------------------------------------------------------------
# The frozen copy runs its own weights, whatever forward patches TRL installed on the policy
# ------------------------------------------------------------------------------------------------------------


def optimizer_step_(model) -> None:
    """One SGD step on a language-modelling loss: every weight the loss reaches moves, the LM head included."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(("cast_lm_head_to_fp32", "dtype"), [(False, "float32"), (True, "float32"),
                                                              (True, "bfloat16")])
def test_frozen_copy_logits_do_not_move_when_the_policy_trains(tiny_model_path, tmp_path, cast_lm_head_to_fp32,
                                                               dtype):
    """TRL 1.16 patches the policy's forward (fused LM head, always) and its LM head's (cast_lm_head_to_fp32)."""
    trainer = make_aapo_trainer(str(tiny_model_path), tmp_path, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                           model_init_kwargs={"dtype": dtype})
    assert isinstance(trainer.reference, FrozenCopyReference)
    reference = trainer.reference.model
    policy_initial = logits_of(trainer.model)
    initial = logits_of(reference)
    torch.testing.assert_close(initial, policy_initial)  # the copy computes what the initial policy computed
    with torch.no_grad():  # TRL's fused LM head, kept on the copy
        fused_initial = trainer.model(input_ids=INPUT_IDS, labels=INPUT_IDS, fused_lm_head=True).log_probs.clone()
    head_before = trainer.model.lm_head.weight.detach().clone()

    optimizer_step_(trainer.model)
    assert not torch.equal(trainer.model.lm_head.weight, head_before)  # the policy's output layer moved
    assert (logits_of(trainer.model) - policy_initial).abs().max() > 1e-2

    assert torch.equal(logits_of(reference), initial)
    with trainer.reference.generation_model(trainer) as model:
        assert torch.equal(logits_of(model), initial)
    with torch.no_grad():
        torch.testing.assert_close(
            reference(input_ids=INPUT_IDS, labels=INPUT_IDS, fused_lm_head=True).log_probs, fused_initial)


def test_frozen_copy_rebinds_every_instance_forward_patch_to_the_copy():
    """Liger-style bound methods, closures over modules, partials and forward hooks all end up on the copy."""
    import functools
    import types

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    first, second = model[0], model[1]
    first.forward = types.MethodType(lambda self, x: torch.nn.functional.linear(x, self.weight), first)
    second.forward = lambda x: torch.nn.functional.linear(x, second.weight, second.bias)  # a closure, like TRL's
    modules = [first, second]
    model.forward = functools.partial(lambda head, x: head(modules[0](x)), second)  # a partial, a list in a closure
    second.register_forward_hook(lambda module, args, output: output + second.bias)
    x = torch.ones(1, 4)
    expected = model(x).detach()

    reference = frozen_copy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert not torch.equal(model(x), expected)
    assert torch.equal(reference(x), expected)


# ------------------------------------------------------------------------------------------------------------
# ref_update_steps with the reference on another device than the policy (vllm_colocate keeps it on the CPU)
# ------------------------------------------------------------------------------------------------------------


class StrictDevices(torch.overrides.TorchFunctionMode):
    """Raises, as CUDA does, when an op mixes tensors of two devices (CPU scalars and explicit moves aside).

    On the CPU the only second device is ``meta``, whose kernels let ``meta.add_(cpu)`` through; this mode
    makes such a mix fail the way ``cpu.add_(cuda)`` does on a GPU machine.
    """

    MOVES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.cuda}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.MOVES:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_strict_devices_raises_on_a_mix_like_cuda():
    with StrictDevices(), pytest.raises(RuntimeError, match="same device"):
        torch.zeros(3, device="meta").add_(torch.ones(3))


@pytest.mark.slow
def test_ref_update_copies_the_policy_into_a_reference_on_another_device(tiny_model_path, tmp_path):
    """The colocated reference's frozen copy sits on another device than the policy (CPU vs accelerator)."""
    trainer = make_aapo_trainer(str(tiny_model_path), tmp_path, ref_update_steps=1)
    policy_device = next(trainer.model.parameters()).device
    elsewhere = frozen_copy(trainer.model).to("meta")  # the "other device": raises on mixing, under StrictDevices
    elsewhere.tie_weights()  # moving to meta unties the head from the embeddings, moving to a GPU does not
    trainer.reference = ColocatedVLLMReference(FrozenCopyReference(elsewhere))

    with StrictDevices():
        trainer.reference.load_policy_weights(trainer)

    assert {p.device.type for p in elsewhere.parameters()} == {"meta"}  # the reference stays where it lives
    assert next(trainer.model.parameters()).device == policy_device
