"""Train with plain GRPO (TRL's advantage and loss), logging the same zero_adv/* metrics as AAPO.

    accelerate launch examples/train_grpo.py [--config recipe.yaml] [--field value ...]
"""

from aapo_trl.train import run

if __name__ == "__main__":
    run("grpo")
