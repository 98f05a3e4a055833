"""Clustering estimators: planted structure recovered exactly, errors, determinism, reservoir."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import dendrogram
from sklearn.metrics import adjusted_rand_score

from lightning_neurons import NeuronsError
from lightning_neurons.clustering import (
    ActivationReservoir,
    CategoryClusterer,
    NeuronClusterer,
    candidate_cluster_counts,
    category_distances,
    normalize_neurons,
)
from lightning_neurons.clustering.neuron import principal_components


def planted_categories(seed: int = 0, groups: int = 4, per_group: int = 3, neurons: int = 120):
    """Class profiles of ``groups`` blocks of similar classes, in a shuffled order."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(groups), per_group)
    rng.shuffle(truth)
    # Non-negative, ReLU-like responses: a shared baseline plus a group pattern plus noise.
    patterns = rng.gamma(1.0, 1.0, size=(groups, neurons))
    profile = 1.0 + patterns[truth] + 0.15 * rng.normal(size=(truth.size, neurons))
    return profile.clip(0), truth


def planted_neurons(
    seed: int = 0, blocks: int = 5, per_block: int = 40, classes: int = 10, dead: int = 6
):
    """Neurons tuned to one of ``blocks`` class patterns (plus noise), and some dead ones."""
    rng = np.random.default_rng(seed)
    tuning = np.zeros((blocks, classes))
    for b in range(blocks):  # each block prefers its own two classes
        tuning[b, [2 * b % classes, (2 * b + 1) % classes]] = 3.0
    truth = np.repeat(np.arange(blocks), per_block)
    rng.shuffle(truth)
    gain = rng.uniform(0.5, 2.0, size=truth.size)  # z-scoring removes the gain
    responses = gain[:, None] * (tuning[truth] + 0.2 * rng.normal(size=(truth.size, classes)))
    profile = np.concatenate([responses.T + 1.0, np.zeros((classes, dead))], axis=1)
    labels = np.concatenate([truth, -np.ones(dead, dtype=int)])
    return profile, labels


def same_partition(found: np.ndarray, truth: np.ndarray) -> bool:
    """Equal up to a renaming of the clusters (noise -1 must match exactly)."""
    if not np.array_equal(found < 0, truth < 0):
        return False
    keep = truth >= 0
    return adjusted_rand_score(truth[keep], found[keep]) == 1.0


# ---- category clustering --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "metric", "linkage"),
    [
        ("agglomerative", "correlation", "average"),
        ("agglomerative", "cosine", "average"),
        ("agglomerative", "euclidean", "average"),
        ("agglomerative", "correlation", "complete"),
        ("agglomerative", "correlation", "ward"),
        ("agglomerative", "euclidean", "ward"),
        ("kmeans", "correlation", "average"),
        ("kmeans", "euclidean", "average"),
        ("hdbscan", "correlation", "average"),
    ],
)
@pytest.mark.parametrize("n_clusters", [4, None])
def test_category_clusterer_recovers_planted_groups(method, metric, linkage, n_clusters):
    profile, truth = planted_categories()
    if method == "hdbscan":
        n_clusters = None
    model = CategoryClusterer(n_clusters=n_clusters, method=method, metric=metric, linkage=linkage)
    labels = model.fit(profile).labels_
    assert same_partition(labels, truth)
    assert model.n_clusters_ == 4
    assert labels.dtype == np.int64 and labels[0] == 0  # numbered by first appearance
    assert model.silhouette_ > 0.5


def test_category_clusterer_attributes():
    profile, truth = planted_categories()
    model = CategoryClusterer().fit(torch.as_tensor(profile, dtype=torch.float32))
    n = truth.size
    assert model.linkage_.shape == (n - 1, 4)
    assert len(dendrogram(model.linkage_, no_plot=True)["leaves"]) == n
    d = model.distances_
    assert d.shape == (n, n) and np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    assert max(model.scores_, key=model.scores_.get) == 4  # silhouette chose the planted count
    assert CategoryClusterer(method="kmeans", n_clusters=4).fit(profile).linkage_ is None


