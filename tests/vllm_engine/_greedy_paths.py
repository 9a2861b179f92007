"""Whether sampled completions are greedy completions of given weights, on every CPU: exact ties allowed.

The real-engine tests sample with ``top_k=1`` and ask whether the samples are the greedy completions of the weights
that should have produced them (the reference's, not the policy's). ``top_k=1`` keeps every token whose logit equals
the maximum and samples among them, while greedy decoding (temperature 0) takes the first, so where two logits tie
exactly the two may differ, at random. bfloat16 logits tie often (8 significant bits: around 32 the next value is
0.25 away), and whether they tie depends on the CPU's kernels: on a CPU with AVX-512 bf16 instructions the embedded
model's tokens 2068 and 35 tie after one of the recorded prompts (both log-prob -2.278607), on an AVX2 CPU they do
not. So a completion counts as a greedy completion when, at every step, its token has the maximal log-prob that the
engine gives that step: where it leaves the greedy completion, its token must be tied at the maximum in the greedy
run's own log-probs, and from there on it must be a greedy completion (in the same sense) of the longer prefix.

The check is pure Python: the engine comes in as ``greedy_decode`` (:func:`engine_greedy_decode` for a ``vllm.LLM``),
and tests/vllm_engine/test_greedy_paths.py checks the rules with hand-made log-probs (an exact tie at the maximum
among them) in every environment; test_engine_ties.py checks them on the real engine with ties made on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

# token id -> log-prob: one step's most likely tokens, as vLLM returns them for ``SamplingParams(logprobs=N)``
TopLogprobs = dict[int, float]
# prompts (token ids), max_tokens -> per prompt: its greedy completion and each step's top log-probs
GreedyDecode = Callable[[list[list[int]], int], list[tuple[list[int], list[TopLogprobs]]]]
# log-probs per greedy step: enough to see every token tied at the maximum
TOP_LOGPROBS = 5


def tied_at_maximum(token: int, top: TopLogprobs) -> bool:
    """Whether ``token`` has the step's maximal log-prob.

    A token missing from ``top`` has not, unless every token of ``top`` is tied at the maximum: then the tie may be
    wider than ``top`` shows, which raises (ask the engine for more log-probs).
    """
    best = max(top.values())
    if token in top:
        return top[token] == best
    if len(top) > 1 and all(logprob == best for logprob in top.values()):
        raise ValueError(f"all {len(top)} top log-probs tie at the maximum and token {token} is not among them: the "
                         f"tie may include it; ask for more log-probs per step")
    return False


def is_greedy_path(prompt: Sequence[int], completion: Sequence[int], greedy: tuple[list[int], list[TopLogprobs]],
                   greedy_decode: GreedyDecode, max_tokens: int, end_token_ids: Collection[int]) -> bool:
    """Whether greedy decoding, breaking exact ties either way, can produce ``completion`` after ``prompt``.

    ``greedy``: the engine's greedy completion of ``prompt`` (at most ``max_tokens`` tokens) with each step's top
    log-probs; ``greedy_decode`` continues after a tie. A completion ends at a token of ``end_token_ids`` or after
    ``max_tokens`` tokens, as the engine's do.
    """
    completion = list(completion)
    tokens, tops = greedy
    start = 0  # completion[:start] is explained
    while True:
        rest = completion[start:]
        step = next((i for i, (token, expected) in enumerate(zip(rest, tokens)) if token != expected), None)
        if step is None:  # one is a prefix of the other: equal, or one stopped where the other went on
            return len(rest) == len(tokens)
        if not tied_at_maximum(rest[step], tops[step]):
            return False
        start += step + 1
        if start == len(completion):
            return completion[-1] in end_token_ids or start == max_tokens
        if completion[start - 1] in end_token_ids:
            return False  # the engine stops at an end token
        tokens, tops = greedy_decode([list(prompt) + completion[:start]], max_tokens - start)[0]


def greedy_paths(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], greedy_decode: GreedyDecode,
                 max_tokens: int, end_token_ids: Collection[int]) -> list[bool]:
    """:func:`is_greedy_path` for each prompt and its completion; the greedy completions in one batch."""
    decoded = greedy_decode([list(p) for p in prompts], max_tokens)
    return [is_greedy_path(prompt, completion, greedy, greedy_decode, max_tokens, end_token_ids)
            for prompt, completion, greedy in zip(prompts, completions, decoded, strict=True)]


def end_token_ids(model_path) -> set[int]:
    """The tokens vLLM ends a completion at for this checkpoint: the tokenizer's EOS and the generation config's."""
    from transformers import AutoTokenizer, GenerationConfig

    ends = {AutoTokenizer.from_pretrained(model_path).eos_token_id}
    try:
        configured = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    ends.update(configured if isinstance(configured, list) else [configured])
    return ends - {None}


def engine_greedy_decode(llm, top_logprobs: int = TOP_LOGPROBS) -> GreedyDecode:
    """A ``vllm.LLM``'s greedy completions with each step's ``top_logprobs`` top log-probs (vLLM's greedy is
    ``argmax``, its log-probs those of the logits it takes the ``argmax`` of)."""
    from vllm import SamplingParams

    def greedy_decode(prompts, max_tokens):
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                               SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=top_logprobs),
                               use_tqdm=False)
        return [(list(output.outputs[0].token_ids),
                 [{token: logprob.logprob for token, logprob in step.items()} for step in output.outputs[0].logprobs])
                for output in outputs]

    return greedy_decode
