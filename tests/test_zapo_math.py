"""ZAPO's DAER / TDAR / final advantage (docs/ALGORITHMS.md sections 3.1, 3.4-3.6)."""

import math
import warnings

import pytest
import torch

from aapo_trl.advantages import group_relative_advantages
from aapo_trl.entropy import mean_pool_completion_states, semantic_entropy, sequence_mean
from aapo_trl.zapo_math import (
    ZAPOAdvantages,
    check_zapo_options,
    classify_zero_advantage_groups,
    daer_advantages,
    difficulty,
    tdar_multiplier,
    tdar_reshape,
    zapo_advantages,
)

nan = float("nan")


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- 3.1 classification -------------------------------------------------------------------------


def test_classify_easy_hard_and_neither():
    r = t(
        1, 1, 1, 1,  # all correct -> easy
        0.1, 0.1, 0.1, 0.1,  # all wrong -> hard
        0, 0, 0, 0,  # no answer -> hard
        0, 0.1, 0, 0.1,  # 0/0.1 mix: spread 0.1, not zero-advantage -> neither (GRPO handles it)
        1, 0.1, 1, 1,  # mixed -> neither
        nan, nan, nan, nan,  # nothing scorable -> neither
        1, nan, 1, nan,  # scorable rows all correct -> easy
        0.95, 0.9499995, 0.95, 0.95,  # zero-advantage within 1e-6 but straddles the threshold -> neither
    )
    easy, hard = classify_zero_advantage_groups(r, 4)
    assert easy.dtype == torch.bool and easy.shape == (8,)
    assert easy.tolist() == [True, False, False, False, False, False, True, False]
    assert hard.tolist() == [False, True, True, False, False, False, False, False]


def test_classify_threshold_is_configurable():
    r = t(0.5, 0.5, 0.5, 0.5)
    assert [x.tolist() for x in classify_zero_advantage_groups(r, 4)] == [[False], [True]]
    assert [x.tolist() for x in classify_zero_advantage_groups(r, 4, correct_threshold=0.5)] == [[True], [False]]


# --- 3.4 DAER -----------------------------------------------------------------------------------


def spec_daer_batch(**kwargs):
    """The spec vector: 10 easy and 20 hard groups, SE = 0.6931, TE = 1.2, t = 300, T = 1000, alpha = 2."""
    easy = torch.tensor([True] * 10 + [False] * 20)
    args = dict(num_generations=2, step=300, total_steps=1000, alpha=2.0)
    args.update(kwargs)
    return daer_advantages(torch.full((30,), 0.6931), torch.full((60,), 1.2), easy, ~easy, **args)


def test_daer_spec_vector():
    rhat = spec_daer_batch()
    assert rhat.shape == (60,)
    torch.testing.assert_close(rhat[:20], torch.full((20,), 0.039964), atol=1e-6, rtol=0)
    torch.testing.assert_close(rhat[20:], torch.full((40,), -0.159854), atol=1e-6, rtol=0)


def test_daer_by_hand_and_rows_outside_easy_hard_get_zero():
    se = t(0.5, nan, 1.0)  # group 1 is not zero-advantage: its SE was never computed
    te = t(0.2, 0.4, 9.0, 9.0, 0.0, 1.0)
    easy, hard = torch.tensor([True, False, False]), torch.tensor([False, False, True])
    rhat = daer_advantages(se, te, easy, hard, 2, step=250, total_steps=1000, alpha=3.0)
    q = 1 / (1 + 3 * 1)
    expected = [
        math.log(1 + (0.5 + 0.2) / 2) * 0.25 * q,
        math.log(1 + (0.5 + 0.4) / 2) * 0.25 * q,
        0.0,
        0.0,
        -math.log(1 + (1.0 + 0.0) / 2) * 0.25 * (1 - q),
        -math.log(1 + (1.0 + 1.0) / 2) * 0.25 * (1 - q),
    ]
    torch.testing.assert_close(rhat, torch.tensor(expected), atol=1e-7, rtol=1e-6)


