"""In-training evaluation: a slice of one of the papers' benchmarks every N steps, with the trainer's
own model, logged as ``eval/<benchmark>/pass@1`` (and ``pass@k`` when enough samples are drawn).

    from aapo_trl.eval_callback import BenchmarkEvalCallback

    trainer = AAPOTrainer(...)
    trainer.add_callback(BenchmarkEvalCallback(trainer, benchmark="math_500", data_dir="data/eval",
                                               eval_steps=50, num_problems=32, num_samples=4))
    trainer.train()

No lighteval pipeline is started (no task registry, no model reload, no sample cache): the problems
are read once with ``datasets``, prompted exactly as the lighteval task prompts them (the open-rs
user message inside the tokenizer's chat template), sampled with ``model.generate`` under
``torch.no_grad`` with a forked RNG (training randomness is untouched), and scored with the task's
own extractive match (lighteval's metric class, math-verify). On several processes the problems are
split across them and the sums gathered; under DeepSpeed ZeRO-3 the weights are gathered for
generation (TRL's ``unwrap_model_for_generation``), so the processes need not generate in lockstep.

The numbers are the benchmark's metric on a small slice with the settings given here (e.g. fewer new
tokens than the papers' 32768); they track training, they are not the papers' numbers -- use
``aapo-trl eval`` on saved checkpoints for those.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback

from .evaluation import evaluation_module

logger = logging.getLogger(__name__)


class BenchmarkEvalCallback(TrainerCallback):
    """Evaluate ``num_problems`` problems of ``benchmark`` every ``eval_steps`` optimizer steps.

    Args:
        trainer: The trainer whose model is evaluated and whose log receives the metrics (as TRL's own
            callbacks take it).
        benchmark: ``aime24``, ``math_500``, ``amc23``, ``minerva`` or ``olympiadbench``.
        eval_steps: Evaluate when ``global_step % eval_steps == 0``.
        num_problems: Size of the slice (a seeded random subset, the same at every evaluation;
            ``None``: the whole split).
        num_samples: Samples per problem; pass@1 is their mean, pass@k is added for k in {8, 16, 32,
            64} with ``k <= num_samples``.
        temperature, top_p, top_k: Sampling (defaults: AAPO's 0.6 / 0.95, no top-k).
        max_new_tokens: Generation budget per sample.
        batch_size: Prompts per ``generate`` call (each expanded to ``num_samples`` sequences).
        dataset, data_dir: Where the rows come from (a local folder or Hub id, see
            ``evaluation/benchmarks.py``); default: the Hub dataset.
        system_prompt: Optional system message (default: none, as the open-rs evaluation).
        eval_on_start: Also evaluate before the first step (logged at step 0).
        seed: Seed of the slice and of the sampling RNG.
    """

    def __init__(
        self,
        trainer: Trainer,
        benchmark: str = "math_500",
        eval_steps: int = 50,
        num_problems: int | None = 16,
        num_samples: int = 4,
        temperature: float = 0.6,
        top_p: float = 0.95,
        top_k: int = 0,
        max_new_tokens: int = 1024,
        batch_size: int = 8,
        dataset: str | None = None,
        data_dir: str | None = None,
        system_prompt: str | None = None,
        eval_on_start: bool = False,
        seed: int = 0,
    ):
        if eval_steps < 1:
            raise ValueError("eval_steps must be >= 1")
        if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
            raise ValueError("num_samples, batch_size and max_new_tokens must be >= 1")
        if num_samples > 1 and temperature <= 0:
            raise ValueError("several samples per problem need temperature > 0")
        self.trainer = trainer
        self._benchmarks = evaluation_module("benchmarks")
        self._tasks = evaluation_module("tasks")  # lighteval's metric classes (no pipeline)
        self.bench = self._benchmarks.benchmark(benchmark)
        self.eval_steps = eval_steps
        self.num_problems = num_problems
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.source = self._benchmarks.resolve_dataset(self.bench, {self.bench.key: dataset} if dataset else None,
                                                       data_dir)
        self.system_prompt = system_prompt
        self.eval_on_start = eval_on_start
        self.seed = seed
        self._scorer = self._tasks.extractive_match(self.bench.gold_kind)
        self._prompt = self._tasks.make_prompt_function(self.bench)
        self._rows: list[dict[str, Any]] | None = None
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------------------------------------
    # Trainer events
    # ----------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.rows()
        if self.eval_on_start and state.global_step == 0:
            self._evaluate_and_log()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step % self.eval_steps == 0:
            self._evaluate_and_log()
        return control

    # ----------------------------------------------------------------------------------------------
    # Evaluation
    # ----------------------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"eval/{self.bench.key}"

    def rows(self) -> list[dict[str, Any]]:
        """The evaluated slice (read once)."""
        if self._rows is None:
            rows = self._benchmarks.load_rows(self.bench, self.source)
            if self.num_problems is not None and self.num_problems < len(rows):
                chosen = sorted(random.Random(self.seed).sample(range(len(rows)), self.num_problems))
                rows = [rows[i] for i in chosen]
            self._rows = rows
        return self._rows

    def _evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.history.append({"step": self.trainer.state.global_step, **metrics})
        # transformers.Trainer.log, not the subclass's: TRL's GRPOTrainer.log would fold (and reset)
        # its buffered training metrics into this entry.
        Trainer.log(self.trainer, dict(metrics))
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Sample, score and aggregate; returns ``{"eval/<benchmark>/pass@1": ..., ...}``."""
        from trl.models.utils import unwrap_model_for_generation

        trainer = self.trainer
        accelerator = trainer.accelerator
        tokenizer = trainer.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps the tokenizer
        rows = self.rows()
        mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
        started = time.time()
        per_problem: list[list[float]] = []
        lengths: list[int] = []
        model_wrapped = trainer.model_wrapped
        was_training = trainer.model.training
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), unwrap_model_for_generation(
                model_wrapped, accelerator
            ) as model:
                torch.manual_seed(self.seed + trainer.state.global_step)
                model.eval()
                for start in range(0, len(mine), self.batch_size):
                    batch = [rows[i] for i in mine[start : start + self.batch_size]]
                    completions, batch_lengths = self._generate(model, tokenizer, batch)
                    lengths.extend(batch_lengths)
                    for row, texts in zip(batch, completions):
                        per_problem.append(self._score(row, texts))
        finally:
            if was_training:
                trainer.model.train()
        local = self._aggregate(per_problem, lengths)
        gathered = accelerator.gather_object([local]) if accelerator.num_processes > 1 else [local]
        metrics = self._combine(gathered)
        metrics[f"{self.prefix}/seconds"] = round(time.time() - started, 2)
        return metrics

    def _messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": self.bench.query(row)}]

    def _generate(self, model, tokenizer, rows: Sequence[dict[str, Any]]) -> tuple[list[list[str]], list[int]]:
        if getattr(tokenizer, "chat_template", None):
            prompts = [tokenizer.apply_chat_template(self._messages(r), tokenize=False, add_generation_prompt=True)
                       for r in rows]
        else:
            prompts = [self.bench.query(r) for r in rows]
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tokenizer.padding_side = padding_side
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        sampling = self.temperature > 0
        output = model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            temperature=self.temperature if sampling else None,
            top_p=self.top_p if sampling else None,
            top_k=self.top_k if sampling else None,
            num_return_sequences=self.num_samples,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        eos = tokenizer.eos_token_id
        lengths = []
        for sequence in new_tokens.tolist():
            length = sequence.index(eos) if eos is not None and eos in sequence else len(sequence)
            lengths.append(length)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        grouped = [texts[i * self.num_samples : (i + 1) * self.num_samples] for i in range(len(rows))]
        return grouped, lengths

    def _score(self, row: dict[str, Any], texts: Sequence[str]) -> list[float]:
        from lighteval.models.model_output import ModelResponse

        doc = self._prompt(row, self.bench.task_name)
        return [float(self._scorer.compute(doc, ModelResponse(text=[text]))) for text in texts]

    def _aggregate(self, per_problem: list[list[float]], lengths: list[int]) -> dict[str, Any]:
        sums: dict[str, float] = {}
        for scores in per_problem:
            for name, value in self._benchmarks.pass_at_ks(scores, self.num_samples).items():
                sums[name] = sums.get(name, 0.0) + value
        return {"problems": len(per_problem), "sums": sums, "tokens": sum(lengths), "samples": len(lengths)}

    def _combine(self, parts: Sequence[dict[str, Any]]) -> dict[str, float]:
        problems = sum(p["problems"] for p in parts)
        metrics: dict[str, float] = {}
        for name in self._benchmarks.metric_names(self.num_samples):
            if problems:
                metrics[f"{self.prefix}/{name}"] = sum(p["sums"].get(name, 0.0) for p in parts) / problems
        samples = sum(p["samples"] for p in parts)
        if samples:
            metrics[f"{self.prefix}/mean_completion_tokens"] = sum(p["tokens"] for p in parts) / samples
        metrics[f"{self.prefix}/num_problems"] = float(problems)
        return metrics


__all__ = ["BenchmarkEvalCallback"]
