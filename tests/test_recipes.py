"""The paper recipes in examples/configs/: each parses with TRL's TrlParser through aapo_trl.train.parse_args,
holds the papers' values, and trains one real step (tiny offline model, local dataset fixture, CPU).

A recipe's algorithm is its file name's prefix (``aapo_``, ``zapo_``, ``grpo_``, ``gpg_``). Its header comment
cites the table or figure it reproduces and gives the launch line, whose ``--num_processes`` is the paper's
GPU count (the per-device batch sizes assume it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from aapo_trl.data import get_dataset_spec, load_dataset_mixture, load_prompt_dataset
from aapo_trl.hub import to_yaml_data
from aapo_trl.rewards import REWARD_REGISTRY
from aapo_trl.train import ALGORITHMS, checkpointing_field_renames, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "examples" / "configs"
FIXTURES = ROOT / "tests" / "fixtures" / "datasets"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))

# GPU-only settings every CPU run replaces (the rest of each recipe is kept as written).
CPU_OVERRIDES = ["--bf16", "false", "--use_cpu", "true", "--activation_checkpointing", "false",
                 "--use_vllm", "false", "--dtype", "float32"]
GPU_KEYS = {"bf16", "use_cpu", "activation_checkpointing", "use_vllm", "dtype"}

# Fields that make a recipe one algorithm rather than another; a baseline must match its run on everything else.
ALGORITHM_KEYS = {"loss_type", "beta", "epsilon", "scale_rewards", "margin_clip", "margin_clip_low",
                  "margin_clip_high", "ref_update_steps", "alpha", "tdar_beta", "correct_reward", "incorrect_reward",
                  "use_daer", "use_tdar", "use_semantic_entropy", "use_token_entropy", "greso", "greso_p_init",
                  "output_dir", "ce_off_policy_correction"}


def algorithm_of(path: Path) -> str:
    return path.name.split("_", 1)[0]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def recipe(stem: str) -> dict:
    return load(RECIPE_DIR / f"{stem}.yaml")


def num_processes(path: Path) -> int:
    """The paper's GPU count, from the launch line of the header."""
    match = re.search(r"accelerate launch .*--num_processes (\d+)", path.read_text())
    assert match, f"{path.name}: the header has no `accelerate launch ... --num_processes N` line"
    return int(match.group(1))


def dataset_parts(name: str) -> list[str]:
    return [part.strip() for part in str(name).split("+")]


def fixture_for(name: str) -> str:
    """The local fixture folder of a registered dataset name; a mix ``a+b`` gives ``fixture_a+fixture_b``."""
    return "+".join(str(FIXTURES / get_dataset_spec(part).name) for part in dataset_parts(name))


def parse(path: Path, *extra: str):
    return parse_args(algorithm_of(path), ["--config", str(path), *CPU_OVERRIDES, *extra])


# ---------------------------------------------------------------------------------------------------------------
# The list of runs (issue 5, part 2)
# ---------------------------------------------------------------------------------------------------------------

