"""DeepSpeed ZeRO-2/3: AAPO's reference is prepared like TRL's ``ref_model`` and gathered for generation.

DeepSpeed runs on the CPU (its CPU accelerator, gloo): the real runs launch the shipped
``accelerate_configs/zero2.yaml`` and ``zero3.yaml`` with 2 processes and ``--mixed_precision no``, and must
reproduce the plain single-process run exactly (greedy decoding, a seeded perturbation of the policy). Under
ZeRO-3 the policy is partitioned when it is loaded, so the reference must be loaded again from the checkpoint
(a deep copy would hold empty shards: generation then fails with "Padding_idx must be within num_embeddings")
and gathered for generation. The suite installs DeepSpeed (``make test`` installs the ``deepspeed`` extra);
one test runs a training step with DeepSpeed made unimportable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _launch import (
    BATCHED_LORA,
    assert_batched_lora_rows_are_not_trivial,
    assert_same_as_single_process,
    launch,
)
from safetensors.torch import load_file

from aapo_trl.reference import initial_policy_model, prepare_reference_model

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_deepspeed_is_installed():
    try:
        import deepspeed
    except ImportError as error:  # pragma: no cover - the suite's own set-up installs it
        pytest.fail(f"these tests need DeepSpeed: pip install -e '.[deepspeed]' ({error})")
    assert deepspeed.__version__.startswith("0.19")


@pytest.fixture(scope="module")
def plain_aapo(single_process_run):
    return single_process_run("aapo")


@pytest.mark.parametrize("stage", [2, 3])
def test_aapo_under_zero_matches_the_plain_run(stage, plain_aapo, tiny_model_path, tmp_path):
    runs = launch("aapo", 2, tiny_model_path, tmp_path / "run", config=f"zero{stage}", port=29562 + stage)
    for rank in runs:
        assert rank["deepspeed_zero_stage"] == stage
        # prepared like TRL's ref_model: a DeepSpeed inference engine (ZeRO-3: sharded; ZeRO-2: stage 0, full copy)
        assert (rank["reference_class"], rank["reference_model_class"]) == ("FrozenCopyReference", "DeepSpeedEngine")
        assert rank["reference_weight_sums"] == pytest.approx(plain_aapo[0]["reference_weight_sums"], rel=1e-6)
    assert_same_as_single_process(plain_aapo, runs)
    assert any(abs(a) > 0 for a in plain_aapo[0]["local_advantages"]), "the test needs non-trivial advantages"
    margins = torch.tensor(runs[0]["rewards_per_func"]) - torch.tensor(runs[0]["ref_rewards_per_func"])
    assert margins.abs().sum() > 0, "policy and reference must differ, or the reference could be the policy"


def test_zapo_under_zero3_matches_the_plain_run(tiny_model_path, tmp_path, single_process_run):
    plain = single_process_run("zapo")
    runs = launch("zapo", 2, tiny_model_path, tmp_path / "zero3", config="zero3", port=29572)
    assert [rank["deepspeed_zero_stage"] for rank in runs] == [3, 3]
    assert_same_as_single_process(plain, runs)
    # the plain run took DAER's statistics from generation; under ZeRO-3 the responses whose last token was sampled at
    # the last step went through the forward pass (no backbone step outside TRL's gathering context)
    assert plain[0]["stats_forward_frac"] == 0.0
    assert all(rank["stats_forward_frac"] > 0 for rank in runs)
    for key in ("seq_logps", "token_entropy", "embeddings"):  # the entropy forward pass ran on gathered weights
        for rank in runs:
            torch.testing.assert_close(torch.tensor(rank["entropy_inputs"][key]),
                                       torch.tensor(plain[0]["entropy_inputs"][key]), atol=1e-4, rtol=1e-4)


def test_batched_lora_reference_under_zero3_matches_the_plain_run(tiny_model_path, tmp_path, single_process_run):
    """The default for a LoRA policy ("auto": the reference rows in the policy's generate call, with the row blocks'
    hooks on its LoRA layers) on sharded weights, which TRL gathers for generation."""
    plain = single_process_run("aapo_lora_batched")
    runs = launch("aapo", 2, tiny_model_path, tmp_path / "zero3", config="zero3", port=29592, overrides=BATCHED_LORA)
    assert [(rank["deepspeed_zero_stage"], rank["reference_generation"]) for rank in runs] == [(3, "batched")] * 2
    assert_same_as_single_process(plain, runs)
    assert_batched_lora_rows_are_not_trivial(plain)


def test_zero3_reference_update_saved_and_resumed(tiny_model_path, tmp_path):
    """ref_update_steps under ZeRO-3: the copy gathers both models, the checkpoint holds the full reference, and a
    resumed run scatters it back into the sharded reference."""
    settings = {"ref_update_steps": 2, "learning_rate": 0.01, "save_strategy": "steps", "save_steps": 2}
    first = launch("aapo", 2, tiny_model_path, tmp_path / "first", config="zero3", port=29581,
                   overrides={**settings, "max_steps": 2})
    checkpoint = tmp_path / "first" / "checkpoint-2"
    reference = load_file(checkpoint / "aapo_reference.safetensors")
    policy = load_file(checkpoint / "model.safetensors")  # the consolidated ZeRO-3 model (zero3_save_16bit_model)
    initial = load_file(Path(tiny_model_path) / "model.safetensors")
    assert json.loads((checkpoint / "aapo_reference_state.json").read_text())["updated_at_step"] == 2
    assert set(reference) == set(policy)
    assert all(reference[name].shape == initial[name].shape for name in reference)  # gathered, not shards
    assert all(torch.equal(reference[name], policy[name]) for name in reference)  # the step-2 policy
    assert any(not torch.equal(reference[name], initial[name]) for name in reference)
    sums = {name: tensor.double().sum().item() for name, tensor in reference.items()}
    assert first[0]["reference_weight_sums"] == pytest.approx(sums)

    resumed = launch("aapo", 2, tiny_model_path, tmp_path / "resumed", config="zero3", port=29582,
                     overrides={**settings, "max_steps": 3, "resume_from_checkpoint": str(checkpoint)})
    for rank in resumed:  # step 3 does not update (3 % 2): the reference is still the one loaded from step 2
        assert rank["reference_weight_sums"] == pytest.approx(sums)


def test_a_training_step_without_deepspeed(tiny_model_path, tmp_path):
    """With DeepSpeed unimportable, aapo_trl imports and an AAPO step runs (its reference a plain module)."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["deepspeed"] = None  # `import deepspeed` now raises ImportError
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import aapo_trl, aapo_trl.cli, aapo_trl.train, aapo_trl.reference
        from _training import CPU_ARGS, hashed_reward, prompt_dataset
        from aapo_trl.configs import AAPOConfig
        from aapo_trl.trainers import AAPOTrainer
        config = AAPOConfig(**dict(CPU_ARGS, output_dir={str(tmp_path)!r}, per_device_train_batch_size=4,
                                   num_generations=2, max_completion_length=4, max_steps=1))
        trainer = AAPOTrainer({str(tiny_model_path)!r}, reward_funcs=[hashed_reward], args=config,
                              train_dataset=prompt_dataset(2))
        trainer.train()
        assert not trainer.is_deepspeed_enabled
        print("REFERENCE", type(trainer.reference.model).__name__, trainer.reference.model is not trainer.model)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    finished = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "REFERENCE LlamaForCausalLM True" in finished.stdout


