"""Reward parameters set from the config, a recipe or the command line (issue 14, parts 6 and 8).

``cosine_*`` (open-r1's / open-rs's names) and ``correct_reward`` / ``incorrect_reward`` are fields of every
aapo-trl config (``RewardArguments``); a reward named in ``reward_funcs`` is built from them, in the Python API
(trainer ``__init__``), in ``aapo-trl train`` and in ``aapo-trl ref-rollouts``.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
from _training import CPU_ARGS, prompt_dataset

from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, RewardArguments, ZAPOConfig
from aapo_trl.rewards import (
    REWARD_REGISTRY,
    REWARD_SETTINGS,
    GuardedReward,
    get_reward_funcs,
    make_accuracy_zapo_reward,
    make_cosine_reward,
)
from aapo_trl.validation import resolve_reward_funcs

ROOT = Path(__file__).resolve().parents[1]
OPEN_RS_RECIPES = sorted((ROOT / "examples" / "configs").glob("*_open-rs*.yaml"))
CPU_OVERRIDES = ["--bf16", "false", "--use_cpu", "true", "--activation_checkpointing", "false", "--dtype", "float32"]
CONFIGS = [AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig]

# What the AAPO authors' open-rs code ran: AAPO.py's script-argument defaults (their AAPO.yaml sets none), with
# open-rs's get_cosine_scaled_reward measuring len(content), i.e. characters.
AUTHORS_COSINE = dict(min_value_wrong=0.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0,
                      max_len=1000, length_unit="characters")

# Non-default values for every reward field, and what each named reward should then be built with.
CUSTOM = dict(cosine_max_len=20, cosine_length_unit="characters", cosine_min_value_wrong=0.0,
              cosine_max_value_wrong=-2.0, cosine_min_value_correct=1.0, cosine_max_value_correct=3.0,
              correct_reward=2.0, incorrect_reward=-0.5)


def config(cls, tmp_path, **fields):
    values = dict(CPU_ARGS, output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                  max_completion_length=4, max_steps=1)
    if cls in (AAPOConfig, GPGConfig):
        values["beta"] = 0.0
    return cls(**values, **fields)


def cosine_value(length, correct, short, long, max_len):
    """The cosine reward written out: v_long + (v_short - v_long) (1 + cos(pi min(len / max_len, 1))) / 2."""
    return long + 0.5 * (short - long) * (1.0 + math.cos(math.pi * min(length / max_len, 1.0)))


# --------------------------------------------------------------------------- the fields and the factories


def test_field_defaults_are_the_factory_defaults():
    """One default per parameter: a config that sets nothing builds exactly the registry's reward."""
    defaults = RewardArguments()
    for name, (factory, fields) in REWARD_SETTINGS.items():
        signature = inspect.signature(factory).parameters
        for field, argument in fields.items():
            if field == "max_completion_length":  # TRL's own GRPOConfig field, not one of RewardArguments
                continue
            assert getattr(defaults, field) == signature[argument].default, (name, field)
        assert get_reward_funcs([name], defaults)[0].parameters() == REWARD_REGISTRY[name].parameters()


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_named_rewards_are_built_from_the_config(cls, tmp_path):
    settings = config(cls, tmp_path, **CUSTOM)
    cosine, accuracy_zapo, final_number_zapo = get_reward_funcs(["cosine", "accuracy_zapo", "final_number_zapo"],
                                                               settings)
    assert cosine.parameters() == dict(min_value_wrong=0.0, max_value_wrong=-2.0, min_value_correct=1.0,
                                       max_value_correct=3.0, max_len=20, length_unit="characters")
    assert accuracy_zapo(["\\boxed{14}", "\\boxed{15}", "no answer"], solution=["14"] * 3) == [2.0, -0.5, 0.0]
    assert final_number_zapo(["14", "15", "none"], solution=["14"] * 3) == [2.0, -0.5, 0.0]
    # resolve_reward_funcs (what every trainer's __init__ calls) builds names the same way
    resolved = resolve_reward_funcs(["cosine", "accuracy_zapo"], settings=settings)
    assert [f.func.parameters() for f in resolved] == [cosine.parameters(), accuracy_zapo.parameters()]


# --------------------------------------------------------------------------- the values the trainers compute


