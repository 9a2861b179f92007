"""The GPU smoke kit (issue 14, part 13) runs end to end on the CPU, and its checks catch what they are for.

``benchmarks/gpu_smoke.py --device cpu`` runs every code path of the GPU run but the device itself, so CI
keeps the kit working for the day a session is lent an accelerator (docs/GPU_SMOKE.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu_smoke.py"


@pytest.fixture(scope="module")
def kit():
    return load_benchmark("gpu_smoke")


@pytest.fixture
def profiling_restored(monkeypatch):
    """The kit records TRL's profiling blocks by patching ProfilingContext: undo it after the test."""
    from trl.extras import profiling

    monkeypatch.setattr(profiling.ProfilingContext, "_log_metrics", profiling.ProfilingContext._log_metrics)


def run_kit(tmp_path, *arguments) -> dict:
    """Run the kit as CI would (a subprocess, this checkout's aapo_trl) and return its verdict, checked passed."""
    out = tmp_path / "verdict.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("OUT", None)
    completed = subprocess.run([sys.executable, str(KIT), "--device", "cpu", "--out", str(out), *arguments],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), completed.stdout[-3000:] + completed.stderr[-3000:]
    verdict = json.loads(out.read_text())
    failed = {name: result.get("error") or result.get("checks") for name, result in verdict["variants"].items()
              if not result["passed"]}
    assert completed.returncode == 0 and verdict["passed"], (failed, verdict.get("error"), completed.stderr[-3000:])
    assert "verdict: PASS" in completed.stdout
    assert verdict["device"] == "cpu" and verdict["steps"] == 2
    assert verdict["environment"]["pins_unmet"] == [] and verdict["environment"]["versions"]["trl"] == "1.16.0"
    return verdict


def check_variants(verdict: dict, dtype: str) -> None:
    """What every variant's verdict must show, beyond ``passed``: the numbers the checks were made of."""
    for name, result in verdict["variants"].items():
        assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"]), name
        assert len(result["step_times_s"]) == 2 and all(t > 0 for t in result["step_times_s"]), name
        assert result["checks"]["losses_finite"] and result["checks"]["policy_on_device"], name
        assert result["policy_device"] == "cpu" and result["policy_dtype"] == f"torch.{dtype}", name
        if name in ("aapo_frozen", "aapo_peft"):
            assert result["reference_logits_max_abs_change"] == 0.0, name  # exactly, on the CPU
            assert result["policy_logits_max_abs_change"] > 1e-2, name  # while the policy did move
        if name == "aapo_frozen":
            assert result["reference_kind"] == "frozen_copy" and result["checks"]["reference_fingerprint_unchanged"]
        if name == "aapo_cache":
            assert result["reference_kind"] == "cache"
        if name.startswith("zapo"):
            zapo = result["zapo"]
            assert zapo["entropy_forwards"] >= 2 and all(groups > 0 for groups in zapo["zero_advantage_groups"])
            assert len(zapo["te_mean"]) == 2 and all(math.isfinite(te) for te in zapo["te_mean"])
        if name == "zapo_greso":
            assert len(result["greso_skip_rate"]) == 2


@pytest.mark.slow
def test_the_kit_runs_every_variant_end_to_end_on_the_cpu(tiny_model_path, tmp_path, kit):
    verdict = run_kit(tmp_path, "--model", str(tiny_model_path), "--max-completion-length", "6")
    assert verdict["dtype"] == "float32" and list(verdict["variants"]) == list(kit.VARIANTS)
    check_variants(verdict, "float32")


@pytest.mark.slow
def test_the_kit_runs_in_bf16_on_the_cpu(tiny_model_path, tmp_path):
    """The GPU run's dtype, where the CPU has it: the frozen copy, the adapters and ZAPO's K-Means in bf16."""
    variants = ["aapo_frozen", "aapo_peft", "zapo_greso"]
    verdict = run_kit(tmp_path, "--model", str(tiny_model_path), "--max-completion-length", "4", "--dtype",
                      "bfloat16", "--variants", *variants)
    assert verdict["dtype"] == "bfloat16" and list(verdict["variants"]) == variants
    check_variants(verdict, "bfloat16")


def _cpu_args(kit, *more):
    return kit.parse_args(["--device", "cpu", "--max-completion-length", "4", *more])


@pytest.mark.slow
def test_the_reference_check_fails_when_the_reference_follows_the_policy(tiny_model_path, tmp_path, kit,
                                                                          monkeypatch):
    from aapo_trl.reference import FrozenCopyReference

    make_trainer = kit.make_trainer

    def live_policy_as_reference(*args, **kwargs):  # the bug the check is for: a "frozen" copy that trains
        trainer = make_trainer(*args, **kwargs)
        trainer.reference = FrozenCopyReference(trainer.model)
        return trainer

    monkeypatch.setattr(kit, "make_trainer", live_policy_as_reference)
    result = kit.run_variant("aapo_frozen", _cpu_args(kit), tiny_model_path, tmp_path)
    assert "error" not in result, result.get("traceback")
    assert not result["passed"] and result["checks"]["policy_moved"]
    assert not result["checks"]["reference_logits_unchanged"]
    assert not result["checks"]["reference_fingerprint_unchanged"]
    assert result["reference_logits_max_abs_change"] == pytest.approx(result["policy_logits_max_abs_change"])


@pytest.mark.slow
def test_the_zapo_check_fails_when_no_entropy_was_computed(tiny_model_path, tmp_path, kit, monkeypatch,
                                                          profiling_restored):
    make_trainer = kit.make_trainer

    def without_entropies(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.args.use_daer = False  # zero-advantage groups then get no entropy forward at all
        return trainer

    kit.record_profiled_blocks()
    monkeypatch.setattr(kit, "make_trainer", without_entropies)
    result = kit.run_variant("zapo", _cpu_args(kit), tiny_model_path, tmp_path)
    assert "error" not in result, result.get("traceback")
    assert result["checks"]["losses_finite"] and result["checks"]["zero_advantage_groups_every_step"]
    assert not result["passed"]
    assert not result["checks"]["entropy_forward_ran"] and not result["checks"]["token_entropies_finite"]


def test_a_failure_is_written_into_the_verdict_with_a_nonzero_exit(tmp_path, kit, profiling_restored):
    out = tmp_path / "verdict.json"
    assert kit.main(["--device", "cpu", "--out", str(out), "--variants", "grpo",
                     "--model", str(tmp_path / "no-such-model")]) == 1
    verdict = json.loads(out.read_text())
    assert not verdict["passed"] and not verdict["variants"]["grpo"]["passed"]
    assert "no-such-model" in verdict["variants"]["grpo"]["error"] + verdict["variants"]["grpo"]["traceback"]

    import torch

    if not torch.cuda.is_available():
        assert kit.main(["--device", "cuda", "--out", str(out)]) == 1
        verdict = json.loads(out.read_text())
        assert not verdict["passed"] and "no CUDA device" in verdict["error"] and verdict["variants"] == {}


def test_the_default_verdict_path_is_under_out_when_set(kit, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert kit.default_out() == tmp_path / "gpu_smoke.json"
    monkeypatch.delenv("OUT")
    assert kit.default_out() == ROOT / "outputs" / "gpu_smoke.json"
