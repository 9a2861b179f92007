"""docs/REPRODUCING.md against the recipes, their header launch lines and the real command-line parsers.

No model is loaded: the recipes are read as YAML, the launch lines are compared token by token with the
``# Launch`` line of each recipe's header comment, and the ``aapo-trl eval`` / ``aapo-trl ref-rollouts`` lines
are parsed with the argument parsers the CLI itself builds (``aapo_trl.evaluation.build_eval_parser``,
``aapo_trl.ref_rollouts.register_cli``).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "REPRODUCING.md"
RECIPE_DIR = ROOT / "examples" / "configs"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))

PROTOCOLS_OF_PAPER = {"AAPO": {"aapo", "aapo-passk"}, "ZAPO": {"zapo"}}


# ---------------------------------------------------------------------------------------------------------------
# Reading the page and the recipes
# ---------------------------------------------------------------------------------------------------------------


def doc_text() -> str:
    assert DOC.is_file(), f"{DOC} is missing"
    return DOC.read_text()


def shell_commands(text: str) -> list[list[str]]:
    """Every command of the page's fenced code blocks, as shell tokens (continuation lines joined, comments
    dropped)."""
    commands = []
    for block in re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def commands_starting_with(text: str, *prefix: str) -> list[list[str]]:
    return [tokens for tokens in shell_commands(text) if tuple(tokens[: len(prefix)]) == prefix]


def option(tokens: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` (or ``--name=VALUE``); the last one wins, as in argparse."""
    value = None
    for i, token in enumerate(tokens):
        if token == name and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


def header_launch(path: Path) -> list[str]:
    """The ``accelerate launch`` line of a recipe's header comment, as shell tokens."""
    header = [line[1:] for line in path.read_text().splitlines() if line.startswith("#")]
    joined = "\n".join(header).replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if line.strip().startswith("accelerate launch")]
    assert len(lines) == 1, f"{path.name}: expected one `accelerate launch` line in the header, found {len(lines)}"
    return shlex.split(lines[0])


def launch_parts(tokens: list[str]) -> dict:
    """Config file, process count, script and recipe of an ``accelerate launch`` command; the tokens after the
    script are the script's own arguments."""
    script_index = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
    assert script_index is not None, f"no training script in: {' '.join(tokens)}"
    launcher, script_args = tokens[:script_index], tokens[script_index + 1:]
    return {
        "config_file": option(launcher, "--config_file"),
        "num_processes": option(launcher, "--num_processes"),
        "script": tokens[script_index],
        "config": option(script_args, "--config"),
        "script_args": script_args,
    }


def recipe_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def recipe_paper(path: Path) -> str:
    match = re.search(r"^# (?:Reproduces|Baseline for): (AAPO|ZAPO) paper", path.read_text(), flags=re.M)
    assert match, f"{path.name}: the header names no paper"
    return match.group(1)


def global_batch(values: dict, num_processes: int, accumulation: int | None = None) -> int:
    accumulation = values.get("gradient_accumulation_steps", 1) if accumulation is None else accumulation
    return values["per_device_train_batch_size"] * num_processes * accumulation


# ---------------------------------------------------------------------------------------------------------------
# The page covers every recipe and names only files that exist
# ---------------------------------------------------------------------------------------------------------------


def test_every_recipe_is_on_the_page_with_a_launch_and_an_eval_line():
    text = doc_text()
    assert len(RECIPES) >= 37, "examples/configs/ lost recipes?"
    launched = {Path(launch_parts(t)["config"]).name for t in commands_starting_with(text, "accelerate", "launch")}
    evaluated = {option(t, "--model") for t in commands_starting_with(text, "aapo-trl", "eval")}
    for path in RECIPES:
        assert path.name in text, f"{path.name} is not mentioned in {DOC.name}"
        assert f"#### {path.stem}\n" in text, f"{path.name} has no section of its own in {DOC.name}"
        assert path.name in launched, f"{path.name}: no `accelerate launch ... --config {path}` line on the page"
        output_dir = recipe_values(path)["output_dir"]
        assert output_dir in evaluated, f"{path.name}: no `aapo-trl eval --model {output_dir}` line on the page"