def trainer_class(config_cls):
    from aapo_trl.trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer, ZAPOTrainer

    return {AAPOConfig: AAPOTrainer, GPGConfig: GPGTrainer, GRPOBaselineConfig: GRPOBaselineTrainer,
            ZAPOConfig: ZAPOTrainer}[config_cls]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_trainer_scores_named_rewards_with_the_config_values(cls, tiny_model_path, tmp_path):
    """Issue 14 parts 6 and 8: ZAPOConfig.correct_reward / incorrect_reward and the cosine fields reach the
    rewards TRL's _calculate_rewards computes, for every trainer (they were ignored: always 1 / 0.1 / 0)."""
    args = config(cls, tmp_path, **CUSTOM)
    trainer = trainer_class(cls)(str(tiny_model_path), reward_funcs=["cosine", "accuracy_zapo"], args=args,
                                 train_dataset=prompt_dataset(2))
    texts = ["\\boxed{14}", "\\boxed{15}" + " " * 30, "I do not know."]  # 10, 40 and 14 characters
    prompt = [{"role": "user", "content": "What is 6 + 8?"}]
    inputs = [{"prompt": prompt, "solution": "14"} for _ in texts]
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    rewards = trainer._calculate_rewards(inputs, [prompt] * 3, completions, [[1, 2, 3]] * 3)

    expected_cosine = [cosine_value(10, True, 3.0, 1.0, 20), cosine_value(40, False, 0.0, -2.0, 20),
                       cosine_value(14, False, 0.0, -2.0, 20)]
    assert rewards[:, 0].tolist() == pytest.approx(expected_cosine)  # in characters, not the 3 token ids
    assert rewards[:, 1].tolist() == [2.0, -0.5, 0.0]


def test_zapo_classifies_with_the_configured_correct_reward(tiny_model_path, tmp_path):
    """A group answered correctly with correct_reward 2.0 is easy, one answered wrongly with -0.5 is hard."""
    import torch

    from aapo_trl.zapo_math import classify_zero_advantage_groups

    args = config(ZAPOConfig, tmp_path, correct_reward=2.0, incorrect_reward=-0.5)
    trainer = trainer_class(ZAPOConfig)(str(tiny_model_path), reward_funcs=["accuracy_zapo"], args=args,
                                        train_dataset=prompt_dataset(2))
    prompt = [{"role": "user", "content": "What is 6 + 8?"}]
    texts = ["\\boxed{14}", "\\boxed{14}", "\\boxed{15}", "\\boxed{15}"]
    rewards = trainer._calculate_rewards([{"prompt": prompt, "solution": "14"}] * 4, [prompt] * 4,
                                         [[{"role": "assistant", "content": t}] for t in texts], [[1]] * 4)
    easy, hard = classify_zero_advantage_groups(rewards[:, 0], 2, args.correct_threshold)
    assert rewards[:, 0].tolist() == [2.0, 2.0, -0.5, -0.5]
    assert easy.tolist() == [True, False] and hard.tolist() == [False, True]
    assert torch.equal(easy | hard, torch.tensor([True, True]))


# --------------------------------------------------------------------------- a reward passed as a function


def test_a_parametrised_reward_function_must_agree_with_the_config(tmp_path):
    aapo, zapo = config(AAPOConfig, tmp_path), config(ZAPOConfig, tmp_path, correct_reward=2.0)
    with pytest.raises(ValueError, match=r"cosine_max_len=1000 \(the function has max_len=500\)"):
        resolve_reward_funcs([make_cosine_reward(max_len=500)], settings=aapo)
    with pytest.raises(ValueError, match=r"correct_reward=2.0 \(the function has correct=1.0\)"):
        resolve_reward_funcs([REWARD_REGISTRY["accuracy_zapo"]], settings=zapo)
    with pytest.raises(ValueError, match="correct_reward=2.0"):  # also when already guarded
        resolve_reward_funcs([GuardedReward(REWARD_REGISTRY["accuracy_zapo"])], settings=zapo)
    # the same values, or no config fields to compare with, pass
    resolve_reward_funcs([make_accuracy_zapo_reward(correct=2.0)], settings=zapo)
    resolve_reward_funcs([make_cosine_reward(max_len=500)], settings=None)


def test_a_trainer_refuses_a_reward_function_that_contradicts_its_config(tiny_model_path, tmp_path):
    from aapo_trl.trainers import ZAPOTrainer

    args = config(ZAPOConfig, tmp_path, correct_reward=2.0)
    with pytest.raises(ValueError, match="correct_reward"):
        ZAPOTrainer(str(tiny_model_path), reward_funcs=[REWARD_REGISTRY["accuracy_zapo"]], args=args,
                    train_dataset=prompt_dataset(2))


