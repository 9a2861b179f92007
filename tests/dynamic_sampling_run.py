"""A short dynamic-sampling training run, for tests/test_dynamic_sampling_trainer.py: launched under 1 or 2
accelerate processes, and killed-and-resumed.

Arguments: algorithm, model path, output dir, JSON config overrides, pause-after step (0 = none), fresh|resume.
The rewards depend on the prompt alone (``kind_reward``), so which groups carry signal is known in advance:
only "mixed" prompts do. Each rank writes rank<i>.json: per generation batch, the prompt numbers of the
groups it trained (from the decoded prompt tokens) and the dynamic-sampling metrics, and the losses per step.
"""

import gc
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _training import CPU_ARGS, PauseAfter, exit_without_teardown  # noqa: E402
from datasets import Dataset  # noqa: E402

from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig  # noqa: E402
from aapo_trl.trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer, ZAPOTrainer  # noqa: E402

TRAINERS = {
    "grpo": (GRPOBaselineConfig, GRPOBaselineTrainer),
    "gpg": (GPGConfig, GPGTrainer),
    "aapo": (AAPOConfig, AAPOTrainer),
    "zapo": (ZAPOConfig, ZAPOTrainer),
}
KINDS = ["easy", "hard", "mixed"] * 4
GLOBAL_PROMPTS = 4
NUM_GENERATIONS = 2


def dataset() -> Dataset:
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "solution": kind, "row_id": i}
        for i, kind in enumerate(KINDS)
    ])


def kind_reward(completions, solution, **kwargs):
    """Easy prompts all-correct, hard ones all-wrong, mixed ones right/wrong in turn (rows of a group are adjacent)."""
    rewards, position = [], {}
    for kind in solution:
        index = position[kind] = position.get(kind, -1) + 1
        rewards.append({"easy": 1.0, "hard": 0.0}.get(kind, float(index % 2 == 0)))
    return rewards


def main(algorithm, model_path, out_dir, overrides="{}", pause_after="0", mode="fresh") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config_class, trainer_class = TRAINERS[algorithm]
    settings = dict(CPU_ARGS, output_dir=out_dir, per_device_train_batch_size=GLOBAL_PROMPTS * NUM_GENERATIONS // world,
                    num_generations=NUM_GENERATIONS, max_completion_length=3, max_steps=3, learning_rate=1e-3,
                    dynamic_sampling=True, seed=5)
    config = config_class(**{**settings, **json.loads(overrides)})
    trainer = trainer_class(model_path, reward_funcs=[kind_reward], args=config, train_dataset=dataset())
    if int(pause_after):
        trainer.add_callback(PauseAfter(int(pause_after)))
    batches = []
    sample = trainer._dynamically_sampled_batch

    def recording(inputs):
        batch = sample(inputs)
        texts = trainer.processing_class.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
        numbers = [int(re.search(r"What is (\d+) \+ 1", text).group(1)) for text in texts]
        metrics = trainer._metrics["train"]
        batches.append({
            "step": trainer.state.global_step,
            "prompts": numbers,
            "rows": len(texts),
            "filler_rows": int((batch["completion_mask"].sum(dim=1) == 0).sum()),
            "advantages": batch["advantages"].tolist(),
            "num_items_in_batch": int(batch["num_items_in_batch"]),
            "metrics": {k: v[-1] for k, v in metrics.items() if k.startswith("dynamic_sampling/")},
        })
        return batch

    trainer._dynamically_sampled_batch = recording
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    result = {
        "world_size": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "batches": batches,
        "losses": losses,
        "greso_history": {str(k): len(v) for k, v in trainer.greso_filter.history.items()}
        if trainer.greso_filter is not None else None,
        "logged_keys": sorted({k for entry in trainer.state.log_history for k in entry}),
    }
    Path(out_dir, f"rank{result['rank']}.json").write_text(json.dumps(result))
    exit_without_teardown(trainer)


if __name__ == "__main__":
    gc.freeze()  # as tests/conftest.py does: Trainer.train()'s gc.collect() then skips the imported modules
    main(*sys.argv[1:])
