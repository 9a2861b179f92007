"""Semantic entropy and token entropy reductions (docs/ALGORITHMS.md sections 3.2-3.3)."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aapo_trl.entropy import (
    choose_num_clusters,
    cluster_semantic_entropy,
    group_semantic_entropies,
    kmeans_seed,
    mean_pool_completion_states,
    semantic_entropy,
    sequence_mean,
)

nan = float("nan")

# The spec's vectors: equal-likelihood clusters of these sizes (G = 8) -> SE.
SE_VECTORS = [
    ((8,), 0.0),
    ((4, 4), 0.6931),
    ((2, 2, 2, 2), 1.3863),
    ((1,) * 8, 2.0794),
    ((7, 1), 0.3768),
    ((5, 2, 1), 0.9003),
]


def labels_of(sizes):
    return torch.tensor([k for k, size in enumerate(sizes) for _ in range(size)])


def clustered_embeddings(sizes, dim=16, noise=0.01, seed=0):
    """Unit vectors near the first len(sizes) basis directions, ``size`` of them around each."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)
    points = torch.cat([centres[k].repeat(size, 1) for k, size in enumerate(sizes)])
    return F.normalize(points + noise * torch.randn(points.shape, generator=gen), dim=1)


# --- mean pooling and masked means -------------------------------------------------------------


def test_mean_pool_is_the_normalised_masked_mean_in_float32():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    pooled = mean_pool_completion_states(hidden.to(torch.bfloat16), mask)
    assert pooled.dtype == torch.float32 and pooled.shape == (3, 4)
    expected = torch.stack(
        [hidden.to(torch.bfloat16).float()[i][mask[i].bool()].mean(0) for i in range(3)]
    )
    torch.testing.assert_close(pooled, F.normalize(expected, dim=1))
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(3))


def test_mean_pool_empty_response_is_a_nan_row_and_padding_nan_does_not_leak():
    hidden = torch.randn(2, 3, 4)
    hidden[0, 2] = nan  # padding position of row 0
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    pooled = mean_pool_completion_states(hidden, mask)
    assert torch.isfinite(pooled[0]).all()
    assert torch.isnan(pooled[1]).all()


def test_mean_pool_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="hidden_states"):
        mean_pool_completion_states(torch.zeros(2, 3, 4), torch.ones(2, 4))


