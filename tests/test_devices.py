"""Device placement: every trainer's advantage step with the batch on an accelerator (issue 14, part 1).

On a GPU, TRL builds the batch on ``accelerator.device`` while CPU-only code (scikit-learn's K-Means)
returns CPU tensors; an op mixing the two raises. The CPU suite cannot see that, so these tests run the
real advantage step -- TRL's ``_generate_and_score_completions`` (completions canned instead of sampled)
followed by ours, the reward functions, the reference and ZAPO's forward pass -- with the accelerator
emulated by tests/_devices.py, and compare the result with the plain CPU run of the same batch.
"""

from __future__ import annotations

import pytest
import torch
from _devices import ACCELERATOR, DeviceMixingError, OnAccelerator, SecondDevice
from _training import CPU_ARGS
from datasets import Dataset

from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig
from aapo_trl.devices import run_on_cpu
from aapo_trl.entropy import choose_num_clusters, group_semantic_entropies
from aapo_trl.ref_rollouts import REF_LENGTHS, REF_REWARDS, REF_REWARDS_PER_FUNC
from aapo_trl.trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer, ZAPOTrainer

NUM_GENERATIONS = 4
KINDS = ("easy", "hard", "mixed")


def dataset() -> Dataset:
    """One all-correct, one all-wrong and one mixed prompt, with a reference-reward cache column."""
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "solution": kind, "row_id": i,
         REF_REWARDS: [0.1, 1.0, 0.1, 0.0], REF_REWARDS_PER_FUNC: [[0.1], [1.0], [0.1], [0.0]],
         REF_LENGTHS: [4, 5, 6, 7]}
        for i, kind in enumerate(KINDS)
    ])


def scripted_reward(completions, solution, **kwargs):
    """1 for every easy row, 0.1 for every hard row, 1 / 0.1 / 0.1 / 0.1 in the mixed group (ZAPO's scale)."""
    rewards, seen_mixed = [], 0
    for kind in solution:
        if kind == "mixed":
            rewards.append(1.0 if seen_mixed == 0 else 0.1)
            seen_mixed += 1
        else:
            rewards.append(1.0 if kind == "easy" else 0.1)
    return rewards


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")


# name: (trainer class, config class, config overrides, trainer keyword arguments)
TRAINERS = {
    "grpo": (GRPOBaselineTrainer, GRPOBaselineConfig, {}, {}),
    "gpg": (GPGTrainer, GPGConfig, {}, {}),
    "aapo-frozen-copy": (AAPOTrainer, AAPOConfig, {}, {}),
    # the generation is canned below, so the reference is sampled by its own call (reference_generation="batched"
    # would take its rows from the canned policy generation)
    "aapo-peft-base": (AAPOTrainer, AAPOConfig, {"reference_generation": "separate"}, {"peft_config": lora}),
    "aapo-cache": (AAPOTrainer, AAPOConfig, {"reference_source": "cache"}, {}),
    "zapo": (ZAPOTrainer, ZAPOConfig, {}, {}),
    "zapo-greso": (ZAPOTrainer, ZAPOConfig, {"greso": True}, {}),
}