def test_correlation_ignores_how_strongly_a_class_activates_the_layer():
    profile, truth = planted_categories()
    loud = profile.copy()
    loud[0] *= 25.0  # one class drives every neuron 25 times harder
    assert same_partition(CategoryClusterer(n_clusters=4).fit(loud).labels_, truth)
    euclid = CategoryClusterer(n_clusters=4, metric="euclidean").fit(loud).labels_
    assert not same_partition(euclid, truth)  # what the correlation default protects against


def test_zscore_lets_small_scale_neurons_count():
    rng = np.random.default_rng(1)
    truth = np.repeat([0, 1], 4)
    informative = np.where(truth[:, None] == 0, 1.0, 0.0) * 0.01 + rng.normal(0, 1e-3, (8, 20))
    loud_noise = rng.normal(0, 1.0, size=(8, 5))
    profile = np.concatenate([informative, loud_noise], axis=1)
    zscored = CategoryClusterer(n_clusters=2, normalize="zscore", metric="euclidean").fit(profile)
    assert same_partition(zscored.labels_, truth)


def test_category_distances_match_scipy():
    from scipy.spatial.distance import cdist

    x = np.random.default_rng(0).normal(size=(6, 9))
    for metric in ("correlation", "cosine", "euclidean"):
        d, _ = category_distances(x, metric)
        assert np.allclose(d, cdist(x, x, metric=metric), atol=1e-10)


def test_category_clusterer_is_deterministic():
    profile, _ = planted_categories(seed=3, neurons=30)
    profile = profile + np.random.default_rng(0).normal(0, 0.8, profile.shape)  # blur it
    for method in ("agglomerative", "kmeans", "hdbscan"):
        a = CategoryClusterer(method=method, random_state=5).fit(profile)
        b = CategoryClusterer(method=method, random_state=5).fit(profile)
        assert np.array_equal(a.labels_, b.labels_), method
        assert a.scores_ == b.scores_


@pytest.mark.parametrize(
    ("profile", "kwargs", "match"),
    [
        (np.ones(5), {}, "2-D"),
        (np.ones((2, 3, 4)), {}, "2-D"),
        (np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 1.0]]), {}, "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0], [1.0, 1.0]]), {}, "NaN or infinite"),
        (np.zeros((0, 4)), {}, "empty"),
        (np.array([["a", "b"], ["c", "d"]]), {}, "numbers"),
        (np.eye(3), {"n_clusters": 4}, "n_clusters=4 clusters of 3 categories"),
        (np.eye(2), {}, "at least 3 categories"),
        (np.eye(3), {"method": "hdbscan", "min_cluster_size": 4}, "min_cluster_size=4"),
    ],
)
def test_category_clusterer_fit_errors(profile, kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        CategoryClusterer(**kwargs).fit(profile)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "spectral"}, "`method` must be one of"),
        ({"metric": "manhattan"}, "`metric`"),
        ({"linkage": "centroid"}, "`linkage`"),
        ({"normalize": "l2"}, "`normalize`"),
        ({"n_clusters": 0}, "`n_clusters`"),
        ({"n_clusters": 2.0}, "`n_clusters`"),
        ({"method": "hdbscan", "n_clusters": 3}, "not used with method='hdbscan'"),
        ({"max_clusters": 1}, "`max_clusters`"),
    ],
)
def test_category_clusterer_argument_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        CategoryClusterer(**kwargs).fit(np.eye(4))


def test_candidate_cluster_counts():
    assert candidate_cluster_counts(12) == [2, 3, 4, 5, 6]
    assert candidate_cluster_counts(3) == [2]
    assert candidate_cluster_counts(2) == []
    big = candidate_cluster_counts(1000)
    assert big[:19] == list(range(2, 21)) and max(big) == 500 and len(big) < 45
    assert max(candidate_cluster_counts(1000, max_clusters=50)) == 50


