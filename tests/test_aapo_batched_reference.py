"""AAPO-LoRA in one generation call: ``reference_generation="batched"``.

With a PEFT policy, AAPO's reference rows ride in the policy's own ``generate`` call as a PEFT mixed-adapter batch:
the policy's rows run the trained adapter, the reference's rows the adapters-off base (a fresh LoRA) or the frozen
copy of the initial adapter ("ref", a policy that arrived with a trained adapter). These tests show that

* the reference rows are sampled from the reference: the logits that drew each of their tokens are the reference
  model's, not the (trained) policy's, and the policy's rows still are the policy's;
* with greedy decoding the batched rows equal what the separate path generates (policy and reference alike);
* a real AAPO step runs one generate call instead of two, with finite losses and the ``aapo/*`` metrics;
* ``"auto"`` picks ``"batched"`` only where PEFT's mixed batches apply, and an explicit ``"batched"`` that cannot
  apply is a clear error.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from _launch import (
    BATCHED_LORA,
    assert_batched_lora_rows_are_not_trivial,
    assert_same_as_single_process,
    launch,
)
from _training import (
    aapo_test_config,
    lora,
    make_aapo_trainer,
    peft_policy_with_a_trained_adapter,
    perturb_adapter_,
    prompt_dataset,
)
from transformers import AutoModelForCausalLM

from aapo_trl.reference import adapter_row_blocks, mixed_batch_unsupported

NUM_GENERATIONS = 3  # aapo_test_config's


def reference_kind_trainer(kind, tiny_model_path, tmp_path, **overrides):
    """An AAPO-LoRA trainer whose policy has trained away from its reference (adapters off, or the "ref" copy)."""
    if kind == "adapters_off":  # a fresh LoRA: the reference is the base
        trainer = make_aapo_trainer(str(tiny_model_path), tmp_path, peft_config=lora(), **overrides)
        assert "ref" not in trainer.model.peft_config
    else:  # an SFT-like adapter (with an lm_head copy in modules_to_save): the reference is its frozen "ref" copy
        policy = peft_policy_with_a_trained_adapter(tiny_model_path, lora(modules_to_save=["lm_head"]))
        trainer = make_aapo_trainer(policy, tmp_path, **overrides)
        assert "ref" in trainer.model.peft_config
    perturb_adapter_(trainer.model, seed=7)  # the policy's adapter has trained since step 0
    trainer.model.train()  # TRL generates in training mode
    return trainer


def prompt_ids_of(trainer) -> list[list[int]]:
    prompt_ids, _, _ = trainer._tokenize_prompts([row["prompt"] for row in prompt_dataset()])
    return prompt_ids


class StepLogits:
    """The logits each generation step drew its tokens from, per row: a forward hook on the model under PEFT."""

    def __init__(self, peft_model):
        self.steps = []
        self.handle = peft_model.get_base_model().register_forward_hook(self.record)

    def record(self, module, args, output):
        self.steps.append(output.logits[:, -1].detach().float())

    def rows(self) -> torch.Tensor:
        self.handle.remove()
        return torch.stack(self.steps, dim=1)  # (rows, steps, vocab)


@torch.no_grad()
def teacher_forced_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The logits ``model`` gives each completion token, from the prompt and the tokens before it."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adapters_off", "initial_adapter"])
def test_reference_rows_are_drawn_from_the_reference_and_policy_rows_from_the_policy(tiny_model_path, tmp_path,
                                                                                        kind):
    trainer = reference_kind_trainer(kind, tiny_model_path, tmp_path)
    assert trainer.reference_generation == "batched"
    prompt_ids = prompt_ids_of(trainer)
    rows = len(prompt_ids)

    recorder = StepLogits(trainer.model)
    policy_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, NUM_GENERATIONS)
    step_logits = recorder.rows()
    reference_ids = trainer._batched_reference["completion_ids"]
    assert step_logits.size(0) == 2 * rows  # one call for both
    assert len(policy_ids) == len(reference_ids) == rows

    with trainer.reference.generation_model(trainer) as reference:
        reference_says = [teacher_forced_logits(reference, p, c) for p, c in zip(prompt_ids, reference_ids)]
    policy_on_reference_rows = [teacher_forced_logits(trainer.model, p, c) for p, c in zip(prompt_ids, reference_ids)]
    policy_says = [teacher_forced_logits(trainer.model, p, c) for p, c in zip(prompt_ids, policy_ids)]
    for row in range(rows):
        drawn_from = step_logits[rows + row, : len(reference_ids[row])]
        torch.testing.assert_close(drawn_from, reference_says[row], atol=1e-4, rtol=1e-4)
        assert (drawn_from - policy_on_reference_rows[row]).abs().max() > 1e-1  # the policy would say otherwise
        torch.testing.assert_close(step_logits[row, : len(policy_ids[row])], policy_says[row], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adapters_off", "initial_adapter"])
def test_greedy_batched_rows_equal_the_separate_calls(tiny_model_path, tmp_path, kind):
    trainer = reference_kind_trainer(kind, tiny_model_path, tmp_path, generation_kwargs={"do_sample": False})
    prompt_ids = prompt_ids_of(trainer)
    batched_policy, _ = trainer._generate_single_turn(prompt_ids, None, {}, NUM_GENERATIONS)
    batched_reference = trainer._batched_reference["completion_ids"]

    trainer.reference_generation = "separate"
    separate_policy, _ = trainer._generate_single_turn(prompt_ids, None, {}, NUM_GENERATIONS)
    separate_reference = trainer.reference.sample(trainer, prompt_ids, NUM_GENERATIONS)
    assert batched_policy == separate_policy
    assert batched_reference == separate_reference
    assert batched_policy != batched_reference  # the two halves really ran different weights


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "reference_generation", "generate_calls"),
                         [("adapters_off", "auto", 1), ("initial_adapter", "batched", 1),
                          ("adapters_off", "separate", 2)])
def test_an_aapo_step_runs_one_generate_call(tiny_model_path, tmp_path, monkeypatch, kind, reference_generation,
                                             generate_calls):
    trainer = reference_kind_trainer(kind, tiny_model_path, tmp_path, max_steps=2,
                                     reference_generation=reference_generation)
    assert trainer.reference_generation == ("separate" if generate_calls == 2 else "batched")
    batch_sizes = []
    generate = trainer.model.generate

    def counting_generate(*args, **kwargs):
        batch_sizes.append(kwargs["input_ids"].size(0))
        return generate(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "generate", counting_generate)
    trainer.train()

    rows = trainer.args.per_device_train_batch_size
    assert batch_sizes == [rows * (3 - generate_calls)] * generate_calls * trainer.args.max_steps
    assert len(trainer._last_reference["completion_ids"]) == rows
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert math.isfinite(entry["loss"])
        for metric in ("aapo/margin_mean", "aapo/ref_reward_mean", "aapo/ref_completion_mean_length"):
            assert math.isfinite(entry[metric]), metric
        assert entry["aapo/ref_completion_mean_length"] > 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_batched_reference_under_two_processes_matches_one(tiny_model_path, tmp_path, single_process_run):
    """Each process appends the reference rows of its own prompts; the gathered batch is the single process's. (That
    these rows are what the separate call samples is test_greedy_batched_rows_equal_the_separate_calls, above.)"""
    single = single_process_run("aapo_lora_batched")
    double = launch("aapo", 2, tiny_model_path, tmp_path / "two", overrides=BATCHED_LORA)
    assert [rank["reference_generation"] for rank in single + double] == ["batched"] * 3
    assert_same_as_single_process(single, double)
    assert_batched_lora_rows_are_not_trivial(single)


def test_the_floor_benchmark_runs_every_call_and_prints_the_ratios(tiny_model_path, capsys):
    from _scripts import load_benchmark

    load_benchmark("batched_reference_floor").main(["--model", str(tiny_model_path), "--rows", "2", "--new-tokens",
                                                     "3", "--rounds", "1"])
    printed = capsys.readouterr().out
    for line in ("policy x2 (GRPO-LoRA)", "row blocks: policy x2 + reference x2", "base x4 (adapters off)",
                 "base x2 (adapters off)", "policy x4 (LoRA on every row)", "floor of an exact batched call"):
        assert line in printed
    ratios = dict(re.findall(r"^(row blocks / \S+).*?([\d.]+)$", printed, re.MULTILINE))
    assert set(ratios) == {"row blocks / floor", "row blocks / GRPO-LoRA's"}
    assert all(float(ratio) > 0 for ratio in ratios.values())


# ------------------------------------------------------------------------------------------------------------
# where "batched" applies
# ------------------------------------------------------------------------------------------------------------


def test_config_refuses_an_explicit_batched_reference_that_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="reference_generation must be one of"):
        aapo_test_config(tmp_path, reference_generation="sometimes")
    with pytest.raises(ValueError, match="reference_generation='batched'.*reference_source='model'"):
        aapo_test_config(tmp_path, reference_generation="batched", reference_source="cache")


def test_explicit_batched_without_peft_fails_before_loading_the_model(tmp_path):
    with pytest.raises(ValueError, match="reference_generation='batched'.*needs a PEFT policy"):
        make_aapo_trainer("no/such-model", tmp_path, reference_generation="batched")


@pytest.mark.slow
def test_auto_falls_back_to_separate_where_mixed_batches_do_not_apply(tiny_model_path, tmp_path):
    # the default, "auto", is "batched" for a plain LoRA
    assert make_aapo_trainer(str(tiny_model_path), tmp_path, peft_config=lora()).reference_generation == "batched"
    auto = {"reference_generation": "auto"}
    assert make_aapo_trainer(str(tiny_model_path), tmp_path, **auto).reference_generation == "separate"  # frozen copy
    beams = {"generation_kwargs": {"do_sample": False, "num_beams": 2}}
    assert make_aapo_trainer(str(tiny_model_path), tmp_path, peft_config=lora(),
                             **beams).reference_generation == "separate"
    dora = lora(use_dora=True)
    assert make_aapo_trainer(str(tiny_model_path), tmp_path, peft_config=dora, **auto).reference_generation == "separate"
    with pytest.raises(ValueError, match="reference_generation='batched'.*not a plain LoRA"):
        make_aapo_trainer(str(tiny_model_path), tmp_path, peft_config=dora, reference_generation="batched")


def test_mixed_batches_need_unmerged_plain_lora_and_supported_modules_to_save(tiny_model_path):
    from peft import get_peft_model

    def peft_model(config):
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), config)

    assert mixed_batch_unsupported(peft_model(lora(modules_to_save=["lm_head"]))) is None
    assert "not a plain LoRA" in mixed_batch_unsupported(peft_model(lora(use_dora=True)))
    assert "LlamaRMSNorm" in mixed_batch_unsupported(peft_model(lora(modules_to_save=["norm"])))
    merged = peft_model(lora())
    merged.merge_adapter()
    assert "merged" in mixed_batch_unsupported(merged)


# ------------------------------------------------------------------------------------------------------------
# the row-block forward against PEFT's own mixed-adapter batch
# ------------------------------------------------------------------------------------------------------------


def test_row_blocks_compute_what_peft_mixed_batches_compute_without_its_per_row_lora_path(tiny_model_path,
                                                                                          monkeypatch):
    """Three blocks (the trained adapter, a second adapter, the base) with an ``lm_head`` copy in modules_to_save:
    every row's logits are PEFT's ``adapter_names`` forward's, no plain LoRA layer takes PEFT's per-row path, and
    the model is left as it was."""
    from peft import get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), lora(modules_to_save=["lm_head"]))
    model.add_adapter("ref", lora(modules_to_save=["lm_head"]))
    perturb_adapter_(model, "default", seed=1)
    perturb_adapter_(model, "ref", seed=2)
    model.eval()  # PEFT refuses adapter_names in training mode
    input_ids = torch.randint(0, model.config.vocab_size, (7, 5), generator=torch.Generator().manual_seed(0))
    names = ["default"] * 3 + ["ref"] * 2 + ["__base__"] * 2
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        peft_mixed = model(input_ids=input_ids, adapter_names=names).logits

        def no_per_row_lora(*args, **kwargs):
            raise AssertionError("a plain LoRA Linear took PEFT's per-row path")

        with monkeypatch.context() as patch:
            patch.setattr(LoraLinear, "_mixed_batch_forward", no_per_row_lora)
            with adapter_row_blocks(model, [("default", 3), ("ref", 2), ("__base__", 2)]):
                blocks = model(input_ids=input_ids).logits
        after = model(input_ids=input_ids).logits

        with adapter_row_blocks(model, [("default", 3), ("ref", 2)]), pytest.raises(RuntimeError, match="7 rows"):
            model(input_ids=input_ids)  # rows the blocks do not describe: a clear error, never the wrong adapter

    torch.testing.assert_close(blocks, peft_mixed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(blocks[:3], before[:3], atol=1e-6, rtol=1e-6)  # the active adapter's rows
    for other in (slice(3, 5), slice(5, 7)):  # the other blocks really ran other weights
        assert (blocks[other] - before[other]).abs().max() > 1e-2
    assert torch.equal(after, before)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        if isinstance(module, LoraLinear):
            assert not module.disable_adapters