# --------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("field, value", [
    ("cosine_max_len", 0), ("cosine_max_len", -5), ("cosine_max_len", 10.5), ("cosine_length_unit", "words"),
    ("cosine_min_value_wrong", float("nan")), ("cosine_max_value_correct", float("inf")),
    ("correct_reward", float("nan")), ("incorrect_reward", 1.5),
])
def test_invalid_reward_fields_are_refused_naming_the_field(cls, field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        config(cls, tmp_path, **{field: value})


def test_zapo_correct_reward_must_agree_with_correct_threshold(tmp_path):
    for fields in (dict(correct_reward=0.9), dict(correct_reward=2.0, incorrect_reward=0.95)):
        with pytest.raises(ValueError, match=r"correct_reward .* correct_threshold \(0.95\)"):
            config(ZAPOConfig, tmp_path, **fields)
    assert config(ZAPOConfig, tmp_path, correct_reward=0.9, correct_threshold=0.5).correct_reward == 0.9
    # GRESO classifies with its own threshold, in every config
    with pytest.raises(ValueError, match="greso_correct_threshold"):
        config(GRPOBaselineConfig, tmp_path, greso=True, correct_reward=0.9, incorrect_reward=0.0)
    assert config(GRPOBaselineConfig, tmp_path, correct_reward=0.9, incorrect_reward=0.0).correct_reward == 0.9


# --------------------------------------------------------------------------- recipes and the command line


@pytest.mark.parametrize("path", OPEN_RS_RECIPES, ids=lambda p: p.stem)
def test_open_rs_recipes_build_the_cosine_reward_the_authors_ran(path):
    from aapo_trl.train import parse_args

    script, config_, _ = parse_args(path.name.split("_", 1)[0], ["--config", str(path), *CPU_OVERRIDES])
    funcs = dict(zip(script.reward_funcs, get_reward_funcs(script.reward_funcs, config_)))
    assert funcs["cosine"].parameters() == AUTHORS_COSINE
    text = path.read_text()
    assert "progress is\n#   clipped at 1" in text and "ALGORITHMS.md section 2" in text  # the one deliberate fix


def test_command_line_sets_and_checks_the_reward_fields(tmp_path):
    from aapo_trl.train import parse_args

    argv = ["--reward_funcs", "cosine", "--cosine_max_len", "50", "--cosine_length_unit", "characters",
            "--cosine_min_value_wrong", "0.0", "--correct_reward", "3.0"]
    script, config_, _ = parse_args("zapo", argv)
    assert get_reward_funcs(script.reward_funcs, config_)[0].parameters()["max_len"] == 50
    assert (config_.cosine_min_value_wrong, config_.correct_reward) == (0.0, 3.0)
    with pytest.raises(ValueError, match="cosine_max_len"):
        parse_args("aapo", ["--cosine_max_len", "0"])
    with pytest.raises(ValueError, match="did you mean 'cosine_max_len'"):
        parse_args("aapo", ["--cosine_maxlen", "10"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("reward_funcs: [cosine]\ncosine_length_unit: words\n")
    with pytest.raises(ValueError, match="cosine_length_unit"):
        parse_args("gpg", ["--config", str(recipe), *CPU_OVERRIDES])


def test_command_line_rejects_an_unknown_length_unit(capsys):
    from aapo_trl.train import parse_args

    with pytest.raises(SystemExit):
        parse_args("grpo", ["--cosine_length_unit", "words"])
    assert "cosine_length_unit" in capsys.readouterr().err


def test_train_main_builds_named_rewards_from_the_config(monkeypatch, tiny_model_path, tmp_path):
    """`aapo-trl train` hands the trainer rewards built from the parsed config."""
    from aapo_trl import train

    class Built(Exception):
        pass

    def capture(**kwargs):
        raise Built(kwargs["reward_funcs"])

    monkeypatch.setattr(train, "trainer_class", lambda algorithm: capture)
    argv = ["--model_name_or_path", str(tiny_model_path), "--output_dir", str(tmp_path), "--max_train_samples", "4",
            "--reward_funcs", "final_number_zapo", "cosine", "--correct_reward", "2.0", "--incorrect_reward", "-0.5",
            "--cosine_max_len", "64"]
    script, config_, model = train.parse_args("zapo", argv)
    with pytest.raises(Built) as built:
        train.main(script, config_, model, algorithm="zapo")
    zapo_reward, cosine = built.value.args[0]
    assert zapo_reward(["14", "15"], solution=["14", "14"]) == [2.0, -0.5]
    assert cosine.parameters()["max_len"] == 64


def test_ref_rollouts_scores_with_the_recipes_reward_fields():
    """The reference cache must be scored as training scores: the CLI reads the recipe's reward fields."""
    import argparse

    from aapo_trl.ref_rollouts import register_cli, resolve_options

    parser = argparse.ArgumentParser(prog="aapo-trl")
    register_cli(parser.add_subparsers(dest="command"))
    recipe = ROOT / "examples" / "configs" / "aapo_r1-distill-qwen-1.5b_open-rs.yaml"
    args = parser.parse_args(["ref-rollouts", "--config", str(recipe), "--output-dir", "unused"])
    options = resolve_options(args)
    settings = RewardArguments(**options["reward_settings"])
    cosine = dict(zip(options["reward_funcs"], get_reward_funcs(options["reward_funcs"], settings)))["cosine"]
    assert cosine.parameters() == AUTHORS_COSINE