def _random_labelings(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Labels with singletons, with few and many clusters, and with noise (-1)."""
    out = [rng.integers(0, k, size=n) for k in (2, 3, 7, n // 2)]
    singletons = rng.integers(0, 3, size=n)
    singletons[:4] = [10, 11, 12, 13]
    noisy = rng.integers(0, 4, size=n)
    noisy[rng.random(n) < 0.2] = -1
    return [*out, singletons, noisy, np.arange(n) % 2]


def test_silhouette_scores_are_scikit_learns():
    """One silhouette per labelling, nested or not, equal to scikit-learn's within rounding
    (1e-12: sums of 60 distances of order 1 in float64)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist, squareform
    from sklearn.metrics import silhouette_score

    from lightning_neurons.clustering._common import silhouette_scores, tree_cuts

    rng = np.random.default_rng(0)
    points = rng.normal(size=(60, 5)) + np.repeat(rng.normal(size=(4, 5)) * 3, 15, axis=0)
    d = squareform(pdist(points))
    counts = [59, 30, 12, 5, 4, 3, 2]  # nested cuts, finest first
    cuts = tree_cuts(linkage(pdist(points), "average"), counts)
    labelings = [cuts[k] for k in counts] + _random_labelings(rng, 60)
    for labels, value in zip(labelings, silhouette_scores(d, labelings), strict=True):
        keep = labels >= 0
        expected = silhouette_score(d[np.ix_(keep, keep)], labels[keep], metric="precomputed")
        assert value == pytest.approx(expected, abs=1e-12)
    # undefined: one cluster, or as many clusters as points
    assert np.isnan(silhouette_scores(d, [np.zeros(60, int), np.arange(60)])).all()


@pytest.mark.parametrize("method", ["average", "single", "complete", "ward"])
def test_tree_cuts_are_scipys_cut_tree(method):
    from scipy.cluster.hierarchy import cut_tree, linkage

    from lightning_neurons.clustering._common import relabel, tree_cuts

    rng = np.random.default_rng(1)
    points = np.round(rng.normal(size=(80, 3)), 1)  # rounded: tied merge heights
    points[10:14] = points[9]  # duplicates: zero heights
    tree = linkage(points, method)
    counts = [1, 2, 3, 9, 40, 79, 80]
    cuts = tree_cuts(tree, counts)
    for k in counts:  # one count at a time: cut_tree mixes up its columns when given k = n
        expected = cut_tree(tree, n_clusters=[k])[:, 0].astype(np.int64)
        assert np.array_equal(relabel(cuts[k]), relabel(expected)), k
        assert np.unique(cuts[k]).size == k


@pytest.mark.parametrize("seed", range(6))
def test_the_count_choice_is_the_previous_one(seed):
    """The count and labels chosen are those of scoring every cut with scikit-learn's
    ``silhouette_score`` and taking the first best (as before the scores came from sums)."""
    from scipy.cluster.hierarchy import cut_tree
    from sklearn.metrics import silhouette_score

    from lightning_neurons.clustering._common import relabel

    profile, _ = planted_categories(seed, groups=3 + seed, per_group=2 + seed % 3, neurons=40)
    profile = profile + np.random.default_rng(seed).normal(scale=0.8, size=profile.shape)
    model = CategoryClusterer().fit(profile)
    counts = candidate_cluster_counts(profile.shape[0])
    cuts = cut_tree(model.linkage_, n_clusters=counts)
    scores = [
        silhouette_score(model.distances_, cuts[:, i], metric="precomputed")
        for i in range(len(counts))
    ]
    best = int(np.argmax(scores))  # the first of equal maxima
    assert model.n_clusters_ == counts[best]
    assert np.array_equal(model.labels_, relabel(cuts[:, best].astype(np.int64)))
    assert [model.scores_[k] for k in counts] == pytest.approx(scores, abs=1e-12)
    assert model.silhouette_ == pytest.approx(scores[best], abs=1e-12)


def test_large_profiles_are_multiplied_in_float32_to_float32_precision():
    """Above 4M entries the profile is float32: the distances agree with float64 ones to 1e-5
    (float32 keeps 7 digits; the products sum 14,000 terms) and the planted groups are found."""
    from lightning_neurons.clustering import category

    profile, truth = planted_categories(groups=6, per_group=50, neurons=14_000)
    assert profile.size > category.FLOAT32_ABOVE
    model = CategoryClusterer(n_clusters=6).fit(profile)
    exact, _ = category_distances(category.standardize_columns(profile), "correlation")
    assert np.abs(model.distances_ - exact).max() < 1e-5
    assert model.distances_.dtype == np.float64
    assert same_partition(model.labels_, truth)


# ---- neuron clustering ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "hdbscan"},
        {"method": "hdbscan", "min_cluster_size": 10},
        {"method": "kmeans", "n_clusters": 5},
        {"method": "kmeans"},
        {"method": "agglomerative", "n_clusters": 5},
        {"method": "agglomerative"},
    ],
)
def test_neuron_clusterer_recovers_planted_blocks_and_leaves_dead_neurons_out(kwargs):
    profile, truth = planted_neurons()
    model = NeuronClusterer(**kwargs).fit(profile)
    assert same_partition(model.labels_, truth)
    assert model.n_clusters_ == 5
    assert model.constant_.sum() == 6 and np.all(model.labels_[model.constant_] == -1)
    assert sorted(model.cluster_sizes_.tolist()) == [40] * 5
    assert model.cluster_profiles_.shape == (5, 10)
    assert model.embedding_.shape[0] == profile.shape[1]
    # each cluster's mean profile peaks on its planted classes
    for c in range(5):
        block = truth[np.flatnonzero(model.labels_ == c)[0]]
        assert set(np.argsort(-model.cluster_profiles_[c])[:2]) == {
            2 * block % 10,
            (2 * block + 1) % 10,
        }


