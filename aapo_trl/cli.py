"""``aapo-trl``: the command-line entry point.

    aapo-trl train --algorithm aapo|gpg|grpo|zapo [--config recipe.yaml] [--field value ...]
    aapo-trl migrate-recipe OLD.yaml [--algorithm aapo]   # a TRL 0.16-era recipe in today's fields, with notes

Each subcommand lives in its own module, which exposes ``register_cli(subparsers)``: it adds its
parser and sets ``handler`` (a function of the parsed namespace and the remaining arguments,
returning an exit code) with ``parser.set_defaults``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute a subcommand (one line each).
COMMAND_MODULES = [
    "aapo_trl.train",
    "aapo_trl.hub",
    "aapo_trl.ref_rollouts",
    "aapo_trl.evaluation",
    "aapo_trl.report",
    "aapo_trl.recipe_migration",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aapo-trl", description="AAPO / ZAPO training and evaluation on TRL.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    known, rest = build_parser().parse_known_args(argv)
    return known.handler(known, rest) or 0


if __name__ == "__main__":
    sys.exit(main())