def build(name, tiny_model_path, tmp_path):
    trainer_class, config_class, overrides, extra = TRAINERS[name]
    args = config_class(**{**CPU_ARGS, "output_dir": str(tmp_path), "per_device_train_batch_size": 12,
                           "num_generations": NUM_GENERATIONS, "max_completion_length": 6, "max_steps": 2,
                           **overrides})
    extra = {key: value() for key, value in extra.items()}
    trainer = trainer_class(str(tiny_model_path), reward_funcs=[scripted_reward], args=args,
                            train_dataset=dataset(), **extra)
    eos = trainer.eos_token_ids[0]

    def canned_completions(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Fixed completions of 2-5 tokens ending with EOS: the test is about what follows generation."""
        return [[100 + (7 * row + j) % 50 for j in range(2 + row % 4)] + [eos] for row in range(len(prompt_ids))], None

    trainer._generate_single_turn = canned_completions
    trainer.model.train()
    return trainer


def modules_on_the_accelerator(trainer):
    """The policy and a reference that holds its own weights (on a GPU, both sit on accelerator.device)."""
    modules = [trainer.model]
    reference_model = getattr(trainer, "reference", None) and getattr(trainer.reference, "model", None)
    if isinstance(reference_model, torch.nn.Module):
        modules.append(reference_model)
    return modules


def advantage_step(trainer, device: SecondDevice | None = None):
    inputs = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)  # the reference samples alike in both runs
    if device is None:
        return trainer._generate_and_score_completions(inputs)
    with device:
        device.place(*modules_on_the_accelerator(trainer))
        device.use_for(trainer.accelerator)
        return trainer._generate_and_score_completions(inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAINERS))
def test_advantage_step_keeps_the_batch_on_the_accelerator(tiny_model_path, tmp_path, name):
    on_cpu = advantage_step(build(name, tiny_model_path, tmp_path / "cpu"))
    trainer = build(name, tiny_model_path, tmp_path / "device")
    device = SecondDevice()
    output = advantage_step(trainer, device)

    for key in ("advantages", "prompt_ids", "completion_ids", "completion_mask"):
        assert device.is_on_accelerator(output[key]), key
    torch.testing.assert_close(output["advantages"].as_subclass(torch.Tensor), on_cpu["advantages"])
    groups_with_signal = int((on_cpu["advantages"].view(len(KINDS), NUM_GENERATIONS) != 0).all(dim=1).sum())
    if name.startswith("zapo"):  # DAER gave the two zero-advantage groups an entropy advantage
        assert groups_with_signal == 3 and trainer._metrics["train"]["zapo/k_mean"]
    else:
        assert groups_with_signal >= 1  # the mixed group (AAPO's margin may move the others)
    if name.startswith("aapo"):
        assert "aapo/ref_reward_mean" in trainer._metrics["train"]
    if trainer.greso_filter is not None:
        kinds = {pid: history[-1][2] for pid, history in trainer.greso_filter.history.items()}
        assert kinds == {0: "easy", 1: "hard", 2: "mixed"}


# ---- the helper and the emulation themselves ---------------------------------------------------------------


def test_run_on_cpu_hands_cpu_results_back_on_the_device_of_the_arguments():
    seen = []

    def cpu_only(values, scale, extra=None):
        seen.append((values.device, extra.device))
        doubled = torch.from_numpy(values.numpy() * scale)  # numpy: CPU only
        return doubled, {"count": torch.tensor(values.numel()), "name": "x"}, int(values.numel())

    with SecondDevice():
        values = torch.arange(4.0, device=ACCELERATOR)
        doubled, info, count = run_on_cpu(cpu_only, values, 2.0, extra=torch.ones(2, device=ACCELERATOR))
        assert seen == [(torch.device("cpu"), torch.device("cpu"))]
        assert doubled.device == ACCELERATOR and info["count"].device == ACCELERATOR
        assert info["name"] == "x" and count == 4
        torch.testing.assert_close((doubled + values).as_subclass(torch.Tensor), torch.arange(4.0) * 3)
        with pytest.raises(ValueError, match="several devices"):
            run_on_cpu(cpu_only, values, 2.0, extra=torch.ones(2))


def test_entropy_functions_return_on_the_device_of_their_inputs():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(8, 5, generator=generator), dim=1)
    seq_logps = -torch.rand(8, generator=generator)
    compute = torch.tensor([True, False])
    se_cpu, k_cpu = group_semantic_entropies(embeddings, seq_logps, 4, compute, step=1)
    with SecondDevice() as device:
        labels, _ = choose_num_clusters(embeddings[:4].to(ACCELERATOR), seed=3)
        assert labels.device == ACCELERATOR
        se, k = group_semantic_entropies(embeddings.to(ACCELERATOR), seq_logps.to(ACCELERATOR), 4,
                                         compute.to(ACCELERATOR), step=1)
        assert device.is_on_accelerator(se) and device.is_on_accelerator(k)
    torch.testing.assert_close(se.as_subclass(torch.Tensor), se_cpu, equal_nan=True)
    assert torch.equal(k.as_subclass(torch.Tensor), k_cpu)


def test_the_emulated_device_raises_where_cuda_does():
    with SecondDevice() as device:
        on_device = torch.ones(3, device=ACCELERATOR)
        assert isinstance(on_device, OnAccelerator) and on_device.device == ACCELERATOR
        with pytest.raises(DeviceMixingError, match="same device"):
            torch.where(on_device > 0, torch.zeros(3), on_device)
        with pytest.raises(DeviceMixingError, match="same device"):
            torch.cat([on_device, torch.zeros(3)])
        with pytest.raises(TypeError, match="numpy"):
            on_device.numpy()
        with pytest.raises(DeviceMixingError, match="indices"):
            torch.zeros(3)[on_device.long()]
        # what CUDA allows: CPU scalars, CPU indices, copies and transfers
        assert device.is_on_accelerator(on_device * torch.tensor(2.0))
        assert device.is_on_accelerator(on_device[torch.tensor([0, 2])])
        on_device[torch.tensor([True, False, True])] = 5.0
        on_device.copy_(torch.arange(3.0))
        back = on_device.cpu()
        assert not device.is_on_accelerator(back) and back.tolist() == [0.0, 1.0, 2.0]
        assert device.is_on_accelerator(torch.zeros(3).to(on_device)) and on_device.sum().item() == 3.0
        module = torch.nn.Linear(3, 2)
        device.place(module)
        assert next(module.parameters()).device == ACCELERATOR
        assert device.is_on_accelerator(module(on_device))
        with pytest.raises(DeviceMixingError, match="same device"):
            module(torch.zeros(3))