AAPO_RUNS = {
    "aapo_r1-distill-qwen-1.5b_open-rs", "aapo_qwen2.5-math-7b_simplelr-qwen",
    "aapo_llama-3.2-1b-instruct_simplelr-abel", "aapo_llama-3.2-3b-instruct_simplelr-abel",
}
AAPO_ABLATIONS = {
    "aapo_r1-distill-qwen-1.5b_open-rs_no-clip", "aapo_qwen2.5-math-7b_simplelr-qwen_no-clip",
    "aapo_r1-distill-qwen-1.5b_open-rs_ref-update-20", "aapo_qwen2.5-math-7b_simplelr-qwen_ref-update-100",
    "aapo_r1-distill-qwen-1.5b_open-rs_g2", "aapo_r1-distill-qwen-1.5b_open-rs_g10",
    "aapo_qwen2.5-math-7b_simplelr-qwen_g2", "aapo_qwen2.5-math-7b_simplelr-qwen_g6",
    "aapo_qwen2.5-math-7b_simplelr-qwen_g10",
}
ZAPO_RUNS = {"zapo_qwen2.5-math-1.5b_dapo-math", "zapo_r1-distill-qwen-1.5b_dapo-math", "zapo_qwen2.5-math-7b_dapo-math"}
ZAPO_ABLATIONS = {
    "zapo_qwen2.5-math-1.5b_dapo-math_no-daer", "zapo_qwen2.5-math-1.5b_dapo-math_no-tdar",
    "zapo_qwen2.5-math-7b_dapo-math_no-se", "zapo_qwen2.5-math-7b_dapo-math_no-te",
}
# Each run's baselines: the same file name with another algorithm prefix (and _greso for GRPO + GRESO).
BASELINES = {
    **{run: [f"grpo_{run[5:]}", f"gpg_{run[5:]}"] for run in AAPO_RUNS},
    **{run: [f"grpo_{run[5:]}_greso", f"grpo_{run[5:]}", f"gpg_{run[5:]}"] for run in ZAPO_RUNS},
}


def test_every_paper_run_has_a_recipe():
    stems = {path.stem for path in RECIPES}
    expected = AAPO_RUNS | AAPO_ABLATIONS | ZAPO_RUNS | ZAPO_ABLATIONS | {b for bs in BASELINES.values() for b in bs}
    assert expected <= stems, f"missing recipes: {sorted(expected - stems)}"
    assert all(algorithm_of(path) in ALGORITHMS for path in RECIPES), [p.name for p in RECIPES]


# ---------------------------------------------------------------------------------------------------------------
# Every recipe: header, TrlParser, fields, batch arithmetic
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_with_trl_and_keeps_its_values(path):
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert re.search(r"^# (Reproduces|Baseline for): (AAPO|ZAPO|DAPO) paper, (Table|Figure) \d", "\n".join(header),
                     re.M), (
        f"{path.name}: the header must cite the paper table/figure it reproduces")
    algorithm = algorithm_of(path)
    assert f"examples/train_{algorithm}.py --config examples/configs/{path.name}" in text

    script, config, model = parse(path)
    assert isinstance(config, ALGORITHMS[algorithm])
    values = load(path)
    renames = checkpointing_field_renames()  # the names of the installed transformers (5.17: gradient_*)
    for key, expected in values.items():
        if key in GPU_KEYS:
            continue
        key = renames.get(key, key)
        owner = next(obj for obj in (script, config, model) if hasattr(obj, key))
        assert to_yaml_data(getattr(owner, key)) == expected, f"{path.name}: {key}"

    assert script.reward_funcs and set(script.reward_funcs) <= set(REWARD_REGISTRY)
    if config.reward_weights is not None:
        assert len(config.reward_weights) == len(script.reward_funcs)
    for part in dataset_parts(script.dataset_name):
        get_dataset_spec(part)  # a registered dataset (KeyError otherwise)
    assert values.get("bf16") is True, "the papers train in bf16"
    assert config.output_dir == f"outputs/{path.stem}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_batch_arithmetic_holds_on_the_papers_gpu_count(path):
    """What TRL checks at launch, on the GPU count of the header: groups never straddle a generation batch."""
    values, gpus = load(path), num_processes(path)
    group, per_device = values["num_generations"], values["per_device_train_batch_size"]
    accumulation = values.get("gradient_accumulation_steps", 1)
    per_step = per_device * gpus * accumulation
    generation = values.get("generation_batch_size", per_step)
    assert per_step % group == 0 and generation % group == 0 and generation % (per_device * gpus) == 0


# ---------------------------------------------------------------------------------------------------------------
# The papers' values
# ---------------------------------------------------------------------------------------------------------------


def prompts_per_step(stem: str) -> float:
    values = recipe(stem)
    gpus = num_processes(RECIPE_DIR / f"{stem}.yaml")
    return values["per_device_train_batch_size"] * gpus * values["gradient_accumulation_steps"] / values["num_generations"]


