"""``aapo-trl``: the command-line entry point.

    aapo-trl train --algorithm aapo|gpg|grpo [--config recipe.yaml] [--field value ...]

With no field at all, ``train`` runs the embedded default (SmolLM2-135M-Instruct on the built-in
arithmetic set, CPU, offline). Every AAPOConfig / GPGConfig / GRPOConfig / ModelConfig field and the
script arguments of :mod:`aapo_trl.train` can be given, exactly as in ``examples/train_aapo.py``.
"""

from __future__ import annotations

import argparse
import sys

from .train import ALGORITHMS, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="aapo-trl", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train with AAPO, GPG or GRPO (remaining arguments go to the TRL config parser)",
        add_help=False,
    )
    train.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="aapo")
    train.add_argument("-h", "--help", action="store_true", help="show the fields of the chosen algorithm's config")
    known, rest = parser.parse_known_args(argv)
    if known.command == "train":
        if known.help:
            rest = ["--help"]
        run(known.algorithm, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
