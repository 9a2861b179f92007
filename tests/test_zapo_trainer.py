"""Real ZAPOTrainer steps on the tiny offline model: an all-correct, an all-wrong and a mixed group."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _training import CPU_ARGS, Recorder
from datasets import Dataset, IterableDataset

from aapo_trl.configs import ZAPOConfig
from aapo_trl.entropy import group_semantic_entropies
from aapo_trl.trainers import ZAPOTrainer
from aapo_trl.zapo_math import zapo_advantages

pytestmark = pytest.mark.slow

NUM_GENERATIONS = 4
PROMPTS = {"easy": "What is 1 + 1?", "hard": "What is 2 + 2?", "mixed": "What is 3 + 3?"}


def dataset():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": text}], "solution": kind}
                              for kind, text in PROMPTS.items()])


def scripted_reward(completions, solution, **kwargs):
    """All-correct for the easy prompt, all-wrong (0.1) for the hard one, one right answer in the mixed group."""
    rewards, seen_mixed = [], 0
    for kind in solution:
        if kind == "easy":
            rewards.append(1.0)
        elif kind == "hard":
            rewards.append(0.1)
        else:
            rewards.append(1.0 if seen_mixed == 0 else 0.1)
            seen_mixed += 1
    return rewards


def zapo_config(tmp_path, **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=12,
                  num_generations=NUM_GENERATIONS, max_completion_length=8, max_steps=2, temperature=1.0)
    values.update(overrides)
    return ZAPOConfig(**values)


def independent_statistics(model, output, rows):
    """Log-likelihood, token entropy and pooled last hidden state of `rows`, from a plain forward pass."""
    prompt_ids, prompt_mask = output["prompt_ids"][rows], output["prompt_mask"][rows]
    completion_ids, completion_mask = output["completion_ids"][rows], output["completion_mask"][rows]
    with torch.no_grad():
        result = model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                       attention_mask=torch.cat([prompt_mask, completion_mask], 1), output_hidden_states=True)
    length = completion_ids.size(1)
    logits = result.logits[:, -length - 1 : -1].float()
    logprobs = F.log_softmax(logits, dim=-1)
    token_logps = logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    mask = completion_mask.float()
    hidden = result.hidden_states[-1][:, -length:].float()
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return ((token_logps * mask).sum(1) / mask.sum(1), (entropy * mask).sum(1) / mask.sum(1),
            F.normalize(pooled, dim=-1))


def test_zapo_advantages_are_the_pure_functions_of_the_captured_statistics(tiny_model_path, tmp_path):
    trainer = ZAPOTrainer(str(tiny_model_path), reward_funcs=[scripted_reward], args=zapo_config(tmp_path),
                          train_dataset=dataset())
    outputs = []
    generate = trainer._generate_and_score_completions

    def keep_output(inputs):
        output = generate(inputs)
        outputs.append({k: v.clone() for k, v in output.items() if isinstance(v, torch.Tensor)})
        return output

    trainer._generate_and_score_completions = keep_output
    model_before_step = [p.detach().clone() for p in trainer.model.parameters()]
    recorder = Recorder(trainer)
    statistics = []
    entropies = trainer._entropies

    def keep_statistics(*args, **kwargs):
        result = entropies(*args, **kwargs)
        statistics.append({k: v.clone() for k, v in trainer._last_entropy_inputs.items()})
        return result

    trainer._entropies = keep_statistics
    trainer.train()

    for step, (batch, stats) in enumerate(zip(recorder.batches, statistics), start=1):
        rewards = batch["rewards"]
        groups = rewards.view(-1, NUM_GENERATIONS)
        kinds = sorted("easy" if g.min() == 1 else "hard" if g.max() == 0.1 else "mixed" for g in groups)
        assert kinds == ["easy", "hard", "mixed"]
        zero_groups = torch.tensor([bool(g.max() == g.min()) for g in groups])
        se, _ = group_semantic_entropies(stats["embeddings"], stats["seq_logps"], NUM_GENERATIONS, zero_groups,
                                         step=step, base_seed=trainer.args.seed)
        te = torch.where(zero_groups.repeat_interleave(NUM_GENERATIONS), stats["token_entropy"],
                         torch.tensor(float("nan")))
        expected = zapo_advantages(rewards, NUM_GENERATIONS, se, te, step=step, total_steps=2).advantages
        torch.testing.assert_close(batch["advantages"], expected)
        # zero-advantage rows got DAER's non-zero signal, every row of the mixed group TDAR's
        assert (batch["advantages"].abs() > 0).all()
    seen = torch.cat(recorder.loss_advantages).sort().values
    torch.testing.assert_close(seen, torch.cat([b["advantages"] for b in recorder.batches]).sort().values)

    # the hooked statistics of step 1 equal an independent forward pass of the model before the update
    with torch.no_grad():
        for parameter, before in zip(trainer.model.parameters(), model_before_step):
            parameter.copy_(before)
    first = statistics[0]
    rows = (~torch.isnan(first["seq_logps"])).nonzero().flatten()
    assert rows.numel() == 8  # the easy and the hard group
    seq_logps, token_entropy, embeddings = independent_statistics(trainer.model, outputs[0], rows)
    torch.testing.assert_close(first["seq_logps"][rows], seq_logps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first["token_entropy"][rows], token_entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first["embeddings"][rows], embeddings, atol=1e-4, rtol=1e-4)

    logged = trainer.state.log_history[0]
    assert logged["zapo/easy_groups"] == 1 and logged["zapo/hard_groups"] == 1
    for name in ("zapo/se_mean", "zapo/te_mean", "zapo/k_mean", "zapo/daer_adv_abs_mean", "zapo/tdar_multiplier_mean",
                 "zero_adv/frac_groups", "zero_adv/frac_groups_final", "zero_adv/all_zero_batch"):
        assert name in logged, name
    assert logged["zero_adv/frac_groups"] == pytest.approx(2 / 3)
    assert logged["zero_adv/frac_groups_final"] == 0


def test_without_daer_the_extra_forward_pass_is_skipped(tiny_model_path, tmp_path):
    trainer = ZAPOTrainer(str(tiny_model_path), reward_funcs=[scripted_reward],
                          args=zapo_config(tmp_path, max_steps=1, use_daer=False), train_dataset=dataset())
    trainer._completion_statistics = lambda *a, **k: pytest.fail("DAER is off: no extra forward pass")
    recorder = Recorder(trainer)
    trainer.train()
    advantages = recorder.batches[0]["advantages"].view(-1, NUM_GENERATIONS)
    assert sorted(int((g != 0).sum()) for g in advantages) == [0, 0, NUM_GENERATIONS]
    assert trainer.state.log_history[0]["zero_adv/frac_groups_final"] == pytest.approx(2 / 3)


def test_total_steps_must_be_known(tiny_model_path, tmp_path):
    stream = IterableDataset.from_generator(lambda: iter(dataset()))
    with pytest.raises(ValueError, match="max_steps"):
        ZAPOTrainer(str(tiny_model_path), reward_funcs=[scripted_reward], args=zapo_config(tmp_path, max_steps=-1),
                    train_dataset=stream)


def recording_total_steps(trainer):
    """Wrap ``trainer.total_steps`` so that every T the advantage step used is recorded."""
    seen, total_steps = [], trainer.total_steps

    def recorded():
        seen.append(total_steps())
        return seen[-1]

    trainer.total_steps = recorded
    return seen


EVAL_DATASET_TYPES = ["dataset", "iterable_dataset", "dataset_dict", "iterable_dataset_dict", "dict_of_dataset",
                      "dict_of_iterable_dataset"]


@pytest.mark.parametrize("eval_dataset_type", EVAL_DATASET_TYPES)
def test_evaluate_with_eval_dataset_before_train(tiny_model_path, tmp_path, eval_dataset_type):
    """TRL's test_evaluate_with_eval_dataset for ZAPO, offline: no max_steps, a sized training set, evaluate()
    before train() with every kind of eval set. T is the total train() will plan (3 epochs of one step here)."""
    from datasets import DatasetDict, IterableDatasetDict

    streaming = "iterable" in eval_dataset_type
    split = dataset().to_iterable_dataset() if streaming else dataset()
    if eval_dataset_type in ("dataset", "iterable_dataset"):
        eval_dataset = split
    elif eval_dataset_type in ("dataset_dict", "iterable_dataset_dict"):
        eval_dataset = (IterableDatasetDict if streaming else DatasetDict)({"data1": split, "data2": split})
    else:
        eval_dataset = {"data1": split, "data2": split}
    trainer = ZAPOTrainer(str(tiny_model_path), reward_funcs=[scripted_reward], train_dataset=dataset(),
                          args=zapo_config(tmp_path, max_steps=-1, per_device_eval_batch_size=12))
    seen = recording_total_steps(trainer)
    metrics = trainer.evaluate(eval_dataset=eval_dataset)
    if eval_dataset_type in ("dataset", "iterable_dataset"):
        assert metrics["eval_loss"] is not None
    else:
        assert metrics["eval_data1_loss"] is not None and metrics["eval_data2_loss"] is not None
    # one generation batch (12 rows) holds the 3 prompts x 4 generations: 1 step per epoch, 3 epochs (TRL's default)
    assert seen and set(seen) == {3}


def test_evaluate_before_train_uses_the_total_steps_training_then_uses(tiny_model_path, tmp_path):
    """Gradient accumulation, steps_per_generation, num_iterations and epochs all enter T."""
    train_dataset = dataset().select([0, 2])  # the easy and the mixed prompt
    config = zapo_config(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=4,
                         per_device_eval_batch_size=4, gradient_accumulation_steps=2, num_iterations=2)
    assert config.steps_per_generation == 2
    trainer = ZAPOTrainer(str(tiny_model_path), reward_funcs=[scripted_reward], args=config,
                          train_dataset=train_dataset, eval_dataset=train_dataset)
    seen = recording_total_steps(trainer)
    trainer.evaluate()
    in_evaluation = list(seen)
    seen.clear()
    trainer.train()
    # an epoch: 2 prompts x 4 generations x (num_iterations 2 x steps_per_generation 2) = 32 rows, in DataLoader
    # batches of 4 x 2 = 8 rows -> 4 batches -> 4 / gradient_accumulation 2 = 2 optimizer steps; 2 epochs -> T = 4
    assert trainer.state.max_steps == 4
    assert set(in_evaluation) == {4} and set(seen) == {4}
    assert len(seen) == 2  # one generation batch per 2 optimizer steps (steps_per_generation / grad. accumulation)