def test_hdbscan_marks_neurons_that_fit_no_group_as_noise():
    # Four blocks of 40 neurons tuned to classes (0, 1), (2, 3), (4, 5), (6, 7); eight odd
    # neurons tuned to class 8 or 9 alone: too few of a kind to make a cluster of 10.
    rng = np.random.default_rng(7)
    truth = np.concatenate([np.repeat(np.arange(4), 40), -np.ones(8, dtype=int)])
    profile = np.ones((10, truth.size))
    for j, block in enumerate(truth):
        peaks = [2 * block, 2 * block + 1] if block >= 0 else [8 + j % 2]
        profile[peaks, j] += 3.0
    profile += 0.2 * rng.normal(size=profile.shape)
    model = NeuronClusterer(min_cluster_size=10).fit(profile)
    blocks = truth >= 0
    assert adjusted_rand_score(truth[blocks], model.labels_[blocks]) == 1.0
    assert np.all(model.labels_[blocks] >= 0)
    assert np.mean(model.labels_[~blocks] == -1) >= 0.75


def test_neuron_clusterer_reduces_long_profiles_with_pca():
    # Per-image rows (300 images) instead of class means: PCA to 16 dimensions first.
    profile, truth = planted_neurons(dead=0)
    rng = np.random.default_rng(0)
    images = np.repeat(profile, 30, axis=0) + 0.3 * rng.normal(size=(300, profile.shape[1]))
    model = NeuronClusterer(n_components=16).fit(images)
    assert model.embedding_.shape == (truth.size, 16)
    assert same_partition(model.labels_, truth)


