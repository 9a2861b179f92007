"""A short training run for tests/test_resume.py: saves every 2 steps and can pause after a step so the
test can SIGKILL it, or resume from the last complete checkpoint."""

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _training import CPU_ARGS, PauseAfter, hashed_reward, prompt_dataset  # noqa: E402

from aapo_trl.configs import AAPOConfig, ZAPOConfig  # noqa: E402
from aapo_trl.trainers import AAPOTrainer, ZAPOTrainer  # noqa: E402

RUNS = {
    "aapo": (AAPOConfig, AAPOTrainer, {"ref_update_steps": 3}),
    "zapo_greso": (ZAPOConfig, ZAPOTrainer, {"greso": True}),
}


def main(name: str, model_path: str, output_dir: str, pause_after: int, resume: bool) -> None:
    config_class, trainer_class, extra = RUNS[name]
    args = config_class(**dict(CPU_ARGS, output_dir=output_dir, per_device_train_batch_size=4, num_generations=2,
                               max_completion_length=4, max_steps=6, save_strategy="steps", save_steps=2,
                               learning_rate=1e-2, seed=3, **extra))
    trainer = trainer_class(model_path, reward_funcs=[hashed_reward], args=args, train_dataset=prompt_dataset(6))
    if pause_after > 0:
        trainer.add_callback(PauseAfter(pause_after))
    trainer.train(resume_from_checkpoint=True if resume else None)
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    Path(output_dir, "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    gc.freeze()  # as tests/conftest.py does: Trainer.train()'s gc.collect() then skips the imported modules
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "resume")
