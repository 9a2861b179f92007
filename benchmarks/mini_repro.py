#!/usr/bin/env python
"""The CPU reproduction: GRPO, GPG, AAPO and ZAPO on SmolLM2-135M-Instruct + the built-in arithmetic set.

    python benchmarks/mini_repro.py [run] [--algorithms grpo gpg aapo zapo grpo-greso grpo-ds] [--seeds 0 1 2]
    python benchmarks/mini_repro.py difficulty [--levels ...]   # base accuracy per level (choose the mix)
    python benchmarks/mini_repro.py report [--out DIR]          # table + plots of the finished runs
    python benchmarks/mini_repro.py publish [--out DIR] [--to docs/results/mini_repro]

``run`` trains every (algorithm, seed) pair not finished yet, one at a time, each in its own process, and
then writes ``DIR/report/`` (``aapo-trl report``). A run is finished when ``DIR/<algorithm>-seed<S>/
results.json`` exists; an interrupted run has none and is started again from scratch. So the command can
be killed and started again at any time, and split up (``--algorithms aapo --seeds 0``).

``publish`` copies the finished runs' ``results.json`` (compact: floats to 6 significant digits, no
indentation, ~30-60 KB) to ``docs/results/mini_repro/<run>/`` and rewrites the report there from every run
published so far, so that ``docs/RESULTS.md`` rests on files in the repository and the grid can be completed
over several sessions on machines that do not keep ``outputs/``.

Every run (the recipe, :data:`RECIPE`; change it with the flags below or ``--train-args``):

* the model: ``--model`` (``embedded`` = SmolLM2-135M-Instruct, full fine-tuning, fp32, CPU);
* the data: the built-in arithmetic set at ``--levels`` (default ``add1 sub1 mul1``, the 1-digit levels
  where this model learns, see benchmarks/README.md), generated with data seed 0 whatever the training
  seed; per level, ``--eval-problems`` problems are held out (the set's ``test`` split) and never trained on;
* the step: 4 prompts x G = 8 completions (micro-batch 4, 8 accumulation steps), at most 48 new tokens,
  temperature 0.7, learning rate 1e-5 constant, ``--steps`` optimizer steps (default 30: meant to fit ~30 min
  per run on 2 cores for the slowest algorithm, AAPO; see benchmarks/README.md);
* the reward: ``final_number`` (1 if the last number is the answer, else 0) for GRPO, GPG and AAPO;
  ZAPO trains on its paper's three levels ``final_number_zapo`` (1 right / 0.1 wrong / 0 no number) and
  also logs ``final_number`` with weight 0 (no effect on its advantages), so that every run logs the same
  training accuracy ``rewards/final_number/mean``;
* each algorithm's defaults otherwise (AAPO: frozen-copy reference, margin clip [-0.2, 0.28], CE loss;
  GPG: CE loss; ZAPO: alpha 2, TDAR beta 5, GRPO clipped loss; GRPO: TRL's loss, beta 0); no GRESO (it only
  filters prompts already seen, and 30 steps x 4 prompts is less than one pass over the data).

Variants (``--algorithms``, beside the four algorithms; not in the default list): ``grpo-greso`` (GRPO + GRESO)
and ``grpo-ds`` (GRPO + DAPO's dynamic sampling, :data:`VARIANTS`: metric ``reward``, i.e. groups whose
``final_number`` rewards spread, at most 8 rounds of 4 prompts, then the kept groups are trained). Every run's
summary also records what a step cost in generation (:func:`generation_cost`): completions generated per
optimizer step, completions generated per trained group with signal, and wall seconds per step, and
``results.json`` names the ``truncated_completions`` setting it trained with.

Held-out accuracy before and after training, on the held-out problems of the same levels: greedy, and
pass@1 over ``--eval-samples`` (4) samples at the training temperature, under the training token budget;
a completion that hits the budget without stopping counts as wrong (in training the recipe keeps such
completions unscorable, ``truncated_completions="unscorable"``, and empty ones, ``empty_completions="unscorable"``:
the settings its published runs used, both the defaults then).
"Before" is the base model, evaluated once per seed (the sampling seed) and reused by every algorithm
(``DIR/base-eval-seed<S>.json``).

``results.json`` holds the recipe, the summary of ``aapo-trl train`` (reward, zero-advantage share before
and after, all-zero batches, ...), the full log history, the per-step series (reward, training accuracy,
zero-advantage share before/after, all-zero batch, response length), the held-out accuracies, wall times
and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("grpo", "gpg", "aapo", "zapo")
# Variants: a run name -> (its trainer, the recipe fields it adds). Their runs are named and reported as the variant.
VARIANTS = {
    "grpo-greso": ("grpo", {"greso": True}),
    # DAPO's dynamic sampling: rounds of 4 prompts until the step's 4 groups all have a spread of final_number;
    # after 8 rounds it trains the groups kept so far (the counter dynamic_sampling/exhausted_total says how often)
    "grpo-ds": ("grpo", {"dynamic_sampling": True, "dynamic_sampling_metric": "reward",
                         "dynamic_sampling_max_rounds": 8, "dynamic_sampling_on_exhaustion": "train_kept"}),
}
RUNS = ALGORITHMS + tuple(VARIANTS)
DEFAULT_LEVELS = ("add1", "sub1", "mul1")
DATA_SEED = 0
RESULTS_FILE = "results.json"

# The training recipe shared by every algorithm (aapo-trl train fields).
RECIPE = {
    "num_generations": 8,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 8,
    "max_completion_length": 48,
    "temperature": 0.7,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    # the published runs (docs/RESULTS.md) were trained when these were the defaults; pinned so that they reproduce
    "truncated_completions": "unscorable",
    "empty_completions": "unscorable",
}
REWARDS = {
    "zapo": (["final_number_zapo", "final_number"], [1.0, 0.0]),
}
DEFAULT_REWARDS = (["final_number"], None)
ACCURACY_KEY = "rewards/final_number/mean"
SERIES_KEYS = {
    "reward": "reward",
    "train_accuracy": ACCURACY_KEY,
    "zero_adv_before": "zero_adv/frac_groups",
    "zero_adv_after": "zero_adv/frac_groups_final",
    "all_zero_batch": "zero_adv/all_zero_batch",
    "completion_length": "completions/mean_length",
    "step_time_s": "step_time",
    # dynamic-sampling runs only (the others generate prompts x G completions per step, one round)
    "generated_completions": "dynamic_sampling/generated_completions",
    "completions_per_kept_group": "dynamic_sampling/completions_per_kept_group",
    "rounds": "dynamic_sampling/rounds",
}


def _offline() -> None:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)


def _write_json_atomic(path: Path, payload: dict) -> None:
    from aapo_trl.checkpointing import atomic_write_json

    atomic_write_json(path, payload, indent=2, default=str, allow_nan=True)  # a run's log may hold NaN losses


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ==================================================================================================
# Data and held-out evaluation
# ==================================================================================================


def load_split(split: str, levels, eval_problems: int):
    """The arithmetic set with data seed 0: ``train`` never contains the ``eval_problems`` test problems/level."""
    from aapo_trl.data import load_prompt_dataset

    return load_prompt_dataset("arithmetic", split=split, levels=list(levels), seed=DATA_SEED, num_test=eval_problems)


def evaluate(model, tokenizer, dataset, *, samples: int, max_new_tokens: int, temperature: float, seed: int,
             batch_size: int = 32, greedy: bool = True) -> dict:
    """Greedy accuracy and pass@1 over ``samples`` samples (mean accuracy), overall and per level."""
    import torch
    from transformers import GenerationConfig

    from aapo_trl.rewards import final_number_reward

    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos_ids = {tokenizer.eos_token_id}
    generation_eos = getattr(model.generation_config, "eos_token_id", None)
    if generation_eos is not None:
        eos_ids |= set(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    rows = list(dataset)
    texts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows]

    def run(config: GenerationConfig, copies: int) -> list[list[float]]:
        scores: list[list[float]] = []
        per_call = max(1, batch_size // copies) if copies > 1 else batch_size
        for start in range(0, len(rows), per_call):
            batch = tokenizer(texts[start : start + per_call], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**batch, generation_config=config)
            generated = out[:, batch["input_ids"].shape[1] :]
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            stopped = [any(int(t) in eos_ids for t in ids) for ids in generated]
            for index in range(len(decoded) // copies):
                row = rows[start + index]
                span = range(index * copies, (index + 1) * copies)
                rewards = final_number_reward([decoded[j] for j in span], solution=[row["solution"]] * copies)
                scores.append([1.0 if (r == 1.0 and stopped[j]) else 0.0 for r, j in zip(rewards, span)])
        return scores

    common = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=sorted(eos_ids), bos_token_id=tokenizer.bos_token_id)
    result: dict = {"problems": len(rows), "samples": samples, "max_new_tokens": max_new_tokens,
                    "temperature": temperature, "seed": seed}
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        greedy_scores = run(GenerationConfig(do_sample=False, **common), 1) if greedy else None
        sampled_scores = run(GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                              num_return_sequences=samples, **common), samples) if samples > 0 else None
    result["seconds"] = round(time.perf_counter() - started, 1)
    tokenizer.padding_side = padding_side
    model.train(was_training)

    def mean(values):
        return sum(values) / len(values) if values else None

    levels = sorted({row["level"] for row in rows})
    if greedy_scores is not None:
        result["greedy"] = mean([s[0] for s in greedy_scores])
    if sampled_scores is not None:
        result["pass@1"] = mean([mean(s) for s in sampled_scores])
        groups = [sum(s) for s in sampled_scores]
        result["groups_all_wrong"] = mean([float(g == 0) for g in groups])
        result["groups_all_right"] = mean([float(g == samples) for g in groups])
        result["groups_mixed"] = 1.0 - result["groups_all_wrong"] - result["groups_all_right"]
    result["per_level"] = {}
    for level in levels:
        idx = [i for i, row in enumerate(rows) if row["level"] == level]
        entry = {"problems": len(idx)}
        if greedy_scores is not None:
            entry["greedy"] = mean([greedy_scores[i][0] for i in idx])
        if sampled_scores is not None:
            entry["pass@1"] = mean([mean(sampled_scores[i]) for i in idx])
            groups = [sum(sampled_scores[i]) for i in idx]
            entry["groups_all_wrong"] = mean([float(g == 0) for g in groups])
            entry["groups_all_right"] = mean([float(g == samples) for g in groups])
            entry["groups_mixed"] = 1.0 - entry["groups_all_wrong"] - entry["groups_all_right"]
        result["per_level"][level] = entry
    return result


# ==================================================================================================
# One run
# ==================================================================================================


def trainer_of(run: str) -> str:
    """The algorithm (trainer) a run name trains with: ``grpo-ds`` -> ``grpo``."""
    return VARIANTS[run][0] if run in VARIANTS else run


def train_argv(args, run: str, seed: int, run_dir: Path) -> list[str]:
    algorithm = trainer_of(run)
    funcs, weights = REWARDS.get(algorithm, DEFAULT_REWARDS)
    argv = ["--model_name_or_path", args.model, "--output_dir", str(run_dir), "--seed", str(seed),
            "--max_steps", str(args.steps), "--reward_funcs", *funcs]
    if weights is not None:
        argv += ["--reward_weights", *map(str, weights)]
    recipe = dict(RECIPE, max_completion_length=args.max_completion_length, **VARIANTS.get(run, (None, {}))[1])
    for key, value in recipe.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv + list(args.train_args)


def series_from(log_history: list[dict]) -> list[dict]:
    steps = [e for e in log_history if "zero_adv/frac_groups" in e and "step" in e]
    return [{"step": e["step"], **{name: e.get(key) for name, key in SERIES_KEYS.items()}} for e in steps]


def generation_cost(series: list[dict], prompts_per_step: int, num_generations: int) -> dict:
    """What a step cost in generation, for the runs with dynamic sampling and without alike.

    ``completions_per_step``: completions generated per optimizer step (one generation batch per step in this
    recipe). ``completions_per_group_with_signal``: completions generated per trained group whose rewards spread
    (dynamic sampling: every trained group, its ``completions_per_kept_group``; otherwise prompts x G over the
    groups with signal, ``1 - zero_adv_before``). ``step_time_s``: TRL's wall time per optimizer step.
    """
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    generated = [e.get("generated_completions") for e in series]
    if any(v is not None for v in generated):
        per_step = mean(generated)
        total_kept = sum(e["generated_completions"] / e["completions_per_kept_group"] for e in series
                         if e.get("generated_completions") and e.get("completions_per_kept_group"))
        per_signal_group = sum(v for v in generated if v is not None) / total_kept if total_kept else None
    else:
        per_step = float(prompts_per_step * num_generations)
        signal_groups = sum(prompts_per_step * (1 - e["zero_adv_before"]) for e in series
                            if e.get("zero_adv_before") is not None)
        per_signal_group = per_step * len(series) / signal_groups if signal_groups else None
    return {"completions_per_step": per_step, "completions_per_group_with_signal": per_signal_group,
            "step_time_s": mean(e.get("step_time_s") for e in series)}


def first_step_at(series: list[dict], key: str, threshold: float, window: int = 5) -> int | None:
    """First step at which the moving average (``window`` steps) of ``key`` reaches ``threshold``."""
    values = []
    for entry in series:
        if entry.get(key) is None:
            continue
        values.append(entry[key])
        recent = values[-window:]
        if len(recent) == window and sum(recent) / window >= threshold:
            return int(entry["step"])
    return None


def base_evaluation(args, seed: int, model, tokenizer, heldout) -> dict:
    path = Path(args.out) / f"base-eval-seed{seed}.json"
    settings = {"model": args.model, "levels": list(args.levels), "eval_problems": args.eval_problems,
                "eval_samples": args.eval_samples, "max_new_tokens": args.max_completion_length,
                "temperature": RECIPE["temperature"], "seed": seed}
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("settings") == settings:
            return stored["result"]
    result = evaluate(model, tokenizer, heldout, samples=args.eval_samples, max_new_tokens=args.max_completion_length,
                      temperature=RECIPE["temperature"], seed=seed)
    _write_json_atomic(path, {"settings": settings, "result": result})
    return result


def run_one(args) -> int:
    _offline()
    import torch
    from trl import get_peft_config

    from aapo_trl import train as entry
    from aapo_trl.rewards import get_reward_funcs

    run_name, seed = args.algorithm, args.seed
    algorithm = trainer_of(run_name)
    run_dir = Path(args.out) / f"{run_name}-seed{seed}"
    if (run_dir / RESULTS_FILE).exists():
        print(f"[{run_dir.name}] finished already ({run_dir / RESULTS_FILE})")
        return 0
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    started = time.time()
    script_args, training_args, model_args = entry.parse_args(algorithm, train_argv(args, run_name, seed, run_dir))
    train_set = load_split("train", args.levels, args.eval_problems)
    heldout = load_split("test", args.levels, args.eval_problems)
    model, tokenizer = entry.load_policy(model_args, training_args)

    before = base_evaluation(args, seed, model, tokenizer, heldout)
    print(f"[{run_dir.name}] held-out before: greedy {before['greedy']:.3f}, pass@1 {before['pass@1']:.3f}", flush=True)
    trainer = entry.trainer_class(algorithm)(
        model=model,
        reward_funcs=get_reward_funcs(script_args.reward_funcs, training_args),
        args=training_args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_started = time.time()
    trainer.train()
    train_seconds = time.time() - train_started
    policy = trainer.accelerator.unwrap_model(trainer.model)
    after = evaluate(policy, tokenizer, heldout, samples=args.eval_samples, max_new_tokens=args.max_completion_length,
                     temperature=RECIPE["temperature"], seed=seed)
    print(f"[{run_dir.name}] held-out after: greedy {after['greedy']:.3f}, pass@1 {after['pass@1']:.3f}", flush=True)

    history = trainer.state.log_history
    summary = entry.summarize(history, algorithm, time.time() - started)
    summary["algorithm"] = run_name  # a variant is reported (and aggregated) under its own name
    series = series_from(history)
    accuracies = [e["train_accuracy"] for e in series if e["train_accuracy"] is not None]
    summary.update(
        train_accuracy_first_step=accuracies[0] if accuracies else None,
        train_accuracy_last5=sum(accuracies[-5:]) / len(accuracies[-5:]) if accuracies else None,
        first_step_train_accuracy_ge_0_6=first_step_at(series, "train_accuracy", 0.6),
        first_step_train_accuracy_ge_0_8=first_step_at(series, "train_accuracy", 0.8),
        **generation_cost(series, RECIPE["per_device_train_batch_size"] * RECIPE["gradient_accumulation_steps"]
                          // RECIPE["num_generations"], RECIPE["num_generations"]),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
    _write_json_atomic(run_dir / "metrics.json", {"summary": summary, "log_history": history})
    if args.save_model:
        trainer.save_model(str(run_dir / "model"))
    results = {
        "algorithm": run_name,
        "trainer": algorithm,
        "seed": seed,
        "recipe": {
            "model": args.model, "levels": list(args.levels), "data_seed": DATA_SEED, "steps": args.steps,
            "train_prompts": len(train_set), "eval_problems_per_level": args.eval_problems,
            "eval_samples": args.eval_samples, "reward_funcs": script_args.reward_funcs,
            "reward_weights": training_args.reward_weights, "train_argv": train_argv(args, run_name, seed, run_dir),
            "truncated_completions": training_args.truncated_completions,
            "torch_threads": torch.get_num_threads(),
        },
        "summary": summary,
        "heldout": {"before": before, "after": after},
        "per_step": series,
        "timing": {"train_s": round(train_seconds, 1), "eval_before_s": before.get("seconds"),
                   "eval_after_s": after.get("seconds"), "total_s": round(time.time() - started, 1)},
        "peak_rss_gb": round(_peak_rss_gb(), 2),
        "log_history": history,
    }
    _write_json_atomic(run_dir / RESULTS_FILE, results)  # last: its presence marks the run finished
    print(entry.format_summary(summary))
    print(f"[{run_dir.name}] done in {results['timing']['total_s']} s (training {results['timing']['train_s']} s), "
          f"peak RSS {results['peak_rss_gb']} GB -> {run_dir / RESULTS_FILE}", flush=True)
    return 0


# ==================================================================================================
# Commands
# ==================================================================================================


def _common_flags(args) -> list[str]:
    flags = ["--model", args.model, "--out", str(args.out), "--steps", str(args.steps), "--levels", *args.levels,
             "--eval-problems", str(args.eval_problems), "--eval-samples", str(args.eval_samples),
             "--max-completion-length", str(args.max_completion_length), "--train-args", shlex.join(args.train_args)]
    if args.torch_threads:
        flags += ["--torch-threads", str(args.torch_threads)]
    if args.save_model:
        flags.append("--save-model")
    return flags


def run_all(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for seed in args.seeds:
        for algorithm in args.algorithms:
            run_dir = out / f"{algorithm}-seed{seed}"
            if (run_dir / RESULTS_FILE).exists():
                print(f"[{run_dir.name}] finished already, skipped")
                continue
            command = [sys.executable, str(Path(__file__).resolve()), "run-one", "--algorithm", algorithm,
                       "--seed", str(seed), *_common_flags(args)]
            print(f"[{run_dir.name}] starting: {shlex.join(command)}", flush=True)
            started = time.time()
            code = subprocess.call(command, cwd=ROOT)
            print(f"[{run_dir.name}] exit code {code} after {time.time() - started:.0f} s", flush=True)
            if code != 0 or not (run_dir / RESULTS_FILE).exists():
                failed.append(run_dir.name)
    report(args)
    if failed:
        print(f"failed runs (start the same command again to retry them): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def report(args) -> int:
    from aapo_trl.report import build_report

    out = Path(args.out)
    finished = sorted(p.parent for p in out.glob(f"*/{RESULTS_FILE}"))
    if not finished:
        print(f"no finished runs under {out}")
        return 0
    result = build_report(finished, out / "report", smooth=args.smooth, title="CPU reproduction (mini_repro)")
    print(result["table"])
    aggregated = [entry for entry in result["aggregated"] if entry["runs"] > 1]
    if aggregated:
        from aapo_trl.report import aggregate_table

        print("\n" + aggregate_table(result["aggregated"]))
    steps = []
    for run_dir in finished:
        data = json.loads((run_dir / RESULTS_FILE).read_text())
        s = {**run_costs(data), **data["summary"]}
        steps.append(f"| {run_dir.name} | {_fmt(s.get('train_accuracy_first_step'))} | "
                     f"{_fmt(s.get('train_accuracy_last5'))} | {s.get('first_step_train_accuracy_ge_0_6') or '-'} | "
                     f"{s.get('first_step_train_accuracy_ge_0_8') or '-'} | {data['timing']['train_s']} | "
                     f"{data['timing']['total_s']} | {data['peak_rss_gb']} | "
                     f"{_fmt(s.get('completions_per_step'), 1)} | "
                     f"{_fmt(s.get('completions_per_group_with_signal'), 1)} | {_fmt(s.get('step_time_s'), 1)} | "
                     f"{truncation_of(data)} |")
    table = ("| run | train acc. step 1 | train acc. last 5 | first step acc. >= 0.6 (5-step mean) | "
             "first step acc. >= 0.8 | train s | total s | peak RSS GB | completions / step | "
             "completions / group with signal | s / step | truncated_completions |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(steps))
    (out / "report" / "training.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nreport: {result['markdown']} (plots beside it), {out / 'report' / 'training.md'}")
    return 0


def run_costs(data: dict) -> dict:
    """:func:`generation_cost` of a finished run, from its log history (runs published before it was recorded)."""
    prompts = RECIPE["per_device_train_batch_size"] * RECIPE["gradient_accumulation_steps"] // RECIPE["num_generations"]
    return generation_cost(series_from(data.get("log_history", [])), prompts, RECIPE["num_generations"])


def truncation_of(data: dict) -> str:
    """The ``truncated_completions`` setting a run trained with (the last one on its command line wins)."""
    recipe = data.get("recipe", {})
    if recipe.get("truncated_completions"):
        return recipe["truncated_completions"]
    argv = recipe.get("train_argv", [])
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--truncated_completions"]
    return values[-1] if values else "-"


def _round_floats(value, digits: int = 6):
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {key: _round_floats(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_round_floats(item, digits) for item in value]
    return value


def publish(args) -> int:
    """Copy the finished runs (compact) and their base evaluations to ``--to``, then report from there."""
    out, target = Path(args.out), Path(args.to)
    finished = sorted(p.parent for p in out.glob(f"*/{RESULTS_FILE}"))
    for run_dir in finished:
        data = _round_floats(json.loads((run_dir / RESULTS_FILE).read_text()))
        destination = target / run_dir.name / RESULTS_FILE
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(json.dumps(data, separators=(",", ":"), default=str) + "\n")
        print(f"published {run_dir.name} -> {destination} ({destination.stat().st_size / 1024:.0f} KB)")
    for base in sorted(out.glob("base-eval-seed*.json")):  # may exist before any run has finished
        target.mkdir(parents=True, exist_ok=True)
        (target / base.name).write_text(json.dumps(_round_floats(json.loads(base.read_text())), indent=1) + "\n")
    if not any(target.glob(f"*/{RESULTS_FILE}")):
        print(f"nothing finished under {out}, nothing published under {target}")
        return 0
    relative = os.path.relpath(target)
    args.out = target if relative.startswith("..") else relative  # report.md names the runs by this path
    return report(args)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def difficulty(args) -> int:
    """Base accuracy per level: greedy and sampled at the training temperature, with group shares."""
    _offline()
    import torch

    from aapo_trl.data import ARITHMETIC_LEVELS
    from aapo_trl.models import load_model_and_tokenizer, resolve_model_path

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    levels = list(ARITHMETIC_LEVELS) if args.levels == ["all"] else args.levels
    model, tokenizer = load_model_and_tokenizer(resolve_model_path(args.model))
    results = {}
    lines = [f"| level | problems | greedy | sampled (T={args.temperature}) | groups of {args.samples} all wrong | "
             "mixed | all right |", "|---|---|---|---|---|---|---|"]
    for level in levels:
        problems = load_split("test", [level], args.problems)
        result = evaluate(model, tokenizer, problems, samples=args.samples, max_new_tokens=args.max_completion_length,
                          temperature=args.temperature, seed=args.seed)
        results[level] = result
        lines.append(f"| {level} | {result['problems']} | {result['greedy']:.3f} | {result['pass@1']:.3f} | "
                     f"{result['groups_all_wrong']:.2f} | {result['groups_mixed']:.2f} | "
                     f"{result['groups_all_right']:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    out = Path(args.out)
    _write_json_atomic(out / "difficulty.json", {
        "command": shlex.join([sys.executable, *sys.argv]), "model": args.model, "problems_per_level": args.problems,
        "samples": args.samples, "temperature": args.temperature, "max_new_tokens": args.max_completion_length,
        "seed": args.seed, "data_seed": DATA_SEED, "torch_threads": torch.get_num_threads(), "levels": results,
    })
    (out / "difficulty.md").write_text(table + "\n")
    print(f"\n{table}\n\nwritten to {out / 'difficulty.json'} and {out / 'difficulty.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    def shared(p, training: bool = True):
        p.add_argument("--model", default="embedded", help="embedded (SmolLM2-135M-Instruct) or tiny (smoke runs)")
        p.add_argument("--out", default=str(ROOT / "outputs" / "mini_repro"), help="folder of the runs")
        p.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS), help="arithmetic levels ('all': every one)")
        p.add_argument("--max-completion-length", type=int, default=RECIPE["max_completion_length"])
        p.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: torch's)")
        if training:
            p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
            p.add_argument("--eval-problems", type=int, default=20, help="held-out problems per level")
            p.add_argument("--eval-samples", type=int, default=4, help="samples per problem for pass@1")
            p.add_argument("--train-args", default="", help="extra aapo-trl train arguments for every run, quoted")
            p.add_argument("--save-model", action="store_true", help="also save each trained model (~540 MB)")
            p.add_argument("--smooth", type=int, default=3, help="moving average of the report's curves")

    run = sub.add_parser("run", help="train (and evaluate) every unfinished run, then write the report")
    shared(run)
    run.add_argument("--algorithms", nargs="+", choices=RUNS, default=list(ALGORITHMS))
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])

    one = sub.add_parser("run-one", help="one (algorithm, seed) run in this process (what `run` launches)")
    shared(one)
    one.add_argument("--algorithm", choices=RUNS, required=True)
    one.add_argument("--seed", type=int, required=True)

    rep = sub.add_parser("report", help="tables and plots of the finished runs under --out")
    shared(rep)

    pub = sub.add_parser("publish", help="copy the finished runs (compact) into the repository and report there")
    shared(pub)
    pub.add_argument("--to", default=str(ROOT / "docs" / "results" / "mini_repro"),
                     help="where the published runs and their report go")

    diff = sub.add_parser("difficulty", help="base accuracy per level, greedy and sampled (choose the mix)")
    shared(diff, training=False)
    diff.set_defaults(levels=["all"])
    diff.add_argument("--problems", type=int, default=20, help="held-out problems per level")
    diff.add_argument("--samples", type=int, default=8, help="samples per problem")
    diff.add_argument("--temperature", type=float, default=RECIPE["temperature"])
    diff.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # `run` is the default command
    args = build_parser().parse_args(argv)
    if hasattr(args, "train_args"):
        args.train_args = shlex.split(args.train_args)
        if args.model == "tiny" and not any(a.startswith("--truncated_completions") for a in args.train_args):
            # the random tiny model never stops: score its truncated completions so every code path runs
            args.train_args = ["--truncated_completions", "score", *args.train_args]
    handler = {"run": run_all, "run-one": run_one, "report": report, "publish": publish,
               "difficulty": difficulty}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
