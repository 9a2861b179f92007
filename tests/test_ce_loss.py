"""The CE losses of AAPO Eq. 4 / GPG run inside TRL's own loss computation (issue 14, parts 10 and 11).

Real tiny training steps: each test wraps the trainer's ``_compute_loss`` and checks, on the very batch and
model state TRL trains on, the loss (and its gradient) against the paper's formula
(:func:`aapo_trl.advantages.cross_entropy_policy_loss`) plus what TRL adds around the per-token term, with the
expectations of TRL's own implementation (entropy bonus, adaptive coefficient, high-entropy mask, router aux
loss, their metrics).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _training import CPU_ARGS, hashed_reward, prompt_dataset
from transformers import AutoTokenizer, GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM
from trl import GRPOConfig, GRPOTrainer

from aapo_trl.advantages import cross_entropy_policy_loss
from aapo_trl.configs import AAPOConfig, GPGConfig, GRPOBaselineConfig
from aapo_trl.trainers import AAPOTrainer, GPGTrainer, GRPOBaselineTrainer

CE_TRAINERS = [(AAPOTrainer, AAPOConfig), (GPGTrainer, GPGConfig)]
CE_IDS = ["aapo", "gpg"]


def small_values(tmp_path, **overrides):
    values = dict(CPU_ARGS, output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=3,
                  max_completion_length=6, max_steps=1)
    values.update(overrides)
    return values


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def gradient(loss, model):
    grads = torch.autograd.grad(loss, trainable(model), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainable(model))]


class LossProbe:
    """Wraps ``_compute_loss``: per call, the trainer's loss and gradient next to the expected ones.

    ``expected(trainer, model, inputs) -> loss`` builds the expected loss with autograd on the same model state.
    """

    def __init__(self, trainer, expected):
        self.calls = []
        compute_loss = trainer._compute_loss

        def probing(model, inputs):
            want = expected(trainer, model, inputs)  # first: TRL's loss updates the entropy controller's state
            loss = compute_loss(model, inputs)
            self.calls.append({
                "inputs": {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()},
                "loss": loss.detach().clone(),
                "expected": want.detach().clone(),
                "grad": gradient(loss, model),
                "expected_grad": gradient(want, model),
            })
            return loss

        trainer._compute_loss = probing

    def assert_matches(self, exact=False):
        assert any(call["loss"] != 0 for call in self.calls), "every loss is 0: nothing was compared"
        for call in self.calls:
            if exact:
                assert torch.equal(call["loss"], call["expected"])
            torch.testing.assert_close(call["loss"], call["expected"], rtol=1e-5, atol=1e-7)
            for got, want in zip(call["grad"], call["expected_grad"]):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-9)


def log_probs_and_entropies(trainer, model, inputs, **kwargs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return trainer._get_per_token_logps_and_entropies(
        model, ids, attention, inputs["completion_ids"].size(1), compute_entropy=True, **kwargs
    )


def paper_normalizer(trainer, inputs):
    """Completion tokens of the whole generation batch, per micro-batch of the accumulation window."""
    return (inputs["num_items_in_batch"] * trainer.current_gradient_accumulation_steps
            / trainer.args.steps_per_generation)


def eq4(trainer, model, inputs, token_weights=None, token_mask=None):
    logps, _, _ = log_probs_and_entropies(trainer, model, inputs)
    if token_weights is not None:
        logps = logps * token_weights
    mask = inputs["completion_mask"] if token_mask is None else inputs["completion_mask"] * token_mask
    return cross_entropy_policy_loss(logps, inputs["advantages"], mask, paper_normalizer(trainer, inputs))


def assert_parameters_changed(before, model):
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert changed, "no parameter changed"


# ------------------------------------------------------------------------------------------- the per-token term


@pytest.mark.parametrize("trainer_class, config_class", CE_TRAINERS, ids=CE_IDS)
def test_on_policy_loss_and_gradient_are_eq4_exactly(trainer_class, config_class, tiny_model_path, tmp_path):
    args = config_class(**small_values(tmp_path, gradient_accumulation_steps=2, max_steps=2))
    trainer = trainer_class(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(6),
                            args=args)
    probe = LossProbe(trainer, eq4)
    trainer.train()
    assert len(probe.calls) == 4
    assert all("old_per_token_logps" not in call["inputs"] for call in probe.calls)  # on-policy: weight 1
    probe.assert_matches(exact=True)
    logs = trainer.state.log_history[0]
    assert "entropy" in logs and "cispo_clip_ratio" not in logs  # the borrowed branch logs nothing of its own
    assert trainer.loss_type == args.loss_type and trainer.epsilon_high == args.epsilon  # restored


def test_loss_type_and_clip_are_restored_when_the_loss_raises(tiny_model_path, tmp_path):
    trainer = GPGTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(2),
                         args=GPGConfig(**small_values(tmp_path)))

    def failing_forward(*args, **kwargs):
        assert trainer.loss_type == "cispo" and trainer.epsilon_high == float("inf")
        raise RuntimeError("forward failed")

    trainer._get_per_token_logps_and_entropies = failing_forward
    with pytest.raises(RuntimeError, match="forward failed"):
        trainer._compute_loss(trainer.model, {"prompt_ids": torch.zeros(1, 1, dtype=torch.long),
                                               "prompt_mask": torch.ones(1, 1, dtype=torch.long),
                                               "completion_ids": torch.zeros(1, 1, dtype=torch.long),
                                               "completion_mask": torch.ones(1, 1, dtype=torch.long)})
    assert trainer.loss_type == "gpg" and trainer.epsilon_high == trainer.args.epsilon


# ------------------------------------------------------------------------------- part 10: stale samples


def stale_weights(trainer, model, inputs):
    """exp(log pi - log pi_old), detached: the importance weight of ce_off_policy_correction='importance_weight'."""
    with torch.no_grad():
        logps, _, _ = log_probs_and_entropies(trainer, model, inputs)
    return torch.exp(logps - inputs["old_per_token_logps"])


def train_on_weighted_eq4(trainer, importance_weights):
    """Two passes over one generation batch, each loss checked against Eq. 4 with every token's log-prob times
    ``importance_weights(trainer, model, inputs)``; returns the probe and those weights, pass by pass."""
    weights = []

    def expected(trainer, model, inputs):
        weights.append(importance_weights(trainer, model, inputs))
        return eq4(trainer, model, inputs, token_weights=weights[-1])

    probe = LossProbe(trainer, expected)
    trainer.train()
    assert len(probe.calls) == 2 and all("old_per_token_logps" in call["inputs"] for call in probe.calls)
    probe.assert_matches()
    return probe, weights


@pytest.mark.parametrize("trainer_class, config_class", CE_TRAINERS, ids=CE_IDS)
def test_stale_samples_are_importance_weighted_without_clipping(trainer_class, config_class, tiny_model_path,
                                                                tmp_path):
    args = config_class(**small_values(tmp_path, num_iterations=2, max_steps=2, learning_rate=0.1))  # the default
    trainer = trainer_class(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(2),
                            args=args)
    probe, weights = train_on_weighted_eq4(trainer, stale_weights)
    mask = probe.calls[1]["inputs"]["completion_mask"].bool()
    # first pass: the sampling policy itself; second pass, one optimizer step later: weights far from 1 and
    # outside any PPO clip range (no clipping)
    torch.testing.assert_close(weights[0][mask], torch.ones_like(weights[0][mask]), rtol=1e-5, atol=1e-5)
    assert (weights[1][mask] - 1).abs().max() > 0.2
    assert ((weights[1][mask] > 1.28) | (weights[1][mask] < 0.8)).any()


def test_stale_samples_without_correction_train_on_the_plain_ce_loss(tiny_model_path, tmp_path):
    args = GPGConfig(**small_values(tmp_path, num_iterations=2, max_steps=2, learning_rate=0.1,
                                    ce_off_policy_correction="none"))
    trainer = GPGTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(2),
                         args=args)
    probe = LossProbe(trainer, eq4)
    trainer.train()
    assert len(probe.calls) == 2 and all("old_per_token_logps" in call["inputs"] for call in probe.calls)
    probe.assert_matches()


def test_no_correction_drops_the_old_log_probs_but_keeps_them_for_the_off_policy_mask():
    from aapo_trl.trainers.base import _without_importance_weight

    old, sampled = torch.full((2, 3), -1.0), torch.full((2, 3), -2.0)
    batch = {"advantages": torch.ones(2), "old_per_token_logps": old}
    stripped = _without_importance_weight(batch)
    assert "old_per_token_logps" not in stripped and stripped["sampling_per_token_logps"] is old
    assert "old_per_token_logps" in batch  # the buffered batch is left alone for the next pass
    with_vllm = _without_importance_weight({**batch, "sampling_per_token_logps": sampled})
    assert with_vllm["sampling_per_token_logps"] is sampled
    on_policy = {"advantages": torch.ones(2)}
    assert _without_importance_weight(on_policy) is on_policy


def test_off_policy_sequence_mask_applies_to_the_ce_loss(tiny_model_path, tmp_path):
    args = GPGConfig(**small_values(tmp_path, num_iterations=2, max_steps=2, learning_rate=0.1,
                                    off_policy_mask_threshold=-1.0))
    trainer = GPGTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(2),
                         args=args)
    dropped = []

    def expected(trainer, model, inputs):
        weights = stale_weights(trainer, model, inputs)
        with torch.no_grad():
            logps, _, _ = log_probs_and_entropies(trainer, model, inputs)
        advantages = inputs["advantages"].unsqueeze(1)
        keep = GPGTrainer.get_off_policy_mask(advantages, logps, inputs["old_per_token_logps"],
                                              inputs["completion_mask"], -1.0)
        dropped.append(int((keep == 0).sum()))
        return eq4(trainer, model, inputs, token_weights=weights, token_mask=keep)

    probe = LossProbe(trainer, expected)
    trainer.train()
    probe.assert_matches()
    # a threshold below any mean KL on these passes: every negative-advantage sequence is dropped
    assert all(count > 0 for count in dropped)


@pytest.mark.parametrize("config_class", [AAPOConfig, GPGConfig], ids=CE_IDS)
@pytest.mark.parametrize("stale", [dict(num_iterations=2), dict(steps_per_generation=4, gradient_accumulation_steps=2),
                                   dict(steps_per_generation=4, gradient_accumulation_steps=6)])
def test_error_refuses_stale_samples_naming_the_fields(config_class, stale, tmp_path):
    with pytest.raises(ValueError, match="ce_off_policy_correction='error'.*num_iterations.*steps_per_generation"):
        config_class(**small_values(tmp_path, ce_off_policy_correction="error", **stale))


@pytest.mark.parametrize("on_policy", [dict(),
                                       dict(num_iterations=2, steps_per_generation=1, gradient_accumulation_steps=2),
                                       dict(steps_per_generation=2, gradient_accumulation_steps=4)])
def test_error_accepts_on_policy_settings_and_other_loss_types(on_policy, tmp_path):
    assert GPGConfig(**small_values(tmp_path, ce_off_policy_correction="error", **on_policy))
    assert GPGConfig(**small_values(tmp_path, ce_off_policy_correction="error", loss_type="grpo", num_iterations=2))


def test_unknown_off_policy_correction_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ce_off_policy_correction must be one of"):
        AAPOConfig(**small_values(tmp_path, ce_off_policy_correction="clip"))


# ------------------------------------------------------- issue 26, part 8: TRL's other settings of its loss


@pytest.mark.parametrize("config_class", [AAPOConfig, GPGConfig], ids=CE_IDS)
@pytest.mark.parametrize("name, value", [("delta", 1.5), ("epsilon_high", 0.28)])
def test_trls_clip_settings_are_refused_by_the_ce_losses_naming_the_field(config_class, name, value, tmp_path):
    with pytest.raises(ValueError, match=rf"^{name}={value} is .* no clipped ratio.* Leave {name} unset"):
        config_class(**small_values(tmp_path, **{name: value}))
    assert config_class(**small_values(tmp_path, loss_type="grpo", **{name: value}))  # TRL's clipped loss uses it


def test_an_unknown_importance_sampling_level_is_refused_before_any_generation(tmp_path):
    with pytest.raises(ValueError, match=r"importance_sampling_level must be one of \('token', 'sequence'\)"):
        GPGConfig(**small_values(tmp_path, importance_sampling_level="tokens"))


def warnings_about_the_sequence_level(config_class, tmp_path, **fields):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config_class(**small_values(tmp_path, **fields))
    return [str(w.message) for w in caught if "importance_sampling_level='sequence'" in str(w.message)]


@pytest.mark.parametrize("config_class", [AAPOConfig, GPGConfig], ids=CE_IDS)
def test_sequence_level_importance_sampling_of_the_ce_loss_is_warned_about(config_class, tmp_path):
    """TRL warns for its 'cispo' term with sequence-level ratios; the CE losses borrow that term, so they warn too."""
    (message,) = warnings_about_the_sequence_level(config_class, tmp_path, importance_sampling_level="sequence")
    loss_type = config_class.__dataclass_fields__["loss_type"].default
    assert f"loss_type={loss_type!r}" in message and "one per completion" in message
    assert warnings_about_the_sequence_level(config_class, tmp_path) == []  # token level: the papers' setting
    assert warnings_about_the_sequence_level(config_class, tmp_path, loss_type="grpo",
                                             importance_sampling_level="sequence") == []  # GSPO as TRL defines it


def sequence_stale_weights(trainer, model, inputs):
    """TRL's sequence-level ratio: exp of the masked mean of log(pi / pi_old) over each completion, detached."""
    with torch.no_grad():
        logps, _, _ = log_probs_and_entropies(trainer, model, inputs)
    mask = inputs["completion_mask"]
    log_ratio = ((logps - inputs["old_per_token_logps"]) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.exp(log_ratio).unsqueeze(1)


@pytest.mark.filterwarnings("ignore:importance_sampling_level='sequence'")
def test_sequence_level_weights_each_stale_completion_by_trls_sequence_ratio(tiny_model_path, tmp_path):
    args = GPGConfig(**small_values(tmp_path, num_iterations=2, max_steps=2, learning_rate=0.1,
                                    importance_sampling_level="sequence"))
    trainer = GPGTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(2),
                         args=args)
    token_weights = []

    def sequence_weights_beside_token_weights(trainer, model, inputs):
        token_weights.append(stale_weights(trainer, model, inputs))
        return sequence_stale_weights(trainer, model, inputs)

    probe, weights = train_on_weighted_eq4(trainer, sequence_weights_beside_token_weights)
    torch.testing.assert_close(weights[0], torch.ones_like(weights[0]), rtol=1e-5, atol=1e-5)  # the sampling policy
    mask = probe.calls[1]["inputs"]["completion_mask"].bool()
    assert (weights[1] - 1).abs().max() > 0.05  # one optimizer step later: stale, one weight per completion
    per_token = token_weights[1][mask]
    assert (per_token - weights[1].expand_as(token_weights[1])[mask]).abs().max() > 0.05  # not the token-level one


