import pytest
import torch

from megaflow.algorithms.advantages import compute_advantages, group_zscore, zero_std_groups


def test_group_zscore_matches_per_group_formula_wherever_members_are():
    rewards = torch.tensor([1.0, 5.0, 2.0, 7.0, 3.0, 1.0])
    groups = torch.tensor([0, 1, 0, 1, 0, 1])  # interleaved, as when a group spans ranks
    adv = group_zscore(rewards, groups, eps=0.0)
    for g in (0, 1):
        r = rewards[groups == g]
        torch.testing.assert_close(adv[groups == g], (r - r.mean()) / r.std(unbiased=False))


def test_global_std_uses_all_rewards():
    rewards = torch.tensor([1.0, 2.0, 10.0, 20.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = group_zscore(rewards, groups, eps=0.0, global_std=True)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, -5.0, 5.0]) / rewards.std(unbiased=False))


def test_clip_zero_std_and_drop():
    rewards = torch.tensor([0.0, 0.0, 0.0, 100.0, 3.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    out = compute_advantages({"r": rewards}, {"r": 1.0}, groups, eps=1e-8, clip_max=1.5, drop_zero_std=True)
    assert float(out.values.max()) == 1.5
    assert out.zero_std_groups == 1
    assert out.weights.tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.equal(out.values[4:], torch.zeros(2))
    assert zero_std_groups(rewards, groups).tolist() == [False] * 4 + [True] * 2


def test_multi_reward_aggregations():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([10.0, 0.0, 10.0, 0.0])
    groups = torch.zeros(4, dtype=torch.long)
    w = {"a": 1.0, "b": 3.0}
    reward_aggr = compute_advantages({"a": a, "b": b}, w, groups, aggregation="reward_aggr", eps=0.0, clip_max=99)
    torch.testing.assert_close(reward_aggr.values, group_zscore(a + 3 * b, groups, eps=0.0))
    adv_aggr = compute_advantages({"a": a, "b": b}, w, groups, aggregation="advantage_aggr", eps=0.0, clip_max=99)
    expected = 0.25 * group_zscore(a, groups, eps=0.0) + 0.75 * group_zscore(b, groups, eps=0.0)
    torch.testing.assert_close(adv_aggr.values, expected)
    with pytest.raises(ValueError, match="unknown reward aggregation"):
        compute_advantages({"a": a}, {"a": 1.0}, groups, aggregation="mean")


def test_granularity_columns_sum_their_zscores_then_clip():
    from megaflow.algorithms.advantages import compute_advantages, group_zscore

    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([0] * 6 + [1] * 6)
    r = torch.rand(12, 3, generator=g)
    adv = compute_advantages({"r": r}, {"r": 1.0}, groups, clip_max=5.0)
    expected = sum(group_zscore(r[:, j], groups) for j in range(3))
    torch.testing.assert_close(adv.values, expected.clamp(-5, 5))
    # the clip acts on the sum: three identical extreme columns exceed what one column reaches
    r_ext = torch.tensor([1.0] + [0.0] * 5).repeat(2)[:, None].expand(12, 3)
    summed = compute_advantages({"r": r_ext}, {"r": 1.0}, groups, clip_max=5.0).values
    assert float(summed.max()) == 5.0 and float(group_zscore(r_ext[:, 0], groups).max()) < 5.0


def test_best_of_keeps_extremes_and_optionally_renormalises():
    from megaflow.algorithms.advantages import best_of, compute_advantages

    groups = torch.tensor([0] * 6 + [1] * 6)
    r = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    adv = compute_advantages({"r": r}, {"r": 1.0}, groups)
    keep = best_of(adv.values, groups, 4)
    assert keep.tolist() == [True, True, False, False, True, True, True, True, False, False, True, True]
    renorm = compute_advantages({"r": r}, {"r": 1.0}, groups, keep=keep)
    assert torch.equal(renorm.weights, keep.float()) and bool((renorm.values[~keep] == 0).all())
    kept = renorm.values[keep].reshape(2, 4)
    torch.testing.assert_close(kept.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(kept.std(1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="even"):
        best_of(adv.values, groups, 3)
