"""One AAPO or ZAPO step, run by tests/test_multiprocess.py under 1 and under 2 accelerate processes.

Greedy decoding and a policy perturbed with a fixed seed make every completion a function of its
prompt alone, so both runs see the same global batch and must produce the same advantages. Each rank
writes the global rewards it saw and the advantages of its own rows.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _training import CPU_ARGS, Recorder, hashed_reward, perturb_, prompt_dataset  # noqa: E402

from aapo_trl.configs import AAPOConfig, ZAPOConfig  # noqa: E402
from aapo_trl.trainers import AAPOTrainer, ZAPOTrainer  # noqa: E402

TRAINERS = {"aapo": (AAPOConfig, AAPOTrainer), "zapo": (ZAPOConfig, ZAPOTrainer)}

GLOBAL_BATCH = 6
NUM_GENERATIONS = 2  # with 3 rows per process, the second group spans both processes


def main(algorithm: str, model_path: str, out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch
    config_class, trainer_class = TRAINERS[algorithm]
    config = config_class(**dict(CPU_ARGS, output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // world,
                               num_generations=NUM_GENERATIONS, max_completion_length=5, max_steps=1,
                               learning_rate=0.0, generation_kwargs={"do_sample": False}))
    trainer = trainer_class(model_path, reward_funcs=[hashed_reward], args=config, train_dataset=prompt_dataset(3))
    perturb_(trainer.model)
    recorder = Recorder(trainer)
    trainer.train()
    batch = recorder.batches[0]
    result = {
        "world_size": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "rewards_per_func": batch["rewards_per_func"].tolist(),
        "ref_rewards_per_func": batch["ref_rewards_per_func"].tolist() if "ref_rewards_per_func" in batch else None,
        "entropy_inputs": {k: v.tolist() for k, v in getattr(trainer, "_last_entropy_inputs", {}).items()},
        "local_advantages": batch["advantages"].tolist(),
        "logged": {k: v for k, v in trainer.state.log_history[0].items() if k.startswith(("zero_adv", "aapo", "zapo"))},
    }
    Path(out_dir, f"rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