# --------------------------------------------------------------------- part 11: what TRL adds around the term


def entropy_bonus(trainer, model, inputs, coef, token_mask=None):
    _, entropies, _ = log_probs_and_entropies(trainer, model, inputs)
    mask = inputs["completion_mask"] if token_mask is None else inputs["completion_mask"] * token_mask
    return coef * (entropies * mask).sum() / mask.sum() / trainer.current_gradient_accumulation_steps


@pytest.mark.parametrize("trainer_class, config_class", CE_TRAINERS, ids=CE_IDS)
def test_entropy_bonus_is_subtracted_and_logged(trainer_class, config_class, tiny_model_path, tmp_path):
    args = config_class(**small_values(tmp_path, entropy_coef=0.05))
    trainer = trainer_class(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(2),
                            args=args)
    policy_losses = []

    def expected(trainer, model, inputs):
        policy_losses.append(eq4(trainer, model, inputs).detach())
        return eq4(trainer, model, inputs) - entropy_bonus(trainer, model, inputs, 0.05)

    probe = LossProbe(trainer, expected)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    probe.assert_matches()
    logs = trainer.state.log_history[0]
    assert logs["entropy_coef"] == 0.05
    assert logs["policy_loss"] == pytest.approx(policy_losses[0].item(), rel=1e-5)
    assert_parameters_changed(before, trainer.model)


