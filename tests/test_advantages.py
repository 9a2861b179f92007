"""The spec's vectors (docs/ALGORITHMS.md sections 1, 2, 4) and the edge cases around them."""

import math

import pytest
import torch

from aapo_trl.advantages import (
    aapo_advantages,
    advantage_margins,
    combine_reward_functions,
    cross_entropy_policy_loss,
    gpg_advantages,
    group_relative_advantages,
    zero_advantage_groups,
    zero_final_advantage_groups,
)

nan = float("nan")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_grpo_matches_formula_with_bessel_std():
    r = t(1, 0, 1, 1)
    mean, std = 0.75, 0.5  # unbiased std of [1, 0, 1, 1]
    expected = (r - mean) / (std + 1e-4)
    torch.testing.assert_close(group_relative_advantages(r, 4), expected)


def test_grpo_matches_trl_nanstd_on_random_groups():
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    r = torch.rand(24)
    r[5] = nan
    grouped = r.view(-1, 6)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1).unsqueeze(1)
    expected = torch.nan_to_num(((grouped - mean) / (std + 1e-4)).flatten(), nan=0.0)
    torch.testing.assert_close(group_relative_advantages(r, 6), expected)


def test_grpo_scale_none_and_batch():
    r = t(1, 0, 3, 3)
    torch.testing.assert_close(group_relative_advantages(r, 2, scale="none"), t(0.5, -0.5, 0, 0))
    batch_std = torch.std(r)
    torch.testing.assert_close(group_relative_advantages(r, 2, scale="batch"), t(0.5, -0.5, 0, 0) / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="scale"):
        group_relative_advantages(r, 2, scale="global")


def test_unscorable_rows_are_excluded_and_get_zero():
    r = t(1, nan, 0, 1)
    adv = group_relative_advantages(r, 4)
    assert adv[1] == 0
    scorable = t(1, 0, 1)
    expected = (scorable - scorable.mean()) / (scorable.std() + 1e-4)
    torch.testing.assert_close(adv[[0, 2, 3]], expected)


def test_all_unscorable_group_and_single_scorable_row_give_zero():
    adv = group_relative_advantages(t(nan, nan, nan, 0.7), 2)
    assert torch.equal(adv, torch.zeros(4))
    assert zero_advantage_groups(t(nan, nan, nan, 0.7), 2).tolist() == [True, True]


def test_zero_advantage_groups_tolerance():
    r = t(1, 1, 1, 1, 0, 0, 0, 1, 0.5, 0.5 + 5e-7, 0.5, 0.5)
    assert zero_advantage_groups(r, 4).tolist() == [True, False, True]


def test_aapo_spec_vector_single_group():
    adv = aapo_advantages(t(1, 0, 1, 1), t(0, 0, 1, 0), 4)
    torch.testing.assert_close(adv, t(0.7799, -1.4997, 0.4999, 0.7799), atol=1e-4, rtol=0)


def test_aapo_spec_vector_zero_advantage_groups_are_no_longer_zero():
    adv = aapo_advantages(t(1, 1, 1, 1, 0, 0, 0, 0), t(0, 1, 0, 0, 1, 0, 0, 0), 4)
    torch.testing.assert_close(adv, t(0.28, 0, 0.28, 0.28, -0.2, 0, 0, 0), atol=1e-6, rtol=0)
    assert zero_final_advantage_groups(adv, 4).tolist() == [False, False]


def test_aapo_without_clip_and_custom_clip():
    r, ref = t(1, 1, 1, 1), t(0, 1, 0, -1)
    torch.testing.assert_close(aapo_advantages(r, ref, 4, clip=False), t(1, 0, 1, 2))
    torch.testing.assert_close(aapo_advantages(r, ref, 4, clip_low=-0.1, clip_high=0.5), t(0.5, 0, 0.5, 0.5))
    with pytest.raises(ValueError, match="clip_low"):
        aapo_advantages(r, ref, 4, clip_low=0.3, clip_high=0.2)


def test_aapo_mean_pairing():
    r, ref = t(1, 1, 0, 0), t(0, 1, 0, 0)
    torch.testing.assert_close(advantage_margins(r, ref, 4, pairing="mean"), t(0.75, 0.75, -0.25, -0.25))
    base = group_relative_advantages(r, 4)
    expected = base + t(0.28, 0.28, -0.2, -0.2)
    torch.testing.assert_close(aapo_advantages(r, ref, 4, pairing="mean"), expected)


def test_aapo_unscorable_reference_gives_margin_zero_and_unscorable_policy_gives_zero():
    r, ref = t(1, 1, nan, 1), t(nan, 0, 0, 0)
    adv = aapo_advantages(r, ref, 4)
    torch.testing.assert_close(adv, t(0, 0.28, 0, 0.28))


def test_aapo_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        aapo_advantages(t(1, 0), t(1, 0, 1, 0), 2)
    with pytest.raises(ValueError, match="num_generations"):
        group_relative_advantages(t(1, 0, 1), 2)


def test_gpg_alpha_corrects_for_zero_advantage_groups():
    r = t(1, 0, 1, 1, 1, 1, 1, 1)  # one mixed group, one all-correct group: B = 8, M = 4
    base = group_relative_advantages(r, 4)
    torch.testing.assert_close(gpg_advantages(r, 4), base * 2.0)
    assert gpg_advantages(r, 4)[4:].abs().max() == 0


def test_gpg_no_zero_groups_and_all_zero_groups():
    r = t(1, 0, 0, 1)
    torch.testing.assert_close(gpg_advantages(r, 2), group_relative_advantages(r, 2))
    assert torch.equal(gpg_advantages(t(1, 1, 0, 0), 2), torch.zeros(4))
    torch.testing.assert_close(gpg_advantages(t(1, 0, 1, 1), 2, scale="none"), t(0.5, -0.5, 0, 0) * 2)


def test_combine_reward_functions_follows_trl():
    per_func = torch.tensor([[1.0, 0.5], [nan, 0.5], [nan, nan]])
    combined = combine_reward_functions(per_func, t(1, 2))
    assert combined[0] == 2.0 and combined[1] == 1.0 and math.isnan(combined[2])


def test_cross_entropy_loss_is_token_normalised_and_has_the_right_gradient():
    logps = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.5, 0.5, 0.5]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = t(2.0, -1.0)
    loss = cross_entropy_policy_loss(logps, adv, mask, normalizer=3)
    expected = -(2 * (math.log(0.5) + math.log(0.25)) - math.log(0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]))