def test_daer_entropy_switches_and_sum_of_logs():
    se, te = 0.6931, 1.2
    scale_easy = 0.3 * 0.2
    only_te = spec_daer_batch(use_semantic_entropy=False)
    only_se = spec_daer_batch(use_token_entropy=False)
    sum_logs = spec_daer_batch(entropy_combine="sum_of_logs")
    assert only_te[0].item() == pytest.approx(math.log(1 + te) * scale_easy, rel=1e-5)
    assert only_se[0].item() == pytest.approx(math.log(1 + se) * scale_easy, rel=1e-5)
    assert sum_logs[0].item() == pytest.approx((math.log(1 + se) + math.log(1 + te)) * scale_easy, rel=1e-5)
    assert sum_logs[-1].item() == pytest.approx(-(math.log(1 + se) + math.log(1 + te)) * 0.3 * 0.8, rel=1e-5)
    single = spec_daer_batch(entropy_combine="sum_of_logs", use_semantic_entropy=False)
    torch.testing.assert_close(single, only_te)


def test_daer_switched_off_entropy_may_be_nan_without_warning():
    easy = torch.tensor([True, False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rhat = daer_advantages(t(nan, nan), t(1.0, 2.0, 0.5, 0.5), easy, ~easy, 2, 10, 10, use_semantic_entropy=False)
        rhat_se = daer_advantages(t(1.0, 0.5), t(nan, nan, nan, nan), easy, ~easy, 2, 10, 10, use_token_entropy=False)
    q = 1 / 3
    hard_row = -math.log(1.5) * (1 - q)
    torch.testing.assert_close(rhat, t(math.log(2) * q, math.log(3) * q, hard_row, hard_row))
    torch.testing.assert_close(rhat_se, t(math.log(2) * q, math.log(2) * q, hard_row, hard_row))


def test_daer_time_schedule():
    none = spec_daer_batch(time_schedule="none")
    assert none[0].item() == pytest.approx(0.039964 / 0.3, abs=1e-5)
    assert spec_daer_batch(step=0).abs().max().item() == 0.0
    torch.testing.assert_close(spec_daer_batch(step=5000), spec_daer_batch(step=1000))  # t/T clamped to 1
    torch.testing.assert_close(spec_daer_batch(step=1000), none)


def test_daer_group_counts():
    te = torch.ones(4)
    # No easy and no hard group: nothing to do.
    no = torch.tensor([False, False])
    assert torch.equal(daer_advantages(t(1, 1), te, no, no, 2, 5, 10), torch.zeros(4))
    # Only hard groups: q = 0, delta = 1 for hard.
    hard = torch.tensor([True, True])
    expected = torch.full((4,), -math.log(2) * 0.5)
    torch.testing.assert_close(daer_advantages(t(1, 1), te, no, hard, 2, 5, 10), expected)
    # alpha = 0 with only hard groups (0/0): q is taken as 0.
    torch.testing.assert_close(daer_advantages(t(1, 1), te, no, hard, 2, 5, 10, alpha=0.0), expected)
    # Only easy groups: q = 1.
    torch.testing.assert_close(daer_advantages(t(1, 1), te, hard, no, 2, 5, 10), -expected)
    with pytest.raises(ValueError, match="both easy and hard"):
        daer_advantages(t(1, 1), te, hard, hard, 2, 5, 10)


def test_daer_nan_entropy_gives_zero_and_a_warning():
    easy = torch.tensor([True, False])
    se = t(0.5, nan)  # the hard group's SE is undefined (e.g. every response empty)
    te = t(0.3, nan, 0.2, 0.2)  # row 1: an empty response
    with pytest.warns(RuntimeWarning, match="3 zero-advantage responses") as record:
        rhat = daer_advantages(se, te, easy, ~easy, 2, 500, 1000)
    assert len(record) == 1
    assert not torch.isnan(rhat).any()
    assert rhat[1:].tolist() == [0.0, 0.0, 0.0]
    assert rhat[0].item() == pytest.approx(math.log(1.4) * 0.5 * (1 / 3), rel=1e-6)


def test_daer_shape_errors():
    easy = torch.tensor([True, False])
    with pytest.raises(ValueError, match="one entry per group"):
        daer_advantages(t(1, 1, 1), torch.ones(4), easy, ~easy, 2, 1, 10)
    with pytest.raises(ValueError, match="groups of"):
        daer_advantages(t(1, 1), torch.ones(5), easy, ~easy, 2, 1, 10)


# --- 3.5 TDAR -----------------------------------------------------------------------------------


def test_difficulty_reward_and_accuracy():
    r = t(1, 0.1, 0.1, 1, 1, 1, 1, nan, nan, nan, nan, nan, 0, 0.1, 0.1, 0.1)
    torch.testing.assert_close(difficulty(r, 4)[[0, 1, 3]], t(0.45, 0.0, 1 - 0.3 / 4))
    assert math.isnan(difficulty(r, 4)[2])
    acc = difficulty(r, 4, kind="accuracy")
    torch.testing.assert_close(acc[[0, 1, 3]], t(0.5, 0.0, 1.0))
    assert math.isnan(acc[2])
    with pytest.raises(ValueError, match="difficulty kind"):
        difficulty(r, 4, kind="entropy")


def test_tdar_multiplier_formula():
    d = t(0.0, 0.45, 0.5, 1.0)
    m = tdar_multiplier(d, 500, 1000, beta=5.0)
    torch.testing.assert_close(m, torch.tensor([1 + sigmoid(2.5 * (x - 0.5)) for x in (0.0, 0.45, 0.5, 1.0)]))
    torch.testing.assert_close(tdar_multiplier(d, 0, 1000), torch.full((4,), 1.5))  # t = 0: neutral
    torch.testing.assert_close(tdar_multiplier(d, 3000, 1000), tdar_multiplier(d, 1000, 1000))  # clamped


def test_tdar_spec_vector():
    r = t(1, 0.1, 0.1, 1)
    a = group_relative_advantages(r, 4)
    reshaped, mult = tdar_reshape(a, r, 4, step=500, total_steps=1000, beta=5.0, difficulty_kind="reward")
    torch.testing.assert_close(reshaped, t(1.27177, -1.27177, -1.27177, 1.27177), atol=1e-5, rtol=0)
    torch.testing.assert_close(mult, torch.full((4,), 1 + sigmoid(-0.125)))


def test_tdar_leaves_zero_advantages_alone():
    r = t(1, 1, 1, 1, 0, 0.5, 1, nan)
    a = group_relative_advantages(r, 4)
    assert a[5].abs().item() < 1e-6 and a[7].item() == 0  # the middle reward and the unscorable row
    reshaped, mult = tdar_reshape(a, r, 4, 800, 1000, difficulty_kind="accuracy")
    torch.testing.assert_close(reshaped, a * mult)
    assert mult[[0, 1, 2, 3, 5, 7]].tolist() == [1.0] * 6
    m = 1 + sigmoid(5 * 0.8 * ((1 - 1 / 3) - 0.5))  # accuracy difficulty of [0, 0.5, 1]: 1 - 1/3
    assert mult[4].item() == pytest.approx(m) and mult[6].item() == pytest.approx(m)
    with pytest.raises(ValueError, match="shape"):
        tdar_reshape(a[:4], r, 4, 1, 10)


# --- 3.6 the final advantage --------------------------------------------------------------------

# One batch, G = 4: an easy group, a hard group (all 0.1), a mixed group, a hard group (all 0).
BATCH_REWARDS = t(1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 1, 0.1, 0.1, 1, 0, 0, 0, 0)
BATCH_SE = t(0.6931, 0.5, nan, 0.0)  # not computed for the mixed group
BATCH_TE = t(1.2, 0.8, 0.0, 2.0, 0.4, 0.6, 0.5, 0.5, 9.0, 9.0, 9.0, 9.0, 1.0, 3.0, 0.0, 0.2)
STEP, TOTAL = 300, 1000


def expected_batch_rows(alpha=2.0, beta=5.0):
    q = 1 / (1 + alpha * 2)  # n_easy = 1, n_hard = 2
    tt = STEP / TOTAL
    se = BATCH_SE.tolist()
    te = BATCH_TE.tolist()
    rows = []
    for j in range(16):
        g = j // 4
        if g == 0:
            rows.append(math.log(1 + (se[0] + te[j]) / 2) * tt * q)
        elif g in (1, 3):
            rows.append(-math.log(1 + (se[g] + te[j]) / 2) * tt * (1 - q))
        else:
            a = 0.45 / (math.sqrt(0.27) + 1e-4) * (1 if j in (8, 11) else -1)
            rows.append(a * (1 + sigmoid(beta * tt * (0.45 - 0.5))))
    return torch.tensor(rows)


def test_zapo_advantages_mixed_batch_by_hand():
    out = zapo_advantages(BATCH_REWARDS, 4, BATCH_SE, BATCH_TE, STEP, TOTAL)
    assert isinstance(out, ZAPOAdvantages)
    torch.testing.assert_close(out.advantages, expected_batch_rows(), atol=1e-6, rtol=1e-5)
    assert out.easy.tolist() == [True, False, False, False]
    assert out.hard.tolist() == [False, True, False, True]
    torch.testing.assert_close(out.grpo_advantages, group_relative_advantages(BATCH_REWARDS, 4))
    assert out.daer[8:12].tolist() == [0.0] * 4
    torch.testing.assert_close(out.daer[:8], out.advantages[:8])
    assert out.tdar_multiplier[:8].tolist() == [1.0] * 8 and out.tdar_multiplier[12:].tolist() == [1.0] * 4
    assert out.tdar_multiplier[8].item() == pytest.approx(1 + sigmoid(1.5 * -0.05))
    # Signs: easy rows positive, hard rows negative (row 14 has SE = TE = 0, so its rhat is 0).
    assert (out.advantages[:4] > 0).all() and (out.advantages[4:8] < 0).all()


def test_zapo_switches_daer_and_tdar():
    grpo = group_relative_advantages(BATCH_REWARDS, 4)
    full = expected_batch_rows()
    no_daer = zapo_advantages(BATCH_REWARDS, 4, BATCH_SE, BATCH_TE, STEP, TOTAL, use_daer=False)
    assert no_daer.advantages[[*range(8), *range(12, 16)]].tolist() == [0.0] * 12
    torch.testing.assert_close(no_daer.advantages[8:12], full[8:12])
    assert no_daer.daer.abs().max().item() == 0.0
    no_tdar = zapo_advantages(BATCH_REWARDS, 4, BATCH_SE, BATCH_TE, STEP, TOTAL, use_tdar=False)
    torch.testing.assert_close(no_tdar.advantages[8:12], grpo[8:12])
    torch.testing.assert_close(no_tdar.advantages[:8], full[:8], atol=1e-6, rtol=1e-5)
    assert no_tdar.tdar_multiplier.tolist() == [1.0] * 16
    neither = zapo_advantages(BATCH_REWARDS, 4, BATCH_SE, BATCH_TE, STEP, TOTAL, use_daer=False, use_tdar=False)
    torch.testing.assert_close(neither.advantages, grpo)
    # With DAER off the entropies are not needed at all, and both may be switched off.
    off = zapo_advantages(
        BATCH_REWARDS, 4, torch.full((4,), nan), torch.full((16,), nan), STEP, TOTAL,
        use_daer=False, use_semantic_entropy=False, use_token_entropy=False,
    )
    torch.testing.assert_close(off.advantages, no_daer.advantages)


def test_zapo_entropy_switches_and_schedule_reach_daer():
    for kwargs in (
        dict(use_semantic_entropy=False),
        dict(use_token_entropy=False),
        dict(entropy_combine="sum_of_logs"),
        dict(time_schedule="none"),
        dict(alpha=5.0),
    ):
        out = zapo_advantages(BATCH_REWARDS, 4, BATCH_SE, BATCH_TE, STEP, TOTAL, **kwargs)
        easy, hard = classify_zero_advantage_groups(BATCH_REWARDS, 4)
        direct = daer_advantages(BATCH_SE, BATCH_TE, easy, hard, 4, STEP, TOTAL, **kwargs)
        torch.testing.assert_close(out.advantages[[*range(8), *range(12, 16)]], direct[[*range(8), *range(12, 16)]])
        default = zapo_advantages(BATCH_REWARDS, 4, BATCH_SE, BATCH_TE, STEP, TOTAL)
        assert not torch.equal(out.advantages, default.advantages)


def test_zapo_scale_and_difficulty_kind_pass_through():
    out = zapo_advantages(BATCH_REWARDS, 4, BATCH_SE, BATCH_TE, STEP, TOTAL, scale="none", difficulty_kind="accuracy")
    m = 1 + sigmoid(5 * 0.3 * (0.5 - 0.5))
    torch.testing.assert_close(out.advantages[8:12], t(0.45, -0.45, -0.45, 0.45) * m)


def test_zapo_unscorable_rows_and_nan_entropies_never_give_nan():
    r = BATCH_REWARDS.clone()
    r[1] = nan  # unscorable row of the easy group
    te = BATCH_TE.clone()
    te[5] = nan  # empty response in a hard group
    se = BATCH_SE.clone()
    se[3] = nan  # SE undefined for the all-0 hard group
    with pytest.warns(RuntimeWarning, match="undefined entropy"):
        out = zapo_advantages(r, 4, se, te, STEP, TOTAL)
    assert not torch.isnan(out.advantages).any()
    full = expected_batch_rows()
    assert out.advantages[1].item() == 0.0 and out.daer[1].item() == 0.0
    assert out.advantages[5].item() == 0.0
    assert out.advantages[12:].tolist() == [0.0] * 4
    torch.testing.assert_close(out.advantages[[0, 2, 3, 4, 6, 7]], full[[0, 2, 3, 4, 6, 7]], atol=1e-6, rtol=1e-5)


def test_zapo_end_to_end_from_token_tensors_with_empty_response_and_nan_logps():
    """Hidden states / log-probs / token entropies -> SE and TE -> advantages, with broken rows."""
    torch.manual_seed(0)
    rewards = t(1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1)
    mask = torch.ones(8, 6)
    mask[2] = 0  # empty response in the easy group
    logps = torch.full((8, 6), -0.3)
    logps[5, 1] = nan  # NaN log-probs in the hard group
    token_entropy = torch.rand(8, 6)
    token_entropy[5, 1] = nan
    hidden = torch.randn(8, 6, 16)
    l_j = sequence_mean(logps, mask)
    te = sequence_mean(token_entropy, mask)
    emb = mean_pool_completion_states(hidden, mask)
    with pytest.warns(RuntimeWarning, match="dropping 1 of 4"):
        se = torch.stack([semantic_entropy(emb[4 * g : 4 * g + 4], l_j[4 * g : 4 * g + 4], seed=g)[0] for g in (0, 1)])
    assert torch.isfinite(se).all()
    with pytest.warns(RuntimeWarning, match="2 zero-advantage responses"):
        out = zapo_advantages(rewards, 4, se, te, 500, 1000)
    assert not torch.isnan(out.advantages).any()
    assert out.advantages[2].item() == 0.0 and out.advantages[5].item() == 0.0
    assert (out.advantages[[0, 1, 3]] > 0).all() and (out.advantages[[4, 6, 7]] < 0).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(entropy_combine="product"), "entropy_combine"),
        (dict(time_schedule="cosine"), "time_schedule"),
        (dict(difficulty_kind="length"), "difficulty_kind"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=-5), "total_steps"),
        (dict(alpha=-1.0), "alpha"),
        (dict(beta=float("inf")), "beta"),
        (dict(use_semantic_entropy=False, use_token_entropy=False), "both off"),
        (dict(scale="global"), "scale"),
    ],
)
def test_zapo_argument_errors(kwargs, match):
    args = dict(step=STEP, total_steps=TOTAL)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        zapo_advantages(BATCH_REWARDS, 4, BATCH_SE, BATCH_TE, **args)


def test_daer_and_tdar_argument_errors():
    easy = torch.tensor([True, False])
    with pytest.raises(ValueError, match="both off"):
        daer_advantages(
            t(1, 1), torch.ones(4), easy, ~easy, 2, 1, 10, use_semantic_entropy=False, use_token_entropy=False
        )
    with pytest.raises(ValueError, match="total_steps"):
        daer_advantages(t(1, 1), torch.ones(4), easy, ~easy, 2, 1, 0)
    with pytest.raises(ValueError, match="entropy_combine"):
        daer_advantages(t(1, 1), torch.ones(4), easy, ~easy, 2, 1, 10, entropy_combine="max")
    with pytest.raises(ValueError, match="total_steps"):
        tdar_multiplier(t(0.5), 1, 0)
    check_zapo_options()  # defaults are valid, total_steps may be unknown yet
    check_zapo_options(use_daer=False, use_semantic_entropy=False, use_token_entropy=False)