def test_every_path_on_the_page_exists():
    text = doc_text()
    recipe_paths = set(re.findall(r"examples/configs/[A-Za-z0-9._+-]+\.yaml", text))
    accelerate_paths = set(re.findall(r"accelerate_configs/[A-Za-z0-9._+-]+\.yaml", text))
    scripts = set(re.findall(r"examples/train_[a-z]+\.py", text))
    assert len(recipe_paths) >= len(RECIPES) and accelerate_paths and scripts
    for relative in sorted(recipe_paths | accelerate_paths | scripts):
        assert (ROOT / relative).is_file(), f"{DOC.name} names {relative}, which does not exist"
    # links relative to docs/ (e.g. ../examples/configs/x.yaml, ../README.md) resolve too
    for link in re.findall(r"\]\((\.\./[^)#\s]+)\)", text):
        assert (DOC.parent / link).resolve().exists(), f"{DOC.name} links to {link}, which does not exist"


def test_internal_links_point_at_headings():
    text = doc_text()

    def slug(heading: str) -> str:  # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens
        return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")

    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, f"{DOC.name}: link #{target} has no heading"


# ---------------------------------------------------------------------------------------------------------------
# Launch lines match the recipe headers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_header_launch_line_is_well_formed(path):
    parts = launch_parts(header_launch(path))
    assert parts["config"] == f"examples/configs/{path.name}"
    assert parts["script"] == f"examples/train_{path.name.split('_', 1)[0]}.py"
    assert parts["config_file"] and (ROOT / parts["config_file"]).is_file()
    assert parts["num_processes"] and int(parts["num_processes"]) >= 1


def test_launch_lines_match_the_recipe_headers():
    commands = commands_starting_with(doc_text(), "accelerate", "launch")
    assert len(commands) >= len(RECIPES)
    for tokens in commands:
        line = " ".join(tokens)
        parts = launch_parts(tokens)
        assert parts["config"], f"launch line without --config: {line}"
        path = ROOT / parts["config"]
        assert path.parent == RECIPE_DIR and path.is_file(), f"not a recipe: {parts['config']} ({line})"
        header = launch_parts(header_launch(path))
        assert parts["script"] == header["script"], f"{path.name}: script differs from the header: {line}"
        assert parts["config_file"] == header["config_file"], f"{path.name}: accelerate config differs: {line}"
        if parts["num_processes"] == header["num_processes"]:
            # the paper's GPU count: only the header's script arguments, or documented extras on top of them
            assert option(parts["script_args"], "--gradient_accumulation_steps") is None, (
                f"{path.name}: changes the accumulation on the paper's GPU count: {line}")
            continue
        # another GPU count: only with --gradient_accumulation_steps keeping the recipe's global batch
        values = recipe_values(path)
        accumulation = option(parts["script_args"], "--gradient_accumulation_steps")
        assert accumulation is not None, (
            f"{path.name}: --num_processes {parts['num_processes']} differs from the header's "
            f"{header['num_processes']} without --gradient_accumulation_steps: {line}")
        assert global_batch(values, int(parts["num_processes"]), int(accumulation)) == global_batch(
            values, int(header["num_processes"])), f"{path.name}: the global batch changes: {line}"
        per_step = values["per_device_train_batch_size"] * int(parts["num_processes"])
        assert values.get("generation_batch_size", per_step) % per_step == 0, line


