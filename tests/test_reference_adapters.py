"""AAPO's PEFT reference is the initial policy for every adapter a user starts from, and it samples without dropout.

A policy that arrives with a trained adapter (an SFT adapter, a resumed run) is referenced with a frozen copy of that
adapter ("ref"). The copy must hold the *whole* adapter: LoRA factors of linear and embedding layers, trainable-token
deltas, ``modules_to_save`` copies, DoRA magnitudes, LoRA biases. For each kind, the reference's logits are compared
with the initial policy's where the trainer reads them:

* the separate sampler (``PeftBaseReference.generation_model``),
* the row-block batched default (``adapter_row_blocks``, in training mode, as TRL's generate call runs it),
* ``vllm_colocate`` (``PeftBaseReference.named_weights``, loaded into a model as vLLM loads a checkpoint), or its
  clear error where a checkpoint cannot hold the reference;

and the same under DeepSpeed ZeRO-3 with 2 processes for a trained adapter with ``modules_to_save``. With
``lora_dropout > 0`` the reference's per-step sampling logits are the initial policy's in eval mode on the separate
and the row-block path, while the policy's own rows keep TRL's training-mode dropout.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _launch import launch
from _training import make_aapo_trainer, prompt_dataset
from peft import LoraConfig, get_peft_model
from test_aapo_batched_reference import StepLogits, teacher_forced_logits
from transformers import AutoModelForCausalLM, AutoTokenizer

from aapo_trl.reference import (
    PeftBaseReference,
    adapter_is_identity,
    adapter_row_blocks,
    keep_initial_adapter,
    make_reference,
    reference_rows_adapter,
)

INPUT_IDS = torch.tensor([[1, 5, 9, 13, 20, 7], [3, 3, 8, 2, 11, 4]])
TOKEN_INDICES = [5, 9, 13, 20, 8, 11]  # tokens of INPUT_IDS, so the trainable-token deltas are read

#: The adapter kinds PEFT 0.21 offers that a user starts from (an SFT adapter): LoraConfig arguments.
ADAPTER_KINDS = {
    "lora_linear": {"target_modules": ["q_proj", "v_proj"]},
    "lora_embedding": {"target_modules": ["q_proj", "embed_tokens"]},
    "trainable_tokens": {"target_modules": ["q_proj"], "trainable_token_indices": TOKEN_INDICES},
    "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "dora": {"target_modules": ["q_proj", "v_proj"], "use_dora": True},
    "lora_bias": {"target_modules": ["q_proj", "v_proj"], "lora_bias": True},
}
#: Where each kind's reference runs: the row-block batched path needs plain LoRA; vllm_colocate needs plain LoRA and,
#: on a model with tied embeddings (the tiny model), an adapter that leaves both embeddings alone.
BATCHED = {"lora_linear", "lora_embedding", "modules_to_save"}
VLLM_TIED = {"lora_linear"}
VLLM_UNTIED = {"lora_linear", "lora_embedding", "modules_to_save"}


def adapter_config(kind: str, **overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 32, "task_type": "CAUSAL_LM", **ADAPTER_KINDS[kind], **overrides})


def adapter_tensors(model, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    """Every parameter of one adapter, found as PEFT names them: ``...lora_A.default.weight``, but also
    ``...lora_embedding_A.default`` and ``...trainable_tokens_delta.default`` (no trailing dot)."""
    return {name: parameter for name, parameter in model.named_parameters()
            if f".{adapter}." in name or name.endswith(f".{adapter}")}


def perturb_whole_adapter_(model, adapter: str = "default", seed: int = 0, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = adapter_tensors(model, adapter)
    assert tensors, adapter
    with torch.no_grad():
        for parameter in tensors.values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def trained_policy(model_path, kind: str, **overrides):
    """A PeftModel whose adapter of ``kind`` is far from the identity in every tensor, as an SFT adapter arrives."""
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                            adapter_config(kind, init_lora_weights=False, **overrides))
    perturb_whole_adapter_(policy, seed=1)
    return policy


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


@torch.no_grad()
def eval_logits_of(model) -> torch.Tensor:
    """What ``model`` computes without dropout, its modes left as they were."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        return logits_of(model)
    finally:
        for module, training in modes:
            module.training = training


