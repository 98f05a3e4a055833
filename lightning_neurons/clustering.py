"""Clustering of image categories and of neurons, scikit-learn shaped (``fit`` / ``labels_``).

* :class:`CategoryClusterer`: the categories are the points and their class profiles (one row of
  ``[num_classes, num_neurons]``) the features. Classes that the network represents alike end up
  together (the paper's first clustering).
* :class:`NeuronClusterer`: the neurons are the points and their normalised response across the
  categories (one column) the features. Neurons tuned alike end up together; density clustering
  (HDBSCAN) leaves unselective neurons as noise, label ``-1`` (the paper's second clustering).
* :class:`ActivationReservoir`: a fixed-size uniform sample of per-image activations, for neuron
  clustering on individual images rather than class means, with bounded memory.

The estimators use scikit-learn, SciPy and ``hdbscan``; what they add is input checking with
clear errors, the distance a profile needs (correlation, cosine), a documented choice of the
number of clusters, deterministic labels for a ``random_state``, and memory-aware shortcuts that
keep ImageNet-sized layers (tens of thousands of neurons, a thousand categories) to seconds.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin

from lightning_neurons.checks import check_choice, check_optional_int
from lightning_neurons.errors import NeuronsError

CategoryMethod = Literal["agglomerative", "kmeans", "hdbscan"]
NeuronMethod = Literal["hdbscan", "kmeans", "agglomerative"]
Metric = Literal["correlation", "cosine", "euclidean"]
Linkage = Literal["average", "complete", "single", "ward"]
CategoryNormalize = Literal["none", "zscore"]
NeuronNormalize = Literal["zscore", "l2", "max", "none"]

#: Above this many matrix entries the estimators compute in float32 (half the memory).
_FLOAT32_ABOVE = 1 << 24


# ---- checks ---------------------------------------------------------------------------------


def _as_matrix(profile: Any, what: str, rows: str, cols: str) -> np.ndarray:
    """The profile as a finite 2-D float array (float32 when large), or a clear error."""
    if isinstance(profile, torch.Tensor):
        profile = profile.detach().cpu()
        if profile.dtype in (torch.bfloat16, torch.float16):
            profile = profile.float()
        profile = profile.numpy()
    try:
        array = np.asarray(profile)
    except Exception as err:  # ragged lists, objects
        raise NeuronsError(
            f"`{what}` must be a 2-D array [{rows}, {cols}]; could not read it ({err})"
        ) from err
    if array.ndim != 2:
        raise NeuronsError(
            f"`{what}` must be a 2-D array [{rows}, {cols}]; got shape {tuple(array.shape)}"
        )
    if array.dtype.kind not in "fiub":
        raise NeuronsError(f"`{what}` must hold numbers; got dtype {array.dtype}")
    if 0 in array.shape:
        raise NeuronsError(f"`{what}` is empty (shape {tuple(array.shape)})")
    dtype = np.float32 if array.size > _FLOAT32_ABOVE else np.float64
    array = np.asarray(array, dtype=dtype)
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise NeuronsError(
            f"`{what}` holds {int((~finite).sum())} NaN or infinite values (in {rows} "
            f"{bad_rows[:10].tolist()}{' ...' if bad_rows.size > 10 else ''}); a class without "
            "images has NaN means. Drop those rows/columns or fill them before clustering."
        )
    return array


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Number clusters 0, 1, ... in order of first appearance (noise stays -1), so that equal
    partitions get equal labels whatever the algorithm's internal numbering."""
    out = np.full(labels.shape, -1, dtype=np.int64)
    mapping: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        if label < 0:
            continue
        if label not in mapping:
            mapping[label] = len(mapping)
        out[i] = mapping[label]
    return out


