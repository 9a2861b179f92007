"""AAPO's reference-server request overlapped with the policy's generation (``reference_request_overlap``).

The training tests run real AAPO steps with TRL's ``VLLMClient``/``VLLMGeneration`` against the fake vLLM HTTP
servers of ``test_reference_vllm`` (policy on one, reference on the other), with latencies injected into their
``/v1/completions`` answers. Nothing asserts on a measured duration: the overlap is shown by the order of the
servers' timestamps (the reference request arrives before the policy's generation has finished), and a failure by
an error raised before the slow server has answered.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import requests
import torch
from _launch import launch
from _training import Recorder, prompt_dataset
from test_reference_vllm import G, tag_of, tagged_reward, vllm_config, vllm_env  # noqa: F401 - vllm_env: a fixture
from transformers import AutoTokenizer
from urllib3.exceptions import MaxRetryError, ReadTimeoutError

import aapo_trl.reference_overlap as reference_overlap
from aapo_trl.advantages import aapo_advantages, combine_reward_functions
from aapo_trl.reference_overlap import (
    BackgroundReferenceRequests,
    ReferenceServerError,
    ReferenceServerTimeout,
    reference_server_error,
)
from aapo_trl.trainers import AAPOTrainer

# ------------------------------------------------------------------------------------------------------------
# Fake servers with a latency, and failing ones
# ------------------------------------------------------------------------------------------------------------


def answer_after(server, seconds: float) -> threading.Event:
    """Make ``server`` answer each ``/v1/completions`` after ``seconds``; records ``(received, answered)`` monotonic
    times in ``server.served``. Setting the returned event ends a pending wait (the test's teardown)."""
    release = threading.Event()
    server.served = []
    complete = server.complete

    def slow_complete(payload):
        received = time.monotonic()
        release.wait(seconds)
        choices = complete(payload)
        server.served.append((received, time.monotonic()))
        return choices

    server.complete = slow_complete
    return release


def fail_completions_with(server, status: int) -> None:
    """Make ``server`` answer every ``/v1/completions`` with HTTP ``status`` (every other route as before)."""
    base = server.httpd.RequestHandlerClass

    class FailingHandler(base):
        def do_POST(self):
            if urlparse(self.path).path != "/v1/completions":
                return super().do_POST()
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            server.record("/v1/completions", {})
            return self._reply({"error": "the reference engine died"}, status=status)

    server.httpd.RequestHandlerClass = FailingHandler


def request_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "aapo-reference-request"]


def server_trainer(model_path, tmp_path, policy_server, reference_server, **overrides):
    config = vllm_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=policy_server.url,
                         reference_source="vllm_server", reference_vllm_server_base_url=reference_server.url,
                         **overrides)
    return AAPOTrainer(str(model_path), reward_funcs=[tagged_reward], args=config, train_dataset=prompt_dataset())


@pytest.fixture
def tiny(tiny_model_path):
    """The tiny model's folder and tokenizer."""
    return SimpleNamespace(path=str(tiny_model_path), tokenizer=AutoTokenizer.from_pretrained(tiny_model_path))


# ------------------------------------------------------------------------------------------------------------
# Overlap on and off: when the reference request is sent, and that nothing else changes
# ------------------------------------------------------------------------------------------------------------

LATENCY = 1.0  # seconds each fake server takes to answer a generation request