def test_aapo_r1_distill_open_rs_is_app_c2():
    values = recipe("aapo_r1-distill-qwen-1.5b_open-rs")
    assert values["model_name_or_path"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert get_dataset_spec(values["dataset_name"]).name == "open-rs"
    assert values["reward_funcs"] == ["format", "cosine"] and values["reward_weights"] == [1.0, 2.0]
    assert (values["num_generations"], values["per_device_train_batch_size"], values["gradient_accumulation_steps"]) == (6, 6, 4)
    assert values["learning_rate"] == 1e-6 and values["max_completion_length"] == 3584
    assert values["temperature"] == 0.7 and values["max_steps"] == 100
    assert (values["margin_clip_low"], values["margin_clip_high"]) == (-0.2, 0.28) and values["beta"] == 0.0
    assert num_processes(RECIPE_DIR / "aapo_r1-distill-qwen-1.5b_open-rs.yaml") == 2  # 2 x A800


def test_aapo_qwen_7b_and_llama_are_app_c2():
    qwen = recipe("aapo_qwen2.5-math-7b_simplelr-qwen")
    assert qwen["model_name_or_path"] == "Qwen/Qwen2.5-Math-7B" and qwen["reward_funcs"] == ["accuracy"]
    assert get_dataset_spec(qwen["dataset_name"]).name == "simplelr_qwen_level3to5"
    assert (qwen["num_generations"], qwen["per_device_train_batch_size"], qwen["gradient_accumulation_steps"]) == (8, 8, 4)
    for size in ("1b", "3b"):
        llama = recipe(f"aapo_llama-3.2-{size}-instruct_simplelr-abel")
        assert llama["model_name_or_path"] == f"meta-llama/Llama-3.2-{size.upper()}-Instruct"
        assert llama["reward_funcs"] == ["accuracy"] and llama["max_completion_length"] == 3072
        assert (llama["num_generations"], llama["per_device_train_batch_size"]) == (8, 16)
        # "There is no extra system prompt added when training Llama series models" (App. C.2)
        assert "system_prompt" not in llama and get_dataset_spec(llama["dataset_name"]).system_prompt is None
        assert get_dataset_spec(llama["dataset_name"]).name == "simplelr_abel_level3to5"


def test_aapo_ablations_change_one_knob():
    main_15b, main_7b = recipe("aapo_r1-distill-qwen-1.5b_open-rs"), recipe("aapo_qwen2.5-math-7b_simplelr-qwen")

    def differences(stem, base):
        values = recipe(stem)
        return {k: values.get(k) for k in set(values) | set(base) if values.get(k) != base.get(k) and k != "output_dir"}

    assert differences("aapo_r1-distill-qwen-1.5b_open-rs_no-clip", main_15b) == {
        "margin_clip": False, "margin_clip_low": None, "margin_clip_high": None}
    assert differences("aapo_qwen2.5-math-7b_simplelr-qwen_no-clip", main_7b) == {
        "margin_clip": False, "margin_clip_low": None, "margin_clip_high": None}
    assert differences("aapo_r1-distill-qwen-1.5b_open-rs_ref-update-20", main_15b) == {"ref_update_steps": 20}
    assert differences("aapo_qwen2.5-math-7b_simplelr-qwen_ref-update-100", main_7b) == {"ref_update_steps": 100}
    for stem, base, group in [("aapo_r1-distill-qwen-1.5b_open-rs_g2", main_15b, 2),
                              ("aapo_r1-distill-qwen-1.5b_open-rs_g10", main_15b, 10),
                              ("aapo_qwen2.5-math-7b_simplelr-qwen_g2", main_7b, 2),
                              ("aapo_qwen2.5-math-7b_simplelr-qwen_g6", main_7b, 6),
                              ("aapo_qwen2.5-math-7b_simplelr-qwen_g10", main_7b, 10)]:
        assert differences(stem, base) == {"num_generations": group, "per_device_train_batch_size": group}
    # the group-size runs keep the prompts per optimizer step of their main run
    assert prompts_per_step("aapo_r1-distill-qwen-1.5b_open-rs_g10") == prompts_per_step("aapo_r1-distill-qwen-1.5b_open-rs") == 8
    assert prompts_per_step("aapo_qwen2.5-math-7b_simplelr-qwen_g2") == prompts_per_step("aapo_qwen2.5-math-7b_simplelr-qwen") == 32


@pytest.mark.parametrize("stem,alpha,context", [("zapo_qwen2.5-math-1.5b_dapo-math", 2.0, 4096),
                                                ("zapo_r1-distill-qwen-1.5b_dapo-math", 5.0, 8192),
                                                ("zapo_qwen2.5-math-7b_dapo-math", 5.0, 4096)])
def test_zapo_runs_are_sec_4_1(stem, alpha, context):
    values = recipe(stem)
    gpus = num_processes(RECIPE_DIR / f"{stem}.yaml")
    assert dataset_parts(values["dataset_name"]) == ["dapo-math-17k", "math-lighteval"]
    assert values["alpha"] == alpha and values["tdar_beta"] == 5.0 and values["greso"] is True
    assert values["reward_funcs"] == ["accuracy_zapo"]
    assert (values["correct_reward"], values["incorrect_reward"]) == (1.0, 0.1)
    assert values["learning_rate"] == 1e-6 and values["weight_decay"] == 0.01 and values["temperature"] == 1.0
    assert values["beta"] == 0.0 and values["loss_type"] == "grpo"
    assert values["num_generations"] == 8 and values["generation_batch_size"] == 256 * 8  # 256 prompts x 8
    per_step = values["per_device_train_batch_size"] * gpus * values["gradient_accumulation_steps"]
    assert per_step == 64 * 8  # GRESO's PPO mini-batch: 64 prompts per optimizer step
    rollouts = values["max_steps"] * per_step / values["generation_batch_size"]
    assert rollouts == 1000  # the paper's 1000 training steps
    assert values["vllm_max_model_length"] == context and values["max_completion_length"] < context
    assert values["save_steps"] * per_step / values["generation_batch_size"] == 20  # evaluated every 20 steps


def test_zapo_ablations_change_one_knob():
    for stem, flag, base_stem, rollouts in [
        ("zapo_qwen2.5-math-1.5b_dapo-math_no-daer", "use_daer", "zapo_qwen2.5-math-1.5b_dapo-math", 400),
        ("zapo_qwen2.5-math-1.5b_dapo-math_no-tdar", "use_tdar", "zapo_qwen2.5-math-1.5b_dapo-math", 400),
        ("zapo_qwen2.5-math-7b_dapo-math_no-se", "use_semantic_entropy", "zapo_qwen2.5-math-7b_dapo-math", 1000),
        ("zapo_qwen2.5-math-7b_dapo-math_no-te", "use_token_entropy", "zapo_qwen2.5-math-7b_dapo-math", 1000),
    ]:
        values, base = recipe(stem), recipe(base_stem)
        changed = {k for k in set(values) | set(base) if values.get(k) != base.get(k)} - {"output_dir", "max_steps"}
        assert changed == {flag} and values[flag] is False
        assert values["max_steps"] * 512 / values["generation_batch_size"] == rollouts


@pytest.mark.parametrize("run", sorted(BASELINES))
def test_baselines_match_their_run(run):
    """A baseline differs from its run only in the algorithm's own fields (GRESO on for the GRESO baseline)."""
    values = recipe(run)
    for baseline in BASELINES[run]:
        other = recipe(baseline)
        shared = {k: v for k, v in values.items() if k not in ALGORITHM_KEYS}
        assert {k: other.get(k) for k in shared} == shared, baseline
        assert set(other) - ALGORITHM_KEYS <= set(values), baseline
        assert other.get("greso", False) is baseline.endswith("_greso")
        assert num_processes(RECIPE_DIR / f"{baseline}.yaml") == num_processes(RECIPE_DIR / f"{run}.yaml")


DYNAMIC_SAMPLING_VARIANTS = sorted(path.stem for path in RECIPES if path.stem.endswith("_dynamic-sampling"))
DYNAMIC_SAMPLING_KEYS = {"dynamic_sampling", "dynamic_sampling_metric", "dynamic_sampling_max_rounds",
                         "dynamic_sampling_on_exhaustion", "output_dir"}


def test_every_zapo_grpo_baseline_has_a_dynamic_sampling_variant():
    grpo_baselines = {b for run in ZAPO_RUNS for b in BASELINES[run] if b.startswith("grpo_") and "_greso" not in b}
    assert {f"{b}_dynamic-sampling" for b in grpo_baselines} == set(DYNAMIC_SAMPLING_VARIANTS)


@pytest.mark.parametrize("stem", DYNAMIC_SAMPLING_VARIANTS)
def test_dynamic_sampling_variants_change_only_dynamic_sampling(stem):
    values, base = recipe(stem), recipe(stem.removesuffix("_dynamic-sampling"))
    changed = {k for k in set(values) | set(base) if values.get(k) != base.get(k)}
    assert changed == DYNAMIC_SAMPLING_KEYS
    assert values["dynamic_sampling"] is True and values["dynamic_sampling_metric"] == "reward"
    assert values["dynamic_sampling_max_rounds"] == 10 and values["dynamic_sampling_on_exhaustion"] == "error"


def test_dapo_recipe_is_the_papers_method_at_verls_7b_scale():
    values = recipe("grpo_qwen2.5-math-7b_dapo-math-17k_dapo")
    gpus = num_processes(RECIPE_DIR / "grpo_qwen2.5-math-7b_dapo-math-17k_dapo.yaml")
    # the paper: clip-higher 0.2 / 0.28, token-level loss, no KL, 512 prompts x 16 responses, lr 1e-6
    assert (values["epsilon"], values["epsilon_high"], values["loss_type"], values["beta"]) == (0.2, 0.28, "dapo", 0.0)
    assert values["generation_batch_size"] == 512 * 16 and values["learning_rate"] == 1e-6
    # verl's 7B recipe: mini-batch 32 prompts (16 optimizer steps per rollout), 2048 tokens, buffer 512
    assert values["per_device_train_batch_size"] * gpus * values["gradient_accumulation_steps"] == 32 * 16
    assert (values["max_completion_length"], values["soft_punish_cache"]) == (2048, 512)
    assert values["reward_funcs"] == ["accuracy", "soft_overlong_punishment"] and values["reward_weights"] == [2.0, 1.0]
    assert (values["dynamic_sampling"], values["dynamic_sampling_metric"]) == (True, "accuracy")
    assert values["dynamic_sampling_accuracy_reward"] == "accuracy"
    assert values["dynamic_sampling_max_rounds"] == 10 * 3  # verl: 10 rounds of 3 x 512 prompts
    assert values["max_steps"] == 200 * 16 and values["warmup_steps"] == 10 * 16


# ---------------------------------------------------------------------------------------------------------------
# One real step of every recipe
# ---------------------------------------------------------------------------------------------------------------


def test_zapo_dataset_mix_loads_both_parts_with_unique_row_ids():
    parts = [load_prompt_dataset(fixture_for(name)) for name in ("dapo-math-17k", "math-lighteval")]
    mixed = load_dataset_mixture(fixture_for("dapo-math-17k+math-lighteval"))
    assert len(mixed) == sum(map(len, parts)) and len(set(mixed["row_id"])) == len(mixed)  # GRESO keys on row_id
    assert list(mixed["question"]) == list(parts[0]["question"]) + list(parts[1]["question"])


def one_step_argv(values: dict, model_path, output_dir) -> list[str]:
    """A recipe's one cheap CPU step: the tiny model, the dataset's local fixture, one prompt per step, 4 new
    tokens, nothing saved or reported (CPU_OVERRIDES switch the GPU-only fields off)."""
    group = values["num_generations"]
    dataset = fixture_for(values["dataset_name"])  # a mix stays a mix: fixture_a+fixture_b
    return ["--model_name_or_path", str(model_path), "--dataset_name", dataset, "--output_dir", str(output_dir),
            "--max_steps", "1", "--per_device_train_batch_size", str(group), "--gradient_accumulation_steps", "1",
            "--max_completion_length", "4", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
            "--push_to_hub", "false", "--disable_tqdm", "true", "--log_completions", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_one_step(path, tiny_model_path, tmp_path):
    """The recipe as written, with the tiny model, the dataset's local fixture, one prompt per step, 4 new tokens,
    and the GPU-only fields switched off."""
    values = load(path)
    algorithm = algorithm_of(path)
    group = values["num_generations"]
    argv = one_step_argv(values, tiny_model_path, tmp_path)
    if "generation_batch_size" in values:
        argv += ["--generation_batch_size", str(group)]
    if "soft_overlong_punishment" in values["reward_funcs"]:  # its ramp must fit in the 4 new tokens
        argv += ["--soft_punish_cache", "2"]
    if values.get("dynamic_sampling"):  # a random tiny model rarely gives a group signal: bound the rounds
        argv += ["--dynamic_sampling_max_rounds", "2", "--dynamic_sampling_on_exhaustion", "train_kept"]
    script, config, model = parse(path, *argv)
    assert config.num_generations == group and config.max_steps == 1

    summary = main(script, config, model, algorithm=algorithm)

    assert summary["steps"] == 1 and summary["reward_mean"] is not None
    assert math.isfinite(summary["zero_adv_frac_groups"])
    history = json.loads((tmp_path / "metrics.json").read_text())["log_history"]
    logged = set().union(*map(set, history))
    for name in script.reward_funcs:
        assert any(key.startswith("rewards/") and name in key for key in logged), (name, sorted(logged))
    if algorithm == "aapo":
        assert summary["margin_mean"] is not None
    if algorithm == "zapo":
        assert summary["easy_groups_mean"] is not None
    if values.get("greso"):
        assert "greso/p_easy" in logged
    if values.get("dynamic_sampling"):
        assert {"dynamic_sampling/rounds", "dynamic_sampling/kept_fraction"} <= logged
    assert (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# Recipes from the ecosystem (TRL 0.16-era: the AAPO authors', open-r1's), unchanged
# ---------------------------------------------------------------------------------------------------------------

LEGACY_RECIPES = sorted((ROOT / "tests" / "fixtures" / "recipes").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", LEGACY_RECIPES, ids=lambda p: p.stem)
def test_legacy_recipe_trains_one_step(path, tiny_model_path, tmp_path, capsys):
    """A recipe written for TRL 0.16 scripts trains with `aapo-trl train --algorithm aapo --config OLD.yaml` and
    the same one-step CPU overrides as the project's recipes; each translated field is reported."""
    values = load(path)
    script, config, model = parse_args("aapo", ["--config", str(path), *CPU_OVERRIDES,
                                                *one_step_argv(values, tiny_model_path, tmp_path)])
    assert "aapo-trl: the recipe: torch_dtype: renamed to dtype" in capsys.readouterr().err
    assert config.beta == 0.0 and config.max_prompt_length == values["max_prompt_length"]

    summary = main(script, config, model, algorithm="aapo")

    assert summary["steps"] == 1 and summary["reward_mean"] is not None and summary["margin_mean"] is not None
    logged = set().union(*map(set, json.loads((tmp_path / "metrics.json").read_text())["log_history"]))
    assert "prompts/truncated_frac" in logged
    for name in script.reward_funcs:
        assert any(key.startswith("rewards/") and name in key for key in logged), (name, sorted(logged))
