"""Train with ZAPO (DAER entropy advantages for zero-advantage samples, TDAR difficulty reshaping).

    accelerate launch examples/train_zapo.py                        # the embedded default (CPU, offline)
    accelerate launch examples/train_zapo.py --config examples/configs/<recipe>.yaml [--field value ...]
"""

from aapo_trl.train import run

if __name__ == "__main__":
    run("zapo")
