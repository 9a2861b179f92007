"""AAPO's reference on vLLM, tested on the CPU against fake vLLM servers and a fake colocated engine.

vLLM is not installed here. The fakes speak what TRL 1.16's ``VLLMClient`` / ``VLLMGeneration`` use:

* a real HTTP server on 127.0.0.1 per "vLLM server" (``/health``, ``/v1/models``, ``/server_info``,
  ``/get_world_size``, ``/init_weight_transfer_engine``, ``/start_weight_update``, ``/update_weights``,
  ``/finish_weight_update``, ``/reset_prefix_cache``, ``/v1/completions``), whose answers decode to
  "POLICY <k>" or "REFERENCE <k>" depending on the server;
* the NCCL pieces (the trainer's side of the weight-transfer group and the tensor broadcast), replaced by
  an in-process hand-over to the server object that the group was opened with; everything else (the HTTP
  protocol, TRL's generation and weight-sync code, our reference code) is the real code;
* for colocate mode, a fake ``vllm.LLM`` whose answers say whose weights it holds when it generates.
"""

from __future__ import annotations

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import torch
from _training import CPU_ARGS, Recorder, hashed_reward, perturb_, prompt_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from aapo_trl.advantages import aapo_advantages, combine_reward_functions
from aapo_trl.configs import AAPOConfig
from aapo_trl.reference import ColocatedVLLMReference, PeftBaseReference, VLLMServerReference
from aapo_trl.trainers import AAPOTrainer

G = 3
TAG_RE = re.compile(r"^(POLICY|REFERENCE) (\d)$")


def tagged_reward(completions, **kwargs):
    """k / 2 for an answer "<TAG> k" (the fakes answer k in {0, 1, 2}); 0 for anything else."""
    rewards = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        match = TAG_RE.match(text.strip())
        rewards.append(int(match.group(2)) / 2 if match else 0.0)
    return rewards


