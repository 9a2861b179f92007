"""End-to-end lighteval runs through the runner (``aapo-trl eval``) on the offline fixtures, with the
tiny model: no network, only our task module, a fresh sample cache, the generation budget respected,
n samples per problem, results JSON + table, and a checkpoint sweep."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

import lighteval  # noqa: E402,F401  (the eval extra; make test installs it: a missing install must fail, not skip)

from aapo_trl.cli import main  # noqa: E402
from aapo_trl.evaluation import evaluation_module, find_checkpoints, infer_base_model  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
FIXTURE_SIZES = {"aime24": 3, "math_500": 3, "amc23": 2, "minerva": 3, "olympiadbench": 3}

pytestmark = pytest.mark.slow


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during an offline evaluation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return attempts


def test_end_to_end_lighteval_run_on_the_fixtures(tiny_model_path, tmp_path, no_network, private_tmp, capsys):
    out = tmp_path / "eval"
    details = tmp_path / "lighteval"
    before = set(sys.modules)
    code = main([
        "eval", "--model", str(tiny_model_path), "--data-dir", str(FIXTURES), "--num-samples", "2",
        "--max-new-tokens", "5", "--batch-size", "16", "--output-dir", str(out),
        "--lighteval-output-dir", str(details), "--save-details", "--label", "tiny",
    ])
    assert code == 0 and not no_network
    import torch

    assert torch.is_grad_enabled()  # lighteval switches autograd off process-wide; the runner restores it

    record = json.loads((out / "results.json").read_text())
    assert record["protocol"]["temperature"] == 0.6 and record["protocol"]["top_p"] == 0.95
    assert record["protocol"]["num_samples"] == 2 and record["protocol"]["max_new_tokens"] == 5
    assert record["protocol"]["top_k"] == 0 and record["protocol"]["remove_reasoning_tags"] is False
    assert list(record["benchmarks"]) == list(FIXTURE_SIZES)
    for key, bench in record["benchmarks"].items():
        assert bench["task"] == f"aapo_{key}"
        assert bench["source"] == str(FIXTURES / key)
        assert bench["num_problems"] == FIXTURE_SIZES[key]
        assert 0.0 <= bench["metrics"]["pass@1"] <= 1.0
        # the task's generation size bounds the output on the transformers backend
        assert 0 < bench["mean_output_tokens"] <= 5
    assert set(record["average"]) == {"pass@1"}
    assert record["label"] == "tiny" and record["wall_time_s"] > 0

    # only our task module was imported, and the fresh sample cache is gone
    assert not {m for m in set(sys.modules) - before if m.startswith("lighteval.tasks.tasks.")}
    assert not list(private_tmp.glob("aapo-lighteval-cache-*"))

    # per-sample details (xxhash < 4): 2 sampled completions per problem, and they differ
    parquet = sorted(details.rglob("details_aapo_math_500*.parquet"))
    assert parquet, list(details.rglob("*"))
    from datasets import load_dataset

    rows = load_dataset("parquet", data_files=str(parquet[0]), split="train")
    texts = [row["model_response"]["text"] for row in rows]
    assert len(texts) == 3 and all(len(t) == 2 for t in texts)
    assert any(t[0] != t[1] for t in texts)  # sampling, not greedy decoding

    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert "| Model | AIME24 | MATH-500 | AMC23 | Minerva | OlympiadBench | Avg. | Source |" in table
    assert "| **tiny** (ours) |" in table and "| **tiny** (ours) |" in printed
    assert "Our rows are on subsets" in table


def test_checkpoint_sweep_evaluates_every_checkpoint_with_its_own_cache(tiny_model_path, tmp_path, no_network,
                                                                         private_tmp, capsys):
    run_dir = tmp_path / "run"
    for step in (2, 10):
        shutil.copytree(tiny_model_path, run_dir / f"checkpoint-{step}")
    (run_dir / "checkpoint-7").mkdir()  # no model inside: ignored
    assert [label for label, _ in find_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-10"]

    run = evaluation_module("run")
    caches = []
    original = run.tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        path = original(*args, **kwargs)
        if kwargs.get("prefix", "").startswith("aapo-lighteval-cache"):
            caches.append(path)
        return path

    run.tempfile.mkdtemp = recording_mkdtemp
    try:
        code = main(["eval", "--model", str(run_dir), "--data-dir", str(FIXTURES), "--benchmarks", "amc23",
                     "--max-new-tokens", "3", "--batch-size", "8", "--output-dir", str(tmp_path / "sweep"),
                     "--compare", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"])
    finally:
        run.tempfile.mkdtemp = original
    assert code == 0
    assert len(caches) == 2 and len(set(caches)) == 2  # a fresh lighteval cache per checkpoint
    records = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["checkpoint_step"] for r in records] == [2, 10]
    assert all((tmp_path / "sweep" / f"checkpoint-{s}.json").is_file() for s in (2, 10))
    out = capsys.readouterr()
    assert "| **checkpoint-2** (ours) |" in out.out and "| **checkpoint-10** (ours) |" in out.out
    assert "| AAPO-1.5B | 33.3 | 86.0 | 80.0 | 30.9 | 53.3 | 56.7 | AAPO Table 1 |" in out.out
    assert "checkpoints" in out.err  # the progress bar


def test_base_model_is_read_from_the_model_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-Math-7B"}))
    assert infer_base_model(tmp_path) == "Qwen/Qwen2.5-Math-7B"
    other = tmp_path / "full"
    other.mkdir()
    (other / "README.md").write_text("---\nbase_model: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B\n---\n")
    assert infer_base_model(other) == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def test_protocols_and_settings():
    run = evaluation_module("run")
    aapo = run.EvalConfig(model="m").resolved()
    assert (aapo.temperature, aapo.top_p, aapo.num_samples, aapo.max_new_tokens) == (0.6, 0.95, 1, 32768)
    assert aapo.benchmarks == ["aime24", "math_500", "amc23", "minerva", "olympiadbench"]
    zapo = run.EvalConfig(model="m", protocol="zapo", benchmarks="math500").resolved()
    assert (zapo.temperature, zapo.top_p, zapo.num_samples, zapo.benchmarks) == (1.0, 0.7, 4, ["math_500"])
    zapo = run.EvalConfig(model="m", protocol="zapo").resolved()  # ZAPO Table 1's five, AMC of 83 problems
    assert zapo.benchmarks == ["amc_aimo", "math_500", "minerva", "olympiadbench", "aime24"]
    assert run.EvalConfig(model="m", protocol="zapo", benchmarks="amc").resolved().benchmarks == ["amc_aimo"]
    assert zapo.protocol_dict()["prompt"].startswith("GRESO") and "math-verify" in zapo.protocol_dict()["papers_grader"]
    passk = run.EvalConfig(model="m", protocol="aapo-passk", num_samples=16).resolved()
    assert passk.num_samples == 16
    with pytest.raises(ValueError, match="temperature"):
        run.EvalConfig(model="m", num_samples=4, temperature=0).resolved()
    with pytest.raises(ValueError, match="protocol"):
        run.EvalConfig(model="m", protocol="nope").resolved()


def test_vllm_environment_requirements_are_shipped():
    text = (Path(__file__).resolve().parents[1] / "evaluation" / "requirements-vllm.txt").read_text()
    requirements = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    # lighteval without its vllm extra (it pins vllm<0.10.2): the runner's own backend runs TRL 1.16's vLLM range
    assert {"lighteval==0.13.0", "vllm>=0.22,<=0.31", "xxhash<4"} <= set(requirements)


def test_zapo_protocol_runs_the_83_problem_amc_with_gresos_prompt_and_grader(tiny_model_path, tmp_path, no_network,
                                                                            private_tmp):
    """`aapo-trl eval --protocol zapo --benchmarks amc` (issue 28): ZAPO's AMC (the fixture's stand-in for the 83
    problems), GRESO's prompt reaching the model, every scorer, ZAPO's columns."""
    out = tmp_path / "zapo"
    code = main(["eval", "--model", str(tiny_model_path), "--protocol", "zapo", "--benchmarks", "amc",
                 "--data-dir", str(FIXTURES), "--max-new-tokens", "3", "--num-samples", "2", "--batch-size", "8",
                 "--no-sweep", "--output-dir", str(out)])
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    assert list(record["benchmarks"]) == ["amc_aimo"]
    amc = record["benchmarks"]["amc_aimo"]
    assert (amc["task"], amc["num_problems"], amc["full_size"]) == ("aapo_amc_aimo", 3, 83)
    assert set(amc["metrics_by_scoring"]) == {"papers", "robust", "qwen"}
    protocol = record["protocol"]
    sampling = (protocol["name"], protocol["temperature"], protocol["top_p"], protocol["num_samples"])
    assert sampling == ("zapo", 1.0, 0.7, 2)
    assert protocol["prompt"].startswith("GRESO") and "math-verify" in protocol["papers_grader"]
    table = (out / "table.md").read_text()
    assert "| Model | AMC (83) | MATH-500 | Minerva | OlympiadBench | AIME24 | Avg. | Source |" in table
