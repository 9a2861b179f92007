"""Semantic entropy and token entropy for ZAPO's DAER (ALGORITHMS.md sections 3.2 and 3.3, ZAPO paper Eqs. 4-7).

Every function here is pure (tensors in, tensors out) and free of TRL. The trainer computes the
per-token quantities under pi_old (final-layer hidden states, per-token log-probs, per-token entropies
of the temperature-scaled logits) and passes them here with the completion mask:

* ``mean_pool_completion_states`` gives the response embedding h_j (paper Eq. 5): mean over the
  response tokens, in float32, then L2-normalised.
* ``sequence_mean`` gives both the length-normalised log-likelihood l_j (spec 3.2 step 3) and the
  sequence-level token entropy TE(o_j) (paper Eq. 7, spec 3.3).
* ``choose_num_clusters`` + ``cluster_semantic_entropy`` (together: ``semantic_entropy``) give SE(x)
  (paper Eqs. 4 and 6, spec 3.2 steps 2-5).

NaN marks "undefined" throughout: an empty response has a NaN embedding, NaN l_j and NaN TE; a group
whose SE cannot be computed gets SE = NaN. ``aapo_trl.zapo_math.daer_advantages`` turns a NaN entropy
into advantage 0 for that row, never into a NaN advantage.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .devices import run_on_cpu

MAX_CLUSTERS = 4
"""Largest K tried for a group (spec 3.2 step 2: K in 2..min(G-1, 4))."""

MIN_SILHOUETTE = 0.1
"""Best silhouette below which the group counts as one cluster (spec 3.2 step 2)."""

IDENTICAL_DISTANCE = 0.02
"""All pairwise cosine distances below this -> one cluster (spec 3.2 step 2)."""

KMEANS_N_INIT = 10
"""K-Means restarts per K. Groups are tiny (G points), so 10 restarts cost little and make the
partition for a given K far less dependent on the initial centroids."""

SILHOUETTE_METRIC = "cosine"
"""Distance the silhouette is scored with. The embeddings are L2-normalised, so K-Means' squared
euclidean distance is exactly 2 x the cosine distance: scoring with cosine measures the same geometry
K-Means optimises and is the same distance the ``identical_distance`` rule uses."""


def mean_pool_completion_states(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Response embedding ``h_j = normalize(mean_{t: mask=1} h_{j,t})`` (paper Eq. 5, spec 3.2 step 1).

    ``hidden_states`` is ``(B, T, D)`` (any float dtype, e.g. bf16), ``mask`` is ``(B, T)`` (bool, int or
    float; 1 = response token). The mean is taken in float32 and the result L2-normalised; a row whose
    mask is empty (an empty response) is all NaN. Returns float32 ``(B, D)``.
    """
    if hidden_states.dim() != 3 or mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            "expected hidden_states (B, T, D) and mask (B, T), "
            f"got {tuple(hidden_states.shape)} and {tuple(mask.shape)}"
        )
    weights = mask.to(device=hidden_states.device, dtype=torch.float32)
    states = hidden_states.float()
    # Zero the padding explicitly: masked-out positions may hold NaN/inf and NaN * 0 would leak through.
    states = torch.where(weights.unsqueeze(-1) > 0, states, torch.zeros((), dtype=states.dtype, device=states.device))
    counts = weights.sum(dim=1, keepdim=True)
    pooled = torch.einsum("bt,btd->bd", weights, states) / counts.clamp(min=1.0)
    pooled = F.normalize(pooled, p=2.0, dim=1)
    return pooled.masked_fill(counts == 0, float("nan"))


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the response tokens: ``(B, T), (B, T) -> (B,)`` in float32.

    Used for the length-normalised log-likelihood ``l_j = mean_t log pi_old(o_j,t)`` (spec 3.2 step 3)
    and the token entropy ``TE(o_j) = mean_t H_t`` (paper Eq. 7, spec 3.3). An empty mask gives NaN; a
    NaN at a response position propagates (NaN log-probs make the row NaN), one at a padding position
    does not.
    """
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(
            f"expected values and mask of the same (B, T) shape, got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    weights = mask.to(device=values.device, dtype=torch.float32)
    vals = torch.where(weights > 0, values.float(), torch.zeros((), dtype=torch.float32, device=values.device))
    counts = weights.sum(dim=1)
    means = (vals * weights).sum(dim=1) / counts.clamp(min=1.0)
    return means.masked_fill(counts == 0, float("nan"))


def temperature_scaled_token_statistics(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy of one decoding step's next-token distribution ``softmax(logits / temperature)``.

    ``logits`` is ``(B, V)`` (the model's raw output for the last position, any float dtype). This is the
    distribution TRL's training path scores (its fused LM head divides by the temperature and applies no
    top-k / top-p / min-p / repetition penalty), so the log-prob of the sampled token and the entropy are
    the ``pi_old`` quantities ZAPO reads (spec 3.2 step 3, paper Eq. 7), computed in float32. Returns
    ``(log_probs (B, V), entropy (B,))``; vocabulary entries of probability 0 add nothing to the entropy.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected (B, V) logits, got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    probs = log_probs.exp()
    entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros((), device=logits.device)).sum(dim=-1)
    return log_probs, entropy


def generation_sequence_statistics(
    token_logps: torch.Tensor, token_entropies: torch.Tensor, fed_hidden_states: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZAPO's per-response statistics from what a sampling loop computed, step by step (no extra forward).

    ``token_logps`` and ``token_entropies`` are ``(B, n)``: step ``k``'s log-prob of the token it sampled and
    its entropy (``temperature_scaled_token_statistics``). ``fed_hidden_states`` is ``(B, m, D)`` with
    ``m <= n``: the final-layer hidden state of completion token ``k`` for ``k < m``, known only once the token
    was fed back to the model at step ``k + 1`` -- the token sampled at the last step never is. ``lengths``
    ``(B,)`` is each response's token count (up to and including its first EOS).

    Returns ``(seq_logps, token_entropy, embeddings, pooled_counts)``: the length-normalised log-likelihood and
    the token entropy over the ``lengths`` tokens (``sequence_mean``, NaN for an empty response), the
    embedding pooled over the response tokens whose hidden state is known (``mean_pool_completion_states``;
    NaN where none is) and how many tokens it pooled. A response whose last token was sampled at the last
    step (the longest ones, and the truncated ones) pools one token fewer than the forward-pass reference.
    """
    if token_logps.dim() != 2 or token_entropies.shape != token_logps.shape:
        raise ValueError(
            "expected token_logps and token_entropies of the same (B, n) shape, "
            f"got {tuple(token_logps.shape)} and {tuple(token_entropies.shape)}"
        )
    batch, steps = token_logps.shape
    if fed_hidden_states.dim() != 3 or fed_hidden_states.size(0) != batch or fed_hidden_states.size(1) > steps:
        raise ValueError(
            f"expected fed_hidden_states (B={batch}, m<={steps}, D), got {tuple(fed_hidden_states.shape)}"
        )
    if lengths.shape != (batch,) or bool((lengths < 0).any()) or bool((lengths > steps).any()):
        raise ValueError(f"expected lengths (B={batch},) in [0, {steps}], got {lengths.tolist()}")
    positions = torch.arange(steps, device=token_logps.device)
    mask = positions.unsqueeze(0) < lengths.to(token_logps.device).unsqueeze(1)
    fed_mask = mask[:, : fed_hidden_states.size(1)]
    seq_logps = sequence_mean(token_logps, mask)
    token_entropy = sequence_mean(token_entropies, mask)
    if fed_hidden_states.size(1) == 0:
        embeddings = torch.full(
            (batch, fed_hidden_states.size(2)), float("nan"), dtype=torch.float32, device=token_logps.device
        )
    else:
        embeddings = mean_pool_completion_states(fed_hidden_states, fed_mask)
    return seq_logps, token_entropy, embeddings, fed_mask.sum(dim=1)


