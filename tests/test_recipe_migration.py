"""Recipes written for TRL 0.16-era scripts (open-r1, the AAPO authors') read as aapo-trl recipes
(aapo_trl.recipe_migration), ``aapo-trl migrate-recipe``, and ``max_prompt_length``.

The recipes that train one step unchanged are in tests/test_recipes.py (test_legacy_recipe_trains_one_step).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aapo_trl.cli import main as cli_main
from aapo_trl.prompt_truncation import keep_last_tokens
from aapo_trl.recipe_migration import (
    DROPS,
    RENAMES,
    RecipeMigrationError,
    migrate_recipe,
)
from aapo_trl.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "recipes"
CPU_OVERRIDES = ["--bf16", "false", "--use_cpu", "true", "--activation_checkpointing", "false",
                 "--use_vllm", "false", "--dtype", "float32"]
LEGACY = {"torch_dtype": "bfloat16"}  # any legacy marker makes a recipe legacy


def fields_of(notes):
    return [note.field for note in notes]


# ---------------------------------------------------------------------------------------------------------------
# One translation at a time
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("old", sorted(RENAMES))
def test_each_rename_moves_the_value_in_place_and_says_so(old):
    new = RENAMES[old][0]
    migrated, notes = migrate_recipe({"learning_rate": 1e-6, old: "x", "seed": 1})
    assert list(migrated) == ["learning_rate", new, "seed"] and migrated[new] == "x"
    assert fields_of(notes) == [old] and new in notes[0].action


def test_a_rename_that_contradicts_the_new_field_is_an_error():
    with pytest.raises(RecipeMigrationError, match="torch_dtype='bfloat16' and dtype='float32'"):
        migrate_recipe({"torch_dtype": "bfloat16", "dtype": "float32"})
    migrated, notes = migrate_recipe({"torch_dtype": "bfloat16", "dtype": "bfloat16"})
    assert migrated == {"dtype": "bfloat16"} and fields_of(notes) == ["torch_dtype"]


@pytest.mark.parametrize("name", sorted(DROPS))
def test_each_dropped_field_is_gone_with_its_reason(name):
    migrated, notes = migrate_recipe({name: "v", "seed": 1})
    assert migrated == {"seed": 1}
    assert fields_of(notes) == [name] and notes[0].action.startswith("dropped") and notes[0].reason


def test_vllm_fields_of_a_run_without_vllm_say_they_had_no_effect():
    _, notes = migrate_recipe({"vllm_device": "auto", "use_vllm": False})
    assert "no effect" in notes[0].reason
    _, notes = migrate_recipe({"vllm_device": "auto", "use_vllm": True})
    assert "no effect" not in notes[0].reason


def test_warmup_ratio_becomes_warmup_steps_below_one():
    migrated, notes = migrate_recipe({"warmup_ratio": 0.1})
    assert migrated == {"warmup_steps": 0.1} and fields_of(notes) == ["warmup_ratio"]
    migrated, _ = migrate_recipe({"warmup_ratio": 0.0})
    assert migrated == {}
    migrated, notes = migrate_recipe({"warmup_ratio": 0.1, "warmup_steps": 10})  # transformers 4: steps win
    assert migrated == {"warmup_steps": 10} and "override" in notes[0].reason
    with pytest.raises(RecipeMigrationError, match="warmup_ratio=1.5"):
        migrate_recipe({"warmup_ratio": 1.5})


def test_beta_of_aapos_loss_is_zero_because_the_authors_loss_never_read_it():
    migrated, notes = migrate_recipe({"beta": 0.1}, "aapo")
    assert migrated == {"beta": 0.0} and fields_of(notes) == ["beta"]
    assert "no KL term" in notes[0].reason and "reference model" in notes[0].reason
    assert migrate_recipe({"beta": 0.04}, "grpo") == ({"beta": 0.04}, [])  # GRPO's KL penalty stays
    assert migrate_recipe({"beta": 0.04, "loss_type": "grpo"}, "aapo") == ({"beta": 0.04, "loss_type": "grpo"}, [])
    assert migrate_recipe({"beta": 0.0}, "aapo") == ({"beta": 0.0}, [])


def test_open_r1_reward_names():
    migrated, notes = migrate_recipe({"reward_funcs": ["accuracy_lv35"]})
    assert migrated["reward_funcs"] == ["accuracy"] and fields_of(notes) == ["reward_funcs[accuracy_lv35]"]
    with pytest.raises(RecipeMigrationError, match="reasoning_steps"):
        migrate_recipe({"reward_funcs": ["accuracy", "reasoning_steps"]})


def test_a_legacy_cosine_reward_keeps_what_the_old_scripts_measured():
    migrated, notes = migrate_recipe({**LEGACY, "reward_funcs": ["format", "cosine"]})
    assert migrated["cosine_length_unit"] == "characters" and migrated["cosine_min_value_wrong"] == 0.0
    assert {"cosine_length_unit", "cosine_min_value_wrong", "reward_funcs[format]"} <= set(fields_of(notes))
    explicit = {**LEGACY, "reward_funcs": ["cosine"], "cosine_length_unit": "tokens", "cosine_min_value_wrong": -1.0}
    migrated, _ = migrate_recipe(explicit)
    assert (migrated["cosine_length_unit"], migrated["cosine_min_value_wrong"]) == ("tokens", -1.0)
    # a recipe written for aapo-trl keeps aapo-trl's defaults
    assert migrate_recipe({"reward_funcs": ["cosine"]}) == ({"reward_funcs": ["cosine"]}, [])


def test_open_r1_soft_overlong_length_must_be_the_completion_length():
    migrated, notes = migrate_recipe({**LEGACY, "max_completion_len": 64, "max_completion_length": 64,
                                      "reward_funcs": ["soft_overlong_punishment"]})
    assert "max_completion_len" not in migrated and "max_completion_len" in fields_of(notes)
    with pytest.raises(RecipeMigrationError, match="max_completion_len=32"):
        migrate_recipe({**LEGACY, "max_completion_len": 32, "max_completion_length": 64, "reward_funcs": ["accuracy"]})


def test_dataset_configs_list_of_one_is_dataset_config():
    migrated, notes = migrate_recipe({"dataset_configs": ["all"]})
    assert migrated == {"dataset_config": "all"} and fields_of(notes) == ["dataset_configs"]
    with pytest.raises(RecipeMigrationError, match="one configuration"):
        migrate_recipe({"dataset_configs": ["a", "b"]})


def test_the_authors_simplerl_loader_ignored_config_and_system_prompt():
    recipe = {**LEGACY, "dataset_name": "SimpleRL-Zoo-Data/simplelr_qwen_level3to5", "dataset_config": "train.parquet",
              "system_prompt": "S", "max_prompt_length": 1024}
    migrated, notes = migrate_recipe(recipe)
    assert "dataset_config" not in migrated and "system_prompt" not in migrated
    assert migrated["max_prompt_length"] == 1024
    assert {"dataset_config", "system_prompt", "max_prompt_length"} <= set(fields_of(notes))
    modern = {key: value for key, value in recipe.items() if key != "torch_dtype"}
    assert migrate_recipe(modern) == (modern, [])


def test_chat_template_has_no_reading_here():
    with pytest.raises(RecipeMigrationError, match="chat_template"):
        migrate_recipe({"chat_template": "{{ messages }}"})


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_projects_own_recipes_are_left_as_they_are(path):
    values = yaml.safe_load(path.read_text())
    assert migrate_recipe(values, path.name.split("_", 1)[0]) == (values, [])


# ---------------------------------------------------------------------------------------------------------------
# Through the parser: train --config OLD.yaml and the command line
# ---------------------------------------------------------------------------------------------------------------


def test_the_authors_open_rs_recipe_parses_with_its_notes(capsys):
    script, config, model = parse_args("aapo", ["--config", str(FIXTURES / "aapo-authors_open-rs.yaml"), *CPU_OVERRIDES])
    printed = capsys.readouterr().err
    for field in ("torch_dtype", "padding_free", "vllm_device", "vllm_enforce_eager", "vllm_max_model_len",
                  "overwrite_output_dir", "warmup_ratio", "beta"):
        assert f"aapo-trl: the recipe: {field}:" in printed, field
    assert config.beta == 0.0 and config.warmup_steps == 0.1 and config.max_prompt_length == 512
    assert config.vllm_max_model_length == 4608 and config.cosine_length_unit == "characters"
    assert script.reward_funcs == ["format", "cosine"]


def test_old_names_on_the_command_line_are_aliases(capsys):
    script, _, model = parse_args("aapo", ["--dataset_split", "test", "--torch_dtype", "bfloat16", "--max_steps", "1"])
    assert script.dataset_train_split == "test" and model.dtype == "bfloat16"
    printed = capsys.readouterr().err
    assert "--dataset_split: renamed to --dataset_train_split" in printed and "--torch_dtype: renamed to --dtype" in printed


def test_a_recipe_with_no_faithful_reading_is_refused_naming_the_field(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("chat_template: '{{ messages }}'\nreward_funcs: [accuracy]\n")
    with pytest.raises(RecipeMigrationError, match="chat_template"):
        parse_args("aapo", ["--config", str(recipe)])


# ---------------------------------------------------------------------------------------------------------------
# aapo-trl migrate-recipe
# ---------------------------------------------------------------------------------------------------------------


def test_migrate_recipe_prints_a_recipe_that_trains_and_its_notes(capsys, tmp_path):
    assert cli_main(["migrate-recipe", str(FIXTURES / "aapo-authors_open-r1.yaml")]) == 0
    text = capsys.readouterr().out
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any(line.startswith("# beta: set to 0.0 (was 0.1)") for line in comments)
    assert any(line.startswith("# reward_funcs[accuracy_lv35]: renamed to accuracy") for line in comments)
    values = yaml.safe_load(text)
    assert values["beta"] == 0.0 and values["reward_funcs"] == ["accuracy"] and values["warmup_steps"] == 0.03
    assert not {"torch_dtype", "warmup_ratio", "overwrite_output_dir", "vllm_device", "dataset_config"} & set(values)
    translated = tmp_path / "new.yaml"
    translated.write_text(text)
    capsys.readouterr()
    _, config, model = parse_args("aapo", ["--config", str(translated), *CPU_OVERRIDES])
    assert capsys.readouterr().err == ""  # nothing left to translate
    assert config.beta == 0.0 and config.max_prompt_length == 1024


def test_migrate_recipe_refuses_with_the_field_and_exit_code_2(capsys, tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("reward_funcs: [code]\n")
    assert cli_main(["migrate-recipe", str(recipe)]) == 2
    assert "reward_funcs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# max_prompt_length
# ---------------------------------------------------------------------------------------------------------------


def test_keep_last_tokens_cuts_on_the_left():
    kept, cut = keep_last_tokens([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], 3)
    assert kept == [[3, 4, 5], [6, 7], [8, 9, 10]] and cut == 1
    with pytest.raises(ValueError):
        keep_last_tokens([[1]], 0)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_max_prompt_length_must_be_a_positive_whole_number(value, tmp_path):
    from aapo_trl.configs import AAPOConfig

    with pytest.raises(ValueError, match="max_prompt_length"):
        AAPOConfig(output_dir=str(tmp_path), max_prompt_length=value)


def test_policy_and_reference_see_the_same_left_truncated_prompt(tiny_model_path, tmp_path):
    """The papers' TRL kept the last max_prompt_length prompt tokens; AAPO's reference samples on those ids."""
    from _training import make_aapo_trainer, prompt_dataset

    limit = 6
    trainer = make_aapo_trainer(str(tiny_model_path), tmp_path, max_prompt_length=limit)
    rows = [row for row in prompt_dataset(2) for _ in range(trainer.num_generations)]
    whole = trainer.processing_class.apply_chat_template(
        [row["prompt"] for row in rows], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert min(map(len, whole)) > limit  # every prompt is cut
    seen = []
    sample = trainer.reference.sample
    trainer.reference.sample = lambda trainer_, prompt_ids, g: seen.append(prompt_ids) or sample(trainer_, prompt_ids, g)
    trainer.model.train()

    output = trainer._generate_and_score_completions(rows)

    policy = [ids[mask.bool()].tolist() for ids, mask in zip(output["prompt_ids"], output["prompt_mask"])]
    expected = [list(ids)[-limit:] for ids in whole]
    assert policy == expected and seen == [expected]
    assert trainer._metrics["train"]["prompts/truncated_frac"] == [1.0]


# ---------------------------------------------------------------------------------------------------------------
# TRL's and open-r1's dataset fields
# ---------------------------------------------------------------------------------------------------------------

DATASET_FIXTURES = ROOT / "tests" / "fixtures" / "datasets"


def test_dataset_config_is_load_datasets_name_and_refused_where_nothing_reads_it(monkeypatch):
    import datasets

    from aapo_trl.data import load_prompt_dataset

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.load_dataset("json", data_files=str(DATASET_FIXTURES / "math-lighteval" / "test.jsonl"),
                                     split="train")

    original = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: original(*a, **k) if a[0] == "json"
                        else fake_load_dataset(*a, **k))
    load_prompt_dataset("math-lighteval", split="test", config="algebra")
    assert calls == [(("DigitalLearningGmbH/MATH-lighteval",), {"split": "test", "name": "algebra"})]
    with pytest.raises(ValueError, match="dataset_config='train.parquet'"):
        load_prompt_dataset("simplelr_qwen_level3to5", config="train.parquet")
    with pytest.raises(ValueError, match="local path"):
        load_prompt_dataset(DATASET_FIXTURES / "open-rs", config="all")
    assert len(load_prompt_dataset(DATASET_FIXTURES / "open-rs", config="default")) > 0


def test_dataset_prompt_column_chooses_the_question_column():
    from aapo_trl.data import load_prompt_dataset

    by_problem = load_prompt_dataset(DATASET_FIXTURES / "open-rs", question_column="problem")
    assert list(by_problem["question"]) == list(load_prompt_dataset(DATASET_FIXTURES / "open-rs")["question"])
    by_solution = load_prompt_dataset(DATASET_FIXTURES / "open-rs", question_column="solution")
    assert by_solution[0]["question"] != by_problem[0]["question"]
    assert by_solution[0]["prompt"][-1]["content"] == by_solution[0]["question"]  # open-rs: the bare question
    with pytest.raises(ValueError, match="missing"):
        load_prompt_dataset(DATASET_FIXTURES / "open-rs", question_column="no_such_column")


def test_ref_rollouts_reads_an_old_recipe_as_train_does(tmp_path, capsys):
    """The reference cache must be scored as training scores: same translation of the recipe."""
    from aapo_trl.cli import build_parser
    from aapo_trl.ref_rollouts import resolve_options

    recipe = tmp_path / "old.yaml"
    recipe.write_text("model_name_or_path: tiny\ntorch_dtype: float32\ndataset_train_split: test\n"
                      "reward_funcs: [accuracy_lv35, cosine]\nnum_generations: 2\n")
    args, _ = build_parser().parse_known_args(["ref-rollouts", "--config", str(recipe), "--output-dir", str(tmp_path)])
    options = resolve_options(args)
    assert options["reward_funcs"] == ["accuracy", "cosine"] and options["dataset_split"] == "test"
    assert options["reward_settings"]["cosine_length_unit"] == "characters"
    assert "aapo-trl: the recipe: reward_funcs[accuracy_lv35]: renamed to accuracy" in capsys.readouterr().err


def test_a_kl_loss_chosen_on_the_command_line_keeps_the_recipes_beta(capsys):
    path = str(FIXTURES / "aapo-authors_open-rs.yaml")
    _, config, _ = parse_args("aapo", ["--config", path, *CPU_OVERRIDES, "--loss_type", "grpo"])
    assert config.beta == 0.1 and config.loss_type == "grpo"
    assert "the recipe: beta:" not in capsys.readouterr().err