def candidate_cluster_counts(n_points: int, max_clusters: int | None = None) -> list[int]:
    """The numbers of clusters tried when ``n_clusters=None``.

    Every count from 2 to 20, then about 20 log-spaced counts up to ``max_clusters`` (default
    ``n_points // 2``), never more than ``n_points - 1``.

    Args:
        n_points: Number of points being clustered (at least 3).
        max_clusters: Largest count to try.

    Returns:
        Sorted counts.
    """
    upper = n_points - 1
    upper = min(upper, max_clusters if max_clusters is not None else max(2, n_points // 2))
    if upper < 2:
        return []
    counts = set(range(2, min(upper, 20) + 1))
    if upper > 20:
        counts.update(int(round(v)) for v in np.geomspace(20, upper, num=20))
    return sorted(c for c in counts if 2 <= c <= upper)


def _silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette on precomputed distances, noise (-1) left out; NaN when undefined."""
    from sklearn.metrics import silhouette_score

    keep = labels >= 0
    found = np.unique(labels[keep])
    if found.size < 2 or found.size >= keep.sum():
        return float("nan")
    sub = distances[np.ix_(keep, keep)]
    return float(silhouette_score(sub, labels[keep], metric="precomputed"))


# ---- category clustering --------------------------------------------------------------------


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
        self.n_clusters = n_clusters
        self.method = method
        self.metric = metric
        self.linkage = linkage
        self.normalize = normalize
        self.max_clusters = max_clusters
        self.min_cluster_size = min_cluster_size
        self.random_state = random_state

    def check_params(self) -> CategoryClusterer:
        """Check the parameters (:meth:`fit` does; call it to check them before fitting).

        Raises:
            NeuronsError: For an unknown option or a bad count.
        """
        check_optional_int("n_clusters", self.n_clusters, 1)
        check_choice("method", self.method, ("agglomerative", "kmeans", "hdbscan"))
        check_choice("metric", self.metric, ("correlation", "cosine", "euclidean"))
        check_choice("linkage", self.linkage, ("average", "complete", "single", "ward"))
        check_choice("normalize", self.normalize, ("none", "zscore"))
        check_optional_int("max_clusters", self.max_clusters, 2)
        check_optional_int("min_cluster_size", self.min_cluster_size, 2)
        if self.method == "hdbscan" and self.n_clusters is not None:
            raise NeuronsError(
                "`n_clusters` is not used with method='hdbscan', which finds the number of clusters "
                "itself; pass n_clusters=None (and tune `min_cluster_size`), or choose "
                "method='agglomerative' or 'kmeans'."
            )
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
        x = _as_matrix(profile, "profile", "categories", "neurons")
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
        self.labels_ = _relabel(labels)
        self.n_clusters_ = int(np.unique(self.labels_[self.labels_ >= 0]).size)
        self.silhouette_ = _silhouette(self.distances_, self.labels_)
        return self

    # ---- methods ----

    def _ward_distances(self) -> np.ndarray:
        if self.metric == "euclidean":
            return self.distances_
        # For unit (centred) rows |a - b|^2 = 2 (1 - a.b): the Euclidean distance Ward needs.
        return np.sqrt(2.0 * self.distances_)

    def _choose(self, candidates: list[int], labels_for: Any) -> np.ndarray:
        best_score, best_labels = -np.inf, None
        for k in candidates:
            labels = labels_for(k)
            score = _silhouette(self.distances_, labels)
            self.scores_[k] = score
            if np.isfinite(score) and score > best_score + 1e-12:
                best_score, best_labels = score, labels
        if best_labels is None:  # no structure at all: every candidate undefined
            best_labels = labels_for(candidates[0])
        return best_labels

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


# ---- neuron clustering ----------------------------------------------------------------------


def normalize_neurons(features: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalise each neuron's response (a row of ``[num_neurons, num_rows]``).

    Args:
        features: ``[num_neurons, num_rows]`` responses (the transposed profile).
        how: ``"zscore"`` (shape of the tuning curve), ``"l2"`` (unit length), ``"max"`` (divide
            by the largest absolute response) or ``"none"``.

    Returns:
        ``(normalised, constant)``: the normalised features, and a ``[num_neurons]`` bool mask of
        neurons whose response does not vary at all (nothing to cluster).
    """
    spread = features.max(axis=1) - features.min(axis=1)
    scale = 1.0 + np.abs(features).max(axis=1)
    constant = spread <= 1e-7 * scale
    out = features
    if how == "zscore":
        centred = features - features.mean(axis=1, keepdims=True)
        std = centred.std(axis=1, keepdims=True)
        out = np.divide(
            centred, std, out=np.zeros_like(centred), where=~constant[:, None] & (std > 0)
        )
    elif how == "l2":
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        out = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    elif how == "max":
        peak = np.abs(features).max(axis=1, keepdims=True)
        out = np.divide(features, peak, out=np.zeros_like(features), where=peak > 0)
    return out, constant


class NeuronClusterer(ClusterMixin, BaseEstimator):
    """Clusters neurons (the columns of a profile) by their normalised response across the rows.

    The rows are usually the categories of a class profile ``[num_classes, num_neurons]``, but
    any ``[num_rows, num_neurons]`` matrix works, e.g. per-image activations from an
    :class:`ActivationReservoir`. Each neuron's response is normalised (``normalize``), reduced
    to ``n_components`` dimensions by PCA when it is longer (which keeps HDBSCAN fast on large
    layers), and clustered. Neurons whose response does not vary at all (dead neurons, say) are
    left out and labelled -1 whatever the method; HDBSCAN also labels -1 the neurons that fit no
    dense group (unselective or idiosyncratic neurons).

    With ``n_clusters=None``, k-means and agglomerative clustering choose the count with the
    largest mean silhouette among :func:`candidate_cluster_counts` (up to ``max_clusters``),
    measured on at most 2,000 neurons.

    Args:
        n_clusters: Number of clusters for k-means / agglomerative; ``None`` to choose.
        method: ``"hdbscan"`` (default), ``"kmeans"`` or ``"agglomerative"`` (Ward).
        min_cluster_size: Smallest HDBSCAN cluster; default ``max(3, int(sqrt(num_neurons) / 2))``
            (3 for up to 63 neurons, 5 for 128, 11 for 512, 70 for 20,000).
        min_samples: HDBSCAN's density smoothing (larger: more neurons left as noise); default
            ``min(min_cluster_size, 10)``.
        normalize: ``"zscore"``, ``"l2"``, ``"max"`` or ``"none"`` (see :func:`normalize_neurons`).
        n_components: PCA dimensions when the response is longer than that (48 keeps about 40
            tuning groups apart at 1,000 categories; HDBSCAN's time grows with it); ``None``
            keeps all.
        max_clusters: Largest count tried when choosing (default 20).
        random_state: Seed of PCA, k-means and the silhouette sample.

    Attributes:
        labels_: ``[num_neurons]`` int64 cluster of each neuron (-1: noise or constant).
        n_clusters_: Number of clusters (noise not counted).
        constant_: ``[num_neurons]`` bool, neurons left out because their response is constant.
        embedding_: ``[num_neurons, d]`` the normalised (and reduced) features that were
            clustered (zeros for constant neurons), e.g. for an embedding projector.
        cluster_profiles_: ``[n_clusters_, num_rows]`` mean normalised response of each cluster.
        cluster_sizes_: ``[n_clusters_]`` neurons per cluster.
        silhouette_: Mean silhouette (Euclidean, on the embedding; noise left out).
        scores_: ``{count: silhouette}`` when the count was chosen.

    Raises:
        NeuronsError: In :meth:`fit`: for unknown options, and a profile that is not 2-D, holds
            NaN/inf, or has fewer varying neurons than clusters.

    Example:
        >>> profile = np.array([[1.0, 0.9, 0.0, 0.1], [0.0, 0.1, 1.0, 0.8], [0.5, 0.4, 0.5, 0.5]])
        >>> NeuronClusterer(method="kmeans", n_clusters=2).fit(profile).labels_
        array([0, 0, 1, 1])
    """

    def __init__(
        self,
        n_clusters: int | None = None,
        *,
        method: NeuronMethod = "hdbscan",
        normalize: NeuronNormalize = "zscore",
        max_clusters: int = 20,
        min_cluster_size: int | None = None,
        min_samples: int | None = None,
        n_components: int | None = 48,
        random_state: int = 0,
    ) -> None:
        self.n_clusters = n_clusters
        self.method = method
        self.normalize = normalize
        self.max_clusters = max_clusters
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.n_components = n_components
        self.random_state = random_state

    def check_params(self) -> NeuronClusterer:
        """Check the parameters (:meth:`fit` does; call it to check them before fitting).

        Raises:
            NeuronsError: For an unknown option, a bad count, or HDBSCAN settings with another
                method.
        """
        check_optional_int("n_clusters", self.n_clusters, 1)
        check_choice("method", self.method, ("hdbscan", "kmeans", "agglomerative"))
        check_choice("normalize", self.normalize, ("zscore", "l2", "max", "none"))
        check_optional_int("max_clusters", self.max_clusters, 2)
        check_optional_int("min_cluster_size", self.min_cluster_size, 2)
        check_optional_int("min_samples", self.min_samples, 1)
        check_optional_int("n_components", self.n_components, 1)
        if self.method == "hdbscan" and self.n_clusters is not None:
            raise NeuronsError(
                "`n_clusters` is not used with method='hdbscan', which finds the number of clusters "
                "itself; pass n_clusters=None (and tune `min_cluster_size`), or choose "
                "method='kmeans' or 'agglomerative'."
            )
        if self.method != "hdbscan" and (
            self.min_cluster_size is not None or self.min_samples is not None
        ):
            raise NeuronsError(
                f"`min_cluster_size` and `min_samples` are HDBSCAN settings; method={self.method!r} "
                "uses `n_clusters` instead"
            )
        return self

    def fit(self, profile: Any, y: Any = None) -> NeuronClusterer:
        """Cluster the columns (neurons) of ``profile``.

        Args:
            profile: ``[num_rows, num_neurons]``: a class profile, or per-image activations.
            y: Ignored.

        Returns:
            ``self``.

        Raises:
            NeuronsError: For bad parameters (see :meth:`check_params`), or if ``profile`` is not
                2-D, holds NaN/inf, has fewer than 2 rows, or fewer varying neurons than the
                clusters asked for.
        """
        self.check_params()
        x = _as_matrix(profile, "profile", "categories", "neurons")
        if x.shape[0] < 2:
            raise NeuronsError(
                f"neurons are clustered by their response across categories (rows); `profile` has "
                f"only {x.shape[0]} row, so there is nothing to compare. Give at least 2."
            )
        features, constant = normalize_neurons(np.ascontiguousarray(x.T), self.normalize)
        self.constant_ = constant
        active = np.flatnonzero(~constant)
        needed = self._needed_points()
        if active.size < needed:
            raise NeuronsError(
                f"{self._what_needs()} needs at least {needed} neurons whose response varies; the "
                f"profile has {x.shape[1]} neurons, {int(constant.sum())} of them constant (dead)"
            )
        reduced = self._reduce(features[active])
        labels = np.full(x.shape[1], -1, dtype=np.int64)
        self.scores_: dict[int, float] = {}
        labels[active] = self._cluster(reduced)
        self.labels_ = _relabel(labels)
        self.embedding_ = np.zeros((x.shape[1], reduced.shape[1]), dtype=np.float32)
        self.embedding_[active] = reduced
        found = np.unique(self.labels_[self.labels_ >= 0])
        self.n_clusters_ = int(found.size)
        self.cluster_sizes_ = np.array([(self.labels_ == c).sum() for c in found], dtype=np.int64)
        self.cluster_profiles_ = (
            np.stack([features[self.labels_ == c].mean(axis=0) for c in found])
            if found.size
            else np.zeros((0, x.shape[0]))
        )
        self.silhouette_ = self._score(reduced, self.labels_[active])
        return self

    # ---- internals ----

    def _what_needs(self) -> str:
        if self.method == "hdbscan":
            if self.min_cluster_size is None:
                return "HDBSCAN"
            return f"HDBSCAN with min_cluster_size={self.min_cluster_size}"
        if self.n_clusters is None:
            return f"choosing the number of {self.method} clusters"
        return f"{self.method} with n_clusters={self.n_clusters}"

    @property
    def needed_neurons(self) -> int:
        """How many neurons must vary across the rows for :meth:`fit` to cluster them."""
        return self._needed_points()

    def _needed_points(self) -> int:
        if self.method == "hdbscan":
            return max(2, self.min_cluster_size or 3)
        return self.n_clusters if self.n_clusters is not None else 3

    def _reduce(self, features: np.ndarray) -> np.ndarray:
        n, d = features.shape
        if self.n_components is None or d <= self.n_components or n <= self.n_components:
            return features.astype(np.float32)
        from sklearn.decomposition import PCA

        pca = PCA(
            n_components=self.n_components, svd_solver="randomized", random_state=self.random_state
        )
        return pca.fit_transform(features.astype(np.float32)).astype(np.float32)

    def _cluster(self, points: np.ndarray) -> np.ndarray:
        if self.method == "hdbscan":
            return self._hdbscan(points)
        if self.n_clusters is not None:
            return self._fixed(points, self.n_clusters)
        counts = candidate_cluster_counts(points.shape[0], self.max_clusters)
        best, best_score = None, -np.inf
        for k in counts:
            labels = self._fixed(points, k)
            score = self._score(points, labels)
            self.scores_[k] = score
            if np.isfinite(score) and score > best_score + 1e-12:
                best, best_score = labels, score
        return best if best is not None else self._fixed(points, counts[0])

    def _fixed(self, points: np.ndarray, k: int) -> np.ndarray:
        if k == 1:
            return np.zeros(points.shape[0], dtype=np.int64)
        if self.method == "kmeans":
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=k, n_init=4, random_state=self.random_state)
            return km.fit_predict(points).astype(np.int64)
        from sklearn.cluster import AgglomerativeClustering

        return (
            AgglomerativeClustering(n_clusters=k, linkage="ward")
            .fit_predict(points)
            .astype(np.int64)
        )

    def _hdbscan(self, points: np.ndarray) -> np.ndarray:
        import hdbscan

        size = self.min_cluster_size or default_min_cluster_size(points.shape[0])
        samples = self.min_samples or min(size, 10)
        model = hdbscan.HDBSCAN(min_cluster_size=size, min_samples=samples, core_dist_n_jobs=1)
        self.min_cluster_size_ = size
        return model.fit_predict(points.astype(np.float64)).astype(np.int64)

    def _score(self, points: np.ndarray, labels: np.ndarray) -> float:
        from sklearn.metrics import silhouette_score

        keep = labels >= 0
        found = np.unique(labels[keep])
        if found.size < 2 or found.size >= keep.sum():
            return float("nan")
        sample = min(int(keep.sum()), 2000)
        return float(
            silhouette_score(
                points[keep], labels[keep], sample_size=sample, random_state=self.random_state
            )
        )


def default_min_cluster_size(num_neurons: int) -> int:
    """HDBSCAN's smallest neuron cluster when none is given: ``max(3, int(sqrt(n) / 2))``.

    Grows slower than the layer, so that a wide layer can still show many small groups.
    """
    return max(3, int(math.sqrt(num_neurons) / 2))


# ---- the reservoir --------------------------------------------------------------------------


class ActivationReservoir:
    """A uniform random sample of at most ``size`` per-image activation rows (reservoir sampling).

    Memory is ``size x num_neurons`` float32 however many images pass through: use it to cluster
    neurons on individual images (``NeuronClusterer().fit(reservoir.values)``) when class means
    hide structure, or to get a class profile from a sample.

    Args:
        size: Rows kept.
        seed: Seed of the reservoir's own ``torch.Generator`` (the global RNG is not touched).

    Attributes:
        seen: Rows offered so far.

    Raises:
        NeuronsError: For a non-positive ``size``, and in :meth:`update` for rows whose width
            changes or labels whose length does not match.

    Example:
        >>> res = ActivationReservoir(size=100, seed=0)
        >>> for _ in range(10):
        ...     res.update(torch.rand(32, 8), torch.randint(0, 3, (32,)))
        >>> res.values.shape, res.seen
        (torch.Size([100, 8]), 320)
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise NeuronsError(f"`size` must be a positive integer, got {size!r}")
        self.size = size
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Empty the reservoir and restart its random stream."""
        self.seen = 0
        self._generator = torch.Generator().manual_seed(int(self.seed))
        self._values: torch.Tensor | None = None
        self._labels = torch.full((self.size,), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return min(self.seen, self.size)

    @property
    def values(self) -> torch.Tensor:
        """``[min(seen, size), num_neurons]`` float32 sampled rows."""
        if self._values is None:
            return torch.zeros(0, 0)
        return self._values[: len(self)]

    @property
    def labels(self) -> torch.Tensor:
        """``[min(seen, size)]`` the class labels of the sampled rows (-1 when none were given)."""
        return self._labels[: len(self)]

    @torch.no_grad()
    def update(self, values: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Offer a batch of rows; each row seen so far is kept with probability ``size / seen``.

        Args:
            values: ``[B, K]`` activations (one row per image).
            labels: Optional ``[B]`` class labels.
        """
        if values.dim() != 2:
            raise NeuronsError(
                f"`values` must be [batch, neurons]; got shape {tuple(values.shape)}"
            )
        values = values.detach().to("cpu", torch.float32)
        batch, width = values.shape
        if labels is not None:
            labels = labels.detach().to("cpu", torch.int64).reshape(-1)
            if labels.numel() != batch:
                raise NeuronsError(f"got {labels.numel()} labels for {batch} rows of `values`")
        if self._values is None:
            self._values = torch.zeros(self.size, width, dtype=torch.float32)
        elif width != self._values.shape[1]:
            raise NeuronsError(
                f"rows have {width} values but the reservoir holds rows of {self._values.shape[1]}; "
                "use one reservoir per layer"
            )
        index = torch.arange(self.seen, self.seen + batch)
        # Algorithm R: row t goes to slot t while there is room, else to a random slot j <= t,
        # kept when j < size. Draws come from the reservoir's own generator.
        draws = (
            torch.rand(batch, generator=self._generator, dtype=torch.float64) * (index + 1)
        ).long()
        slots = torch.where(index < self.size, index, draws)
        keep = torch.nonzero(slots < self.size).flatten()
        if keep.numel():
            slots, rows = slots[keep], keep
            # A later row replaces an earlier one in the same slot, as in the sequential algorithm.
            last = {int(s): int(r) for s, r in zip(slots.tolist(), rows.tolist(), strict=True)}
            target = torch.tensor(list(last.keys()), dtype=torch.int64)
            source = torch.tensor(list(last.values()), dtype=torch.int64)
            self._values[target] = values[source]
            if labels is not None:
                self._labels[target] = labels[source]
        self.seen += batch

    def class_profile(self, num_classes: int) -> torch.Tensor:
        """``[num_classes, K]`` mean sampled row per class (NaN for classes without a row)."""
        labels, values = self.labels, self.values
        sums = torch.zeros(num_classes, values.shape[1], dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.float64)
        ok = (labels >= 0) & (labels < num_classes)
        sums.index_add_(0, labels[ok], values[ok].double())
        counts.index_add_(0, labels[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
        means = sums / counts.clamp_min(1).unsqueeze(1)
        means[counts == 0] = math.nan
        return means

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, for checkpoints."""
        return {
            "seen": self.seen,
            "values": None if self._values is None else self._values.clone(),
            "labels": self._labels.clone(),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.seen = int(state.get("seen", 0))
        values = state.get("values")
        self._values = None if values is None else values.clone()
        labels = state.get("labels")
        if labels is not None and labels.numel() == self.size:
            self._labels = labels.clone()
        if state.get("generator") is not None:
            self._generator.set_state(state["generator"])
