"""Train with GPG, AAPO's main baseline, on the same CE-loss code path.

    accelerate launch examples/train_gpg.py [--config recipe.yaml] [--field value ...]
"""

from aapo_trl.train import run

if __name__ == "__main__":
    run("gpg")