def tag_of(tokenizer, ids) -> str | None:
    match = TAG_RE.match(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------------------------------
# A fake vLLM server (HTTP) and the in-process stand-in for the NCCL weight transfer
# ------------------------------------------------------------------------------------------------------------


class FakeVLLMServer:
    """One "vLLM server": answers "<tag> k" to every prompt and records every request and received tensor."""

    def __init__(self, tag: str, tokenizer, served_model: str, weight_transfer: bool = True):
        self.tag, self.tokenizer, self.served_model = tag, tokenizer, served_model
        self.weight_transfer_config = {"backend": "nccl"} if weight_transfer else None
        self.requests: list[tuple[str, dict]] = []
        self.received: list[dict[str, torch.Tensor]] = []  # one dict per weight update
        self.counter = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = urlparse(self.path).path
                server.record(path, {})
                if path == "/health":
                    return self._reply({})
                if path == "/v1/models":
                    return self._reply({"data": [{"id": server.served_model}]})
                if path == "/server_info":
                    return self._reply({"vllm_config": {
                        "model_config": {"logprobs_mode": "processed_logprobs"},
                        "weight_transfer_config": server.weight_transfer_config,
                    }})
                if path == "/get_world_size":
                    return self._reply({"world_size": 1})
                return self._reply({"error": path}, status=404)

            def do_POST(self):
                path = urlparse(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                payload = json.loads(self.rfile.read(length) or b"{}")
                server.record(path, payload)
                if path == "/v1/completions":
                    return self._reply({"choices": server.complete(payload)})
                if path in ("/init_weight_transfer_engine", "/start_weight_update", "/finish_weight_update",
                            "/reset_prefix_cache"):
                    if path == "/start_weight_update":
                        server.received.append({})
                    return self._reply({})
                if path == "/update_weights":
                    return self._reply({})
                return self._reply({"error": path}, status=404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def record(self, path, payload):
        with self.lock:
            self.requests.append((path, payload))

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def payloads(self, path) -> list[dict]:
        return [payload for p, payload in self.requests if p == path]

    def complete(self, payload) -> list[dict]:
        choices = []
        for prompt in payload["prompt"]:
            for _ in range(payload["n"]):
                with self.lock:  # the two servers walk 0..2 in different orders, so their rewards differ
                    k, self.counter = self.counter * (2 if self.tag == "REFERENCE" else 1) % 3, self.counter + 1
                ids = self.tokenizer(f"{self.tag} {k}")["input_ids"] + [self.tokenizer.eos_token_id]
                ids = ids[: payload["max_tokens"]]
                logprobs = None
                if payload.get("logprobs") is not None:
                    logprobs = {
                        "tokens": [f"token_id:{t}" for t in ids],
                        "token_logprobs": [-1.0] * len(ids),
                        "top_logprobs": [{f"token_id:{t}": -1.0} for t in ids],
                    }
                choices.append({"prompt_token_ids": prompt, "token_ids": ids, "logprobs": logprobs})
        return choices

    def receive(self, name: str, tensor: torch.Tensor) -> None:
        self.received[-1][name] = tensor.detach().clone()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeWeightGroup:
    """Stands in for the trainer's side of vLLM's NCCL weight-transfer group (CUDA only)."""

    def __init__(self, server: FakeVLLMServer):
        self.server = server


def fake_broadcast_producer(iterator, group, src, post_iter_func):
    """Stands in for vLLM's ``packed_nccl_broadcast_producer``: hands each tensor to the group's server."""
    for name, tensor in iterator:
        group.server.receive(name, post_iter_func((name, tensor)))


@pytest.fixture
def vllm_env(monkeypatch):
    """Makes TRL believe vLLM is installed and replaces only the NCCL transport; restores the env it touches."""
    import trl.generation.vllm_client as vllm_client
    import trl.generation.vllm_generation as vllm_generation

    servers: dict[str, FakeVLLMServer] = {}

    def init_communicator(self, device=0):
        # TRL's steps (server_info check, world size, /init_weight_transfer_engine), minus the CUDA-only NCCL rendezvous
        if self.get_server_info()["weight_transfer_config"] is None:
            raise RuntimeError("no weight-transfer engine")
        world_size = self.get_world_size() + 1
        self._post(f"{self.base_url}/init_weight_transfer_engine", json={"init_info": {
            "master_address": "127.0.0.1", "master_port": self.group_port, "rank_offset": 1, "world_size": world_size,
        }})
        self.communicator = FakeWeightGroup(servers[self.base_url])

    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(vllm_client, "_HAS_STATEFUL_TRAINER_ENGINE", True)
    monkeypatch.setattr(vllm_client, "packed_nccl_broadcast_producer", fake_broadcast_producer, raising=False)
    monkeypatch.setattr(vllm_client.VLLMClient, "init_communicator", init_communicator)
    # TRL's colocate mode writes the distributed variables into os.environ; put them back afterwards
    env_keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env_before = {key: os.environ.get(key) for key in env_keys}
    started = []

    def start(tag, tokenizer, served_model, weight_transfer=True):
        server = FakeVLLMServer(tag, tokenizer, served_model, weight_transfer)
        servers[server.url] = server
        started.append(server)
        return server

    yield SimpleNamespace(start=start, vllm_generation=vllm_generation)
    for server in started:
        server.close()
    for key, value in env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def vllm_config(tmp_path, **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=G,
                  max_completion_length=8, max_steps=2)
    values.update(overrides)
    return AAPOConfig(**values)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------------------
# Server mode: the policy on server A, the reference on server B
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_mode_policy_and_reference_come_from_their_own_servers(tiny_model_path, tmp_path, vllm_env):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    policy_server = vllm_env.start("POLICY", tokenizer, str(tiny_model_path))
    reference_server = vllm_env.start("REFERENCE", tokenizer, str(tiny_model_path))
    config = vllm_config(tmp_path, max_steps=3, use_vllm=True, vllm_mode="server",
                         vllm_server_base_url=policy_server.url, reference_source="vllm_server",
                         reference_vllm_server_base_url=reference_server.url)
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config,
                          train_dataset=prompt_dataset())
    assert isinstance(trainer.reference, VLLMServerReference)
    recorder = Recorder(trainer)
    trainer.train()

    assert len(recorder.batches) == 3
    for batch in recorder.batches:
        assert {tag_of(tokenizer, ids) for ids in batch["completion_ids"]} == {"POLICY"}
        assert {tag_of(tokenizer, ids) for ids in batch["ref_completion_ids"]} == {"REFERENCE"}
        ref_rewards = combine_reward_functions(batch["ref_rewards_per_func"], trainer.reward_weights)
        torch.testing.assert_close(batch["advantages"], aapo_advantages(batch["rewards"], ref_rewards, G))
        assert not torch.equal(batch["rewards"], ref_rewards)  # the two servers answered differently

    # B: asked once per generation batch, for G answers to each unique prompt, with the policy's sampling settings
    ref_requests = reference_server.payloads("/v1/completions")
    policy_requests = policy_server.payloads("/v1/completions")
    assert len(ref_requests) == len(policy_requests) == 3
    for ref_request, policy_request in zip(ref_requests, policy_requests):
        assert ref_request["n"] == G and len(ref_request["prompt"]) == 6 // G
        assert ref_request["prompt"] == policy_request["prompt"]
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens"):
            assert ref_request[key] == policy_request[key], key
    # B never received weights, nor was a weight-transfer group opened with it ...
    for path in ("/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update"):
        assert path not in reference_server.paths(), path
    assert reference_server.received == []
    # ... while A received the policy before each of the 3 generations
    assert policy_server.paths().count("/init_weight_transfer_engine") == 1
    assert policy_server.paths().count("/update_weights") == 3
    assert set(policy_server.received[-1]) == {name for name, _ in trainer.model.named_parameters()}


@pytest.mark.slow
def test_server_mode_ref_update_steps_pushes_the_policy_into_the_reference_server(tiny_model_path, tmp_path, vllm_env):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    policy_server = vllm_env.start("POLICY", tokenizer, str(tiny_model_path))
    reference_server = vllm_env.start("REFERENCE", tokenizer, str(tiny_model_path))
    config = vllm_config(tmp_path, max_steps=3, ref_update_steps=2, use_vllm=True, vllm_mode="server",
                         vllm_server_base_url=policy_server.url, reference_source="vllm_server",
                         reference_vllm_server_base_url=reference_server.url)
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config,
                          train_dataset=prompt_dataset())
    policy_at = {}

    class Snapshot(TrainerCallback):  # added after the reference-update callback: sees the same weights it pushed
        def on_step_end(self, args, state, control, **kwargs):
            policy_at[state.global_step] = snapshot(trainer.model)

    trainer.add_callback(Snapshot())
    trainer.train()

    assert reference_server.paths().count("/init_weight_transfer_engine") == 1  # opened at start-up (ref_update_steps)
    assert reference_server.paths().count("/update_weights") == 1
    assert len(reference_server.received) == 1
    pushed = reference_server.received[0]
    assert set(pushed) == set(policy_at[2])
    for name, tensor in pushed.items():
        torch.testing.assert_close(tensor, policy_at[2][name], rtol=0, atol=0)
    assert not all(torch.equal(policy_at[2][n], policy_at[3][n]) for n in pushed)  # step 3 trained on
    assert trainer.reference.weight_updates == 1 and trainer.reference_updated_at_step == 2
    # the push came after step 2's reference generation and before step 3's
    paths = reference_server.paths()
    generations = [i for i, p in enumerate(paths) if p == "/v1/completions"]
    assert generations[1] < paths.index("/update_weights") < generations[2]


@pytest.mark.slow
def test_reference_server_with_a_transformers_policy_and_peft(tiny_model_path, tmp_path, vllm_env):
    from peft import LoraConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    reference_server = vllm_env.start("REFERENCE", tokenizer, str(tiny_model_path))
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = vllm_config(tmp_path, max_steps=1, reference_source="vllm_server",
                         reference_vllm_server_base_url=reference_server.url)
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config,
                          train_dataset=prompt_dataset(), peft_config=lora)
    recorder = Recorder(trainer)
    trainer.train()
    batch = recorder.batches[0]
    assert {tag_of(tokenizer, ids) for ids in batch["ref_completion_ids"]} == {"REFERENCE"}
    assert {tag_of(tokenizer, ids) for ids in batch["completion_ids"]} == {None}  # the tiny model's own words
    assert reference_server.received == [] and "/init_weight_transfer_engine" not in reference_server.paths()
    with pytest.raises(ValueError, match="ref_update_steps is not supported with PEFT"):
        AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], train_dataset=prompt_dataset(),
                    peft_config=lora, args=vllm_config(tmp_path, ref_update_steps=2, reference_source="vllm_server",
                                                       reference_vllm_server_base_url=reference_server.url))


