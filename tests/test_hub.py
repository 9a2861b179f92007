"""Hub pushes and model cards (issue 5, part 5).

Only the network is faked: the two ``HfApi`` methods transformers' Trainer calls to reach huggingface.co,
``create_repo`` (from ``Trainer.init_hf_repo``) and ``upload_folder`` (from ``Trainer.push_to_hub`` and
``Trainer._push_from_checkpoint``). The fake upload lists the folder with huggingface_hub's own filter
(``filter_repo_objects`` with the caller's ignore patterns plus huggingface_hub's defaults), checks the card's
metadata the way the Hub does (``ModelCard`` parses it), and records every file's bytes at upload time.
Everything that decides what is pushed and when is the real code.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from aapo_trl.hub import (
    EVAL_RESULTS_FILENAME,
    PAPERS,
    RECIPE_FILENAME,
    REDACTED,
    ModelCardMixin,
    build_model_card,
    eval_results_table,
    push_output_dir,
    read_eval_results,
    recipe_from_config,
    register_cli,
    render_recipe,
    update_model_card,
)

ROOT = Path(__file__).resolve().parents[1]
OPEN_RS_RECIPE = ROOT / "examples" / "configs" / "aapo_r1-distill-qwen-1.5b_open-rs.yaml"
OPEN_RS_FIXTURE = ROOT / "tests" / "fixtures" / "datasets" / "open-rs"
RESULTS = {"AIME24": 33.3, "MATH-500": 86.0, "AMC23": 80.0, "Minerva": 30.9, "OlympiadBench": 53.3}
SECRET = "hf_do_not_leak_0123456789"


class FakeHub:
    """Stands in for huggingface.co: records created repositories and every commit's files (read at commit time)."""

    def __init__(self, monkeypatch):
        self.repos: list[dict] = []
        self.commits: list[dict] = []
        self.validated: list[str] = []
        self._lock = threading.Lock()
        hub = self

        def create_repo(api, repo_id, **kwargs):
            with hub._lock:
                hub.repos.append({"repo_id": repo_id, **kwargs})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, path_in_repo=None, commit_message=None, token=None,
                          run_as_future=False, allow_patterns=None, ignore_patterns=None, revision=None, **kwargs):
            folder = Path(folder_path)
            ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
            paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
            kept = filter_repo_objects(paths, allow_patterns=allow_patterns,
                                       ignore_patterns=ignore + list(DEFAULT_IGNORE_PATTERNS))
            prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
            files = {prefix + name: (folder / name).read_bytes() for name in kept}
            if "README.md" in files:
                card = files["README.md"].decode()
                ModelCard(card)  # the Hub rejects a card whose metadata is not valid YAML
                hub.validated.append(card)
            with hub._lock:
                hub.commits.append({"repo_id": repo_id, "message": commit_message, "files": files,
                                    "revision": revision, "token": token})
            info = CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                              commit_message=commit_message, commit_description="", oid="0" * 40, pr_url=None)
            if not run_as_future:
                return info
            future = Future()
            future.set_result(info)
            return future

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    def commit(self, message_prefix: str) -> dict:
        matching = [c for c in self.commits if c["message"].startswith(message_prefix)]
        assert matching, [c["message"] for c in self.commits]
        return matching[-1]


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def test_papers():
    assert PAPERS["aapo"].arxiv_id == "2505.14264" and PAPERS["aapo"].url == "https://arxiv.org/abs/2505.14264"
    assert "Advantage Margin" in PAPERS["aapo"].title and "Jian Xiong" in PAPERS["aapo"].citation
    zapo = PAPERS["zapo"]
    assert zapo.arxiv_id is None and zapo.title.startswith("Useless, or Untapped?")
    assert "double-blind" in zapo.reference() and "Anonymous" in zapo.citation
    assert PAPERS["gpg"].arxiv_id == "2504.02546" and PAPERS["grpo"].arxiv_id == "2402.03300"


