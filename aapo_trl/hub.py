"""Hugging Face Hub support: pushing an aapo-trl run, and the ``aapo-trl push`` command.

``push_to_hub`` / ``hub_model_id`` / ``hub_strategy`` work exactly as in TRL (they are
``transformers.Trainer``'s): the repository is created when the trainer is built, the output folder is
uploaded at every save (``hub_strategy="every_save"``) and by ``trainer.push_to_hub()``. What aapo-trl
changes is the ``README.md`` written into the output folder before each upload: the model card, built by
:mod:`aapo_trl.model_card` (a low module the trainers import :class:`ModelCardMixin` from), whose public
names this module re-exports, with :func:`render_recipe` from :mod:`aapo_trl.train` (it knows the embedded
default). This module sits at the top (it imports :mod:`aapo_trl.train`; nothing below imports it).

After training, ``aapo-trl push --output_dir DIR --hub_model_id USER/NAME`` rebuilds the card from the
files in ``DIR`` (``README.md`` metadata, ``recipe.yaml``, ``eval_results.json``) and uploads the folder:
the way to publish evaluation results computed after the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .model_card import (  # noqa: F401  (re-exported: the public names of the card live in model_card)
    EVAL_RESULTS_FILENAME,
    GRESO_PAPER,
    MODEL_CARD_FILENAME,
    PAPERS,
    RECIPE_FILENAME,
    REDACTED,
    ModelCardMixin,
    Paper,
    _package_version,
    _settings_from,
    build_model_card,
    eval_results_table,
    hub_base_model,
    paper_for,
    read_eval_results,
    recipe_from_config,
    redact,
    to_yaml_data,
    write_recipe,
)
from .train import render_recipe  # noqa: F401  (re-exported)


# ---------------------------------------------------------------------------------------------------
# Pushing a finished run (e.g. after its evaluation)
# ---------------------------------------------------------------------------------------------------


def _algorithm_from_tags(tags: Iterable[str]) -> str | None:
    tags = [str(tag).lower() for tag in tags or []]
    for algorithm in ("aapo", "zapo", "gpg"):
        if algorithm in tags:
            return algorithm
    return "grpo" if "grpo" in tags else None


def update_model_card(output_dir: str | os.PathLike, algorithm: str | None = None,
                      hub_model_id: str | None = None) -> Path:
    """Rebuild ``README.md`` in ``output_dir`` from the files there: the existing card's metadata (base
    model, datasets, tags), ``recipe.yaml`` and ``eval_results.json``. Returns the card's path."""
    from huggingface_hub import ModelCard

    output_dir = Path(output_dir)
    card_path = output_dir / MODEL_CARD_FILENAME
    data: dict[str, Any] = {}
    if card_path.is_file():
        data = ModelCard.load(card_path).data.to_dict()
    recipe_path = output_dir / RECIPE_FILENAME
    recipe = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else None
    settings = _settings_from(recipe, None, None)
    if recipe:
        loaded = yaml.safe_load(recipe)
        if isinstance(loaded, Mapping):
            settings.update(loaded)
    tags = [tag for tag in data.get("tags") or [] if tag != "generated_from_trainer"]
    algorithm = algorithm or _algorithm_from_tags(tags)
    if algorithm is None:
        raise ValueError(f"cannot tell the algorithm of {output_dir}: pass --algorithm")
    datasets = data.get("datasets")
    dataset_name = settings.get("dataset_name") or ("+".join(datasets) if isinstance(datasets, list) else datasets)
    model_name = data.get("model_name") or (hub_model_id or output_dir.resolve().name).split("/")[-1]
    card = build_model_card(
        algorithm,
        model_name=model_name,
        base_model=data.get("base_model") or hub_base_model(settings.get("model_name_or_path")),
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        tags=tags,
        recipe_yaml=recipe,
        eval_results=read_eval_results(output_dir / EVAL_RESULTS_FILENAME),
        settings=settings,
        greso=bool(settings.get("greso", False)) or "greso" in tags,
    )
    card_path.write_text(card, encoding="utf-8")
    return card_path


def push_output_dir(output_dir: str | os.PathLike, hub_model_id: str, *, algorithm: str | None = None,
                    private: bool | None = None, token: str | None = None,
                    commit_message: str = "Update model card and evaluation results", revision: str | None = None):
    """Rebuild the card (:func:`update_model_card`) and upload ``output_dir`` to ``hub_model_id``, skipping
    checkpoint folders and ``_*`` files like ``Trainer.push_to_hub``. Returns the commit info."""
    from huggingface_hub import HfApi

    update_model_card(output_dir, algorithm=algorithm, hub_model_id=hub_model_id)
    api = HfApi(library_name="aapo-trl", library_version=_package_version("aapo-trl"))
    repo_id = api.create_repo(hub_model_id, token=token, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=commit_message,
        token=token,
        revision=revision,
        ignore_patterns=["_*", "checkpoint-*"],
    )


def register_cli(subparsers) -> None:
    """``aapo-trl push``: refresh the model card of a finished run (e.g. with its evaluation) and upload it."""
    parser = subparsers.add_parser(
        "push",
        help="rebuild the model card of an output folder (recipe, evaluation results) and upload the folder",
    )
    parser.add_argument("--output_dir", required=True, help="the run's output folder")
    parser.add_argument("--hub_model_id", required=True, help="user/name of the model repository")
    parser.add_argument("--algorithm", choices=sorted(PAPERS), default=None,
                        help="default: read from the existing card's tags")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.set_defaults(handler=_push_command)


def _push_command(args, rest: list[str]) -> int:
    if rest:
        raise SystemExit(f"aapo-trl push: unrecognized arguments {rest}")
    info = push_output_dir(args.output_dir, args.hub_model_id, algorithm=args.algorithm,
                           private=args.private or None, revision=args.revision)
    print(f"pushed {args.output_dir} to https://huggingface.co/{args.hub_model_id} ({getattr(info, 'oid', info)})")
    return 0


__all__ = [
    "EVAL_RESULTS_FILENAME",
    "GRESO_PAPER",
    "ModelCardMixin",
    "PAPERS",
    "Paper",
    "RECIPE_FILENAME",
    "build_model_card",
    "eval_results_table",
    "paper_for",
    "push_output_dir",
    "read_eval_results",
    "recipe_from_config",
    "redact",
    "render_recipe",
    "to_yaml_data",
    "update_model_card",
    "write_recipe",
]