@pytest.mark.parametrize("entropy_target, expected_coef", [(100.0, 0.1 + 0.02), (0.0, 0.1 - 0.02)])
def test_adaptive_entropy_coefficient_follows_the_target(entropy_target, expected_coef, tiny_model_path, tmp_path):
    args = AAPOConfig(**small_values(tmp_path, entropy_coef=0.1, use_adaptive_entropy=True, entropy_coef_delta=0.02,
                                     entropy_target=entropy_target, max_steps=2))
    trainer = AAPOTrainer(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(4),
                          args=args)
    coefficients = []

    def expected(trainer, model, inputs):
        # TRL applies the coefficient of the previous step, and only while the entropy it measured was at or
        # below the target; the first step has no measurement yet (no bonus)
        applied = trainer.entropy_coef if trainer._last_world_entropy <= entropy_target else 0.0
        coefficients.append(applied)
        return eq4(trainer, model, inputs) - entropy_bonus(trainer, model, inputs, applied)

    probe = LossProbe(trainer, expected)
    trainer.train()
    probe.assert_matches()
    first, second = (entry["entropy_coef"] for entry in trainer.state.log_history[:2])
    assert first == pytest.approx(expected_coef)
    assert second == pytest.approx(expected_coef + (expected_coef - 0.1))
    assert coefficients[0] == 0.0
    assert coefficients[1] == (pytest.approx(expected_coef) if entropy_target > 0 else 0.0)


