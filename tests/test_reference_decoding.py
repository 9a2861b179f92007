"""The reference's completions reach the reward functions in the form TRL gives the policy's.

TRL 1.16 parses a conversational completion with ``parse_response`` when the tokenizer carries a response template
(reasoning split from the content, the end-of-turn token stripped, tool calls parsed), and decodes it with
``batch_decode(skip_special_tokens=True)`` otherwise. Were the reference decoded differently, a reward function would
read two kinds of text and the margin r - r_ref would measure the decoding. The tokenizer here is the tiny model's
(SmolLM2, ChatML) with TRL's ChatML response template set on it, offline.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _training import CPU_ARGS, prompt_dataset, text_of
from transformers import AutoTokenizer
from trl.chat_template_utils import parse_response, qwen3_template

from aapo_trl.configs import AAPOConfig
from aapo_trl.ref_rollouts import build_ref_rollouts, tokenize_prompts
from aapo_trl.trainers import AAPOTrainer

#: Completions as a reasoning model writes them: the parser splits the reasoning off and strips the end of turn.
TEXTS = ["<think>\nadd them\n</think>\n\n{n}<|im_end|>", "The answer is {n}.<|im_end|>",
         "<think>hmm</think>{n}<|im_end|>"]


def template_tokenizer(tiny_model_path, response_template=True):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    if response_template:
        tokenizer.response_template = qwen3_template  # ChatML, as SmolLM2's chat template
    return tokenizer


def completion_ids(tokenizer, rows: int) -> list[list[int]]:
    return [tokenizer(TEXTS[row % len(TEXTS)].format(n=row), add_special_tokens=False)["input_ids"]
            for row in range(rows)]


def test_decode_completions_parses_with_the_response_template_as_trl_does(tiny_model_path):
    from aapo_trl.reference import decode_completions

    tokenizer = template_tokenizer(tiny_model_path)
    prompts = [row["prompt"] for row in prompt_dataset(3)]
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    ids = completion_ids(tokenizer, 3)

    parsed = decode_completions(tokenizer, prompts, prompt_ids, ids)
    assert parsed == [[parse_response(tokenizer, row, prefix=prefix, tools=[])] for row, prefix in zip(ids, prompt_ids)]
    assert parsed[0] == [{"role": "assistant", "reasoning_content": "add them", "content": "0"}]
    assert parsed[1] == [{"role": "assistant", "content": "The answer is 1."}]

    plain = template_tokenizer(tiny_model_path, response_template=False)
    assert decode_completions(plain, prompts, prompt_ids, ids)[0] == [
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n0"}]  # <|im_end|> is a special token
    texts = ["What is 1 + 2?"] * 3  # text prompts: plain decoding, template or not
    assert decode_completions(tokenizer, texts, prompt_ids, ids) == tokenizer.batch_decode(ids, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["frozen_copy", "peft"])
def test_reward_functions_read_the_reference_completion_as_trl_gives_the_policy_s(tiny_model_path, tmp_path,
                                                                                  monkeypatch, policy):
    """The policy and the reference produce the same token ids; the reward function must receive the same
    completions for both (TRL decodes the policy's; AAPO the reference's, whatever source sampled them)."""
    from peft import LoraConfig

    tokenizer = template_tokenizer(tiny_model_path)
    seen = []

    def recording_reward(completions, **kwargs):
        seen.append(copy.deepcopy(completions))
        return [float(len(text_of(completion))) for completion in completions]

    config = AAPOConfig(**dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                               max_completion_length=24, max_steps=1))
    peft_config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM") if policy == "peft" else None
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[recording_reward], args=config,
                          train_dataset=prompt_dataset(), processing_class=tokenizer, peft_config=peft_config)

    def fixed_policy_rows(prompt_ids, *args, **kwargs):
        return completion_ids(tokenizer, len(prompt_ids)), None

    def fixed_reference_rows(prompt_ids, num_generations):
        return completion_ids(tokenizer, len(prompt_ids))

    monkeypatch.setattr(trainer, "_generate_single_turn", fixed_policy_rows)
    monkeypatch.setattr(trainer, "_sample_reference", fixed_reference_rows)  # every reference source returns ids here
    trainer.train()

    policy_completions, reference_completions = seen
    assert policy_completions[0][0]["reasoning_content"] == "add them"  # TRL parsed the policy's
    assert reference_completions == policy_completions
    assert trainer._last_reference["completions"] == policy_completions
    margins = torch.tensor(trainer.state.log_history[0]["aapo/margin_mean"])
    assert margins == 0  # the same completions score the same


def test_the_cache_scores_reference_completions_as_trl_gives_the_policy_s(tiny_model_path, tmp_path):
    tokenizer = template_tokenizer(tiny_model_path)
    dataset = prompt_dataset(2)
    prompt_ids = tokenize_prompts(tokenizer, dataset["prompt"])
    seen = []

    def recording_reward(completions, **kwargs):
        seen.extend(copy.deepcopy(completions))
        return [1.0] * len(completions)

    class FixedSampler:
        name = "fixed"

        def sample(self, prompt_ids, num_generations, seeds):
            return [completion_ids(tokenizer, num_generations) for _ in prompt_ids]

    built = build_ref_rollouts(dataset, tmp_path / "cache", num_generations=2, reward_funcs=[recording_reward],
                               tokenizer=tokenizer, sampler=FixedSampler(), progress=False)
    ids = completion_ids(tokenizer, 2)
    expected = [[parse_response(tokenizer, row, prefix=prefix, tools=[])] for prefix in prompt_ids for row in ids]
    assert seen == expected
    assert seen[0][0]["content"] == "0" and "reasoning_content" in seen[0][0]
    assert built["ref_completions"][0] == tokenizer.batch_decode(ids, skip_special_tokens=True)  # for inspection
