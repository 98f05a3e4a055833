"""Category clustering: image categories are the points, their class profiles the features.

Classes that the network represents alike end up together (the paper's first clustering).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from lightning_neurons.checks import Constraints, Interval, Options
from lightning_neurons.clustering._common import (
    SHARED_CONSTRAINTS,
    best_by_silhouette,
    candidate_cluster_counts,
    relabel,
    silhouette_precomputed,
    store_params,
    validate_params,
    validate_profile,
)
from lightning_neurons.errors import NeuronsError

CategoryMethod = Literal["agglomerative", "kmeans", "hdbscan"]
Metric = Literal["correlation", "cosine", "euclidean"]
Linkage = Literal["average", "complete", "single", "ward"]
CategoryNormalize = Literal["none", "zscore"]


def standardize_columns(matrix: np.ndarray) -> np.ndarray:
    """Z-score every column (neuron) across the rows (categories); constant columns become 0."""
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    std = centred.std(axis=0, keepdims=True)
    return np.divide(
        centred, std, out=np.zeros_like(centred), where=std > 1e-12 * (1.0 + np.abs(matrix).max())
    )


def category_distances(features: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise distances between the rows of ``features`` through one matrix product.

    ``correlation`` is ``1 - Pearson r`` of the rows, ``cosine`` is ``1 - cos``, ``euclidean``
    the Euclidean distance. A constant row (all-zero, for cosine) has correlation 0 with every
    other row (distance 1).

    Args:
        features: ``[n, d]`` rows.
        metric: ``"correlation"``, ``"cosine"`` or ``"euclidean"``.

    Returns:
        ``(distances, gram)``: the ``[n, n]`` float64 distance matrix (zero diagonal, symmetric)
        and the Gram matrix of the transformed rows, in which Euclidean distance is monotone in
        the metric (for Ward linkage and k-means).
    """
    rows = features
    if metric == "correlation":
        rows = rows - rows.mean(axis=1, keepdims=True)
    if metric in ("correlation", "cosine"):
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        rows = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    gram = (rows @ rows.T).astype(np.float64)
    if metric == "euclidean":
        sq = np.diag(gram)
        distances = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0, None))
    else:
        distances = np.clip(1.0 - gram, 0.0, 2.0)
    distances = (distances + distances.T) / 2.0
    np.fill_diagonal(distances, 0.0)
    return distances, gram


def _gram_coordinates(gram: np.ndarray) -> np.ndarray:
    """Points whose Euclidean distances equal those of the rows behind ``gram`` (rank <= n)."""
    values, vectors = np.linalg.eigh(gram)
    keep = values > values.max() * 1e-10 if values.max() > 0 else values > 0
    if not keep.any():
        return np.zeros((gram.shape[0], 1))
    return vectors[:, keep] * np.sqrt(values[keep])