@pytest.mark.parametrize("trainer_class, config_class", CE_TRAINERS, ids=CE_IDS)
def test_top_entropy_quantile_keeps_only_high_entropy_tokens(trainer_class, config_class, tiny_model_path,
                                                             tmp_path):
    args = config_class(**small_values(tmp_path, top_entropy_quantile=0.2))
    trainer = trainer_class(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(2),
                            args=args)
    kept = []

    def expected(trainer, model, inputs):
        with torch.no_grad():
            _, entropies, _ = log_probs_and_entropies(trainer, model, inputs)
        high = trainer.get_high_entropy_mask(entropies, inputs["completion_mask"], 1 - 0.2).float()
        kept.append(high.sum() / inputs["completion_mask"].sum())
        return eq4(trainer, model, inputs, token_mask=high)  # the normaliser stays the batch's token count

    probe = LossProbe(trainer, expected)
    trainer.train()
    probe.assert_matches()
    assert 0 < kept[0] < 0.5


def tiny_moe_model(tiny_model_path, folder):
    """A two-layer Qwen3-MoE with four experts and the SmolLM2 tokenizer, random weights, built offline."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=512, router_aux_loss_coef=0.01,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(tiny_model_path)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("trainer_class, config_class", CE_TRAINERS, ids=CE_IDS)
def test_router_aux_loss_of_a_mixture_of_experts_policy(trainer_class, config_class, tiny_model_path, tmp_path):
    model_path = tiny_moe_model(tiny_model_path, tmp_path / "moe")
    trainer = trainer_class(str(model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(2),
                            args=config_class(**small_values(tmp_path / "run")))
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.01
    aux_losses = []

    def expected(trainer, model, inputs):
        _, _, aux_loss = log_probs_and_entropies(trainer, model, inputs, compute_aux_loss=True)
        aux_losses.append(aux_loss.detach())
        return eq4(trainer, model, inputs) + 0.01 * aux_loss / trainer.current_gradient_accumulation_steps

    probe = LossProbe(trainer, expected)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    probe.assert_matches()
    assert aux_losses[0] > 0
    assert trainer.state.log_history[0]["aux_loss"] == pytest.approx(aux_losses[0].item(), rel=1e-5)
    router = [n for n in before if "mlp.gate." in n]
    assert router and all(not torch.equal(before[n], trainer.model.get_parameter(n)) for n in router)


# --------------------------------------------------------------------- GRPOBaselineTrainer == trl.GRPOTrainer


def test_grpo_baseline_with_its_defaults_is_trls_grpo_trainer(tiny_model_path, tmp_path):
    """Same seed, data and settings (truncated completions included): the same advantages and losses."""
    runs = []
    for trainer_class, config_class in ((GRPOTrainer, GRPOConfig), (GRPOBaselineTrainer, GRPOBaselineConfig)):
        args = config_class(**small_values(tmp_path / config_class.__name__, max_steps=3))
        trainer = trainer_class(str(tiny_model_path), reward_funcs=[hashed_reward], train_dataset=prompt_dataset(4),
                                args=args)
        seen = []
        compute_loss = trainer._compute_loss

        def recording(model, inputs, compute_loss=compute_loss, seen=seen):
            loss = compute_loss(model, inputs)
            seen.append((inputs["advantages"].detach().clone(), loss.detach().clone()))
            return loss

        trainer._compute_loss = recording
        trainer.train()
        runs.append((seen, [entry.get("loss") for entry in trainer.state.log_history]))
    (trl_seen, trl_logged), (ours_seen, ours_logged) = runs
    assert len(trl_seen) == len(ours_seen) == 3
    for (trl_advantages, trl_loss), (our_advantages, our_loss) in zip(trl_seen, ours_seen):
        assert trl_advantages.abs().sum() > 0
        torch.testing.assert_close(our_advantages, trl_advantages)
        torch.testing.assert_close(our_loss, trl_loss)
    assert ours_logged == trl_logged