@pytest.mark.slow
def test_overlap_sends_the_reference_request_while_the_policy_generates_and_changes_no_result(tmp_path, tiny,
                                                                                           vllm_env):  # noqa: F811
    runs = {}
    for overlap in (True, False):
        policy_server = vllm_env.start("POLICY", tiny.tokenizer, tiny.path)
        reference_server = vllm_env.start("REFERENCE", tiny.tokenizer, tiny.path)
        releases = [answer_after(policy_server, LATENCY), answer_after(reference_server, LATENCY)]
        trainer = server_trainer(tiny.path, tmp_path / str(overlap), policy_server, reference_server, max_steps=2,
                                 reference_request_overlap=overlap)
        recorder = Recorder(trainer)
        trainer.train()
        for release in releases:
            release.set()
        runs[overlap] = SimpleNamespace(trainer=trainer, recorder=recorder, policy=policy_server,
                                        reference=reference_server)

    for overlap, run in runs.items():
        assert len(run.policy.served) == len(run.reference.served) == 2  # one request each per generation batch
        for (policy_in, policy_out), (reference_in, reference_out) in zip(run.policy.served, run.reference.served):
            if overlap:  # both servers were busy at the same time: the step pays max(policy, reference), not the sum
                assert reference_in < policy_out and policy_in < reference_out
            else:  # sequential: the reference is asked once the policy's completions are back (and scored)
                assert reference_in > policy_out
        for batch in run.recorder.batches:
            assert {tag_of(tiny.tokenizer, ids) for ids in batch["completion_ids"]} == {"POLICY"}
            assert {tag_of(tiny.tokenizer, ids) for ids in batch["ref_completion_ids"]} == {"REFERENCE"}
            ref_rewards = combine_reward_functions(batch["ref_rewards_per_func"], run.trainer.reward_weights)
            torch.testing.assert_close(batch["advantages"], aapo_advantages(batch["rewards"], ref_rewards, G))
        assert request_threads() == []  # every request thread ended with its request

    on, off = runs[True], runs[False]
    # the same requests: the prompts the policy generated for (in its order), the same sampling settings
    assert on.reference.payloads("/v1/completions") == off.reference.payloads("/v1/completions")
    for policy_request, reference_request in zip(on.policy.payloads("/v1/completions"),
                                                 on.reference.payloads("/v1/completions")):
        assert reference_request["prompt"] == policy_request["prompt"]
    # ... and the same results, step by step
    for batch_on, batch_off in zip(on.recorder.batches, off.recorder.batches, strict=True):
        assert batch_on["ref_completion_ids"] == batch_off["ref_completion_ids"]
        torch.testing.assert_close(batch_on["ref_rewards_per_func"], batch_off["ref_rewards_per_func"],
                                   rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(batch_on["advantages"], batch_off["advantages"], rtol=0, atol=0)
    for loss_on, loss_off in zip(on.recorder.loss_advantages, off.recorder.loss_advantages, strict=True):
        torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)