def start_training(trainer) -> None:
    """The policy's adapter moves away from step 0, and the model is in training mode, as TRL generates."""
    perturb_whole_adapter_(trainer.model, seed=2)
    trainer.model.train()


@torch.no_grad()
def separate_reference_logits(trainer) -> torch.Tensor:
    with trainer.reference.generation_model(trainer) as model:
        return logits_of(model)


@torch.no_grad()
def row_block_reference_logits(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy rows, reference rows) of one forward of the PEFT policy under the batched path's row blocks."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    rows = INPUT_IDS.size(0)
    with adapter_row_blocks(model, [(model.active_adapter, rows), (reference_rows_adapter(model), rows)]):
        logits = logits_of(model, torch.cat([INPUT_IDS, INPUT_IDS]))
    return logits[:rows], logits[rows:]


@torch.no_grad()
def checkpoint_model_logits(trainer, model_path) -> torch.Tensor:
    """Load ``named_weights`` into the base architecture the way vLLM loads a checkpoint (a tied output embedding is
    the input embedding; every other weight must be there) and run it."""
    weights = dict(PeftBaseReference().named_weights(trainer))
    model = AutoModelForCausalLM.from_pretrained(model_path)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # nothing of the base survives unless named_weights carries it
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = model.config.tie_word_embeddings
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    return logits_of(model.eval())


