#!/usr/bin/env python
"""GPU smoke kit: two optimizer steps of every trainer on one accelerator, and one JSON verdict.

    python benchmarks/gpu_smoke.py [--device cuda|cpu] [--out FILE] [--variants NAME ...]

On a lent GPU machine run it through ``benchmarks/gpu_smoke.sh`` (it installs the carried wheels first;
docs/GPU_SMOKE.md gives the exact ``run`` call). ``--device cpu`` runs every code path but the device
itself (in float32, or bf16 with ``--dtype bfloat16``): CI does both in ``tests/test_gpu_smoke.py``.

Every variant builds a fresh trainer on the tiny random Llama (:func:`aapo_trl.models.ensure_tiny_model`,
loaded by TRL from its path, as ``aapo-trl train`` does on accelerators) and runs ``trainer.train()`` for
``--steps`` optimizer steps (default 2) on three prompts whose rewards give one all-correct, one all-wrong
and one mixed group per step, so that the zero-advantage paths (ZAPO's entropies, GRESO's history) and
the non-zero ones both run at every step:

==============  ==========================================================================================
variant         what
==============  ==========================================================================================
grpo            GRPOBaselineTrainer
gpg             GPGTrainer
aapo_frozen     AAPOTrainer, reference = frozen copy of the initial policy (``reference_source="model"``)
aapo_peft       AAPOTrainer with a fresh LoRA, reference = the policy with its adapters off
aapo_cache      AAPOTrainer, ``reference_source="cache"``: the cache is first built on the device with
                :func:`aapo_trl.ref_rollouts.build_ref_rollouts` (what ``aapo-trl ref-rollouts`` runs)
zapo            ZAPOTrainer (DAER entropies: the no-grad entropy forward on the device, K-Means on the CPU)
zapo_greso      ZAPOTrainer + GRESO pre-rollout filtering
==============  ==========================================================================================

On ``cuda`` the models are loaded in bfloat16 with ``bf16=True`` and SDPA attention (as every recipe in
``examples/configs``); on ``cpu`` in float32 with ``use_cpu=True`` (``--dtype`` overrides either). A
variant passes when it ran its steps without an exception and

* every logged loss is finite (one per step);
* the policy's parameters sit on the requested device;
* AAPO (frozen copy, PEFT): the reference did not move. Its logits on a fixed probe input, computed through
  the same context the reference sampler uses (``reference.generation_model``), are the same before and
  after training (exactly in float32 on the CPU; within ``--reference-atol`` otherwise), its
  ``parameters_fingerprint()`` (when the reference has one) is unchanged, and the policy's logits on
  the same probe *did* move by more than ten times that tolerance (so the check has teeth);
* AAPO (cache): the cached reference rewards reached the advantage (``aapo/ref_reward_mean`` logged, finite);
* ZAPO: at every step there were zero-advantage groups, a pass computing DAER's statistics ran (the
  default ``zapo_generation_statistics`` after ``generate``, or the forward ``zapo_entropy_forward``), and the token-entropy mean it logged (``zapo/te_mean``) is finite: the device round trip to
  scikit-learn's K-Means and back completed (issue 14, part 1, crashed exactly there);
* GRESO: its filter recorded every step's groups (``greso/skip_rate`` logged).

The verdict (``--out``; default ``$OUT/gpu_smoke.json`` when ``$OUT`` is set, else
``outputs/gpu_smoke.json``) holds the environment (versions, the project's pins met or not, the device),
and per variant: ``passed``, the losses, the step times, the checks with their numbers, the peak device
memory and the error text (traceback) if any; then ``passed`` overall. The exit code is 0 when everything
passed, 1 otherwise. Variants still waiting when ``--budget-s`` has passed are reported as not run
(a failure): the kit must finish inside one ``run`` call. A CUDA device-side error poisons the process, so
the variants after one fail with the same error: rerun the others with ``--variants``.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import importlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                      ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
    os.environ.setdefault(_name, _value)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this checkout's aapo_trl
    sys.path.insert(0, str(ROOT))

VARIANTS = ("grpo", "gpg", "aapo_frozen", "aapo_peft", "aapo_cache", "zapo", "zapo_greso")
NUM_GENERATIONS = 4
# One group of each kind per step: all correct (easy), all wrong (hard), spread (mixed).
PROMPTS = (("What is 2 + 3?", "5", "easy"), ("What is 7 - 4?", "3", "hard"), ("What is 3 * 3?", "9", "mixed"))
PROBE_TEXT = "What is 6 + 1? The answer is 7."
PROFILED_ENTROPY_PASSES = ("zapo_generation_statistics", "zapo_entropy_forward")


# ==================================================================================================
# The task: three prompts, a reward that decides each group's kind
# ==================================================================================================


def smoke_dataset():
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": question}], "solution": solution, "kind": kind}
        for question, solution, kind in PROMPTS
    ])


def smoke_reward(completions, kind, **kwargs):
    """1 for every completion of an ``easy`` prompt, 0 for a ``hard`` one, and for a ``mixed`` one a
    deterministic function of the completion text spread over {0, 0.5, 1}."""
    rewards = []
    for completion, row_kind in zip(completions, kind):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        if row_kind == "easy":
            rewards.append(1.0)
        elif row_kind == "hard":
            rewards.append(0.0)
        else:
            rewards.append(int(hashlib.sha256(text.encode()).hexdigest(), 16) % 3 / 2)
    return rewards


# ==================================================================================================
# The environment
# ==================================================================================================


def environment_report(device: str) -> dict:
    """Versions, the project's own pins (setup.cfg ``install_requires``) met or not, and the device."""
    from importlib.metadata import PackageNotFoundError, requires, version

    import torch
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser.get("options", "install_requires", fallback="").splitlines()
    requirements = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    versions, unmet = {}, []
    for requirement in requirements:
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = None
        versions[canonicalize_name(requirement.name)] = installed
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{requirement} (installed: {installed})")
    # what the stack below the pins asks for (a device image may hold an older pyarrow, say): reported, and
    # an unmet one usually shows up again as an import error of the variant that needs it
    dependency_conflicts = []
    for parent in ("trl", "transformers", "datasets", "peft", "accelerate"):
        try:
            needs = [Requirement(text) for text in requires(parent) or []]
        except PackageNotFoundError:
            continue
        for requirement in needs:
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                installed = version(requirement.name)
            except PackageNotFoundError:
                installed = None
            versions.setdefault(canonicalize_name(requirement.name), installed)
            if installed is None or not requirement.specifier.contains(installed, prereleases=True):
                dependency_conflicts.append(f"{parent} needs {requirement} (installed: {installed})")
    imported_from = {}
    for module in ("torch", "trl", "transformers", "datasets", "peft", "aapo_trl"):
        try:
            imported_from[module] = str(Path(importlib.import_module(module).__file__).parent)
        except Exception as error:  # noqa: BLE001 - reported, the variants then fail with the same error
            imported_from[module] = f"import failed: {type(error).__name__}: {error}"
    report = {
        "python": platform.python_version(),
        "imported_from": imported_from,
        "versions": versions,
        "pins_unmet": unmet,
        "dependency_conflicts": dependency_conflicts,
        "device": device,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if device == "cuda" and torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    return report


# ==================================================================================================
# One variant
# ==================================================================================================


def base_config(args, output_dir: Path) -> dict:
    """The settings every variant shares (bf16 + SDPA on cuda, fp32 on the CPU)."""
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=len(PROMPTS) * NUM_GENERATIONS,
        gradient_accumulation_steps=1,
        num_generations=NUM_GENERATIONS,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=1e-2,  # large, so that two steps visibly move the tiny policy (see the reference checks)
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        seed=0,
        # the tiny random model rarely emits EOS: score its truncated completions so groups keep their kinds
        truncated_completions="score",
    )
    bf16 = args.dtype == "bfloat16"
    values.update(bf16=bf16, model_init_kwargs={"dtype": args.dtype, "attn_implementation": "sdpa"})
    if args.device == "cpu":
        values.update(use_cpu=True)
    return values


