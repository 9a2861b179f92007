#!/usr/bin/env python
"""What AAPO-LoRA's batched reference costs in one ``generate`` call, against the floor that call can reach.

    python benchmarks/batched_reference_floor.py [--rows 24] [--new-tokens 48] [--rounds 3] [--model embedded|tiny]
        [--device cpu|cuda]

``benchmarks/step_overhead.py`` measures whole steps (aapo_peft against grpo_peft); this isolates the generation
call, where the whole difference lies. The PEFT policy of the step benchmark (LoRA r 16 on every linear layer,
dropout 0.05, training mode, no_grad as TRL samples) generates, on the built-in arithmetic prompts (4 prompts,
``--rows`` rows), exactly ``--new-tokens`` tokens per row (``min_new_tokens``: every call does the same work) at
temperature 0.7:

* ``policy xN``: GRPO-LoRA's call;
* ``row blocks``: AAPO-LoRA's batched call, N policy rows and N reference rows (adapters off), through
  ``aapo_trl.reference.adapter_row_blocks``;
* ``base x2N`` and ``base xN``: the same rows with the adapters off (no LoRA layer computes);
* ``policy x2N``: LoRA on every row.

The calls are interleaved, round by round, in alternating order (as in step_overhead.py). No exact batched call can
skip the base layers of the reference rows or the LoRA of the policy rows, so its floor is ``base x2N`` + (``policy
xN`` - ``base xN``); the last lines print the batched call against that floor and against GRPO-LoRA's call.
Measured in docs/RESULTS.md, section 2. On a lent GPU: ``bash benchmarks/gpu_smoke.sh floor`` (docs/GPU_SMOKE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=24, help="policy rows per call (the step benchmark's 4 x 6)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up call")
    parser.add_argument("--model", default="embedded", help="embedded (SmolLM2-135M-Instruct), tiny, or a folder")
    parser.add_argument("--device", default="cpu", help="where the model runs (fp32 either way): cpu or cuda")
    args = parser.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aapo_trl.data import make_arithmetic_dataset
    from aapo_trl.models import resolve_model_path
    from aapo_trl.reference import adapter_row_blocks

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device)
    # step_overhead.py's PEFT_ARGS (r 16, alpha 32, all linear layers) and TRL's ModelConfig dropout (0.05)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter (PEFT initialises B to 0); what it computes does not change the cost
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    model.train()  # TRL samples the policy in training mode (LoRA dropout on)

    prompts = [row["prompt"] for row in make_arithmetic_dataset(num_train=4)["train"]]
    texts = [tokenizer.apply_chat_template(prompts[i % len(prompts)], tokenize=False, add_generation_prompt=True)
             for i in range(2 * args.rows)]
    sampling = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)
    n = args.rows
    policy, batched = f"policy x{n} (GRPO-LoRA)", f"row blocks: policy x{n} + reference x{n}"
    base_double, base_single = f"base x{2 * n} (adapters off)", f"base x{n} (adapters off)"
    calls = {
        policy: (n, contextlib.nullcontext),
        batched: (2 * n, lambda: adapter_row_blocks(model, [("default", n), ("__base__", n)])),
        base_double: (2 * n, model.disable_adapter),
        base_single: (n, model.disable_adapter),
        f"policy x{2 * n} (LoRA on every row)": (2 * n, contextlib.nullcontext),
    }

    def synchronize() -> None:  # a CUDA call returns before its kernels finish
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()

    def generate(rows: int, context) -> float:
        batch = tokenizer(texts[:rows], return_tensors="pt", padding=True).to(args.device)
        synchronize()
        start = time.perf_counter()
        with torch.no_grad(), context():
            model.generate(**batch, **sampling)
        synchronize()
        return time.perf_counter() - start

    generate(n, contextlib.nullcontext)  # warm-up
    seconds = {name: [] for name in calls}
    for round_index in range(args.rounds):
        order = list(calls) if round_index % 2 == 0 else list(reversed(calls))
        for name in order:
            seconds[name].append(generate(*calls[name]))

    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{args.device}, torch threads {torch.get_num_threads()}, {args.rounds} rounds, {n} policy rows, "
          f"{args.new_tokens} tokens")
    lora_cost = median[policy] - median[base_single]
    reference_rows_cost = median[base_double] - median[base_single]
    floor = median[base_double] + lora_cost
    lines = [(name, median[name], f"x{median[name] / median[policy]:5.3f}  ({', '.join(f'{v:.2f}' for v in values)})")
             for name, values in seconds.items()]
    lines += [(f"LoRA of the policy rows (policy x{n} - base x{n})", lora_cost, ""),
              (f"reference rows' base layers (base x{2 * n} - base x{n})", reference_rows_cost, ""),
              ("floor of an exact batched call", floor, f"x{floor / median[policy]:5.3f}")]
    for name, value, note in lines:
        print(f"{name:52s} {value:7.2f} s  {note}")
    for name, ratio in (("row blocks / floor", median[batched] / floor),
                        ("row blocks / GRPO-LoRA's call", median[batched] / median[policy])):
        print(f"{name:52s} {ratio:7.3f}")


if __name__ == "__main__":
    main()