def test_extra_training_flags_on_the_page_exist():
    """Arguments added to a header's launch line (a GPU-count change, the reference cache) are real fields."""
    from aapo_trl.train import parse_args

    cpu = ["--bf16", "false", "--use_cpu", "true", "--activation_checkpointing", "false", "--use_vllm", "false",
           "--dtype", "float32"]
    checked = 0
    for tokens in commands_starting_with(doc_text(), "accelerate", "launch"):
        parts = launch_parts(tokens)
        header = launch_parts(header_launch(ROOT / parts["config"]))
        if parts["script_args"] == header["script_args"]:
            continue
        algorithm = Path(parts["script"]).stem.removeprefix("train_")
        script, config, _ = parse_args(algorithm, [*parts["script_args"], *cpu])
        for flag, value in zip(parts["script_args"][2::2], parts["script_args"][3::2]):
            name = flag.removeprefix("--")
            owner = next((obj for obj in (script, config) if hasattr(obj, name)), None)
            assert owner is not None, f"{flag} is not a field: {' '.join(tokens)}"
            assert str(getattr(owner, name)).lower() == value.lower(), f"{flag} {value} was not applied"
        checked += 1
    assert checked >= 2, "the page should show a GPU-count change and the reference-cache launch"


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and ref-rollouts lines parse with the real parsers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_parser() -> argparse.ArgumentParser:
    from aapo_trl.evaluation import build_eval_parser

    return build_eval_parser(argparse.ArgumentParser(prog="aapo-trl eval", exit_on_error=False))


@pytest.fixture(scope="module")
def paper_tables():
    from aapo_trl.evaluation import evaluation_module

    return evaluation_module("paper_tables")


def test_eval_lines_use_only_real_flags_and_their_papers_protocol(eval_parser, paper_tables):
    commands = commands_starting_with(doc_text(), "aapo-trl", "eval")
    assert len(commands) >= len(RECIPES)
    by_output_dir = {recipe_values(path)["output_dir"]: path for path in RECIPES}
    for tokens in commands:
        line = " ".join(tokens)
        try:
            args, unknown = eval_parser.parse_known_args(tokens[2:])
        except argparse.ArgumentError as error:
            pytest.fail(f"`{line}`: {error}")
        assert not unknown, f"`{line}`: aapo-trl eval does not accept {unknown}"
        assert args.model, f"`{line}`: no --model"
        path = by_output_dir.get(args.model)
        assert path is not None, f"`{line}`: --model {args.model} is no recipe's output_dir"
        paper = recipe_paper(path)
        assert args.protocol in PROTOCOLS_OF_PAPER[paper], (
            f"`{line}`: {path.name} reproduces the {paper} paper, evaluate with {PROTOCOLS_OF_PAPER[paper]}")
        assert args.compare, f"`{line}`: give --compare so that the published rows are printed"
        base = paper_tables.canonical_base_model(recipe_values(path)["model_name_or_path"])
        assert base and paper_tables.canonical_base_model(args.compare) == base, (
            f"`{line}`: --compare {args.compare} is not the base model of {path.name} ({base})")
        assert paper_tables.rows_for(args.compare), f"`{line}`: no published rows for {args.compare}"
        if option(tokens, "--max-new-tokens") is not None:  # the page's budget: the recipe's completion length
            assert args.max_new_tokens == recipe_values(path)["max_completion_length"], (
                f"`{line}`: --max-new-tokens {args.max_new_tokens} is not {path.name}'s max_completion_length")


def test_eval_parser_rejects_what_the_cli_rejects(eval_parser):
    """The check above would be empty if the parser accepted anything."""
    _, unknown = eval_parser.parse_known_args(["--model", "x", "--no-such-flag"])
    assert unknown == ["--no-such-flag"]
    with pytest.raises(argparse.ArgumentError):
        eval_parser.parse_known_args(["--model", "x", "--protocol", "not-a-protocol"])


def test_ref_rollouts_lines_parse():
    from aapo_trl.ref_rollouts import register_cli

    parser = argparse.ArgumentParser(prog="aapo-trl", exit_on_error=False)
    register_cli(parser.add_subparsers(dest="command"))
    commands = commands_starting_with(doc_text(), "aapo-trl", "ref-rollouts")
    assert commands, "the page should show the reference-cache command"
    for tokens in commands:
        args, unknown = parser.parse_known_args(tokens[1:])
        assert not unknown, f"`{' '.join(tokens)}`: aapo-trl ref-rollouts does not accept {unknown}"
        assert args.config and (ROOT / args.config).is_file() and args.output_dir
        values = recipe_values(ROOT / args.config)
        assert args.num_generations >= values["num_generations"], "K must be >= the recipe's G"