@pytest.fixture(scope="module")
def untied_model_path(tiny_model_path, tmp_path_factory):
    """The tiny model with an output embedding of its own (not tied to the input embedding)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.get_input_embeddings().weight
                                   + 0.1 * torch.randn(model.lm_head.weight.shape,
                                                       generator=torch.Generator().manual_seed(5)))
    path = tmp_path_factory.mktemp("untied")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------------------
# the whole initial adapter, on every path
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(ADAPTER_KINDS))
def test_reference_is_the_initial_policy_for_every_adapter_kind(tiny_model_path, tmp_path, kind):
    policy = trained_policy(tiny_model_path, kind)
    initial = eval_logits_of(policy)
    with policy.disable_adapter():
        assert (eval_logits_of(policy) - initial).abs().max() > 1e-2, "the adapter must change what the model says"
    assert not adapter_is_identity(policy, "default")

    trainer = make_aapo_trainer(policy, tmp_path)
    model = trainer.model
    assert model.peft_config["ref"].lora_dropout == 0.0
    assert set(adapter_tensors(model, "ref")) == {
        name.replace(".default", ".ref") for name in adapter_tensors(model, "default")}
    assert not any(p.requires_grad for p in adapter_tensors(model, "ref").values())
    assert all(p.requires_grad for p in adapter_tensors(model, "default").values())
    assert model.active_adapter == "default"
    start_training(trainer)
    assert (eval_logits_of(model) - initial).abs().max() > 1e-2  # the policy moved

    torch.testing.assert_close(separate_reference_logits(trainer), initial)
    if kind in BATCHED:
        assert trainer.reference_generation == "batched"
        _, reference_rows = row_block_reference_logits(trainer)
        torch.testing.assert_close(reference_rows, initial)
    else:  # PEFT's mixed batches run plain LoRA only: "auto" samples this reference with the separate path
        assert trainer.reference_generation == "separate"
        with pytest.raises(ValueError, match="not a plain LoRA"):
            make_aapo_trainer(trained_policy(tiny_model_path, kind), tmp_path, reference_generation="batched")
    if kind in VLLM_TIED:
        torch.testing.assert_close(checkpoint_model_logits(trainer, tiny_model_path), initial)
    else:
        with pytest.raises(NotImplementedError, match="vllm_colocate"):
            list(PeftBaseReference().named_weights(trainer))
        trainer.args.reference_source = "vllm_colocate"  # the check runs when the trainer is built
        with pytest.raises(NotImplementedError, match="vllm_colocate"):
            make_reference(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(VLLM_UNTIED - VLLM_TIED))
def test_vllm_colocate_weights_are_the_initial_policy_on_a_model_with_untied_embeddings(untied_model_path, tmp_path,
                                                                                       kind):
    policy = trained_policy(untied_model_path, kind)
    initial = eval_logits_of(policy)
    trainer = make_aapo_trainer(policy, tmp_path)
    start_training(trainer)
    torch.testing.assert_close(checkpoint_model_logits(trainer, untied_model_path), initial)


@pytest.mark.slow
def test_trl_s_own_ref_adapter_is_replaced_by_the_whole_initial_adapter(tiny_model_path, tmp_path):
    """beta != 0 with a PeftModel: TRL adds "ref" itself, copying tensors named ``.default.``; its KL term and AAPO's
    reference both read that adapter, so it must hold the embedding LoRA too."""
    policy = trained_policy(tiny_model_path, "lora_embedding")
    initial = eval_logits_of(policy)
    trainer = make_aapo_trainer(policy, tmp_path, beta=0.04, loss_type="grpo")
    start_training(trainer)
    torch.testing.assert_close(separate_reference_logits(trainer), initial)
    from trl.trainer.utils import use_adapter

    with use_adapter(trainer.model, "ref"):  # what TRL's KL term runs
        torch.testing.assert_close(eval_logits_of(trainer.model), initial)


def test_keep_initial_adapter_copies_every_tensor_and_refuses_trained_base_biases(tiny_model_path):
    for kind in ADAPTER_KINDS:
        policy = trained_policy(tiny_model_path, kind)
        keep_initial_adapter(policy)
        source, copied = adapter_tensors(policy, "default"), adapter_tensors(policy, "ref")
        for name, tensor in source.items():
            assert torch.equal(copied[name.replace(".default", ".ref")], tensor), (kind, name)
    with pytest.raises(ValueError, match="bias='all'.*base model's own biases"):
        keep_initial_adapter(trained_policy(tiny_model_path, "lora_linear", bias="all"))


def test_a_policy_with_its_own_ref_adapter_is_refused_before_training(tiny_model_path, tmp_path):
    """AAPO (and TRL's KL term) name the frozen copy "ref"; an adapter of the user's under that name would be taken
    for the initial policy, or overwritten."""
    policy = trained_policy(tiny_model_path, "lora_linear")
    policy.add_adapter("ref", adapter_config("lora_linear"))
    with pytest.raises(ValueError, match="already has an adapter named 'ref'"):
        make_aapo_trainer(policy, tmp_path)


@pytest.mark.parametrize("kind", list(ADAPTER_KINDS))
def test_adapter_is_identity_only_when_the_adapter_changes_nothing(tiny_model_path, kind):
    """A fresh adapter (PEFT's default initialisation) may be called the identity only if the model with it computes
    the base model; an adapter moved in any of its tensors never is."""
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), adapter_config(kind)).eval()
    with fresh.disable_adapter():
        base = logits_of(fresh)

    def check(model) -> bool:
        identity = adapter_is_identity(model, "default")
        if identity:
            assert torch.equal(logits_of(model), base)
        return identity

    assert check(fresh) == (kind in {"lora_linear", "lora_embedding", "modules_to_save"})
    for name, tensor in adapter_tensors(fresh).items():  # one tensor moved: identity only if nothing changed
        moved = copy.deepcopy(fresh)
        with torch.no_grad():
            moved.get_parameter(name).add_(torch.full_like(tensor, 0.1))
        check(moved)
    perturb_whole_adapter_(fresh)
    assert not check(fresh)


# ------------------------------------------------------------------------------------------------------------
# no dropout in the reference's sampling distribution
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("path", ["separate", "batched"])
def test_reference_samples_without_lora_dropout(tiny_model_path, tmp_path, path):
    """lora_dropout=0.5: every step's logits of the reference's rows are the initial policy's in eval mode; the
    policy's rows (batched: the same forward) keep TRL's training-mode dropout."""
    kind = "modules_to_save"
    policy = trained_policy(tiny_model_path, kind, lora_dropout=0.5)
    initial = copy.deepcopy(policy).eval()
    trainer = make_aapo_trainer(policy, tmp_path, reference_generation=path)
    assert trainer.reference_generation == path
    start_training(trainer)
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in prompt_dataset()])
    rows = len(prompt_ids)

    recorder = StepLogits(trainer.model)
    torch.manual_seed(0)
    if path == "separate":
        reference_ids = trainer.reference.sample(trainer, prompt_ids, 3)
        reference_steps = recorder.rows()
    else:
        policy_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, 3)
        steps = recorder.rows()
        reference_ids = trainer._batched_reference["completion_ids"]
        reference_steps = steps[rows:]
        policy = copy.deepcopy(trainer.model).eval()
        dropped = [(steps[row, : len(ids)] - teacher_forced_logits(policy, prompt_ids[row], ids)).abs().max()
                   for row, ids in enumerate(policy_ids)]
        assert max(dropped) > 1e-2, "the policy's rows must keep TRL's training-mode LoRA dropout"
    assert trainer.model.training  # the mode TRL set is given back
    for row, ids in enumerate(reference_ids):
        torch.testing.assert_close(reference_steps[row, : len(ids)],
                                   teacher_forced_logits(initial, prompt_ids[row], ids), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_vllm_colocate_reference_weights_carry_no_dropout(tiny_model_path, tmp_path):
    """vLLM runs merged weights, so the reference's LoRA delta has no dropout there by construction."""
    policy = trained_policy(tiny_model_path, "lora_linear", lora_dropout=0.5)
    initial = eval_logits_of(policy)
    trainer = make_aapo_trainer(policy, tmp_path)
    start_training(trainer)
    torch.testing.assert_close(checkpoint_model_logits(trainer, tiny_model_path), initial)
    torch.testing.assert_close(checkpoint_model_logits(trainer, tiny_model_path), initial)  # the same every time


@pytest.mark.slow
def test_batched_reference_falls_back_to_separate_when_the_base_model_has_dropout(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attention_dropout=0.1)
    policy = get_peft_model(model, adapter_config("lora_linear"))
    trainer = make_aapo_trainer(policy, tmp_path)
    assert trainer.reference_generation == "separate"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attention_dropout=0.1)
    with pytest.raises(ValueError, match="reference_generation='batched'.*dropout"):
        make_aapo_trainer(get_peft_model(model, adapter_config("lora_linear")), tmp_path,
                          reference_generation="batched")


# ------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3, 2 processes: a trained adapter with modules_to_save
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trained_adapter_with_modules_to_save_under_zero3_is_the_initial_policy(tiny_model_path, tmp_path):
    """An SFT adapter with an ``lm_head`` copy in modules_to_save and LoRA on q_proj and the embeddings. The launched
    run loads the saved adapter onto the partitioned base, trains a step, and records the logits of
    the reference's separate path and of its row-block rows (both gathered for generation, as TRL does)."""
    policy = trained_policy(tiny_model_path, "modules_to_save", target_modules=["q_proj", "embed_tokens"])
    adapter_dir = tmp_path / "sft_adapter"
    policy.save_pretrained(adapter_dir, save_embedding_layers=False)  # PEFT cannot load base weights under ZeRO-3
    initial = eval_logits_of(policy)

    overrides = {"initial_adapter": str(adapter_dir), "input_ids": INPUT_IDS.tolist(), "learning_rate": 0.01}
    runs = launch(None, 2, tiny_model_path, tmp_path / "zero3", config="zero3", overrides=overrides,
                  script=Path(__file__).with_name("reference_adapter_run.py"))
    for rank in runs:
        assert rank["deepspeed_zero_stage"] == 3
        assert rank["reference_generation"] == "batched"
        logits = {key: torch.tensor(value) for key, value in rank["reference_logits"].items()}
        torch.testing.assert_close(logits["separate"], initial, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits["row_blocks"], initial, atol=1e-5, rtol=1e-5)
        assert (torch.tensor(rank["policy_logits"]) - initial).abs().max() > 1e-3, "the policy must have trained"
    assert json.dumps(runs[0]["reference_logits"]) == json.dumps(runs[1]["reference_logits"])