def step_recorder(device: str):
    """A TrainerCallback whose ``step_times`` are the seconds of each optimizer step (the device synchronised)."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.step_times: list[float] = []
            self._started: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = now()

        def on_step_end(self, args, state, control, **kwargs):
            if self._started is not None:
                self.step_times.append(round(now() - self._started, 4))
                self._started = None

    return StepRecorder()


PROFILED_BLOCKS: list = []
"""``(name, start, end)`` of every TRL ``profiling_context`` that completed (our ``zapo_entropy_forward`` too)."""


def record_profiled_blocks() -> None:
    """Fill :data:`PROFILED_BLOCKS` (TRL 1.16 sends these timings only to wandb/mlflow/trackio)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "step_overhead.py"  # its recorder, not a copy of it
    step_overhead = sys.modules.get("step_overhead")
    if step_overhead is None:
        spec = importlib.util.spec_from_file_location("step_overhead", path)
        step_overhead = sys.modules["step_overhead"] = importlib.util.module_from_spec(spec)  # for its dataclasses
        spec.loader.exec_module(step_overhead)
    step_overhead._patch_profiling(PROFILED_BLOCKS)


def probe_logits(model, input_ids) -> "torch.Tensor":
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids.to(next(model.parameters()).device)).logits.float().cpu()