def test_principal_components_keep_the_distances_of_points_in_fewer_dimensions():
    # 300 points on a 6-dimensional plane in 80 dimensions: 10 axes span the plane, so the
    # reduced points are the centred points rotated, their distances kept. float32 arithmetic on
    # values of order 10: distances (order 10-100) agree to a few 1e-5, far inside 1e-3.
    rng = np.random.default_rng(3)
    points = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 80)) + 5.0
    reduced = principal_components(points, 10, seed=0)
    assert reduced.shape == (300, 10) and reduced.dtype == np.float32
    assert np.allclose(pairwise(reduced), pairwise(points), rtol=1e-3, atol=1e-3)


def test_principal_components_hold_the_variance_of_the_exact_ones_and_leave_the_rng_alone():
    # A noisy spectrum (no gap at 16): the randomized axes keep at least 99% of the variance
    # of the exact first 16 (99.74% at least on ResNet-50's layers, docs/benchmarks.md).
    rng = np.random.default_rng(4)
    scales = 1.0 / np.arange(1, 201) ** 0.5
    points = rng.normal(size=(1000, 200)) * scales
    centred = points - points.mean(axis=0)
    exact = np.linalg.svd(centred, compute_uv=False)[:16] ** 2
    torch.manual_seed(123)
    state = torch.get_rng_state()
    reduced = principal_components(points, 16, seed=5)
    assert torch.equal(torch.get_rng_state(), state), "training's random stream moved"
    assert (reduced.astype(np.float64) ** 2).sum() >= 0.99 * exact.sum()
    assert np.array_equal(reduced, principal_components(points, 16, seed=5))


def pairwise(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)


def test_normalize_neurons_options():
    x = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [-4.0, 0.0, 2.0]])
    z, constant = normalize_neurons(x, "zscore")
    assert constant.tolist() == [False, True, False]
    assert (
        np.allclose(z[0], z[0] - z[0].mean()) and np.isclose(z[0].std(), 1.0) and np.all(z[1] == 0)
    )
    assert np.allclose(np.linalg.norm(normalize_neurons(x, "l2")[0], axis=1), 1.0)
    assert np.allclose(np.abs(normalize_neurons(x, "max")[0]).max(axis=1), 1.0)
    assert np.array_equal(normalize_neurons(x, "none")[0], x)


def test_neuron_clusterer_is_deterministic():
    profile, _ = planted_neurons(seed=2)
    noisy = profile + np.random.default_rng(0).normal(0, 1.5, profile.shape)
    for kwargs in (
        {"method": "hdbscan"},
        {"method": "kmeans"},
        {"method": "agglomerative", "n_clusters": 4},
    ):
        a = NeuronClusterer(random_state=3, **kwargs).fit(noisy).labels_
        b = NeuronClusterer(random_state=3, **kwargs).fit(noisy).labels_
        assert np.array_equal(a, b), kwargs


@pytest.mark.parametrize(
    ("profile", "kwargs", "match"),
    [
        (np.ones((1, 8)), {}, "only 1 row"),
        (np.ones(8), {}, "2-D"),
        (np.full((3, 8), np.nan), {}, "NaN"),
        (np.zeros((4, 10)), {}, "needs at least 3 neurons whose response varies"),
        (np.eye(4, 6), {"method": "kmeans", "n_clusters": 7}, "n_clusters=7 needs at least 7"),
    ],
)
def test_neuron_clusterer_fit_errors(profile, kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        NeuronClusterer(**kwargs).fit(profile)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "dbscan"}, "`method`"),
        ({"normalize": "softmax"}, "`normalize`"),
        ({"method": "hdbscan", "n_clusters": 4}, "not used with method='hdbscan'"),
        ({"method": "kmeans", "min_cluster_size": 4}, "HDBSCAN settings"),
        ({"min_cluster_size": 1}, "`min_cluster_size`"),
        ({"n_components": 0}, "`n_components`"),
    ],
)
def test_neuron_clusterer_argument_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        NeuronClusterer(**kwargs).fit(np.eye(4))


# ---- reservoir ------------------------------------------------------------------------------


