"""Real TRL training steps on the tiny offline model: what AAPO, GPG and GRPO hand to the loss."""

from __future__ import annotations

import pytest
import torch
from _training import CPU_ARGS, Recorder, hashed_reward, perturb_, prompt_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from aapo_trl.advantages import aapo_advantages, combine_reward_functions, gpg_advantages, group_relative_advantages
from aapo_trl.configs import AAPOConfig, GPGConfig
from aapo_trl.reference import FrozenCopyReference, PeftBaseReference
from aapo_trl.trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer

pytestmark = pytest.mark.slow

GREEDY = {"do_sample": False}


def aapo_config(tmp_path, **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                  max_completion_length=6, max_steps=2)
    values.update(overrides)
    return AAPOConfig(**values)


def weights(trainer):
    return torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])


def greedy_completions(model, tokenizer, prompts, max_new_tokens):
    """What `model` answers greedily, one prompt at a time (no batching effects)."""
    outputs = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        new = generated[0, ids["input_ids"].size(1):].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        outputs.append(new)
    return outputs


def test_aapo_loss_sees_the_pure_function_of_the_captured_rewards(tiny_model_path, tmp_path):
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=aapo_config(tmp_path),
                          train_dataset=prompt_dataset())
    recorder = Recorder(trainer)
    reference_before = trainer.reference.parameters_fingerprint()
    policy_before = weights(trainer)
    trainer.train()

    assert len(recorder.batches) == 2
    for batch in recorder.batches:
        rewards = batch["rewards"]
        ref_rewards = combine_reward_functions(batch["ref_rewards_per_func"], trainer.reward_weights)
        expected = aapo_advantages(rewards, ref_rewards, 3)
        torch.testing.assert_close(batch["advantages"], expected)
        # the completions table shows the final (augmented) advantages
        assert batch["logged_advantages"][-6:] == pytest.approx(expected.tolist())
        assert len(batch["ref_completion_ids"]) == len(batch["completion_ids"]) == 6
    # the loss saw exactly those advantages (TRL shuffles rows inside a generation batch)
    seen = torch.cat(recorder.loss_advantages).sort().values
    torch.testing.assert_close(seen, torch.cat([b["advantages"] for b in recorder.batches]).sort().values)
    # the policy trained, the reference did not
    assert not torch.equal(policy_before, weights(trainer))
    assert torch.equal(reference_before, trainer.reference.parameters_fingerprint())

    logged = trainer.state.log_history[0]
    for name in ["zero_adv/frac_groups", "zero_adv/frac_groups_final", "zero_adv/all_zero_batch", "aapo/margin_mean",
                 "aapo/margin_clipped_frac", "aapo/ref_reward_mean", "rewards_ref/hashed_reward/mean"]:
        assert name in logged, name
    first_rewards = combine_reward_functions(recorder.batches[0]["rewards_per_func"], trainer.reward_weights)
    assert logged["reward"] == pytest.approx(first_rewards.mean().item())


def test_reference_completions_come_from_the_reference_weights(tiny_model_path, tmp_path):
    config = aapo_config(tmp_path, max_steps=1, generation_kwargs=GREEDY, learning_rate=0.0)
    dataset = prompt_dataset()
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config, train_dataset=dataset)
    assert isinstance(trainer.reference, FrozenCopyReference)
    perturb_(trainer.model)  # the policy now differs from the frozen initial copy
    recorder = Recorder(trainer)
    trainer.train()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    prompts = [row["prompt"] for row in dataset]
    initial_answers = greedy_completions(initial, tokenizer, prompts, max_new_tokens=6)
    policy_answers = greedy_completions(trainer.model.eval(), tokenizer, prompts, max_new_tokens=6)
    assert initial_answers != policy_answers, "the perturbation must change what the policy says"

    batch = recorder.batches[0]
    # each row repeats its prompt num_generations times; greedy answers depend only on the prompt
    answers_by_row = {tuple(ids) for ids in batch["ref_completion_ids"]}
    assert answers_by_row <= {tuple(a) for a in initial_answers}
    assert not answers_by_row & ({tuple(a) for a in policy_answers} - {tuple(a) for a in initial_answers})
    assert {tuple(ids) for ids in batch["completion_ids"]} <= {tuple(a) for a in policy_answers}


def test_ref_update_steps_copies_the_policy_into_the_reference(tiny_model_path, tmp_path):
    config = aapo_config(tmp_path, max_steps=2, ref_update_steps=2)
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config,
                          train_dataset=prompt_dataset())
    fingerprints = []
    original_update = trainer.reference.load_policy_weights
    trainer.reference.load_policy_weights = lambda t: (original_update(t), fingerprints.append(t.state.global_step))
    initial = trainer.reference.parameters_fingerprint()
    trainer.train()
    assert fingerprints == [2]
    after = trainer.reference.parameters_fingerprint()
    assert not torch.equal(initial, after)
    policy = torch.stack([p.detach().double().sum() for p in trainer.model.parameters()])
    torch.testing.assert_close(after, policy)