def test_eval_results_file(tmp_path):
    assert read_eval_results(tmp_path / EVAL_RESULTS_FILENAME) is None
    path = tmp_path / EVAL_RESULTS_FILENAME
    path.write_text(json.dumps({"AIME24": 0.3, "MATH-500": {"pass@1": 0.86, "n": 4}, "model": "x", "AMC23": None}))
    assert read_eval_results(path) == {"AIME24": 0.3, "MATH-500": 0.86}
    assert eval_results_table({"AIME24": 0.3, "MATH-500": 0.86}).splitlines() == [
        "| Benchmark | pass@1 |", "|---|---|", "| AIME24 | 0.3 |", "| MATH-500 | 0.86 |", "| **Average** | **0.58** |"]
    assert eval_results_table({"AIME24": 33.3}).splitlines()[-1] == "| AIME24 | 33.3 |"  # no average of one
    record = {"model": "m", "benchmarks": {"aime24": {"title": "AIME24", "metrics": {"pass@1": 0.3, "pass@8": 0.6}},
                                           "math_500": {"metrics": {"pass@1": 0.86}}}, "average": {"pass@1": 0.58}}
    path.write_text(json.dumps(record))  # what `aapo-trl eval` writes
    assert read_eval_results(path) == {"AIME24": 0.3, "math_500": 0.86}
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_eval_results(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_eval_results(path)


def test_aapo_card_names_the_algorithm_cites_the_paper_embeds_recipe_and_results():
    recipe = OPEN_RS_RECIPE.read_text()
    card = build_model_card(
        "aapo", model_name="aapo-1.5b", base_model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        hub_model_id="someone/aapo-1.5b", dataset_name="knoveleng/open-rs", recipe_yaml=recipe,
        eval_results=RESULTS, settings=yaml.safe_load(recipe),
    )
    parsed = ModelCard(card)
    assert parsed.data.base_model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert parsed.data.datasets == ["knoveleng/open-rs"] and {"aapo", "aapo-trl", "trl"} <= set(parsed.data.tags)
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in parsed.data.eval_results][0] == ("AIME24", "pass@1", 33.3)
    assert "trained with **AAPO** (Advantage-Augmented Policy Optimization)" in card
    assert "(https://arxiv.org/abs/2505.14264) (arXiv:2505.14264)" in card and "eprint        = {2505.14264}" in card
    assert "```yaml\n" + recipe.rstrip("\n") + "\n```" in card  # the recipe, verbatim, comments included
    assert "| OlympiadBench | 53.3 |" in card and "| **Average** | **56.7** |" in card  # AAPO Table 1: 56.7
    assert "advantage margin clipped to [-0.2, 0.28]" in card and "`format` (weight 1), `cosine` (weight 2)" in card
    assert 'model="someone/aapo-1.5b"' in card and "aapo-trl train --algorithm aapo --config recipe.yaml" in card


def test_zapo_card_cites_the_title_and_greso_without_inventing_an_id():
    card = build_model_card("zapo", model_name="zapo-7b", dataset_name="dapo-math-17k+math-lighteval",
                            settings={"alpha": 5.0, "tdar_beta": 5.0, "use_tdar": False}, greso=True)
    assert "**ZAPO** (Zero-Advantage sample-augmented Policy Optimization)" in card
    assert "*Useless, or Untapped? Unlocking the Full Value of Zero-Advantage Samples for Better Policy Optimization*" in card
    assert "double-blind review" in card and "arxiv.org/abs/2506.02177" in card  # GRESO has an id, ZAPO none
    assert card.count("arxiv.org/abs/") == 1 and "## Evaluation" not in card
    assert "alpha = 5.0" in card and "ablation: without TDAR" in card
    assert ModelCard(card).data.datasets == ["BytedTsinghua-SIA/DAPO-Math-17k", "DigitalLearningGmbH/MATH-lighteval"]
    gpg = build_model_card("gpg", model_name="gpg", greso=True)
    assert "**GPG + GRESO**" in gpg and "2504.02546" in gpg