def test_reservoir_keeps_a_bounded_uniform_sample():
    res = ActivationReservoir(size=1000, seed=0)
    state = torch.random.get_rng_state()
    for start in range(0, 20_000, 250):
        rows = torch.arange(start, start + 250, dtype=torch.float32)
        res.update(rows[:, None].repeat(1, 3), (rows % 4).long())
    assert torch.equal(state, torch.random.get_rng_state())
    assert res.values.shape == (1000, 3) and res.seen == 20_000 and len(res) == 1000
    index = res.values[:, 0]
    assert index.unique().numel() == 1000  # no row twice
    # A uniform sample of 0..19999 has mean 9999.5 and standard error 5773/sqrt(1000) = 183.
    assert abs(float(index.mean()) - 9999.5) < 4 * 183
    assert float((index < 10_000).float().mean()) == pytest.approx(0.5, abs=0.07)
    assert torch.equal(res.labels, (index % 4).long())  # labels travel with their rows


def test_reservoir_before_it_is_full_keeps_everything_in_order():
    res = ActivationReservoir(size=10, seed=0)
    res.update(torch.arange(6.0)[:, None], torch.tensor([0, 1, 0, 1, 0, 1]))
    assert res.values[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    profile = res.class_profile(3)
    assert profile[0, 0] == 2.0 and profile[1, 0] == 3.0 and torch.isnan(profile[2, 0])


def test_reservoir_is_deterministic_and_resumable():
    def fill(res, batches):
        for b in batches:
            res.update(torch.arange(b * 50, (b + 1) * 50, dtype=torch.float32)[:, None])

    a, b = ActivationReservoir(64, seed=4), ActivationReservoir(64, seed=4)
    fill(a, range(10))
    fill(b, range(5))
    c = ActivationReservoir(64, seed=4)
    c.load_state_dict(b.state_dict())
    fill(c, range(5, 10))
    assert torch.equal(a.values, c.values) and a.seen == c.seen
    d = ActivationReservoir(64, seed=5)
    fill(d, range(10))
    assert not torch.equal(a.values, d.values)


def test_reservoir_feeds_neuron_clustering():
    profile, truth = planted_neurons(dead=0)
    res = ActivationReservoir(size=200, seed=0)
    gen = torch.Generator().manual_seed(0)
    base = torch.as_tensor(profile, dtype=torch.float32)
    for _ in range(8):
        labels = torch.randint(0, 10, (64,), generator=gen)
        res.update(base[labels] + 0.2 * torch.randn(64, base.shape[1], generator=gen), labels)
    model = NeuronClusterer().fit(res.values)
    assert same_partition(model.labels_, truth)


def test_reservoir_errors():
    with pytest.raises(NeuronsError, match="`size`"):
        ActivationReservoir(0)
    res = ActivationReservoir(4)
    with pytest.raises(NeuronsError, match=r"\[batch, neurons\]"):
        res.update(torch.zeros(3))
    with pytest.raises(NeuronsError, match="2 labels for 3 rows"):
        res.update(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    res.update(torch.zeros(3, 2))
    with pytest.raises(NeuronsError, match="one reservoir per layer"):
        res.update(torch.zeros(3, 5))


@pytest.mark.parametrize("cls", [CategoryClusterer, NeuronClusterer])
def test_estimators_follow_scikit_learn_conventions(cls):
    import inspect

    from sklearn.base import clone

    model = cls(2, method="kmeans", random_state=3)
    params = model.get_params()
    assert (params["n_clusters"], params["method"], params["random_state"]) == (2, "kmeans", 3)
    copy = clone(model)
    assert copy is not model and copy.get_params() == params
    bad = cls(method="nonsense")  # stored as given, checked by fit
    assert bad.method == "nonsense"
    with pytest.raises(NeuronsError, match="`method`"):
        bad.fit(np.eye(4))
    names = list(inspect.signature(cls).parameters)
    assert names[:2] == ["n_clusters", "method"] and names[-1] == "random_state"
    assert model.fit_predict(np.eye(4) + 0.1 * np.arange(4)).shape == (4,)