def test_peft_reference_is_the_base_model_with_adapters_off(tiny_model_path, tmp_path):
    from peft import LoraConfig

    # a fresh LoRA (B = 0) adds nothing, so the base is the initial policy (else see tests/test_reference.py)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    config = aapo_config(tmp_path, max_steps=1, generation_kwargs=GREEDY, learning_rate=0.0)
    dataset = prompt_dataset()
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config, train_dataset=dataset,
                          peft_config=lora)
    assert isinstance(trainer.reference, PeftBaseReference) and "ref" not in trainer.model.peft_config
    with torch.no_grad():  # the adapter as if trained: the policy now differs from the base
        for name, parameter in trainer.model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    recorder = Recorder(trainer)
    trainer.train()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    prompts = [row["prompt"] for row in dataset]
    base_answers = {tuple(a) for a in greedy_completions(base, tokenizer, prompts, max_new_tokens=6)}
    batch = recorder.batches[0]
    assert {tuple(ids) for ids in batch["ref_completion_ids"]} <= base_answers
    assert {tuple(ids) for ids in batch["completion_ids"]} != {tuple(ids) for ids in batch["ref_completion_ids"]}
    with pytest.raises(ValueError, match="ref_update_steps is not supported with PEFT"):
        AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=dataset, peft_config=lora,
                    args=aapo_config(tmp_path, ref_update_steps=5))


def test_reference_scoring_leaves_the_reward_side_channels_alone(tiny_model_path, tmp_path):
    calls = []

    def logging_reward(completions, log_metric, log_extra, **kwargs):
        calls.append(len(completions))
        log_metric("custom/calls", 1.0)
        log_extra("custom_column", ["policy"] * len(completions))
        return hashed_reward(completions)

    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[logging_reward], args=aapo_config(tmp_path, max_steps=1),
                          train_dataset=prompt_dataset())
    trainer.train()
    assert calls == [6, 6]  # policy and reference were both scored ...
    assert trainer.state.log_history[0]["custom/calls"] == 1.0
    assert list(trainer._logs["extra"]["custom_column"]) == ["policy"] * 6  # ... but only the policy was logged


def test_reference_rollouts_are_skipped_in_eval_unless_asked(tiny_model_path, tmp_path):
    dataset = prompt_dataset()
    for asked in (False, True):
        config = aapo_config(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=6,
                             eval_reference_rollouts=asked)
        trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config, train_dataset=dataset,
                              eval_dataset=dataset)
        trainer._last_reference = None
        metrics = trainer.evaluate()
        assert ("eval_aapo/ref_reward_mean" in metrics) is asked
        assert (trainer._last_reference is not None) is asked
        assert "eval_zero_adv/frac_groups" in metrics


def test_gpg_loss_sees_the_corrected_advantage(tiny_model_path, tmp_path):
    config = GPGConfig(**dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                              max_completion_length=6, max_steps=2))
    trainer = GPGTrainer(str(tiny_model_path), reward_funcs=["final_number", hashed_reward], args=config,
                         train_dataset=prompt_dataset())
    assert trainer.reward_func_names == ["final_number", "hashed_reward"]
    recorder = Recorder(trainer)
    trainer.train()
    for batch in recorder.batches:
        torch.testing.assert_close(batch["advantages"], gpg_advantages(batch["rewards"], 3))
    seen = torch.cat(recorder.loss_advantages).sort().values
    torch.testing.assert_close(seen, torch.cat([b["advantages"] for b in recorder.batches]).sort().values)
    assert "zero_adv/all_zero_batch" in trainer.state.log_history[0]


def test_grpo_baseline_keeps_trls_advantage(tiny_model_path, tmp_path):
    from aapo_trl.configs import GRPOBaselineConfig

    trl_advantages = []
    config = GRPOBaselineConfig(**dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                               max_completion_length=6, max_steps=1, loss_type="grpo"))
    trainer = GRPOBaselineTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config,
                                  train_dataset=prompt_dataset())
    ours = trainer.compute_advantages

    def compare(rewards, scored, output, num_generations, mode):
        trl_advantages.append(output["advantages"].clone())
        result = ours(rewards, scored, output, num_generations, mode)
        torch.testing.assert_close(result, group_relative_advantages(rewards, num_generations))
        return result

    trainer.compute_advantages = compare
    recorder = Recorder(trainer)
    trainer.train()
    torch.testing.assert_close(recorder.batches[0]["advantages"], trl_advantages[0])
    assert "zero_adv/frac_groups" in trainer.state.log_history[0]


def test_ce_loss_rejects_a_kl_term(tmp_path):
    with pytest.raises(ValueError, match="no KL term"):
        aapo_config(tmp_path, beta=0.04)
    with pytest.raises(ValueError, match="margin_clip_low"):
        aapo_config(tmp_path, margin_clip_low=0.5, margin_clip_high=0.1)
    config = aapo_config(tmp_path, beta=0.04, loss_type="grpo")  # a TRL loss may carry a KL penalty
    assert config.loss_type == "grpo"


def test_explicit_reference_model_is_sampled_and_must_share_the_tokenizer(tiny_model_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    other = AutoTokenizer.from_pretrained(tiny_model_path)
    other.add_tokens(["<extra-token>"])
    with pytest.raises(ValueError, match="tokenizer differs from the policy's"):
        AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=aapo_config(tmp_path),
                    train_dataset=prompt_dataset(), reference_model=str(tiny_model_path),
                    reference_processing_class=other)

    sft = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    perturb_(sft)
    sft.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    dataset = prompt_dataset()
    config = aapo_config(tmp_path / "run", max_steps=1, generation_kwargs=GREEDY, learning_rate=0.0)
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config, train_dataset=dataset,
                          reference_model=str(tmp_path / "sft"))
    recorder = Recorder(trainer)
    trainer.train()
    prompts = [row["prompt"] for row in dataset]
    sft_answers = {tuple(a) for a in greedy_completions(sft.eval(), tokenizer, prompts, max_new_tokens=6)}
    batch = recorder.batches[0]
    assert {tuple(ids) for ids in batch["ref_completion_ids"]} <= sft_answers
    assert {tuple(ids) for ids in batch["completion_ids"]} != {tuple(ids) for ids in batch["ref_completion_ids"]}
