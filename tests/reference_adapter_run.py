"""One AAPO step of a PEFT policy that starts from a saved, trained adapter, run by tests/test_reference_adapters.py
under ``accelerate launch`` (DeepSpeed ZeRO-3, 2 CPU processes). Arguments: model path, output folder, and a JSON dict
with ``initial_adapter`` (the adapter folder), ``input_ids`` (the rows whose logits are recorded) and config
overrides.

The base model is loaded after the config exists, so under ZeRO-3 it is partitioned as it loads (``zero3_init_flag``)
and the adapter is put on the partitioned model, as a user's script does. After the step, every rank writes the
logits of the reference (its separate path and its rows under the batched path's row blocks, each gathered for
generation as TRL gathers the policy) and of the trained policy, on ``input_ids``.
"""

import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from multiprocess_run import skip_deepspeed_shared_memory_kernel  # noqa: E402
from _training import CPU_ARGS, exit_without_teardown, hashed_reward, prompt_dataset  # noqa: E402

from aapo_trl.configs import AAPOConfig  # noqa: E402
from aapo_trl.reference import (  # noqa: E402
    _unwrapped_for_generation,
    adapter_row_blocks,
    reference_rows_adapter,
)
from aapo_trl.trainers import AAPOTrainer  # noqa: E402


@torch.no_grad()
def main(model_path: str, out_dir: str, overrides: str) -> None:
    skip_deepspeed_shared_memory_kernel()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    overrides = json.loads(overrides)
    adapter_dir = overrides.pop("initial_adapter")
    input_ids = torch.tensor(overrides.pop("input_ids"))
    settings = dict(CPU_ARGS, output_dir=out_dir, per_device_train_batch_size=3, num_generations=2,
                    max_completion_length=5, max_steps=1)
    config = AAPOConfig(**{**settings, **overrides})  # under ZeRO-3 from here on, models load partitioned
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter_dir,
                                       is_trainable=True)
    trainer = AAPOTrainer(policy, reward_funcs=[hashed_reward], args=config, train_dataset=prompt_dataset(3))
    with torch.enable_grad():
        trainer.train()

    def logits(model, ids=input_ids):
        return model(input_ids=ids.to(trainer.accelerator.device)).logits.float().cpu()

    with trainer.reference.generation_model(trainer) as reference:
        separate = logits(reference)
    rows = input_ids.size(0)
    with _unwrapped_for_generation(trainer, trainer.model_wrapped) as model:
        model.eval()  # the logits without dropout (the reference's rows have none in training mode either)
        policy_logits = logits(model)
        with adapter_row_blocks(model, [(model.active_adapter, rows), (reference_rows_adapter(model), rows)]):
            row_blocks = logits(model, torch.cat([input_ids, input_ids]))[rows:]
    result = {
        "rank": trainer.accelerator.process_index,
        "deepspeed_zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "reference_generation": trainer.reference_generation,
        "reference_logits": {"separate": separate.tolist(), "row_blocks": row_blocks.tolist()},
        "policy_logits": policy_logits.tolist(),
    }
    Path(out_dir, f"rank{result['rank']}.json").write_text(json.dumps(result))
    exit_without_teardown(trainer)


if __name__ == "__main__":
    gc.freeze()  # as tests/conftest.py does: Trainer.train()'s gc.collect() then skips the imported modules
    main(*sys.argv[1:])