@pytest.mark.slow
def test_steps_per_generation_buffering_sends_one_request_per_generation_batch(tmp_path, tiny, vllm_env):  # noqa: F811
    policy_server = vllm_env.start("POLICY", tiny.tokenizer, tiny.path)
    reference_server = vllm_env.start("REFERENCE", tiny.tokenizer, tiny.path)
    trainer = server_trainer(tiny.path, tmp_path, policy_server, reference_server, max_steps=4,
                             per_device_train_batch_size=3, gradient_accumulation_steps=1, steps_per_generation=2)
    recorder = Recorder(trainer)
    trainer.train()
    # 4 optimizer steps, a generation every 2: two generation batches, two reference requests, same prompts
    assert len(recorder.batches) == 2
    policy_requests = policy_server.payloads("/v1/completions")
    reference_requests = reference_server.payloads("/v1/completions")
    assert len(policy_requests) == len(reference_requests) == 2
    for policy_request, reference_request in zip(policy_requests, reference_requests):
        assert reference_request["prompt"] == policy_request["prompt"] and reference_request["n"] == G


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_send_one_request_and_each_gets_its_own_rows(tmp_path, tiny, vllm_env):  # noqa: F811
    """``accelerate launch`` with 2 CPU processes (tests/multiprocess_run.py; the policy generates with transformers,
    G = 2, 3 rows per process: the second group spans both): the collectives of the overlapped request (gather when
    sent, broadcast when collected) interleave with TRL's without a deadlock, the main process sends one request for
    every process's prompts, and each process gets its own rows of the answer. (That the sequential path gives the
    same results is checked in one process above; one launch only, to keep the suite short.)"""
    server = vllm_env.start("REFERENCE", tiny.tokenizer, tiny.path)
    overrides = dict(reference_source="vllm_server", reference_vllm_server_base_url=server.url)
    ranks = launch("aapo", 2, tiny.path, tmp_path / "two", overrides=overrides)
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    (request,) = server.payloads("/v1/completions")  # one request: the 3 unique prompts of both processes, n = 2
    assert len(request["prompt"]) == 3 and request["n"] == 2
    # the fake answers "REFERENCE k" with k = 2c mod 3 for its c-th row: rows 0-2 went to rank 0, rows 3-5 to rank 1
    stitched = ranks[0]["ref_completion_ids"] + ranks[1]["ref_completion_ids"]
    texts = [tiny.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in stitched]
    assert texts == [f"REFERENCE {2 * row % 3}" for row in range(6)]
    rewards = combine_reward_functions(torch.tensor(ranks[0]["rewards_per_func"]), torch.ones(1))
    ref_rewards = combine_reward_functions(torch.tensor(ranks[0]["ref_rewards_per_func"]), torch.ones(1))
    assert ranks[1]["ref_rewards_per_func"] == ranks[0]["ref_rewards_per_func"]  # gathered: the same on both
    expected = aapo_advantages(rewards, ref_rewards, num_generations=2)
    assert ranks[0]["local_advantages"] + ranks[1]["local_advantages"] == pytest.approx(expected.tolist(), abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Failures of the reference server: a clear error, never a hang
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
def test_a_reference_server_error_stops_training_with_a_clear_error(tmp_path, tiny, vllm_env, overlap):  # noqa: F811
    policy_server = vllm_env.start("POLICY", tiny.tokenizer, tiny.path)
    reference_server = vllm_env.start("REFERENCE", tiny.tokenizer, tiny.path)
    fail_completions_with(reference_server, 500)
    trainer = server_trainer(tiny.path, tmp_path, policy_server, reference_server, max_steps=1,
                             reference_request_overlap=overlap)
    session = trainer.reference.generation.vllm_client.session
    session.adapters["http://"].max_retries.backoff_factor = 0  # TRL's retries of a 500, without their 2-8 s pauses
    with pytest.raises(ReferenceServerError, match="500") as raised:
        trainer.train()
    message = str(raised.value)
    assert reference_server.url in message and "reference_request_timeout=1800" in message
    assert not isinstance(raised.value, ReferenceServerTimeout)
    assert reference_server.paths().count("/v1/completions") == 4  # TRL's retry policy: the first try and 3 retries
    assert request_threads() == []


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
def test_a_reference_server_that_does_not_answer_times_out_with_a_clear_error(tmp_path, tiny, vllm_env,  # noqa: F811
                                                                              overlap):
    policy_server = vllm_env.start("POLICY", tiny.tokenizer, tiny.path)
    reference_server = vllm_env.start("REFERENCE", tiny.tokenizer, tiny.path)
    release = answer_after(reference_server, 120.0)  # far beyond the time-out: it would answer only then
    trainer = server_trainer(tiny.path, tmp_path, policy_server, reference_server, max_steps=1,
                             reference_request_timeout=1.5, reference_request_overlap=overlap)
    try:
        with pytest.raises(ReferenceServerTimeout) as raised:
            trainer.train()
        assert reference_server.served == []  # raised before the server answered: it did not wait for it
        message = str(raised.value)
        assert reference_server.url in message and "reference_request_timeout=1.5 s" in message
        assert reference_server.paths().count("/v1/completions") == 1  # a read time-out is not retried
        for thread in request_threads():  # its own read time-out ends the request thread too
            thread.join(timeout=30)
            assert not thread.is_alive()
    finally:
        release.set()


# ------------------------------------------------------------------------------------------------------------
# The request object on its own: multi-process slicing, errors on every process, the wait bound
# ------------------------------------------------------------------------------------------------------------


class FakeClient:
    def __init__(self, answer=None, error=None, block: threading.Event | None = None):
        self.answer, self.error, self.block = answer, error, block
        self.calls = []

    def generate(self, prompts, **kwargs):
        self.calls.append((prompts, kwargs))
        if self.block is not None:
            self.block.wait(30)
        if self.error is not None:
            raise self.error
        return {"completion_ids": self.answer(prompts, kwargs["n"])}


def fake_generation(client) -> SimpleNamespace:
    return SimpleNamespace(vllm_client=client, repetition_penalty=1.0, temperature=0.7, top_p=0.9, top_k=5,
                           min_p=None, max_completion_length=8, logprobs=None, structured_outputs_regex=None,
                           generation_kwargs={"seed": 3})


def accelerator(rank: int, world: int = 2) -> SimpleNamespace:
    return SimpleNamespace(is_main_process=rank == 0, process_index=rank, num_processes=world)


def answer_per_row(prompts, n):
    return [[prompt[0], 100 + k] for prompt in prompts for k in range(n)]


def test_the_main_process_sends_every_processes_unique_prompts_and_each_process_gets_its_rows(monkeypatch):
    """Two processes, 2 rows each (G = 2: one prompt per process), simulated around the two collectives."""
    rows = {0: [[1, 2], [1, 2]], 1: [[7], [7]]}
    monkeypatch.setattr(reference_overlap, "gather_object", lambda local: rows[0] + rows[1])
    client = FakeClient(answer=answer_per_row)
    sender = BackgroundReferenceRequests(fake_generation(client), "http://ref:8001", timeout=30)
    main = sender.send(accelerator(0), rows[0], num_generations=2)
    other = sender.send(accelerator(1), rows[1], num_generations=2)
    assert other.future is None  # only the main process talks to the server
    answer = main.completions(accelerator(0), rows[0])
    assert answer == [[1, 100], [1, 101]]
    assert client.calls == [([[1, 2], [7]], {"n": 2, "repetition_penalty": 1.0, "temperature": 0.7, "top_p": 0.9,
                                             "top_k": 5, "min_p": 0.0, "max_tokens": 8, "logprobs": None,
                                             "structured_outputs_regex": None, "generation_kwargs": {"seed": 3}})]

    everything = main.future.result()["completion_ids"]
    monkeypatch.setattr(reference_overlap, "broadcast_object_list", lambda shared, from_process: shared.__setitem__(
        0, everything))
    assert other.completions(accelerator(1), rows[1]) == [[7, 100], [7, 101]]
    with pytest.raises(RuntimeError, match="other prompts than the ones the policy generated for"):
        other.completions(accelerator(1), [[8], [8]])


def test_a_failure_on_the_main_process_is_raised_on_every_process(monkeypatch):
    monkeypatch.setattr(reference_overlap, "gather_object", lambda local: local)
    shared_by_main = []

    def broadcast(shared, from_process):  # the main process's object, kept for the "other" process
        if shared[0] is None:
            shared[0] = shared_by_main[0]
        else:
            shared_by_main.append(shared[0])

    monkeypatch.setattr(reference_overlap, "broadcast_object_list", broadcast)
    client = FakeClient(error=requests.ConnectionError("connection refused"))
    sender = BackgroundReferenceRequests(fake_generation(client), "http://ref:8001", timeout=30)
    pending = sender.send(accelerator(0), [[1], [1]], num_generations=2)
    expected = r"http://ref:8001 failed .*ConnectionError: connection refused"
    with pytest.raises(ReferenceServerError, match=expected) as raised:
        pending.completions(accelerator(0), [[1], [1]])
    assert isinstance(raised.value.__cause__, requests.ConnectionError)
    other = reference_overlap.PendingReferenceRequest(sender, [[2], [2]], None)
    with pytest.raises(ReferenceServerError, match="ConnectionError: connection refused"):
        other.completions(accelerator(1), [[2], [2]])


def test_the_training_thread_waits_at_most_the_time_out(monkeypatch):
    monkeypatch.setattr(reference_overlap, "gather_object", lambda local: local)
    never = threading.Event()
    client = FakeClient(answer=answer_per_row, block=never)
    sender = BackgroundReferenceRequests(fake_generation(client), "http://ref:8001", timeout=0.5)
    pending = sender.send(accelerator(0, world=1), [[1], [1]], num_generations=2)
    try:
        expected = r"http://ref:8001 did not answer .* reference_request_timeout=0.5 s"
        with pytest.raises(ReferenceServerTimeout, match=expected):
            pending.completions(accelerator(0, world=1), [[1], [1]])
        assert pending.future.running()  # raised while the request was still on the wire
    finally:
        never.set()


def test_close_cancels_senders_that_have_not_started(monkeypatch):
    monkeypatch.setattr(reference_overlap, "gather_object", lambda local: local)
    gate = threading.Event()
    client = FakeClient(answer=answer_per_row, block=gate)
    sender = BackgroundReferenceRequests(fake_generation(client), "http://ref:8001", timeout=30)
    first = sender.send(accelerator(0, world=1), [[1]], num_generations=1)
    while not first.future.running():  # on the wire
        time.sleep(0.01)
    second = sender.send(accelerator(0, world=1), [[2]], num_generations=1)  # queued behind the first
    sender.close()
    gate.set()
    assert first.future.result(timeout=30) == {"completion_ids": [[1, 100]]}  # a request on the wire completes
    assert second.future.cancelled()
    for thread in request_threads():
        thread.join(timeout=30)
    assert request_threads() == []
    assert [prompts for prompts, _ in client.calls] == [[[1]]]  # the cancelled one was never sent


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (requests.ReadTimeout("read timed out"), ReferenceServerTimeout),
        (TimeoutError(), ReferenceServerTimeout),
        (requests.ConnectionError(MaxRetryError(None, "/v1/completions", ReadTimeoutError(None, "/", "timed out"))),
         ReferenceServerTimeout),
        (requests.exceptions.RetryError("too many 500 error responses"), ReferenceServerError),
        (requests.ConnectionError("connection refused"), ReferenceServerError),
        (Exception("Request failed: 400, bad"), ReferenceServerError),
    ],
)
def test_reference_server_errors_name_the_server_and_the_time_out(error, kind):
    failure = reference_server_error("http://ref:8001", 60.0, error)
    assert type(failure) is kind
    assert "http://ref:8001" in str(failure) and "reference_request_timeout=60" in str(failure)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(reference_request_timeout=0), "reference_request_timeout must be a positive number of seconds"),
        (dict(reference_request_timeout=float("nan")), "reference_request_timeout must be a positive number"),
        (dict(reference_request_timeout=float("inf")), "reference_request_timeout must be a positive number"),
        (dict(reference_request_overlap="yes"), "reference_request_overlap must be True or False"),
    ],
)
def test_bad_overlap_settings_fail_at_configuration(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        vllm_config(tmp_path, **overrides)
