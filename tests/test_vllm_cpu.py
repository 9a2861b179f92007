"""``aapo_trl.vllm_cpu`` where vLLM is not installed (the real engine's side: tests/vllm_engine, make test-vllm)."""

from __future__ import annotations

import importlib.util

import pytest

from aapo_trl.vllm_cpu import free_port, server_is_healthy, vllm_server


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="needs an environment without vLLM")
def test_a_server_that_exits_raises_with_its_log_and_leaves_nothing_behind(tiny_model_path, tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match=r"(?s)trl vllm-serve exited with \d+:.*vllm"):
        with vllm_server(tiny_model_path, log, start_timeout=120):
            pytest.fail("the body must not run")
    assert log.read_text()


def test_free_port_is_free_and_a_closed_port_is_not_healthy():
    port = free_port()
    assert 1024 < port < 65536
    assert not server_is_healthy(f"http://127.0.0.1:{port}")
