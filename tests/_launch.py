"""Launching tests/multiprocess_run.py with `accelerate launch` (1 or 2 CPU processes, plain or DeepSpeed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aapo_trl.vllm_cpu import free_port

SCRIPT = Path(__file__).with_name("multiprocess_run.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"


def launch(algorithm: str | None, num_processes: int, model_path, out_dir: Path, *, config: str = "cpu_2proc",
           overrides: dict | None = None, port: int | None = None, script: Path = SCRIPT) -> list[dict]:
    """Run one multiprocess_run.py job (or ``script``'s, which takes no algorithm) under
    ``accelerate_configs/<config>.yaml``; the per-rank results.

    The shipped GPU configs (zero2, zero3) are launched with ``--mixed_precision no``: the CPU has no bf16
    kernels for every op, and fp32 keeps the results comparable with the plain single-process run.
    """
    out_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [str(ACCELERATE), "launch", "--config_file", str(CONFIG_DIR / f"{config}.yaml"),
               "--num_processes", str(num_processes), "--main_process_port", str(port or free_port())]
    if config != "cpu_2proc":
        command += ["--mixed_precision", "no"]
    command += [str(script), *([algorithm] if algorithm else []), str(model_path), str(out_dir),
                json.dumps(overrides or {})]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    return rank_results(out_dir)


def rank_results(out_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")), key=lambda r: r["rank"])


#: A LoRA policy (perturbed by multiprocess_run.py) with the reference rows sampled in its own generate call. Rank 8:
#: its hashed rewards vary over the rows and differ from the reference's, so the advantages compared are not all 0.
BATCHED_LORA = {"lora": {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"},
                "reference_generation": "batched"}

#: The one-process runs that others compare against: name -> (algorithm, overrides, port). One port each, apart from
#: every other launch in the suite: under xdist these runs may overlap any of them.
SINGLE_PROCESS_RUNS = {
    "aapo": ("aapo", {}, 29561),
    "zapo": ("zapo", {}, 29571),
    "aapo_lora_batched": ("aapo", BATCHED_LORA, 29591),
}


def shared_single_process_run(name: str, model_path, shared_dir: Path) -> list[dict]:
    """``launch(algorithm, 1, ...)`` under cpu_2proc.yaml for ``SINGLE_PROCESS_RUNS[name]``, run once per test session
    and read by every test that compares against it (tests/test_multiprocess.py, tests/test_deepspeed.py and
    tests/test_aapo_batched_reference.py). ``shared_dir`` is seen by all xdist workers: the first to ask runs it
    while holding the lock, the others wait and read its results."""
    from filelock import FileLock

    algorithm, overrides, port = SINGLE_PROCESS_RUNS[name]
    out_dir = shared_dir / f"single-process-{name}"
    with FileLock(f"{out_dir}.lock"):
        if not (out_dir / "rank0.json").exists():
            shutil.rmtree(out_dir, ignore_errors=True)  # what a failed earlier attempt left
            return launch(algorithm, 1, model_path, out_dir, overrides=overrides, port=port)
        return rank_results(out_dir)


def assert_same_as_single_process(single, double):
    assert [r["world_size"] for r in double] == [2, 2]
    for rank in double:  # every rank saw the whole gathered batch, identical to the single-process batch
        assert rank["rewards_per_func"] == single[0]["rewards_per_func"]
        assert rank["ref_rewards_per_func"] == single[0]["ref_rewards_per_func"]
    assert len(double[0]["local_advantages"]) == 3  # rows 0-2 on rank 0: the group of rows 2 and 3 spans ranks
    stitched = double[0]["local_advantages"] + double[1]["local_advantages"]
    assert stitched == pytest.approx(single[0]["local_advantages"], abs=1e-5)
    for rows in ("completion_ids", "ref_completion_ids"):  # each rank's own rows (the reference's: AAPO online)
        if single[0][rows] is not None:
            assert double[0][rows] + double[1][rows] == single[0][rows], rows
    # relative too: ZAPO's entropy means (~6) come from generate's incremental steps in one run and from a forward
    # pass in the other (ZeRO-3), equal up to float32 rounding (1.8e-5 apart in zapo/te_mean with transformers 5.24)
    assert double[0]["logged"] == pytest.approx(single[0]["logged"], rel=1e-5, abs=1e-5)


def assert_batched_lora_rows_are_not_trivial(single):
    """What makes a batched-LoRA comparison mean something: the policy's rows are not the reference's, and the
    advantages are not all 0 (the tiny model's hashed rewards can coincide)."""
    assert all(policy != reference for policy, reference in zip(single[0]["completion_ids"],
                                                                 single[0]["ref_completion_ids"]))
    assert single[0]["rewards_per_func"] != single[0]["ref_rewards_per_func"]
    assert any(abs(advantage) > 0 for advantage in single[0]["local_advantages"])
