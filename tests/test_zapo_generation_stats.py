"""ZAPO's DAER statistics taken from generation (``zapo_statistics_source="generation"``) against the forward pass.

The forward pass (``"forward"``, ZAPO's own no-grad pass through TRL's fused LM head) is the reference. Tolerances:
mean log-probs and token entropies to 1e-5 absolute (float32 sums over <= 12 tokens of a 49k vocabulary, one
computed step by step on the KV cache, the other in one pass), embeddings to 1e-5 absolute per coordinate of the
unit vector (cosine >= 1 - 1e-6). The statistics are the same definitions, not approximations: the log-prob of the
sampled token and the entropy under ``softmax(logits / temperature)`` (no top-k/top-p/repetition penalty, as TRL's
training path scores them), and the mean final hidden state over every completion token up to its first EOS,
including the token sampled last (fed through one more backbone step on generate's cache).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from _training import CPU_ARGS, Recorder
from datasets import Dataset
from test_zapo_trainer import scripted_reward  # all-correct easy, all-wrong hard, one right answer in mixed

from aapo_trl.configs import ZAPOConfig
from aapo_trl.entropy import generation_sequence_statistics, temperature_scaled_token_statistics
from aapo_trl.trainers import ZAPOTrainer

NUM_GENERATIONS = 4
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
# prompts of different lengths, so that the generation batch is left-padded
PROMPTS = {"easy": "What is 1 + 1?", "hard": "Compute the sum of two and two, then explain each step briefly.",
           "mixed": "What is 3 + 3?"}


# ---- the pure functions ------------------------------------------------------------------------------------------

def test_temperature_scaled_token_statistics_match_the_definition():
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf")], [0.5, 0.5, 0.5, 0.5]])
    log_probs, entropy = temperature_scaled_token_statistics(logits, temperature=0.5)
    expected = F.log_softmax(logits / 0.5, dim=-1)
    torch.testing.assert_close(log_probs, expected)
    probs = expected.exp()
    torch.testing.assert_close(entropy[0], -(probs[0, :3] * expected[0, :3]).sum())  # a -inf logit adds nothing
    torch.testing.assert_close(entropy[1], torch.tensor(math.log(4.0)))
    assert log_probs.dtype == torch.float32 and entropy.shape == (2,)


def test_temperature_scaled_token_statistics_refuse_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        temperature_scaled_token_statistics(torch.zeros(1, 3), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        temperature_scaled_token_statistics(torch.zeros(3), temperature=1.0)


def test_generation_sequence_statistics_masks_each_response_at_its_length():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 9.0, 9.0]])
    entropies = torch.tensor([[1.0, 2.0, 3.0], [5.0, 9.0, 9.0]])
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[3.0, 4.0], [9.0, 9.0], [9.0, 9.0]]])
    lengths = torch.tensor([3, 1])
    seq_logps, token_entropy, embeddings, pooled = generation_sequence_statistics(
        token_logps, entropies, hidden, lengths
    )
    torch.testing.assert_close(seq_logps, torch.tensor([-2.0, -4.0]))
    torch.testing.assert_close(token_entropy, torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(embeddings, F.normalize(torch.tensor([[2.0, 2.0], [3.0, 4.0]]), dim=1))
    assert pooled.tolist() == [3, 1]


def test_generation_sequence_statistics_pool_only_the_hidden_states_known():
    """The hidden state of the token sampled last is absent (m = n - 1): that row pools one token fewer."""
    token_logps, entropies = torch.zeros(2, 3), torch.zeros(2, 3)
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [7.0, 7.0]]])
    _, _, embeddings, pooled = generation_sequence_statistics(token_logps, entropies, hidden, torch.tensor([3, 1]))
    assert pooled.tolist() == [2, 1]
    torch.testing.assert_close(embeddings, F.normalize(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), dim=1))
    _, _, none_known, pooled = generation_sequence_statistics(
        token_logps, entropies, torch.zeros(2, 0, 2), torch.tensor([3, 1])
    )
    assert torch.isnan(none_known).all() and pooled.tolist() == [0, 0]


def test_generation_sequence_statistics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        generation_sequence_statistics(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 3, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="fed_hidden_states"):
        generation_sequence_statistics(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="lengths"):
        generation_sequence_statistics(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, 4), torch.tensor([1, 4]))


def test_the_source_is_validated_with_the_field_name(tmp_path):
    with pytest.raises(ValueError, match="zapo_statistics_source must be one of"):
        ZAPOConfig(output_dir=str(tmp_path), zapo_statistics_source="vllm", use_cpu=True, report_to=[])


# ---- real ZAPO steps on the tiny model ------------------------------------------------------------------------

def dataset():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": text}], "solution": kind}
                              for kind, text in PROMPTS.items()])


def make_trainer(tiny_model_path, tmp_path, source="generation", early_eos=True, **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path / source), per_device_train_batch_size=12,
                  num_generations=NUM_GENERATIONS, max_completion_length=12, max_steps=1, temperature=0.7,
                  zapo_statistics_source=source)
    values.update(overrides)
    trainer = ZAPOTrainer(str(tiny_model_path), reward_funcs=[scripted_reward], args=ZAPOConfig(**values),
                          train_dataset=dataset())
    if early_eos:
        # The random tiny model almost never samples its EOS: make a 16th of the vocabulary end a completion, so
        # that completions stop at different steps (padding after EOS) and some run to the length limit.
        eos = list(range(0, trainer.model.config.vocab_size, 16))
        trainer.eos_token_ids = eos
        trainer.generation_config.eos_token_id = eos
        trainer.generation_kwargs["eos_token_id"] = eos
    return trainer


def count_no_grad_forwards(trainer) -> list:
    """Record every no-grad call of TRL's log-prob pass (ZAPO's extra forward, TRL's old-log-prob pass)."""
    calls = []
    original = trainer._get_per_token_logps_and_entropies

    def counting(model, input_ids, *args, **kwargs):
        if not torch.is_grad_enabled():
            calls.append(input_ids.size(0))
        return original(model, input_ids, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = counting
    return calls


def compare_with_the_forward_pass(trainer) -> list[dict]:
    """For each round: the collected statistics of every row, and the forward pass's, on the same model."""
    records = []
    collected_of = trainer._statistics_from_round

    def comparing(output, local_needed):
        everything = torch.ones_like(local_needed)
        seq_logps, token_entropy, embeddings, covered = collected_of(output, everything)
        reference = trainer._completion_statistics(output, everything)
        records.append({
            "collected": (seq_logps, token_entropy, embeddings), "covered": covered, "reference": reference,
            "source": trainer._collected_statistics.source, "completion_mask": output["completion_mask"].clone(),
            "prompt_mask": output["prompt_mask"].clone(),
        })
        return collected_of(output, local_needed)

    trainer._statistics_from_round = comparing
    return records


def assert_same_statistics(record):
    seq_logps, token_entropy, embeddings = record["collected"]
    ref_logps, ref_entropy, ref_embeddings = record["reference"]
    torch.testing.assert_close(seq_logps, ref_logps, **TOLERANCE)
    torch.testing.assert_close(token_entropy, ref_entropy, **TOLERANCE)
    torch.testing.assert_close(embeddings, ref_embeddings, **TOLERANCE)
    assert (F.cosine_similarity(embeddings, ref_embeddings, dim=1) >= 1 - 1e-6).all()


@pytest.mark.slow
def test_statistics_collected_while_generating_match_the_forward_pass(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path)
    records = compare_with_the_forward_pass(trainer)
    trainer.train()
    assert len(records) == 1
    lengths = torch.cat([r["completion_mask"].sum(1) for r in records])
    width = records[0]["completion_mask"].size(1)
    assert lengths.min() < width and len(set(lengths.tolist())) > 2  # EOS at different steps, padding after it
    assert all(bool((r["prompt_mask"] == 0).any()) for r in records)  # left-padded prompts
    for record in records:
        assert record["source"] == "generation"
        assert record["covered"].all()
        assert_same_statistics(record)


@pytest.mark.slow
def test_a_zapo_step_from_generation_equals_the_forward_path_without_its_forward(tiny_model_path, tmp_path):
    results = {}
    for source in ("generation", "forward"):
        trainer = make_trainer(tiny_model_path, tmp_path, source=source)
        recorder = Recorder(trainer)
        calls = count_no_grad_forwards(trainer)
        trainer.train()
        results[source] = (recorder, calls, trainer.state.log_history)
    generation, forward = results["generation"], results["forward"]
    assert generation[1] == []  # no forward pass ran before the loss: the statistics came from generate
    assert len(forward[1]) == 1 and forward[1][0] >= NUM_GENERATIONS  # the reference: the zero-advantage groups
    for ours, reference in zip(generation[0].batches, forward[0].batches, strict=True):
        assert ours["completion_ids"] == reference["completion_ids"]  # same samples: the hooks draw no randomness
        torch.testing.assert_close(ours["advantages"], reference["advantages"], **TOLERANCE)
        # DAER gave the scorable rows of zero-advantage groups a signal, from the statistics generation collected
        rewards = ours["rewards"].view(-1, NUM_GENERATIONS)
        scorable = ~rewards.isnan()
        filled = rewards.nan_to_num(nan=0.5)
        zero_groups = (filled.where(scorable, -math.inf).amax(1) == filled.where(scorable, math.inf).amin(1))
        daer_rows = zero_groups.unsqueeze(1) & scorable
        assert bool(daer_rows.any())
        assert (ours["advantages"].view(-1, NUM_GENERATIONS)[daer_rows] != 0).all()
    assert generation[2][0]["zapo/stats_forward_frac"] == 0.0
    assert forward[2][0]["zapo/stats_forward_frac"] == 1.0
    for ours, reference in zip(generation[2][:1], forward[2][:1], strict=True):
        for name in ("zapo/se_mean", "zapo/te_mean", "zapo/k_mean"):
            assert ours[name] == pytest.approx(reference[name], abs=1e-5), name


@pytest.mark.slow
def test_the_old_log_prob_pass_of_trl_provides_the_statistics(tiny_model_path, tmp_path):
    """num_iterations=2: TRL runs its no-grad old-log-prob forward, and ZAPO takes its statistics from it."""
    trainer = make_trainer(tiny_model_path, tmp_path, num_iterations=2, max_steps=2)
    calls = count_no_grad_forwards(trainer)
    records = compare_with_the_forward_pass(trainer)
    trainer.train()
    assert len(records) == 1  # one generation for the two iterations
    # TRL's pass over the 12 completions, then the comparison's reference pass; the advantage step ran none
    assert calls == [12, 12]
    assert trainer.state.log_history[0]["zapo/stats_forward_frac"] == 0.0
    assert records[0]["source"] == "old_logps_forward" and records[0]["covered"].all()
    assert_same_statistics(records[0])


@pytest.mark.slow
def test_rows_generation_could_not_cover_fall_back_to_the_forward_pass(tiny_model_path, tmp_path):
    """Without the last backbone step (sharded parameters), rows that end at the last step go through the forward."""
    trainer = make_trainer(tiny_model_path, tmp_path)
    trainer._parameters_sharded = lambda: True
    recorder = Recorder(trainer)
    calls = count_no_grad_forwards(trainer)
    trainer.train()
    fraction = trainer.state.log_history[0]["zapo/stats_forward_frac"]
    assert 0 < fraction < 1 and len(calls) == 1 and 0 < calls[0] < 8

    reference = make_trainer(tiny_model_path, tmp_path, source="forward")
    reference_recorder = Recorder(reference)
    reference.train()
    torch.testing.assert_close(recorder.batches[0]["advantages"], reference_recorder.batches[0]["advantages"],
                               **TOLERANCE)


def test_vllm_and_other_paths_without_generate_hooks_fall_back(tiny_model_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tmp_path, early_eos=False)
    assert trainer._statistics_capture_plan() == "generation"
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, False
    assert trainer._statistics_capture_plan() is None  # vLLM samples elsewhere: ZAPO's forward pass
    trainer.vllm_importance_sampling_correction = True
    assert trainer._statistics_capture_plan() == "old_logps_forward"  # TRL's importance-sampling pass
    trainer.use_vllm = False
    trainer.tools = [len]
    assert trainer._statistics_capture_plan() is None  # several generations per completion
    trainer.tools = None
    trainer.args.zapo_statistics_source = "forward"
    assert trainer._statistics_capture_plan() is None


# ---- generate calls whose recorded steps cannot describe the returned rows (issue 26, part 9) -------------------

# TRL's own tests/test_grpo_trainer.py::test_train_with_generation_kwargs (beam sampling, 2 beams per row)
TRL_GENERATION_KWARGS = {"do_sample": True, "top_k": 50, "num_beams": 2, "length_penalty": -0.1}


@pytest.mark.slow
def test_a_zapo_step_with_trls_beam_generation_kwargs_takes_its_statistics_from_the_forward_pass(
    tiny_model_path, tmp_path, caplog
):
    results = {}
    for source in ("generation", "forward"):
        trainer = make_trainer(tiny_model_path, tmp_path, source=source, generation_kwargs=TRL_GENERATION_KWARGS)
        recorder = Recorder(trainer)
        calls = count_no_grad_forwards(trainer)
        with caplog.at_level(logging.WARNING, logger="aapo_trl.trainers.zapo"):
            trainer.train()
        results[source] = (trainer, recorder, calls)
    fallbacks = [r.getMessage() for r in caplog.records if "zapo_statistics_source='generation'" in r.getMessage()]
    assert len(fallbacks) == 1 and "beam search (num_beams=2)" in fallbacks[0]  # said once, for the generation run
    trainer, recorder, calls = results["generation"]
    assert trainer._statistics_capture_plan() is None  # beams: no hooks on generate
    assert trainer.state.log_history[0]["zapo/stats_forward_frac"] == 1.0
    assert len(calls) == 1 and calls[0] >= NUM_GENERATIONS  # ZAPO's own forward over the zero-advantage groups
    _, reference, _ = results["forward"]
    for ours, theirs in zip(recorder.batches, reference.batches, strict=True):
        assert ours["completion_ids"] == theirs["completion_ids"]
        torch.testing.assert_close(ours["advantages"], theirs["advantages"], **TOLERANCE)
        assert bool((ours["advantages"] != 0).any())


@pytest.mark.parametrize("generation_kwargs, reason", [
    (TRL_GENERATION_KWARGS, "beam"),
    ({"num_beams": 2}, "beam"),
    ({"do_sample": True, "num_return_sequences": 2}, "num_return_sequences"),
    ({"do_sample": False, "penalty_alpha": 0.6, "top_k": 4}, "contrastive_search"),
    ({"do_sample": True, "prompt_lookup_num_tokens": 3}, "assisted_generation"),
])
def test_generation_modes_that_expand_or_reorder_rows_are_not_recorded(generation_kwargs, reason):
    from transformers import GenerationConfig

    from aapo_trl.trainers.zapo import generation_statistics_unsupported

    assert reason in generation_statistics_unsupported(GenerationConfig(**generation_kwargs))
    assert generation_statistics_unsupported(GenerationConfig(do_sample=True, top_k=50, top_p=0.9)) is None
    assert generation_statistics_unsupported(GenerationConfig(do_sample=False)) is None


def test_recorded_steps_of_expanded_rows_are_refused_not_stacked(tiny_model_path):
    """Whatever ``generate`` does, steps recorded for rows other than the returned ones give no statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aapo_trl.trainers.zapo import _GenerationRecorder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts = tokenizer(["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"], return_tensors="pt")
    recorder = _GenerationRecorder(model, temperature=1.0)
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            sequences = model.generate(**prompts, **TRL_GENERATION_KWARGS, max_new_tokens=6, min_new_tokens=6,
                                       pad_token_id=tokenizer.pad_token_id)
    finally:
        recorder.remove()
    completions = sequences[:, prompts["input_ids"].size(1):].tolist()
    assert len(completions) == 3 and recorder.token_logps[0].size(0) == 6  # the steps ran on 2 beams per row
    with torch.no_grad():
        assert recorder.finish(completions, tokenizer.pad_token_id, feed_last_token=True) is None