def test_render_recipe(tmp_path):
    from aapo_trl.train import parse_args

    cpu = ["--bf16", "false", "--use_cpu", "true", "--activation_checkpointing", "false"]
    argv = ["--config", str(OPEN_RS_RECIPE)]
    parsed = parse_args("aapo", argv + cpu)
    # the recipe file as is when nothing overrides it
    assert render_recipe(parsed, argv, "aapo") == f"# algorithm: aapo\n# recipe: {OPEN_RS_RECIPE}\n" + OPEN_RS_RECIPE.read_text()

    argv += ["--learning_rate", "2e-6", "--hub_token", SECRET, *cpu]
    rendered = render_recipe(parse_args("aapo", argv), argv, "aapo")
    values = yaml.safe_load(rendered)
    assert values["learning_rate"] == 2e-6 and values["bf16"] is False and values["reward_weights"] == [1.0, 2.0]
    assert values["lr_scheduler_type"] == "cosine_with_min_lr" and values["hub_token"] == REDACTED
    assert SECRET not in rendered and "# Reproduces: AAPO paper, Table 1" in rendered
    assert "# command-line overrides applied: learning_rate, hub_token, bf16, use_cpu, activation_checkpointing\n" in rendered

    secret_recipe = tmp_path / "r.yaml"
    secret_recipe.write_text(f"env:\n  HF_TOKEN: {SECRET}\n  OMP_NUM_THREADS: '1'\nmax_steps: 3\n")
    argv = ["--config", str(secret_recipe)]
    rendered = render_recipe(parse_args("grpo", argv), argv)
    assert SECRET not in rendered and yaml.safe_load(rendered)["env"] == {"HF_TOKEN": REDACTED, "OMP_NUM_THREADS": "1"}

    embedded = yaml.safe_load(render_recipe(parse_args("zapo", ["--max_steps", "3"]), ["--max_steps", "3"], "zapo"))
    assert embedded["max_steps"] == 3 and embedded["model_name_or_path"] == "embedded"
    assert embedded["reward_funcs"] == ["final_number_zapo"]


def test_recipe_from_config_without_a_recipe_file(tmp_path):
    from aapo_trl.configs import ZAPOConfig

    config = ZAPOConfig(output_dir=str(tmp_path), use_cpu=True, alpha=5.0, hub_token=SECRET, num_generations=4)
    rendered = recipe_from_config(config)
    values = yaml.safe_load(rendered)
    assert values["alpha"] == 5.0 and values["num_generations"] == 4 and values["use_cpu"] is True
    assert SECRET not in rendered and "hub_token" not in values and "accelerator_config" not in values