def test_sequence_mean_masked_mean_empty_and_nan():
    values = torch.tensor([[1.0, 2.0, 3.0, nan], [4.0, 5.0, 6.0, 7.0], [1.0, 1.0, 1.0, 1.0], [nan, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    out = sequence_mean(values, mask)
    torch.testing.assert_close(out[:2], torch.tensor([2.0, 5.5]))
    assert math.isnan(out[2])  # empty response
    assert math.isnan(out[3])  # NaN log-prob inside the response
    with pytest.raises(ValueError, match="same"):
        sequence_mean(values, mask[:, :3])


# --- the seed -----------------------------------------------------------------------------------


def test_kmeans_seed_is_deterministic_distinct_and_in_numpy_range():
    seeds = {kmeans_seed(step, group) for step in range(20) for group in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**32 for s in seeds)
    assert kmeans_seed(7, 3) == kmeans_seed(7, 3)
    assert kmeans_seed(7, 3, base_seed=1) != kmeans_seed(7, 3)
    np.random.RandomState(kmeans_seed(10**9, 10**6, base_seed=2**40))  # accepted by numpy
    with pytest.raises(ValueError, match="step"):
        kmeans_seed(-1, 0)
    with pytest.raises(ValueError, match="group"):
        kmeans_seed(0, 1.5)
    assert 0 <= kmeans_seed(0, 0, base_seed=-1) < 2**32  # a negative run seed is fine


# --- cluster entropy: the spec vectors ----------------------------------------------------------


@pytest.mark.parametrize("sizes,expected", SE_VECTORS)
def test_cluster_semantic_entropy_spec_vectors(sizes, expected):
    se = cluster_semantic_entropy(labels_of(sizes), torch.full((8,), -0.37))
    assert se.dim() == 0 and se.dtype == torch.float32
    assert se.item() == pytest.approx(expected, abs=1e-4)
    assert se.item() >= 0


def test_cluster_semantic_entropy_weights_clusters_by_likelihood_in_log_space():
    labels = torch.tensor([0, 0, 1, 2])
    logps = torch.tensor([-1.0, -2.0, -0.5, -900.0])  # -900: would underflow outside log space
    mass = torch.exp(logps.double())
    p = torch.stack([mass[:2].sum(), mass[2:3].sum(), mass[3:].sum()]) / mass.sum()
    p = p[p > 0]
    expected = float(-(p * p.log()).sum())
    assert cluster_semantic_entropy(labels, logps).item() == pytest.approx(expected, rel=1e-6)
    # Shifting every l_j by a constant changes nothing (masses are normalised over the group).
    assert cluster_semantic_entropy(labels, logps - 1000).item() == pytest.approx(expected, rel=1e-6)
    assert cluster_semantic_entropy(torch.tensor([3, 3, 9, 9]), torch.zeros(4)).item() == pytest.approx(math.log(2))


def test_cluster_semantic_entropy_argument_errors():
    with pytest.raises(ValueError, match="shape"):
        cluster_semantic_entropy(torch.zeros(3, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        cluster_semantic_entropy(torch.zeros(0, dtype=torch.long), torch.zeros(0))


# --- choosing K ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes,expected_k,expected_se",
    [((4, 4), 2, 0.6931), ((2, 2, 2, 2), 4, 1.3863), ((7, 1), 2, 0.3768), ((5, 2, 1), 3, 0.9003), ((3, 3, 2), 3, None)],
)
def test_semantic_entropy_end_to_end_finds_separated_clusters(sizes, expected_k, expected_se):
    emb = clustered_embeddings(sizes)
    se, k = semantic_entropy(emb, torch.full((8,), -0.5), seed=kmeans_seed(3, 1))
    assert k == expected_k
    labels, k2 = choose_num_clusters(emb, seed=kmeans_seed(3, 1))
    assert k2 == k
    assert torch.equal(labels, labels_of(sizes))  # numbered in order of first appearance
    if expected_se is not None:
        assert se.item() == pytest.approx(expected_se, abs=1e-4)
    else:
        assert se.item() == pytest.approx(cluster_semantic_entropy(labels_of(sizes), torch.zeros(8)).item())


def test_semantic_entropy_end_to_end_single_cluster_vector():
    se, k = semantic_entropy(clustered_embeddings((8,), noise=1e-3), torch.full((8,), -0.5), seed=0)
    assert k == 1 and se.item() == 0.0


def test_small_groups_are_one_cluster():
    emb = clustered_embeddings((1, 1))
    labels, k = choose_num_clusters(emb, seed=0)
    assert k == 1 and labels.tolist() == [0, 0]
    se, k = semantic_entropy(emb[:1], torch.tensor([-0.3]), seed=0)  # G = 1
    assert k == 1 and se.item() == 0.0
    se, k = semantic_entropy(emb, torch.tensor([-0.3, -0.1]), seed=0)  # G = 2, very different
    assert k == 1 and se.item() == 0.0


def test_identical_embeddings_are_one_cluster():
    emb = clustered_embeddings((6,), noise=0.0)
    labels, k = choose_num_clusters(emb, seed=0)
    assert k == 1 and labels.tolist() == [0] * 6
    # Cosine distances below 0.02 still count as identical, larger ones do not.
    near = clustered_embeddings((3, 3), noise=0.0)
    near = F.normalize(near + torch.tensor([5.0] + [0.0] * 15), dim=1)  # pull both directions together
    assert float(1 - near[0] @ near[-1]) < 0.02
    assert choose_num_clusters(near, seed=0)[1] == 1
    assert choose_num_clusters(near, seed=0, identical_distance=1e-4)[1] == 2


def test_low_silhouette_falls_back_to_one_cluster():
    gen = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(8, 256, generator=gen), dim=1)  # no structure: near-equal distances
    labels, k = choose_num_clusters(emb, seed=5)
    assert k == 1 and labels.tolist() == [0] * 8
    _, k_forced = choose_num_clusters(emb, seed=5, min_silhouette=-1.0)
    assert k_forced >= 2  # it is the silhouette rule that chose K = 1


def test_max_clusters_is_respected():
    emb = clustered_embeddings((2, 2, 2, 2))
    assert choose_num_clusters(emb, seed=0)[1] == 4
    labels, k = choose_num_clusters(emb, seed=0, max_clusters=3)
    assert k <= 3 and int(labels.max()) == k - 1
    assert choose_num_clusters(emb, seed=0, max_clusters=1)[1] == 1
    # K <= G - 1: four points in four directions never make four clusters.
    assert choose_num_clusters(clustered_embeddings((1, 1, 1, 1)), seed=0)[1] <= 3
    with pytest.raises(ValueError, match="max_clusters"):
        choose_num_clusters(emb, seed=0, max_clusters=0)


def test_duplicate_points_skip_degenerate_k_without_warnings():
    two = clustered_embeddings((4, 4), noise=0.0)  # only two distinct points
    three = clustered_embeddings((3, 3, 2), noise=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_num_clusters(two, seed=0)[1] == 2
        assert choose_num_clusters(three, seed=0)[1] == 3
        se, k = semantic_entropy(two, torch.zeros(8), seed=0)
    assert k == 2 and se.item() == pytest.approx(math.log(2), abs=1e-6)


def test_clustering_is_deterministic_for_a_seed():
    gen = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(8, 4, generator=gen), dim=1)
    first = choose_num_clusters(emb, seed=kmeans_seed(12, 5), min_silhouette=-1.0)
    for _ in range(3):
        again = choose_num_clusters(emb, seed=kmeans_seed(12, 5), min_silhouette=-1.0)
        assert again[1] == first[1] and torch.equal(again[0], first[0])


def test_choose_num_clusters_rejects_nan():
    emb = clustered_embeddings((4, 4))
    emb[2] = nan
    with pytest.raises(ValueError, match="NaN"):
        choose_num_clusters(emb, seed=0)


# --- NaN rows -----------------------------------------------------------------------------------


def test_semantic_entropy_drops_nan_rows_with_one_warning():
    emb = clustered_embeddings((4, 4))
    logps = torch.full((8,), -0.5)
    emb[1] = nan  # empty response
    logps[6] = nan  # NaN log-probs
    with pytest.warns(RuntimeWarning, match="dropping 2 of 8") as record:
        se, k = semantic_entropy(emb, logps, seed=0)
    assert len(record) == 1
    keep = [0, 2, 3, 4, 5, 7]
    expected_se, expected_k = semantic_entropy(emb[keep], logps[keep], seed=0)
    assert k == expected_k == 2
    assert se.item() == pytest.approx(expected_se.item())
    assert se.item() == pytest.approx(-(3 / 6 * math.log(3 / 6)) * 2)


def test_semantic_entropy_with_no_valid_row_is_nan():
    emb = torch.full((4, 3), nan)
    with pytest.warns(RuntimeWarning, match="dropping 4 of 4"):
        se, k = semantic_entropy(emb, torch.zeros(4), seed=0)
    assert math.isnan(se) and k == 0


def test_semantic_entropy_from_pooled_states_with_an_empty_response():
    """The whole path: hidden states + masks -> embeddings and l_j -> SE, one response empty."""
    torch.manual_seed(0)
    directions = clustered_embeddings((4, 4), dim=8)
    hidden = directions.unsqueeze(1).repeat(1, 5, 1) + 0.01 * torch.randn(8, 5, 8)
    mask = torch.ones(8, 5)
    mask[3] = 0
    logps = sequence_mean(torch.full((8, 5), -0.2), mask)
    emb = mean_pool_completion_states(hidden, mask)
    with pytest.warns(RuntimeWarning, match="dropping 1 of 8"):
        se, k = semantic_entropy(emb, logps, seed=kmeans_seed(0, 0))
    assert k == 2
    assert se.item() == pytest.approx(-(3 / 7) * math.log(3 / 7) - (4 / 7) * math.log(4 / 7), abs=1e-5)


def test_group_semantic_entropies_only_where_asked():
    emb = torch.cat([clustered_embeddings((4, 4)), clustered_embeddings((8,)), clustered_embeddings((2, 2, 2, 2))])
    logps = torch.zeros(24)
    se, k = group_semantic_entropies(emb, logps, 8, torch.tensor([True, True, False]), step=4)
    assert k.tolist() == [2, 1, 0]
    assert se[0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert se[1].item() == 0.0
    assert math.isnan(se[2])
    # Group g uses kmeans_seed(step, g): same result as calling semantic_entropy directly.
    direct, _ = semantic_entropy(emb[:8], logps[:8], seed=kmeans_seed(4, 0))
    assert se[0].item() == direct.item()
    with pytest.raises(ValueError, match="one entry per group"):
        group_semantic_entropies(emb, logps, 8, torch.tensor([True]), step=0)
