"""Kill a CPU training run with SIGKILL after a checkpoint, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aapo_trl.checkpointing import CHECKPOINT_MARKER, last_complete_checkpoint, resolve_resume_checkpoint

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("resume_run.py")


def start(name, model_path, output_dir, pause_after=0, resume=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(SCRIPT), name, str(model_path), str(output_dir), str(pause_after),
               "resume" if resume else "fresh"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]


def checkpoint_state(checkpoint: Path) -> dict:
    state = {
        "model": load_file(checkpoint / "model.safetensors"),
        "optimizer": torch.load(checkpoint / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(checkpoint / "scheduler.pt", weights_only=True),
        "rng": torch.load(checkpoint / "rng_state.pth", weights_only=False),  # the Trainer's own file (numpy state)
        "trainer_state": json.loads((checkpoint / "trainer_state.json").read_text())["global_step"],
    }
    for extra in ("greso_state.json", "aapo_reference_state.json"):
        if (checkpoint / extra).exists():
            state[extra] = json.loads((checkpoint / extra).read_text())
    if (checkpoint / "aapo_reference.safetensors").exists():
        state["reference"] = load_file(checkpoint / "aapo_reference.safetensors")
    return state


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "shape"):  # numpy arrays in the RNG state
        assert (a == b).all(), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", ["zapo_greso", "aapo"])
def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tiny_model_path, tmp_path, name):
    uninterrupted = start(name, tiny_model_path, tmp_path / "a")
    finish(uninterrupted)

    victim = start(name, tiny_model_path, tmp_path / "b", pause_after=3)
    deadline = time.time() + 300
    while not (tmp_path / "b" / "checkpoint-2" / CHECKPOINT_MARKER).exists() or not _paused(victim):
        assert time.time() < deadline and victim.poll() is None, victim.communicate()[1][-4000:]
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b" / "checkpoint-4").exists()

    finish(start(name, tiny_model_path, tmp_path / "b", resume=True))

    losses_a = json.loads((tmp_path / "a" / "losses.json").read_text())
    losses_b = json.loads((tmp_path / "b" / "losses.json").read_text())
    assert sorted(losses_a, key=int) == sorted(losses_b, key=int) == ["1", "2", "3", "4", "5", "6"]
    for step in ("3", "4", "5", "6"):
        assert losses_b[step] == pytest.approx(losses_a[step], abs=1e-6), f"loss at step {step}"
    for step in (4, 6):
        resumed = checkpoint_state(tmp_path / "b" / f"checkpoint-{step}")
        assert_same(checkpoint_state(tmp_path / "a" / f"checkpoint-{step}"), resumed, f"checkpoint-{step}")
        # what must survive the kill: the reference updated at step 3 (ref_update_steps), GRESO's state
        assert ("reference" in resumed) is (name == "aapo") and ("greso_state.json" in resumed) is (name != "aapo")


_paused_lines: dict[int, str] = {}


def _paused(process) -> bool:
    """Whether the run printed that it is sleeping after step 3 (reads its stdout without blocking)."""
    import select

    ready, _, _ = select.select([process.stdout], [], [], 0)
    if ready:
        _paused_lines[process.pid] = _paused_lines.get(process.pid, "") + (process.stdout.readline() or "")
    return "PAUSED AT 3" in _paused_lines.get(process.pid, "")


def test_a_checkpoint_killed_while_saving_is_skipped(tmp_path):
    complete, partial = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    complete.mkdir()
    partial.mkdir()
    (complete / CHECKPOINT_MARKER).write_text("{}")
    (partial / "model.safetensors").write_text("half written")
    assert last_complete_checkpoint(tmp_path) == str(complete)
    assert resolve_resume_checkpoint(True, tmp_path) == str(complete)
    with pytest.raises(ValueError, match=f"its save did not finish.*{complete}"):
        resolve_resume_checkpoint(str(partial), tmp_path)
