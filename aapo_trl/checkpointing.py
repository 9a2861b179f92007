"""Crash-safe state files and checkpoint completion markers.

Every state file aapo-trl writes is JSON (never pickle), written atomically: a temp file in the same
folder, fsync, ``os.replace``. A checkpoint gets a completion marker written last, after the
Trainer's files and ours, so a job killed while saving leaves a checkpoint without marker, which
resuming skips in favour of the previous complete one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Callable

CHECKPOINT_MARKER = "aapo_trl_checkpoint.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_json(
    path: str | os.PathLike, payload: Any, *, indent: int | None = None, sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None, allow_nan: bool = False,
) -> None:
    """Write ``payload`` as JSON so that a crash leaves the old file or the new one, never a partial file.

    The one atomic JSON writer of the project (checkpoint state, GRESO state, the reference-rollout cache's progress
    and metadata, the mini-reproduction's results). Strict JSON (no NaN literals) unless ``allow_nan``; compact unless
    ``indent``; ``default`` as in :func:`json.dumps` (e.g. ``str`` for paths).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    separators = None if indent is not None else (",", ":")
    text = json.dumps(payload, allow_nan=allow_nan, separators=separators, indent=indent, sort_keys=sort_keys,
                      default=default) + "\n"
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # persist the rename itself; best effort (not every platform can open a directory)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def mark_checkpoint_complete(checkpoint_dir: str | os.PathLike, step: int, algorithm: str) -> None:
    files = sorted(name for name in os.listdir(checkpoint_dir) if name != CHECKPOINT_MARKER)
    atomic_write_json(os.path.join(checkpoint_dir, CHECKPOINT_MARKER), {"step": step, "algorithm": algorithm,
                                                                         "files": files})


def is_complete_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, CHECKPOINT_MARKER))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` whose save finished (None if there is none)."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT_DIR.match(name))
    )
    for _, name in reversed(steps):
        if is_complete_checkpoint(os.path.join(output_dir, name)):
            return os.path.join(output_dir, name)
    return None


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir) -> str | None:
    """``True`` -> the last *complete* checkpoint; a path -> itself, refused when its save never finished."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint-N folder.")
        return checkpoint
    checkpoint = os.fspath(resume_from_checkpoint)
    if not is_complete_checkpoint(checkpoint):
        previous = last_complete_checkpoint(os.path.dirname(os.path.abspath(checkpoint)))
        raise ValueError(
            f"{checkpoint} has no {CHECKPOINT_MARKER}: its save did not finish (the job was probably killed while "
            f"saving) or it was not written by aapo-trl. Resume from the previous complete checkpoint"
            + (f" ({previous})." if previous else ".")
        )
    return checkpoint
