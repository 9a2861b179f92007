"""Train with AAPO.

    accelerate launch examples/train_aapo.py                        # the embedded default (CPU, offline)
    accelerate launch examples/train_aapo.py --config examples/configs/<recipe>.yaml [--field value ...]
"""

from aapo_trl.train import run

if __name__ == "__main__":
    run("aapo")
