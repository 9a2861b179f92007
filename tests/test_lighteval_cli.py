"""lighteval's own CLI runs this project's tasks (issue 27, part 4):

    lighteval accelerate "model_name=MODEL" "aapo_amc23|0,aapo_math_500|0" --custom-tasks evaluation/tasks.py

run here as a subprocess, with the embedded SmolLM2 generating and lighteval scoring two problems of two local
fixture benchmarks (one gold read as an expression, one as LaTeX), and nothing fetched from the network.

What lighteval 0.13's CLI needs at start-up (its ``Registry`` imports every built-in task module before ours):

* ``huggingface_hub<2`` (the ``eval`` extra pins it): ``mt_bench`` and ``mix_eval`` call
  ``HfApi().list_models(model_name=...)`` at import, an argument huggingface_hub 2.0 removed (``TypeError``);
  in 1.x ``list_models`` is a lazy generator, so the call sends no request;
* ``tinyBenchmarks.pkl`` in lighteval's ``tasks/tasks/`` folder: ``tiny_benchmarks`` downloads it from GitHub
  at import unless the file is there;
* nltk's ``punkt`` and ``punkt_tab`` (``NLTK_DATA``): ``ifeval`` calls ``nltk.download`` at import unless
  ``nltk.data.find`` finds them.

The test serves the last two from files it writes (lighteval only checks that they exist; our tasks never use
them), removes what it created, and points every proxy variable at a closed local port so that any request that
would still leave the machine fails the run instead of reaching the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import lighteval  # noqa: F401  (the eval extra; make test installs it: a missing install must fail, not skip)

from aapo_trl.evaluation import evaluation_module

benchmarks = evaluation_module("benchmarks")
tasks = evaluation_module("tasks")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "eval"
BENCHMARKS = ("amc23", "math_500")
MAX_SAMPLES = 2
GENERATION_SIZE = 48
#: Nothing listens on port 9 (discard): a request through the proxy is refused at once.
CLOSED_PROXY = "http://127.0.0.1:9"


def _lighteval_command() -> list[str]:
    """The ``lighteval`` console script of the interpreter running the tests."""
    script = Path(sys.executable).with_name("lighteval")
    assert script.is_file(), f"no lighteval console script next to {sys.executable}: pip install -e '.[eval]'"
    return [str(script)]


@pytest.fixture
def lighteval_startup_files(tmp_path):
    """The files lighteval 0.13 would download at start-up, written locally; yields the NLTK_DATA folder."""
    nltk_data = tmp_path / "nltk_data"
    for resource in ("punkt", "punkt_tab"):
        (nltk_data / "tokenizers" / resource).mkdir(parents=True)

    tasks_dir = Path(importlib.util.find_spec("lighteval.tasks.tasks").submodule_search_locations[0])
    tiny_benchmarks = tasks_dir / "tinyBenchmarks.pkl"
    created = not tiny_benchmarks.exists()
    if created:  # a real download (tiny benchmarks' IRT parameters) is left alone
        tiny_benchmarks.write_bytes(pickle.dumps({}))
    try:
        yield nltk_data
    finally:
        if created:
            tiny_benchmarks.unlink(missing_ok=True)


@pytest.fixture
def local_model(embedded_model_path, tmp_path):
    """The embedded model's files linked into a fresh folder: lighteval writes its sample cache inside the
    folder of a model given by absolute path, which must not be the shared model cache."""
    folder = tmp_path / "smollm2"
    folder.mkdir()
    for item in Path(embedded_model_path).iterdir():
        (folder / item.name).symlink_to(item)
    return folder


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_lighteval_accelerate_cli_runs_the_tasks_offline(lighteval_startup_files, local_model, tmp_path):
    import datasets

    output_dir = tmp_path / "out"
    env = dict(os.environ)
    env.update(
        AAPO_EVAL_DATA_DIR=str(FIXTURES),
        AAPO_EVAL_GENERATION_SIZE=str(GENERATION_SIZE),
        NLTK_DATA=str(lighteval_startup_files),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **{name: CLOSED_PROXY for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                            "http_proxy", "https_proxy", "all_proxy")},
    )
    for name in ("NO_PROXY", "no_proxy"):
        env.pop(name, None)
    task_list = ",".join(f"aapo_{key}|0" for key in BENCHMARKS)
    command = _lighteval_command() + [
        "accelerate", f"model_name={local_model},batch_size={MAX_SAMPLES}", task_list,
        "--custom-tasks", str(REPO / "evaluation" / "tasks.py"),
        "--max-samples", str(MAX_SAMPLES),
        "--output-dir", str(output_dir),
        "--save-details",
    ]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"lighteval exited with {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"

    (results_file,) = output_dir.glob("results/**/results_*.json")
    results = json.loads(results_file.read_text())["results"]
    for key in BENCHMARKS:
        bench = benchmarks.benchmark(key)
        rows = _read_jsonl(FIXTURES / key / f"{bench.split}.jsonl")[:MAX_SAMPLES]
        (details_file,) = output_dir.glob(f"details/**/details_aapo_{key}|0_*.parquet")
        details = datasets.Dataset.from_parquet(str(details_file)).to_list()
        assert len(details) == MAX_SAMPLES, f"{key}: {len(details)} samples scored"

        # the prompts and golds come from our task definition and the local fixture rows
        assert sorted(d["doc"]["query"] for d in details) == sorted(bench.query(row) for row in rows)
        by_query = {bench.query(row): row for row in rows}
        scores = []
        for detail in details:
            (completion,) = detail["model_response"]["text"]
            assert completion.strip(), f"{key}: empty generation for {detail['doc']['query']!r}"
            row = by_query[detail["doc"]["query"]]
            assert detail["doc"]["choices"] == [bench.gold(row)]
            # lighteval's score of the generated text is the one our scorer gives the same text
            expected = tasks.score_completion(key, row, completion)
            assert detail["metric"]["pass@1"] == expected, (key, completion, detail["metric"])
            scores.append(expected)
        assert results[f"aapo_{key}|0"]["pass@1"] == pytest.approx(sum(scores) / len(scores))

