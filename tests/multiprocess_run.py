"""One AAPO or ZAPO step, run by tests/test_multiprocess.py under 1 and under 2 accelerate processes (and by
tests/test_deepspeed.py under DeepSpeed ZeRO-2/3). An optional 4th argument is a JSON dict of config overrides;
its "lora" entry, if any, is not a config field but the LoraConfig arguments of a PEFT policy.

Greedy decoding and a policy perturbed with a fixed seed make every completion a function of its
prompt alone, so both runs see the same global batch and must produce the same advantages. Each rank
writes the global rewards it saw and the advantages of its own rows.
"""

import gc
import importlib
import json
import os
import sys
from pathlib import Path

from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).parent))

from _training import CPU_ARGS, Recorder, exit_without_teardown, hashed_reward, perturb_, prompt_dataset  # noqa: E402

from aapo_trl.configs import AAPOConfig, ZAPOConfig  # noqa: E402
from aapo_trl.reference import writable_gathered  # noqa: E402
from aapo_trl.trainers import AAPOTrainer, ZAPOTrainer  # noqa: E402

TRAINERS = {"aapo": (AAPOConfig, AAPOTrainer), "zapo": (ZAPOConfig, ZAPOTrainer)}

GLOBAL_BATCH = 6
STATS_SOURCE_METRIC = "zapo/stats_forward_frac"
NUM_GENERATIONS = 2  # with 3 rows per process, the second group spans both processes


def skip_deepspeed_shared_memory_kernel() -> None:
    """Under DeepSpeed, keep its CPU backend from JIT-compiling its shared-memory all-reduce kernel.

    Building it is minutes of C++ on 2 cores, and it is built again whenever the venv's path changes (every fresh
    clone, so every CI run). Only ``inference_all_reduce`` (tensor-parallel inference) uses it; without it that
    call falls back to the process group's all_reduce, and ZeRO training, which never calls it, is unchanged.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # by module name: the attribute deepspeed.comm.torch is the torch package (a star import re-exports it)
        backend = importlib.import_module("deepspeed.comm.torch")
        backend.build_shm_op = lambda: None


def main(algorithm: str, model_path: str, out_dir: str, overrides: str = "{}") -> None:
    skip_deepspeed_shared_memory_kernel()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch
    config_class, trainer_class = TRAINERS[algorithm]
    settings = dict(CPU_ARGS, output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // world,
                    num_generations=NUM_GENERATIONS, max_completion_length=5, max_steps=1, learning_rate=0.0,
                    generation_kwargs={"do_sample": False})
    overrides = json.loads(overrides)
    lora = overrides.pop("lora", None)
    config = config_class(**{**settings, **overrides})
    if getattr(config, "reference_source", None) == "vllm_server":  # a fake reference server of the test (HTTP only)
        import trl.generation.vllm_client as vllm_client
        import trl.generation.vllm_generation as vllm_generation

        vllm_client.is_vllm_available = vllm_generation.is_vllm_available = lambda *args, **kwargs: True
    peft = {} if lora is None else {"peft_config": LoraConfig(**lora)}
    trainer = trainer_class(model_path, reward_funcs=[hashed_reward], args=config, train_dataset=prompt_dataset(3),
                            **peft)
    with writable_gathered(trainer, trainer.model.parameters()) as writes:  # ZeRO-3: perturb the full weights
        if writes:
            perturb_(trainer.model)
    recorder = Recorder(trainer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    batch = recorder.batches[0]
    result = {
        "world_size": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "rewards_per_func": batch["rewards_per_func"].tolist(),
        "ref_rewards_per_func": batch["ref_rewards_per_func"].tolist() if "ref_rewards_per_func" in batch else None,
        "completion_ids": batch["completion_ids"],
        "ref_completion_ids": batch.get("ref_completion_ids"),
        "entropy_inputs": {k: v.tolist() for k, v in getattr(trainer, "_last_entropy_inputs", {}).items()},
        "local_advantages": batch["advantages"].tolist(),
        # where ZAPO's statistics came from is not part of the result: ZeRO-3 computes some by the forward pass
        "logged": {k: v for k, v in trainer.state.log_history[0].items()
                   if k.startswith(("zero_adv", "aapo", "zapo")) and k != STATS_SOURCE_METRIC},
        "stats_forward_frac": trainer.state.log_history[0].get(STATS_SOURCE_METRIC),
        "deepspeed_zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
        if trainer.is_deepspeed_enabled else None,
        "reference_class": type(getattr(trainer, "reference", None)).__name__,
        "reference_generation": getattr(trainer, "reference_generation", None),
        "reference_model_class": type(getattr(getattr(trainer, "reference", None), "model", None)).__name__,
        # gathered from ZeRO-3 shards on every rank (a collective): what the reference holds after training
        "reference_weight_sums": {name: tensor.double().sum().item()
                                  for name, tensor in trainer.reference.state_dict(trainer).items()}
        if hasattr(getattr(trainer, "reference", None), "state_dict") else None,
    }
    Path(out_dir, f"rank{result['rank']}.json").write_text(json.dumps(result))
    exit_without_teardown(trainer)


if __name__ == "__main__":
    gc.freeze()  # as tests/conftest.py does: Trainer.train()'s gc.collect() then skips the imported modules
    main(*sys.argv[1:])