def kmeans_seed(step: int, group: int, base_seed: int = 0) -> int:
    """Deterministic K-Means seed from ``(step, group)`` (spec 3.2 step 2), in numpy's ``[0, 2**32)``.

    Mixed through ``numpy.random.SeedSequence`` (whose output numpy keeps stable across versions), so
    nearby (step, group) pairs give unrelated seeds and the same pair always gives the same seed, on
    every rank and after a resume. ``base_seed`` is the run's seed (any integer; a negative one is taken
    modulo 2**64).
    """
    for name, value in (("step", step), ("group", group)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if int(base_seed) != base_seed:
        raise ValueError(f"base_seed must be an integer, got {base_seed!r}")
    entropy = [int(base_seed) % 2**64, int(step), int(group)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def _first_appearance_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0, 1, ... in the order they first appear (a canonical labelling)."""
    clusters, first = np.unique(labels, return_index=True)
    mapping = np.zeros(int(clusters.max()) + 1, dtype=np.int64)
    mapping[clusters[np.argsort(first)]] = np.arange(clusters.size)
    return mapping[labels]


def choose_num_clusters(
    embeddings: torch.Tensor,
    seed: int,
    max_clusters: int = MAX_CLUSTERS,
    min_silhouette: float = MIN_SILHOUETTE,
    identical_distance: float = IDENTICAL_DISTANCE,
    n_init: int = KMEANS_N_INIT,
) -> tuple[torch.Tensor, int]:
    """Cluster one group's response embeddings and pick K (spec 3.2 step 2). Returns ``(labels (G,), K)``.

    * K = 1 when G < 3 or every pairwise cosine distance is < ``identical_distance``;
    * otherwise K-Means (``random_state=seed``, ``n_init`` restarts) for every K in
      ``2..min(G-1, max_clusters)``, keeping the K with the best silhouette (cosine metric, see
      ``SILHOUETTE_METRIC``; ties go to the smaller K);
    * K = 1 when that best silhouette is < ``min_silhouette``, or when no K >= 2 gives K distinct
      clusters (duplicate points: K-Means then finds fewer clusters than asked and that K is skipped).

    ``embeddings`` is ``(G, D)`` without NaN (``semantic_entropy`` drops NaN rows first); rows are
    L2-normalised here again, which is a no-op for ``mean_pool_completion_states`` output. Labels are
    a LongTensor numbered in order of first appearance.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"expected (G, D) embeddings, got shape {tuple(embeddings.shape)}")
    if max_clusters < 1:
        raise ValueError(f"max_clusters must be at least 1, got {max_clusters}")
    if n_init < 1:
        raise ValueError(f"n_init must be at least 1, got {n_init}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf; drop those rows first (semantic_entropy does)")
    # scikit-learn runs on the CPU; the labels come back on the embeddings' device
    return run_on_cpu(
        _cluster_on_cpu, embeddings.detach(), int(seed), max_clusters, min_silhouette, identical_distance, n_init
    )


def _cluster_on_cpu(
    embeddings: torch.Tensor, seed: int, max_clusters: int, min_silhouette: float, identical_distance: float,
    n_init: int,
) -> tuple[torch.Tensor, int]:
    """``choose_num_clusters`` on CPU tensors (scikit-learn and numpy need them)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score
    from sklearn.metrics.pairwise import cosine_distances

    points = embeddings.double()
    num = points.size(0)
    one_cluster = torch.zeros(num, dtype=torch.long)
    if num < 3:
        return one_cluster, 1
    x = F.normalize(points, p=2.0, dim=1).numpy()
    distances = cosine_distances(x)
    if float(distances.max()) < identical_distance:
        return one_cluster, 1

    best_k, best_score, best_labels = 1, -np.inf, None
    for k in range(2, min(num - 1, max_clusters) + 1):
        with warnings.catch_warnings():
            # Duplicate points: "Number of distinct clusters (m) found smaller than n_clusters (k)".
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(x)
        if np.unique(labels).size != k:
            continue
        score = float(silhouette_score(distances, labels, metric="precomputed"))
        if score > best_score:
            best_k, best_score, best_labels = k, score, labels
    if best_labels is None or best_score < min_silhouette:
        return one_cluster, 1
    return torch.from_numpy(_first_appearance_labels(best_labels)), best_k


def cluster_semantic_entropy(labels: torch.Tensor, seq_logps: torch.Tensor) -> torch.Tensor:
    """``SE(x) = -sum_k P(C_k|x) log P(C_k|x)`` (paper Eq. 6, spec 3.2 steps 4-5), in log space.

    ``log P(C_k|x) = logsumexp_{j in C_k} l_j - logsumexp_{all j} l_j`` with ``l_j`` the length-normalised
    log-likelihoods ``seq_logps`` (G,): the cluster masses are normalised over the sampled group.
    Returns a float32 0-d tensor in ``[0, log K]``.
    """
    if labels.dim() != 1 or labels.shape != seq_logps.shape:
        raise ValueError(
            "expected labels and seq_logps of the same (G,) shape, "
            f"got {tuple(labels.shape)} and {tuple(seq_logps.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("cannot compute the semantic entropy of an empty group")
    logps = seq_logps.detach().double()
    labels = labels.to(logps.device)
    total = torch.logsumexp(logps, dim=0)
    cluster_log_mass = torch.stack([torch.logsumexp(logps[labels == k], dim=0) for k in torch.unique(labels)]) - total
    entropy = -(cluster_log_mass.exp() * cluster_log_mass).sum()
    return (entropy.clamp(min=0.0) + 0.0).float()  # + 0.0 turns a -0.0 into 0.0


def semantic_entropy(
    embeddings: torch.Tensor, seq_logps: torch.Tensor, seed: int, **kmeans_limits
) -> tuple[torch.Tensor, int]:
    """SE(x) of one group (spec 3.2): ``choose_num_clusters`` then ``cluster_semantic_entropy``.

    ``embeddings`` is ``(G, D)`` (from ``mean_pool_completion_states``), ``seq_logps`` is ``(G,)`` (the
    l_j from ``sequence_mean``). Rows with a NaN/inf embedding or a non-finite l_j (empty response, NaN
    log-probs) are dropped from the group with one warning; with no valid row left the result is
    ``(NaN, 0)``. ``kmeans_limits`` go to ``choose_num_clusters`` (``max_clusters``, ``min_silhouette``,
    ``identical_distance``, ``n_init``). Returns ``(SE float32 0-d tensor, K)``.
    """
    if embeddings.dim() != 2 or seq_logps.dim() != 1 or embeddings.size(0) != seq_logps.size(0):
        raise ValueError(
            f"expected embeddings (G, D) and seq_logps (G,), got {tuple(embeddings.shape)} and {tuple(seq_logps.shape)}"
        )
    valid = torch.isfinite(embeddings).all(dim=1) & torch.isfinite(seq_logps)
    num_invalid = int((~valid).sum())
    if num_invalid:
        warnings.warn(
            f"semantic entropy: dropping {num_invalid} of {valid.numel()} responses with a NaN embedding or "
            "log-likelihood (empty response or NaN log-probs)",
            RuntimeWarning,
            stacklevel=2,
        )
    if num_invalid == valid.numel():
        return torch.tensor(float("nan"), device=seq_logps.device), 0
    labels, k = choose_num_clusters(embeddings[valid], seed, **kmeans_limits)
    return cluster_semantic_entropy(labels, seq_logps[valid]), k


def group_semantic_entropies(
    embeddings: torch.Tensor,
    seq_logps: torch.Tensor,
    num_generations: int,
    compute: torch.Tensor,
    step: int,
    base_seed: int = 0,
    **kmeans_limits,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SE per group of a batch ordered group by group; only where ``compute`` (bool, one per group) is True.

    ``embeddings`` is ``(N, D)``, ``seq_logps`` ``(N,)`` with ``N = n_groups * num_generations``. Group g
    is clustered with ``kmeans_seed(step, g, base_seed)``, so pass the global batch (or global group
    indices) for the same result on every rank. Returns ``(se (n_groups,) float32, k (n_groups,) long)``:
    NaN / 0 for groups not computed (ZAPO only needs the zero-advantage groups) or without valid rows.
    """
    if num_generations < 1 or seq_logps.dim() != 1 or seq_logps.numel() % num_generations != 0:
        raise ValueError(f"{seq_logps.numel()} log-likelihoods cannot be split into groups of {num_generations}")
    n_groups = seq_logps.numel() // num_generations
    if compute.shape != (n_groups,):
        raise ValueError(f"compute must have one entry per group ({n_groups}), got shape {tuple(compute.shape)}")
    se = torch.full((n_groups,), float("nan"), dtype=torch.float32, device=seq_logps.device)
    ks = torch.zeros(n_groups, dtype=torch.long, device=seq_logps.device)
    for g in torch.nonzero(compute, as_tuple=False).flatten().tolist():
        rows = slice(g * num_generations, (g + 1) * num_generations)
        se[g], ks[g] = semantic_entropy(
            embeddings[rows], seq_logps[rows], kmeans_seed(step, g, base_seed), **kmeans_limits
        )
    return se, ks