def fake_trainer(zero_stage: int | None, *, deepspeed: bool = False, fsdp: bool = False, name_or_path: str = ""):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), device=torch.device("cpu"))
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path=name_or_path))
    return SimpleNamespace(accelerator=accelerator, model=model, is_deepspeed_enabled=deepspeed,
                           is_fsdp_enabled=fsdp, args=SimpleNamespace(model_init_kwargs=None, trust_remote_code=False))


def test_zero3_reference_without_a_checkpoint_path_is_refused():
    with pytest.raises(ValueError, match="no checkpoint path .* reference_model="):
        initial_policy_model(fake_trainer(3, deepspeed=True))


def test_prepare_reference_model_routes_by_backend(monkeypatch):
    import aapo_trl.reference as reference_module

    calls = []
    monkeypatch.setattr(reference_module, "prepare_deepspeed", lambda model, acc: calls.append("deepspeed") or model)
    monkeypatch.setattr(reference_module, "prepare_fsdp", lambda model, acc: calls.append("fsdp") or model)
    module = torch.nn.Linear(2, 2)
    assert prepare_reference_model(fake_trainer(2, deepspeed=True), module) is module
    assert prepare_reference_model(fake_trainer(None, fsdp=True), module) is module
    assert prepare_reference_model(fake_trainer(None), module) is module  # plain: moved to the device only
    assert calls == ["deepspeed", "fsdp"]
