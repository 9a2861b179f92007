"""The training entry points: argument parsing, YAML recipes and a real run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aapo_trl.cli import main as cli_main
from aapo_trl.configs import AAPOConfig, GPGConfig
from aapo_trl.train import EMBEDDED_DEFAULTS, parse_args

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = ["--model_name_or_path", "tiny", "--max_steps", "1", "--num_generations", "2",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--max_completion_length", "4", "--max_train_samples", "8"]


def test_no_arguments_means_the_embedded_default(tmp_path):
    script, config, model = parse_args("aapo", [])
    assert isinstance(config, AAPOConfig)
    assert model.model_name_or_path == "embedded"
    assert script.dataset_name == "arithmetic" and script.reward_funcs == ["final_number"]
    assert config.num_generations == EMBEDDED_DEFAULTS["num_generations"]
    assert config.max_steps == EMBEDDED_DEFAULTS["max_steps"]
    assert config.loss_type == "aapo" and config.bf16 is False
    assert config.output_dir.endswith("aapo-smollm2-arithmetic")


def test_cli_overrides_the_embedded_default():
    _, config, model = parse_args("gpg", ["--max_steps", "3", "--model_name_or_path", "tiny"])
    assert isinstance(config, GPGConfig) and config.max_steps == 3 and model.model_name_or_path == "tiny"
    assert config.num_generations == EMBEDDED_DEFAULTS["num_generations"]


def test_yaml_recipe_with_reward_names_and_cli_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: tiny\n"
        "dataset_name: arithmetic\n"
        "reward_funcs: [format, cosine]\n"
        "reward_weights: [1.0, 2.0]\n"
        "num_generations: 6\n"
        "per_device_train_batch_size: 6\n"
        "margin_clip: false\n"
        "ref_update_steps: 20\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    script, config, model = parse_args("aapo", ["--config", str(recipe), "--learning_rate", "2e-6"])
    assert script.reward_funcs == ["format", "cosine"]
    assert config.reward_weights == [1.0, 2.0]
    assert config.margin_clip is False and config.ref_update_steps == 20
    assert config.learning_rate == 2e-6
    assert config.num_generations == 6  # the recipe wins over the embedded default


@pytest.mark.slow
def test_cli_train_runs_and_writes_model_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--algorithm", "aapo", *TINY_RUN, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zero-advantage group share" in printed and "AAPO margin mean" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["steps"] == 1
    assert metrics["summary"]["zero_adv_frac_groups_final"] is not None
    assert (out / "model.safetensors").exists()


def test_bad_reward_configuration_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="not_a_reward"):
        cli_main(["train", "--algorithm", "aapo", *TINY_RUN, "--reward_funcs", "not_a_reward",
                  "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="reward_weights has 2 values"):
        cli_main(["train", "--algorithm", "grpo", *TINY_RUN, "--reward_weights", "1", "2",
                  "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_example_script_under_accelerate_launch(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    finished = subprocess.run(
        [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--cpu", str(ROOT / "examples" / "train_gpg.py"), *TINY_RUN,
         "--output_dir", str(tmp_path / "gpg")],
        capture_output=True, text=True, timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "GPG finished: 1 steps" in finished.stdout


def test_zapo_embedded_default_uses_the_three_level_reward():
    from aapo_trl.configs import ZAPOConfig

    script, config, _ = parse_args("zapo", [])
    assert isinstance(config, ZAPOConfig) and config.loss_type == "grpo" and config.beta == 0.0
    assert script.reward_funcs == ["final_number_zapo"]
    assert config.output_dir.endswith("zapo-smollm2-arithmetic")
    _, config, _ = parse_args("zapo", ["--greso", "true", "--alpha", "5", "--use_tdar", "false"])
    assert config.greso and config.alpha == 5 and not config.use_tdar


@pytest.mark.slow
def test_cli_trains_zapo_with_greso(tmp_path, capsys):
    out = tmp_path / "zapo"
    assert cli_main(["train", "--algorithm", "zapo", *TINY_RUN, "--greso", "true", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ZAPO finished: 1 steps" in printed and "zero-advantage group share" in printed
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert "greso/p_easy" in history[0]