class CategoryClusterer(ClusterMixin, BaseEstimator):
    """Clusters image categories by their class profiles (categories are the points).

    The distance between two categories compares their rows of the class profile: by default
    ``1 - Pearson correlation`` (which ignores the overall activation level of a class), with
    average linkage. With ``n_clusters=None`` the number of clusters is the candidate count (see
    :func:`candidate_cluster_counts`) with the largest mean silhouette on those distances; HDBSCAN
    chooses its own number.

    Args:
        n_clusters: Number of clusters, or ``None`` to choose it by silhouette. Not used by
            ``"hdbscan"``.
        method: ``"agglomerative"`` (SciPy hierarchy; gives ``linkage_`` for a dendrogram),
            ``"kmeans"`` (scikit-learn, on coordinates that preserve the metric) or ``"hdbscan"``
            (on the precomputed distances; categories that fit no cluster get -1).
        metric: ``"correlation"``, ``"cosine"`` or ``"euclidean"``.
        linkage: ``"average"``, ``"complete"``, ``"single"`` or ``"ward"`` (Ward on the metric's
            Euclidean embedding: unit rows for cosine, centred unit rows for correlation).
        normalize: ``"zscore"`` (default) first standardises every neuron (column) across the
            categories, so that each neuron counts equally whatever its scale and baseline (a
            neuron that fires for every category would otherwise make every pair of categories
            look alike); ``"none"`` uses the profile as it is.
        max_clusters: Largest count tried when ``n_clusters=None`` (default: half the categories).
        min_cluster_size: Smallest cluster HDBSCAN reports.
        random_state: Seed of k-means.

    Attributes:
        labels_: ``[num_categories]`` int64 cluster of each category, numbered by first
            appearance (-1: HDBSCAN noise).
        n_clusters_: Number of clusters found.
        linkage_: SciPy linkage matrix ``[n - 1, 4]`` (agglomerative only, else ``None``), ready
            for :func:`scipy.cluster.hierarchy.dendrogram`.
        distances_: ``[n, n]`` category distance matrix.
        silhouette_: Mean silhouette of the labels on ``distances_`` (NaN when undefined).
        scores_: ``{count: silhouette}`` of the candidates when the count was chosen.

    Raises:
        NeuronsError: In :meth:`fit`: for an unknown option or a bad count, and a profile that is
            not 2-D, holds NaN/inf, or has fewer categories than clusters.

    Example:
        >>> profile = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 0.1, 0.9]])
        >>> CategoryClusterer(n_clusters=2).fit(profile).labels_
        array([0, 0, 1, 1])
    """

    _parameter_constraints: ClassVar[Constraints] = {
        **SHARED_CONSTRAINTS,
        "method": [Options.of(CategoryMethod)],
        "metric": [Options.of(Metric)],
        "linkage": [Options.of(Linkage)],
        "normalize": [Options.of(CategoryNormalize)],
        "min_cluster_size": [Interval(int, 2, None)],
    }

    def __init__(
        self,
        n_clusters: int | None = None,
        *,
        method: CategoryMethod = "agglomerative",
        metric: Metric = "correlation",
        linkage: Linkage = "average",
        normalize: CategoryNormalize = "zscore",
        max_clusters: int | None = None,
        min_cluster_size: int = 2,
        random_state: int = 0,
    ) -> None:
        store_params(self, locals())

    def check_params(self) -> CategoryClusterer:
        """Check the parameters (:meth:`fit` does; call it to check them before fitting).

        Raises:
            NeuronsError: For an unknown option or a bad count.
        """
        validate_params(self, "'agglomerative' or 'kmeans'")
        return self

    def fit(self, profile: Any, y: Any = None) -> CategoryClusterer:
        """Cluster the rows (categories) of ``profile``.

        Args:
            profile: ``[num_categories, num_neurons]`` array or tensor (a class profile, or
                several layers' profiles side by side).
            y: Ignored (scikit-learn convention).

        Returns:
            ``self``, with ``labels_`` and the other attributes set.

        Raises:
            NeuronsError: For bad parameters (see :meth:`check_params`), or if ``profile`` is not
                2-D, holds NaN/inf, or has fewer categories than ``n_clusters`` (or fewer than 3
                when the count is to be chosen).
        """
        self.check_params()
        x = validate_profile(self, profile, "categories", "neurons", min_rows=2)
        n = x.shape[0]
        if self.n_clusters is not None and self.n_clusters > n:
            raise NeuronsError(
                f"cannot make n_clusters={self.n_clusters} clusters of {n} categories; pass "
                f"n_clusters <= {n}"
            )
        if self.n_clusters is None and n < 3:
            raise NeuronsError(
                f"choosing the number of clusters needs at least 3 categories, got {n}; pass "
                "`n_clusters=`"
            )
        if self.method == "hdbscan" and n < self.min_cluster_size:
            raise NeuronsError(
                f"HDBSCAN with min_cluster_size={self.min_cluster_size} needs at least that many "
                f"categories, got {n}"
            )
        if self.normalize == "zscore":
            x = standardize_columns(x)
        self.distances_, gram = category_distances(x, self.metric)
        self.linkage_ = None
        self.scores_: dict[int, float] = {}
        if self.method == "agglomerative":
            labels = self._agglomerative()
        elif self.method == "kmeans":
            labels = self._kmeans(gram)
        else:
            labels = self._hdbscan()
        self.labels_ = relabel(labels)
        self.n_clusters_ = int(np.unique(self.labels_[self.labels_ >= 0]).size)
        self.silhouette_ = silhouette_precomputed(self.distances_, self.labels_)
        return self

    # ---- methods ----

    def _ward_distances(self) -> np.ndarray:
        if self.metric == "euclidean":
            return self.distances_
        # For unit (centred) rows |a - b|^2 = 2 (1 - a.b): the Euclidean distance Ward needs.
        return np.sqrt(2.0 * self.distances_)

    def _choose(self, candidates: list[int], labels_for: Any) -> np.ndarray:
        def score(labels: np.ndarray) -> float:
            return silhouette_precomputed(self.distances_, labels)

        return best_by_silhouette(candidates, labels_for, score, self.scores_)

    def _counts(self) -> list[int]:
        if self.n_clusters is not None:
            return [self.n_clusters]
        return candidate_cluster_counts(self.distances_.shape[0], self.max_clusters)

    def _agglomerative(self) -> np.ndarray:
        from scipy.cluster.hierarchy import cut_tree, linkage
        from scipy.spatial.distance import squareform

        d = self._ward_distances() if self.linkage == "ward" else self.distances_
        condensed = squareform(d, checks=False)
        self.linkage_ = linkage(condensed, method=self.linkage)
        counts = self._counts()
        cuts = cut_tree(self.linkage_, n_clusters=counts)
        by_count = {k: cuts[:, i].astype(np.int64) for i, k in enumerate(counts)}
        if self.n_clusters is not None:
            return by_count[self.n_clusters]
        return self._choose(counts, by_count.__getitem__)

    def _kmeans(self, gram: np.ndarray) -> np.ndarray:
        from sklearn.cluster import KMeans

        coords = _gram_coordinates(gram)

        def run(k: int) -> np.ndarray:
            if k == 1:
                return np.zeros(coords.shape[0], dtype=np.int64)
            km = KMeans(n_clusters=k, n_init=10, random_state=self.random_state)
            return km.fit_predict(coords).astype(np.int64)

        if self.n_clusters is not None:
            return run(self.n_clusters)
        return self._choose(self._counts(), run)

    def _hdbscan(self) -> np.ndarray:
        import hdbscan

        model = hdbscan.HDBSCAN(
            min_cluster_size=self.min_cluster_size,
            min_samples=1,
            metric="precomputed",
            allow_single_cluster=False,
        )
        return model.fit_predict(self.distances_.astype(np.float64)).astype(np.int64)
