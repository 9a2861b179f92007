"""The greedy-completion check of the real-engine tests (_greedy_paths.py) on the real engine, with exact ties.

Whether the engine's bfloat16 logits tie depends on the CPU (see _greedy_paths.py), so tie_run.py makes ties on
purpose, the same on every CPU: a float32 engine whose sampler sees each logit rounded to a multiple of 2. There
``top_k=1`` samples take tied tokens that greedy decoding does not take (what made the AAPO tests fail on a CPU with
AVX-512 bf16 instructions), and the check must still count every one of them as a greedy completion, through the
log-probs the engine returns, while it rejects samples of the full distribution. Needs vLLM (make test-vllm).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this environment; the real-engine tests run in .venv-vllm: make test-vllm",
                allow_module_level=True)

from _engine_process import run_engine_process  # noqa: E402

SCRIPT = Path(__file__).with_name("tie_run.py")


@pytest.mark.slow
def test_top_k_1_samples_that_take_a_tied_token_are_greedy_completions_by_the_engines_log_probs(embedded_model_path,
                                                                                                tmp_path):
    run_engine_process([sys.executable, str(SCRIPT), str(embedded_model_path), str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())

    seeds = result["seeds"]
    greedy = [tokens for tokens, _ in result["greedy"]]
    steps = [{int(token): logprob for token, logprob in step.items()} for _, tops in result["greedy"] for step in tops]
    # exact ties at the maximum in the engine's log-probs of greedy decoding
    assert any(list(step.values()).count(max(step.values())) > 1 for step in steps)
    # top_k=1 sampled tied tokens that greedy decoding did not take: the samples are not all the greedy completions
    differing = [sample for i, sample in enumerate(result["top_k_1"]) if sample != greedy[i // seeds]]
    assert differing
    # yet each of them is a greedy completion, told by the engine's log-probs
    assert all(result["top_k_1_greedy_paths"]), result
    # samples of the full distribution (temperature 1, no top_k) take tokens below the maximum: not all greedy
    assert not all(result["free_greedy_paths"]), result