def test_ref_update_steps_fail_at_start_up_when_the_reference_server_cannot_receive_weights(tiny_model_path, tmp_path,
                                                                                           vllm_env):
    """A server started without a weight-transfer engine (and, with the real engine, a trainer without CUDA:
    tests/vllm_engine) fails when the trainer is built, not at the first reference update."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    reference_server = vllm_env.start("REFERENCE", tokenizer, str(tiny_model_path), weight_transfer=False)
    config = vllm_config(tmp_path, ref_update_steps=2, reference_source="vllm_server",
                         reference_vllm_server_base_url=reference_server.url)
    with pytest.raises(ValueError, match=r"(?s)ref_update_steps with reference_source='vllm_server'.*CUDA.*"
                                         r"--weight-transfer-config.*no weight-transfer engine"):
        AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config, train_dataset=prompt_dataset())
    assert "/v1/completions" not in reference_server.paths()
    # a frozen reference server needs no transfer: the same server serves it
    config = vllm_config(tmp_path, reference_source="vllm_server", reference_vllm_server_base_url=reference_server.url)
    AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config, train_dataset=prompt_dataset())
    assert "/init_weight_transfer_engine" not in reference_server.paths()


def test_reference_server_needs_vllm_installed(tiny_model_path, tmp_path):
    """Without the fixture, TRL sees no vLLM: the error says what to install (and nothing imports vllm)."""
    config = vllm_config(tmp_path, reference_source="vllm_server", reference_vllm_server_base_url="http://127.0.0.1:9")
    with pytest.raises(ImportError, match=r"aapo-trl\[vllm\]"):
        AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config, train_dataset=prompt_dataset())


# ------------------------------------------------------------------------------------------------------------
# Colocate mode: one engine, the reference weights swapped in, the policy re-synced
# ------------------------------------------------------------------------------------------------------------


class FakeLLM:
    """Stands in for ``vllm.LLM`` in TRL's colocate mode: holds the weights loaded into it and answers
    "<whose weights> k", where ``whose(weights)`` is set by the test."""

    instances: list["FakeLLM"] = []

    def __init__(self, model, **kwargs):
        self.weights: dict[str, torch.Tensor] = {}
        self.events: list[tuple] = []
        self.whose = lambda weights: "UNKNOWN"
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.counter = 0
        runner_model = SimpleNamespace(load_weights=self._load_weights)
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=runner_model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker),
                                          model_config=SimpleNamespace(max_model_len=2048))
        FakeLLM.instances.append(self)

    def _load_weights(self, pairs):
        for name, tensor in pairs:
            self.weights[name] = tensor.detach().clone()
        self.events.append(("load",))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.events.append(("sleep", level))
        if level == 2:  # vLLM's level 2 discards the weights
            self.weights = {}

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tuple(tags or ())))

    def generate(self, prompts, sampling_params=None, use_tqdm=False):
        tag = self.whose(self.weights)
        self.events.append(("generate", tag, len(prompts)))
        outputs = []
        for prompt in prompts:
            k, self.counter = self.counter % 3, self.counter + 1
            ids = self.tokenizer(f"{tag} {k}")["input_ids"] + [self.tokenizer.eos_token_id]
            logprobs = [{t: SimpleNamespace(logprob=-1.0, rank=1)} for t in ids]
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"],
                                           outputs=[SimpleNamespace(token_ids=ids, logprobs=logprobs)]))
        return outputs


def fake_sampling_params(**kwargs):
    return SimpleNamespace(**kwargs)


def same_weights(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    return set(loaded) == set(reference) and all(torch.equal(loaded[n], reference[n]) for n in loaded)


@pytest.fixture
def colocate_env(vllm_env, monkeypatch):
    FakeLLM.instances.clear()
    monkeypatch.setattr(vllm_env.vllm_generation, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(vllm_env.vllm_generation, "SamplingParams", fake_sampling_params, raising=False)
    return vllm_env


@pytest.mark.slow
@pytest.mark.parametrize("sleep_mode", [False, True])
def test_colocate_mode_swaps_the_reference_in_and_resyncs_the_policy(tiny_model_path, tmp_path, colocate_env,
                                                                     sleep_mode):
    config = vllm_config(tmp_path, max_steps=2, use_vllm=True, vllm_mode="colocate", reference_source="vllm_colocate",
                         eval_strategy="no", per_device_eval_batch_size=6, eval_reference_rollouts=True,
                         vllm_enable_sleep_mode=sleep_mode)
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config,
                          train_dataset=prompt_dataset(), eval_dataset=prompt_dataset(2))  # one eval batch
    assert isinstance(trainer.reference, ColocatedVLLMReference)
    assert next(trainer.reference.model.parameters()).device.type == "cpu"  # the reference copy stays off the GPU
    perturb_(trainer.model)  # the policy differs from the reference from the first step on
    (engine,) = FakeLLM.instances
    reference_weights = snapshot(trainer.reference.model)

    def whose(weights):
        if same_weights(weights, snapshot(trainer.model)):
            return "POLICY"
        if same_weights(weights, reference_weights):
            return "REFERENCE"
        return "STALE"

    engine.whose = whose
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    recorder = Recorder(trainer)
    trainer.train()
    # two evaluations at the same global step: without the forced re-sync the second one would generate the
    # "policy" completions with the reference weights still in the engine
    trainer.evaluate()
    trainer.evaluate()

    generations = [event[1] for event in engine.events if event[0] == "generate"]
    assert generations == ["POLICY", "REFERENCE"] * 4
    for batch in recorder.batches:
        assert {tag_of(tokenizer, ids) for ids in batch["completion_ids"]} == {"POLICY"}
        assert {tag_of(tokenizer, ids) for ids in batch["ref_completion_ids"]} == {"REFERENCE"}
        ref_rewards = combine_reward_functions(batch["ref_rewards_per_func"], trainer.reward_weights)
        torch.testing.assert_close(batch["advantages"], aapo_advantages(batch["rewards"], ref_rewards, G))
    # each reference generation: load the reference, reset the prefix cache (its KV came from the policy), generate
    events = [e[0] if e[0] != "generate" else e[1] for e in engine.events if e[0] not in ("load", "sleep")]
    for index, event in enumerate(events):
        if event == "REFERENCE":
            assert events[index - 1] == ("wake_up" if sleep_mode else "reset_prefix_cache")  # sleep: KV cache wakes
            assert "reset_prefix_cache" in events[index - 3 : index]
    assert trainer._last_loaded_step == -1 and trainer.reference.weight_loads == 4
    assert torch.equal(trainer.reference.parameters_fingerprint(), torch.stack(
        [p.double().sum() for p in reference_weights.values()]))  # the reference never trained


@pytest.mark.slow
def test_colocate_mode_with_peft_swaps_in_the_unmerged_base_weights(tiny_model_path, tmp_path, colocate_env):
    from peft import LoraConfig

    # a fresh LoRA (B = 0): the base is the initial policy (a trained adapter: tests/test_reference.py)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = vllm_config(tmp_path, max_steps=1, use_vllm=True, vllm_mode="colocate", reference_source="vllm_colocate",
                         learning_rate=0.0)
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config,
                          train_dataset=prompt_dataset(), peft_config=lora)
    assert isinstance(trainer.reference, ColocatedVLLMReference)
    assert isinstance(trainer.reference.weights, PeftBaseReference)
    with torch.no_grad():  # the adapter as if trained: the policy now differs from the base
        for name, parameter in trainer.model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    (engine,) = FakeLLM.instances
    base = snapshot(AutoModelForCausalLM.from_pretrained(tiny_model_path))
    loads = []
    engine.whose = lambda weights: (loads.append({n: t.clone() for n, t in weights.items()}), "ANY")[1]
    trainer.train()

    policy_load, reference_load = loads
    assert set(policy_load) == set(reference_load) == set(base)  # vLLM's names: no LoRA tensors, no PEFT prefixes
    # the reference is the base model, bit for bit: the policy push before it merged the adapter out of place
    # (push_peft_policy_without_merging), where TRL's merge/unmerge round trip would have moved the base ...
    assert trainer.peft_push_without_merging
    for name in base:
        assert torch.equal(reference_load[name], base[name]), name
    # ... while the policy pushed has the adapters merged in
    lora_targets = [n for n in base if "q_proj" in n or "v_proj" in n]
    assert all((policy_load[n] - base[n]).abs().max() > 1e-3 for n in lora_targets)
    assert all(torch.equal(policy_load[n], base[n]) for n in base if n not in lora_targets)
    assert trainer._last_loaded_step == -1


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.04])  # beta != 0: TRL adds the "ref" adapter itself
def test_colocate_mode_with_a_trained_peft_adapter_swaps_in_the_merged_initial_policy(tiny_model_path, tmp_path,
                                                                                     colocate_env, beta):
    """A PeftModel arriving with a trained adapter (and a trained modules_to_save head): the reference is base +
    that adapter as it was at step 0, merged; the policy push carries no tensor of the frozen copy."""
    import copy

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                      task_type="CAUSAL_LM")
    # an output embedding of its own: vLLM loads tied embeddings as one tensor, so an lm_head copy on a tied model is
    # refused (tests/test_reference_adapters.py)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path, tie_word_embeddings=False), lora)
    perturb_(policy, scale=0.1)
    with torch.no_grad():  # perturb_ moved the base too: an SFT adapter on top of that base
        initial = copy.deepcopy(policy).merge_and_unload()
    config = vllm_config(tmp_path, max_steps=1, use_vllm=True, vllm_mode="colocate", reference_source="vllm_colocate",
                         learning_rate=0.0, beta=beta, loss_type="aapo" if beta == 0 else "grpo")
    trainer = AAPOTrainer(policy, reward_funcs=[tagged_reward], args=config, train_dataset=prompt_dataset())
    (engine,) = FakeLLM.instances
    loads = []
    engine.whose = lambda weights: (loads.append({n: t.clone() for n, t in weights.items()}), "ANY")[1]
    with torch.no_grad():  # the policy's adapter trains from step 0 on
        for name, parameter in trainer.model.named_parameters():
            if ".default." in name:
                parameter.add_(0.5)
    trainer.train()

    policy_load, reference_load = loads
    expected = dict(initial.named_parameters())
    assert set(policy_load) == set(reference_load) == set(expected)  # vLLM's names only
    for name in expected:
        torch.testing.assert_close(reference_load[name], expected[name])
    assert any(not torch.equal(policy_load[name], reference_load[name]) for name in expected)


# ------------------------------------------------------------------------------------------------------------
# Fail fast
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(reference_source="vllm_server"), "needs the reference server's address"),
        (dict(reference_source="vllm_server", reference_vllm_server_base_url="http://localhost:8000", use_vllm=True,
              vllm_mode="server", vllm_server_base_url="http://127.0.0.1:8000"), "is the policy's vLLM server"),
        (dict(reference_source="vllm_server", reference_vllm_server_host="0.0.0.0", reference_vllm_server_port=8000,
              use_vllm=True, vllm_mode="server"), "is the policy's vLLM server"),
        (dict(reference_source="vllm_colocate"), "needs use_vllm=True and vllm_mode='colocate'"),
        (dict(reference_source="vllm_colocate", use_vllm=True, vllm_mode="server"), "vllm_mode='colocate'"),
        (dict(reference_vllm_server_base_url="http://localhost:8001"), "set reference_source='vllm_server'"),
        (dict(reference_source="cache", ref_update_steps=20), "cannot be used with reference_source='cache'"),
        (dict(ref_rollouts_path="cache/"), "set reference_source='cache'"),
        (dict(reference_source="vllm"), "reference_source must be one of"),
    ],
)
def test_inconsistent_reference_settings_fail_at_configuration(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        vllm_config(tmp_path, **overrides)


def test_reference_server_settings_that_work(tmp_path):
    config = vllm_config(tmp_path, reference_source="vllm_server", reference_vllm_server_host="10.0.0.2",
                         use_vllm=True, vllm_mode="server", vllm_server_host="10.0.0.1")
    assert config.reference_server_url == "http://10.0.0.2:8001"
    assert vllm_config(tmp_path, reference_source="vllm_server",
                       reference_vllm_server_base_url="http://ref:8001/").reference_server_url == "http://ref:8001"


def test_modules_import_without_vllm():
    import subprocess
    import sys

    code = (
        "import sys, aapo_trl.reference, aapo_trl.ref_rollouts, aapo_trl.trainers.aapo, aapo_trl.cli; "
        "aapo_trl.cli.build_parser(); assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if 'vllm' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------------------
# The updated reference survives a resume (ref_update_steps)
# ------------------------------------------------------------------------------------------------------------


def fingerprint(model) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in model.parameters()])


class AtTrainBegin(TrainerCallback):
    def __init__(self, action):
        self.action = action

    def on_train_begin(self, args, state, control, **kwargs):
        self.action()


@pytest.mark.slow
def test_resume_restores_the_updated_reference_copy(tiny_model_path, tmp_path):
    from aapo_trl.trainers.aapo import REFERENCE_STATE_FILENAME

    def make(max_steps):
        config = vllm_config(tmp_path, max_steps=max_steps, ref_update_steps=1, save_strategy="steps", save_steps=1)
        return AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], args=config,
                           train_dataset=prompt_dataset())

    first = make(1)
    initial = first.reference.parameters_fingerprint()
    first.train()
    checkpoint = tmp_path / "checkpoint-1"
    saved_policy = fingerprint(AutoModelForCausalLM.from_pretrained(checkpoint))
    torch.testing.assert_close(first.reference.parameters_fingerprint(), saved_policy)
    assert not torch.equal(initial, saved_policy)

    resumed, seen = make(2), []
    resumed.add_callback(AtTrainBegin(lambda: seen.append(resumed.reference.parameters_fingerprint())))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(seen[0], saved_policy)  # not the initial policy
    assert resumed.reference_updated_at_step == 2

    (checkpoint / REFERENCE_STATE_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match="holds no aapo_reference_state.json"):
        make(2).train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.slow
def test_resume_at_an_update_step_pushes_the_policy_into_the_reference_server(tiny_model_path, tmp_path, vllm_env):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    reference_server = vllm_env.start("REFERENCE", tokenizer, str(tiny_model_path))

    def make(max_steps):
        config = vllm_config(tmp_path, max_steps=max_steps, ref_update_steps=1, save_strategy="steps", save_steps=1,
                             reference_source="vllm_server", reference_vllm_server_base_url=reference_server.url)
        return AAPOTrainer(str(tiny_model_path), reward_funcs=[tagged_reward], args=config,
                           train_dataset=prompt_dataset())

    make(1).train()
    assert len(reference_server.received) == 1
    resumed = make(2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    # a push at train begin (the resumed policy, i.e. the reference of step 1), then the step-2 update
    assert len(reference_server.received) == 3
    saved = snapshot(AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1"))
    for name, tensor in reference_server.received[1].items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