# ---------------------------------------------------------------------------------------------------------------
# Pushing through the real Trainer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_push_to_hub_uploads_model_recipe_and_card(monkeypatch, tiny_model_path, tmp_path):
    from aapo_trl.data import load_prompt_dataset
    from aapo_trl.rewards import get_reward_funcs
    from aapo_trl.train import load_policy, parse_args
    from aapo_trl.trainers import AAPOTrainer

    assert issubclass(AAPOTrainer, ModelCardMixin)  # every aapo-trl trainer writes this card
    CardAAPOTrainer = AAPOTrainer
    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    argv = ["--config", str(OPEN_RS_RECIPE), "--model_name_or_path", str(tiny_model_path),
            "--dataset_name", str(OPEN_RS_FIXTURE), "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "6", "--gradient_accumulation_steps", "1", "--max_completion_length", "4",
            "--bf16", "false", "--use_cpu", "true", "--activation_checkpointing", "false", "--dtype", "float32",
            "--report_to", "none", "--save_steps", "1", "--log_completions", "false", "--disable_tqdm", "true",
            "--push_to_hub", "true", "--hub_model_id", "someone/aapo-tiny", "--hub_token", SECRET]
    script, config, model_args = parse_args("aapo", argv)
    model, tokenizer = load_policy(model_args, config)
    trainer = CardAAPOTrainer(model=model, reward_funcs=get_reward_funcs(script.reward_funcs, config), args=config,
                              train_dataset=load_prompt_dataset(script.dataset_name), processing_class=tokenizer)
    trainer.recipe_yaml = render_recipe((script, config, model_args), argv, "aapo")
    assert [r["repo_id"] for r in hub.repos] == ["someone/aapo-tiny"] and hub.repos[0]["token"] == SECRET

    trainer.train()  # save_steps=1: the checkpoint is pushed in the background (hub_strategy every_save)
    trainer._finish_current_push()
    during = hub.commit("Training in progress, step 1")
    assert during["repo_id"] == "someone/aapo-tiny"
    assert {"README.md", RECIPE_FILENAME, "model.safetensors", "config.json"} <= set(during["files"])
    assert not any(name.startswith("checkpoint-") for name in during["files"])  # checkpoints stay local
    assert "## Evaluation" not in during["files"]["README.md"].decode()  # not evaluated yet

    # the evaluation harness writes its results next to the model; the next push carries them
    (out / EVAL_RESULTS_FILENAME).write_text(json.dumps(RESULTS))
    trainer.push_to_hub()
    final = hub.commit("End of training")
    card = final["files"]["README.md"].decode()
    recipe = final["files"][RECIPE_FILENAME].decode()
    assert EVAL_RESULTS_FILENAME in final["files"] and "model.safetensors" in final["files"]
    assert card == (out / "README.md").read_text() and card in hub.validated

    assert "trained with **AAPO**" in card and "arxiv.org/abs/2505.14264" in card
    assert "| MATH-500 | 86.0 |" in card and "| **Average** | **56.7** |" in card
    assert "```yaml\n" + recipe.rstrip("\n") + "\n```" in card
    values = yaml.safe_load(recipe)
    assert values["reward_funcs"] == ["format", "cosine"] and values["num_generations"] == 6
    assert values["max_steps"] == 1 and values["push_to_hub"] is True and values["hub_token"] == REDACTED
    assert "# Reproduces: AAPO paper, Table 1" in recipe
    data = ModelCard(card).data
    assert {"aapo", "trl", "grpo"} <= set(data.tags) and data.model_name == "aapo-tiny"
    assert data.base_model is None  # a local model: nothing to link
    for commit in hub.commits:  # (transformers' own training_args.bin pickles hub_token: use `hf auth login`)
        for name in ("README.md", RECIPE_FILENAME):
            assert SECRET.encode() not in commit["files"][name], f"{name} leaks the token"


def test_push_output_dir_refreshes_the_card_with_results(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    (out / RECIPE_FILENAME).write_text(OPEN_RS_RECIPE.read_text())
    (out / "README.md").write_text(build_model_card(
        "aapo", model_name="aapo-1.5b", base_model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        dataset_name="knoveleng/open-rs", recipe_yaml=OPEN_RS_RECIPE.read_text()))
    (out / EVAL_RESULTS_FILENAME).write_text(json.dumps(RESULTS))

    push_output_dir(out, "someone/aapo-1.5b")

    commit = hub.commit("Update model card")
    assert set(commit["files"]) == {"README.md", RECIPE_FILENAME, "model.safetensors", EVAL_RESULTS_FILENAME}
    card = commit["files"]["README.md"].decode()
    assert "| **Average** | **56.7** |" in card and "trained with **AAPO**" in card
    assert ModelCard(card).data.base_model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert 'model="someone/aapo-1.5b"' in card

    (out / EVAL_RESULTS_FILENAME).unlink()
    assert "## Evaluation" not in update_model_card(out).read_text()


def test_push_command_line(monkeypatch, tmp_path):
    import argparse

    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text(build_model_card("zapo", model_name="zapo-7b", greso=True))
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["push", "--output_dir", str(out), "--hub_model_id", "someone/zapo-7b", "--private"])
    assert args.handler(args, []) == 0
    assert hub.repos[0]["repo_id"] == "someone/zapo-7b" and hub.repos[0]["private"] is True
    card = hub.commit("Update model card")["files"]["README.md"].decode()
    assert "**ZAPO**" in card and "Cite GRESO as" in card