def reference_snapshot(trainer, input_ids) -> dict:
    """The reference's logits on the probe (through the context its sampler uses) and its fingerprint."""
    with trainer.reference.generation_model(trainer) as model:
        logits = probe_logits(model, input_ids)
    fingerprint = getattr(trainer.reference, "parameters_fingerprint", None)
    return {"logits": logits, "fingerprint": fingerprint().clone() if fingerprint is not None else None}


def policy_logits(trainer, input_ids):
    return probe_logits(trainer.accelerator.unwrap_model(trainer.model), input_ids)


def build_cache(args, model_path: Path, dataset, output_dir: Path) -> Path:
    """``aapo-trl ref-rollouts`` on the device: K = G reference samples per prompt, scored like training."""
    import torch

    from aapo_trl.models import load_model_and_tokenizer
    from aapo_trl.ref_rollouts import build_ref_rollouts

    model, tokenizer = load_model_and_tokenizer(model_path, dtype=getattr(torch, args.dtype))
    model.to(args.device)
    cache_dir = output_dir / "ref_rollouts"
    build_ref_rollouts(dataset, cache_dir, num_generations=NUM_GENERATIONS, reward_funcs=[smoke_reward],
                       model=model, tokenizer=tokenizer, max_completion_length=args.max_completion_length, seed=0,
                       batch_size=len(PROMPTS) * NUM_GENERATIONS, progress=False)
    del model
    return cache_dir


def make_trainer(name: str, args, model_path: Path, output_dir: Path, recorder):
    from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig, ZAPOConfig
    from aapo_trl.trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer, ZAPOTrainer

    dataset = smoke_dataset()
    values = base_config(args, output_dir)
    kwargs = {}
    if name == "grpo":
        trainer_class, config_class = GRPOBaselineTrainer, GRPOBaselineConfig
    elif name == "gpg":
        trainer_class, config_class = GPGTrainer, GPGConfig
    elif name.startswith("aapo"):
        trainer_class, config_class = AAPOTrainer, AAPOConfig
        if name == "aapo_peft":
            from peft import LoraConfig

            kwargs["peft_config"] = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                               task_type="CAUSAL_LM")
        elif name == "aapo_cache":
            values.update(reference_source="cache",
                          ref_rollouts_path=str(build_cache(args, model_path, dataset, output_dir)))
    elif name.startswith("zapo"):
        trainer_class, config_class = ZAPOTrainer, ZAPOConfig
        values.update(greso=name == "zapo_greso")
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    trainer = trainer_class(model=str(model_path), reward_funcs=[smoke_reward], args=config_class(**values),
                            train_dataset=dataset, callbacks=[recorder], **kwargs)
    return trainer


