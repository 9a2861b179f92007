"""Shared helpers for the tests that run real (tiny, offline, CPU) TRL training steps."""

from __future__ import annotations

import hashlib
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

CPU_ARGS = dict(
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    learning_rate=1e-2,
    seed=0,
)


def prompt_dataset(num_prompts: int = 6) -> Dataset:
    """Single-digit additions: every prompt tokenises to the same length, so no padding differs across batches."""
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}], "solution": str(2 * i + 1)}
        for i in range(num_prompts)
    ]
    return Dataset.from_list(rows)


def text_of(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def hashed_reward(completions, **kwargs):
    """A deterministic function of the completion text that spreads rewards over {0, 0.5, 1}."""
    return [int(hashlib.sha256(text_of(c).encode()).hexdigest(), 16) % 3 / 2 for c in completions]


def perturb_(model: torch.nn.Module, scale: float = 0.5, seed: int = 1234) -> None:
    """Move every weight so the policy visibly differs from the model it was copied from."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def aapo_test_config(tmp_path, **overrides):
    """A one-step AAPO config on the CPU: 6 rows of 3 generations, 6 new tokens."""
    from aapo_trl.configs import AAPOConfig

    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                  max_completion_length=6, max_steps=1)
    values.update(overrides)
    return AAPOConfig(**values)


def make_aapo_trainer(model, tmp_path, peft_config=None, **overrides):
    """An AAPOTrainer on :func:`prompt_dataset` with :func:`hashed_reward` and :func:`aapo_test_config`."""
    from aapo_trl.trainers import AAPOTrainer

    return AAPOTrainer(model, reward_funcs=[hashed_reward], args=aapo_test_config(tmp_path, **overrides),
                       train_dataset=prompt_dataset(), peft_config=peft_config)


def perturb_adapter_(model, name: str = "default", seed: int = 0, scale: float = 0.5) -> None:
    """Move every tensor of one adapter (LoRA A and B alike): a trained adapter, or the policy's adapter training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if f".{name}." in parameter_name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def lora(**overrides):
    """A small LoRA on the attention projections of the tiny Llama (PEFT's default init: B = 0, the identity)."""
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
                         **overrides})


def peft_policy_with_a_trained_adapter(tiny_model_path, config=None):
    """A PeftModel whose adapter (``config``, default :func:`lora`) is not the identity, as an SFT LoRA or a resumed
    run arrives."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), config or lora())
    perturb_adapter_(policy, seed=1)
    return policy


class Recorder:
    """Wraps a trainer's seams to record what the advantage step and the loss saw."""

    def __init__(self, trainer):
        self.batches = []  # one dict per generation batch
        self.loss_advantages = []
        generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss
        compute_advantages = trainer.compute_advantages
        self._rewards = None

        def recording_advantages(rewards, *args, **kwargs):
            self._rewards = rewards.clone()  # what the advantage step saw (unscorable rows NaN)
            return compute_advantages(rewards, *args, **kwargs)

        def recording_generate(inputs):
            output = generate(inputs)
            batch = {
                "rewards": self._rewards,
                "rewards_per_func": trainer._last_scored.rewards_per_func.clone(),
                "completion_ids": [list(ids) for ids in trainer._last_scored.completion_ids],
                "advantages": output["advantages"].clone(),
                "logged_advantages": list(trainer._logs["advantages"]),
            }
            reference = getattr(trainer, "_last_reference", None)
            if reference is not None:
                batch["ref_rewards_per_func"] = reference["rewards_per_func"].clone()
                batch["ref_completion_ids"] = [list(ids) for ids in reference["completion_ids"]]
            self.batches.append(batch)
            return output

        def recording_loss(model, inputs):
            self.loss_advantages.append(inputs["advantages"].detach().clone())
            return compute_loss(model, inputs)

        trainer._generate_and_score_completions = recording_generate
        trainer._compute_loss = recording_loss
        trainer.compute_advantages = recording_advantages


class PauseAfter(TrainerCallback):
    """Hold a training subprocess after ``step`` optimizer steps (its checkpoint saved) so a test can SIGKILL it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            print(f"PAUSED AT {state.global_step}", flush=True)
            time.sleep(600)  # the test kills the process here


def exit_without_teardown(trainer) -> None:
    """End a launched training script whose results are written, skipping the interpreter's teardown.

    That teardown intermittently aborts after everything has finished ("terminate called without an active
    exception": a C++ thread still joinable when its owner is freed), seen under DeepSpeed 0.19's CPU backend and,
    with gc.freeze() keeping the process group alive to the end, under plain gloo DDP; the launcher then reports a
    failed rank. Only under torch.distributed: a single process ends normally.
    """
    if torch.distributed.is_initialized():
        trainer.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