def _finite(values) -> bool:
    return bool(values) and all(value is not None and math.isfinite(value) for value in values)


def _logged(trainer, key: str) -> list:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def run_variant(name: str, args, model_path: Path, work_dir: Path) -> dict:
    """Build, train ``args.steps`` steps and check one variant; never raises (errors go into the result)."""
    import torch

    result: dict = {"variant": name, "passed": False, "checks": {}, "losses": [], "step_times_s": []}
    recorder = step_recorder(args.device)
    PROFILED_BLOCKS.clear()
    started = time.perf_counter()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        trainer = make_trainer(name, args, model_path, work_dir / name, recorder)
        checks = result["checks"]
        probe = trainer.processing_class(PROBE_TEXT, return_tensors="pt")["input_ids"]
        with_reference = name in ("aapo_frozen", "aapo_peft")
        if with_reference:
            reference_before = reference_snapshot(trainer, probe)
            policy_before = policy_logits(trainer, probe)
            result["reference_kind"] = trainer.reference.kind
            result["reference_generation"] = trainer.reference_generation  # aapo_peft: "batched" (the default "auto")

        trainer.train()

        result["losses"] = _logged(trainer, "loss")
        result["step_times_s"] = recorder.step_times
        checks["losses_finite"] = _finite(result["losses"]) and len(result["losses"]) == args.steps
        parameter = next(trainer.accelerator.unwrap_model(trainer.model).parameters())
        result["policy_device"], result["policy_dtype"] = str(parameter.device), str(parameter.dtype)
        checks["policy_on_device"] = parameter.device.type == args.device

        if with_reference:
            reference_after = reference_snapshot(trainer, probe)
            reference_drift = (reference_after["logits"] - reference_before["logits"]).abs().max().item()
            policy_drift = (policy_logits(trainer, probe) - policy_before).abs().max().item()
            tolerance = 0.0 if args.device == "cpu" and args.dtype == "float32" else args.reference_atol
            result["reference_logits_max_abs_change"] = reference_drift
            result["policy_logits_max_abs_change"] = policy_drift
            checks["reference_logits_unchanged"] = reference_drift <= tolerance
            checks["policy_moved"] = policy_drift > 10 * max(tolerance, 1e-6)
            if reference_before["fingerprint"] is not None:
                checks["reference_fingerprint_unchanged"] = bool(
                    torch.equal(reference_before["fingerprint"], reference_after["fingerprint"])
                )
        if name == "aapo_cache":
            result["reference_kind"] = trainer.reference.kind
            ref_means = _logged(trainer, "aapo/ref_reward_mean")
            result["ref_reward_mean"] = ref_means
            checks["cached_reference_rewards_used"] = trainer.reference.kind == "cache" and _finite(ref_means)
        if name.startswith("zapo"):
            zero_groups = [e + h for e, h in zip(_logged(trainer, "zapo/easy_groups"),
                                                  _logged(trainer, "zapo/hard_groups"))]
            te_means = _logged(trainer, "zapo/te_mean")
            result["zapo"] = {"zero_advantage_groups": zero_groups, "te_mean": te_means,
                              "se_mean": _logged(trainer, "zapo/se_mean"),
                              "entropy_forwards": sum(1 for e in PROFILED_BLOCKS if e[0] in PROFILED_ENTROPY_PASSES)}
            checks["zero_advantage_groups_every_step"] = len(zero_groups) == args.steps and all(zero_groups)
            checks["entropy_forward_ran"] = result["zapo"]["entropy_forwards"] >= args.steps
            checks["token_entropies_finite"] = len(te_means) == args.steps and _finite(te_means)
        if name == "zapo_greso":
            skip_rates = _logged(trainer, "greso/skip_rate")
            result["greso_skip_rate"] = skip_rates
            checks["greso_recorded_every_step"] = len(skip_rates) == args.steps
        result["passed"] = all(checks.values())
    except Exception as error:  # noqa: BLE001 - the verdict must say what failed, then go on
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
        result["step_times_s"] = recorder.step_times
        if trainer is not None:  # the steps that did run
            result["losses"] = _logged(trainer, "loss")
    trainer = None
    result["wall_s"] = round(time.perf_counter() - started, 2)
    if args.device == "cuda":
        result["peak_device_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        torch.cuda.empty_cache()
    return result


# ==================================================================================================
# Main
# ==================================================================================================


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_smoke.json"
    return ROOT / "outputs" / "gpu_smoke.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="the JSON verdict (default: $OUT/gpu_smoke.json, "
                        "else outputs/gpu_smoke.json)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per variant")
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--model", type=Path, default=None,
                        help="a model folder (default: the tiny random Llama, aapo_trl.models.ensure_tiny_model)")
    parser.add_argument("--reference-atol", type=float, default=1e-3,
                        help="largest change of the reference's probe logits accepted on an accelerator (bf16 "
                        "kernels may reorder sums); on the CPU the logits must be identical")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="variants not started after this many seconds are reported as not run")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights and bf16 mixed precision (default: bfloat16 on cuda, float32 on the CPU)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.max_completion_length < 1:
        parser.error("--max-completion-length must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or default_out()
    started = time.perf_counter()
    verdict: dict = {"kit": "benchmarks/gpu_smoke.py", "device": args.device, "dtype": args.dtype, "steps": args.steps,
                     "max_completion_length": args.max_completion_length, "variants": {}, "passed": False}
    try:
        import torch

        verdict["environment"] = environment_report(args.device)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
        from aapo_trl.models import ensure_tiny_model

        model_path = args.model or ensure_tiny_model()
        verdict["model"] = str(model_path)
        record_profiled_blocks()
    except Exception as error:  # noqa: BLE001
        verdict["error"] = f"{type(error).__name__}: {error}"
        verdict["traceback"] = traceback.format_exc()
        return _finish(verdict, out, started)

    work_dir = Path(tempfile.mkdtemp(prefix="gpu_smoke-"))
    try:
        for name in args.variants:
            if time.perf_counter() - started > args.budget_s:
                verdict["variants"][name] = {"variant": name, "passed": False,
                                             "error": f"not run: the {args.budget_s:.0f} s budget was spent"}
                continue
            print(f"== {name}", flush=True)
            verdict["variants"][name] = result = run_variant(name, args, model_path, work_dir)
            print(f"   {'PASS' if result['passed'] else 'FAIL'} in {result['wall_s']} s: losses {result['losses']}, "
                  f"step times {result['step_times_s']}" + (f", error {result['error']}" if "error" in result else ""),
                  flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    verdict["passed"] = (
        not verdict["environment"]["pins_unmet"]
        and len(verdict["variants"]) == len(args.variants)
        and all(result["passed"] for result in verdict["variants"].values())
    )
    return _finish(verdict, out, started)


def _finish(verdict: dict, out: Path, started: float) -> int:
    verdict["wall_s"] = round(time.perf_counter() - started, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(verdict, indent=2) + "\n")
    print(summary_table(verdict))
    print(f"verdict: {'PASS' if verdict['passed'] else 'FAIL'} -> {out}")
    return 0 if verdict["passed"] else 1


def summary_table(verdict: dict) -> str:
    lines = [f"{'variant':<12} {'result':<6} {'losses':<28} {'step times (s)':<20} failed checks / error"]
    for name, result in verdict["variants"].items():
        failed = [check for check, ok in result.get("checks", {}).items() if not ok]
        losses = ", ".join(f"{value:.4g}" for value in result.get("losses", []) if value is not None)
        times = ", ".join(f"{value:.2f}" for value in result.get("step_times_s", []))
        note = result.get("error", ", ".join(failed))
        lines.append(f"{name:<12} {'PASS' if result['passed'] else 'FAIL':<6} {losses:<28} {times:<20} {note}")
    environment = verdict.get("environment", {})
    if environment.get("pins_unmet"):
        lines.append("unmet pins: " + "; ".join(environment["pins_unmet"]))
    if "error" in verdict:
        lines.append("error: " + verdict["error"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
