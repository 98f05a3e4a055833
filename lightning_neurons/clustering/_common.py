"""What both clustering estimators share: reading a profile, parameters, labels, silhouettes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import validate_data

from lightning_neurons.checks import RANDOM_STATE, Constraints, Interval
from lightning_neurons.checks import validate_params as check_table
from lightning_neurons.errors import NeuronsError

#: Above this many matrix entries the estimators compute in float32 (half the memory).
FLOAT32_ABOVE = 1 << 24


def store_params(estimator: BaseEstimator, values: dict[str, Any]) -> None:
    """Store an ``__init__``'s arguments unchanged, as scikit-learn asks (``locals()`` in)."""
    for name in estimator._get_param_names():
        setattr(estimator, name, values[name])


#: The constraints of the parameters both clusterers take (each adds its own).
SHARED_CONSTRAINTS: Constraints = {
    "n_clusters": [Interval(int, 1, None), None],
    "max_clusters": [Interval(int, 2, None), None],
    "random_state": list(RANDOM_STATE),
}


def validate_params(estimator: BaseEstimator, others: str) -> None:
    """Check an estimator's parameters against its ``_parameter_constraints``
    (:func:`~lightning_neurons.checks.validate_params`), and that HDBSCAN is not given a cluster
    count.

    Args:
        estimator: The clusterer.
        others: The other methods, for the message (``"'kmeans' or 'agglomerative'"``).

    Raises:
        NeuronsError: For the first parameter out of its constraints, or ``n_clusters`` with
            ``method="hdbscan"``.
    """
    check_table(estimator, estimator.get_params(deep=False))
    if estimator.method == "hdbscan" and estimator.n_clusters is not None:
        raise NeuronsError(
            "`n_clusters` is not used with method='hdbscan', which finds the number of clusters "
            "itself; pass n_clusters=None (and tune `min_cluster_size`), or choose "
            f"method={others}."
        )


def validate_profile(
    estimator: BaseEstimator,
    profile: Any,
    rows: str,
    cols: str,
    *,
    min_rows: int = 1,
    float32_above: int = FLOAT32_ABOVE,
) -> np.ndarray:
    """The profile as a finite 2-D float array (float32 when large), or a clear error.

    Sets ``n_features_in_`` (scikit-learn's ``validate_data``). Tensors of any dtype and device
    are read as NumPy arrays.

    Args:
        estimator: The estimator being fitted.
        profile: ``[rows, cols]`` array, tensor or nested list.
        rows: What a row is, for messages (``"categories"``).
        cols: What a column is, for messages (``"neurons"``).
        min_rows: Fewest rows accepted.
        float32_above: Above this many entries the array is float32, else float64.

    Raises:
        NeuronsError: For a profile that is not 2-D, not numbers, empty, too short, or holds
            NaN or infinite values.
        TypeError: For sparse matrices, and objects that are not numbers (scikit-learn's).
    """
    if isinstance(profile, torch.Tensor):
        profile = profile.detach().cpu()
        if profile.dtype in (torch.bfloat16, torch.float16):
            profile = profile.float()
        profile = profile.numpy()
    from scipy import sparse

    if not sparse.issparse(profile):
        profile = _dense(profile, rows, cols)
    size = int(np.prod(profile.shape))
    dtype = np.float32 if size > float32_above else np.float64
    try:
        array = validate_data(
            estimator, profile, dtype=dtype, ensure_all_finite=False, ensure_min_samples=min_rows
        )
    except ValueError as err:
        if isinstance(err, NeuronsError):
            raise
        state = "is empty" if 0 in profile.shape else f"has shape {tuple(profile.shape)}"
        raise NeuronsError(
            f"`profile` [{rows}, {cols}] {state}; it needs real numbers in at least {min_rows} "
            f"row(s) and 1 column ({err})"
        ) from err
    _check_finite(array, rows)
    return array


def _dense(profile: Any, rows: str, cols: str) -> np.ndarray:
    try:
        array = np.asarray(profile)
    except Exception as err:  # ragged lists
        raise NeuronsError(
            f"`profile` must be a 2-D array [{rows}, {cols}]; could not read it ({err})"
        ) from err
    if array.ndim != 2:
        raise NeuronsError(
            f"`profile` must be a 2-D array [{rows}, {cols}]; got shape {tuple(array.shape)}"
        )
    if array.dtype.kind in "USV":
        raise NeuronsError(f"`profile` must hold numbers; got dtype {array.dtype}")
    return array


def _check_finite(array: np.ndarray, rows: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise NeuronsError(
            f"`profile` holds {int((~finite).sum())} NaN or infinite values (in {rows} "
            f"{bad_rows[:10].tolist()}{' ...' if bad_rows.size > 10 else ''}); a class without "
            "images has NaN means. Drop those rows/columns or fill them before clustering."
        )


def relabel(labels: np.ndarray) -> np.ndarray:
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


def best_by_silhouette(
    candidates: list[int],
    labels_for: Callable[[int], np.ndarray],
    score: Callable[[np.ndarray], float],
    scores: dict[int, float],
) -> np.ndarray:
    """The labels of the candidate count with the largest silhouette (the first on ties).

    Args:
        candidates: Counts to try, in order.
        labels_for: Labels for one count.
        score: Silhouette of labels (NaN when undefined).
        scores: Filled with ``{count: silhouette}``.

    Returns:
        The best labels; the first candidate's when every silhouette is undefined.
    """
    for k in candidates:
        scores[k] = score(labels_for(k))
    return labels_for(best_count(candidates, [scores[k] for k in candidates]))


def best_count(candidates: list[int], values: list[float]) -> int:
    """The candidate with the largest finite value (the first on ties within 1e-12); the first
    candidate when no value is finite."""
    best_value, best = -np.inf, candidates[0]
    for k, value in zip(candidates, values, strict=True):
        if np.isfinite(value) and value > best_value + 1e-12:
            best_value, best = value, k
    return best


def tree_cuts(linkage: np.ndarray, counts: list[int]) -> dict[int, np.ndarray]:
    """The flat clusterings of a SciPy linkage matrix into each of ``counts`` clusters.

    The same partitions as :func:`scipy.cluster.hierarchy.cut_tree` (the state after the first
    ``n - k`` merges), in one pass over the merges; cluster numbers are arbitrary (see
    :func:`relabel`).

    Args:
        linkage: ``[n - 1, 4]`` linkage matrix.
        counts: Numbers of clusters, each in ``[1, n]``.

    Returns:
        ``{count: [n] int64 labels}``.
    """
    n = linkage.shape[0] + 1
    labels = np.arange(n, dtype=np.int64)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    wanted = {n - k: k for k in counts}
    cuts = {n: labels.copy()} if 0 in wanted else {}
    for step, (a, b) in enumerate(linkage[:, :2].astype(np.int64).tolist(), start=1):
        big, small = members.pop(a), members.pop(b)
        if len(big) < len(small):
            big, small = small, big
        labels[small] = labels[big[0]]
        big.extend(small)
        members[n + step - 1] = big
        if step in wanted:
            cuts[wanted[step]] = labels.copy()
    return {k: cuts[k] for k in counts}


def silhouette_scores(distances: np.ndarray, labelings: list[np.ndarray]) -> list[float]:
    """Mean silhouette of each labelling on precomputed distances: the values of scikit-learn's
    ``silhouette_score(distances, labels, metric="precomputed")`` (noise, -1, left out; NaN when
    undefined), computed from per-cluster sums of distances.

    A labelling that merges the clusters of the one before it (the next coarser cut of a tree)
    gets its sums from that one's, without reading the distances again: pass nested cuts from
    the finest to the coarsest.

    Args:
        distances: ``[n, n]`` symmetric distances, zero diagonal.
        labelings: ``[n]`` integer labels each.

    Returns:
        One silhouette per labelling.
    """
    from scipy import sparse

    out: list[float] = []
    previous: tuple[np.ndarray, np.ndarray] | None = None  # (cluster index, sums)
    for labels in labelings:
        labels = np.asarray(labels)
        if (labels < 0).any():
            out.append(silhouette_precomputed(distances, labels))
            previous = None
            continue
        _, cluster, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        cluster = cluster.reshape(-1)
        if previous is not None:
            merged = np.full(previous[1].shape[1], -1, dtype=np.int64)
            merged[previous[0]] = cluster
            nested = np.array_equal(merged[previous[0]], cluster)
        if previous is not None and nested:
            source, index = previous[1], merged
        else:
            source, index = distances, cluster
        onehot = sparse.csr_array(
            (np.ones(index.size), (np.arange(index.size), index)), shape=(index.size, sizes.size)
        )
        sums = np.asarray(source @ onehot)
        previous = (cluster, sums)
        out.append(_silhouette_from_sums(sums, cluster, sizes))
    return out


def _silhouette_from_sums(sums: np.ndarray, cluster: np.ndarray, sizes: np.ndarray) -> float:
    """Mean silhouette from ``sums[i, c]``, point ``i``'s summed distance to cluster ``c``."""
    n = cluster.size
    if sizes.size < 2 or sizes.size >= n:
        return float("nan")
    rows = np.arange(n)
    size = sizes[cluster]
    with np.errstate(divide="ignore", invalid="ignore"):
        within = sums[rows, cluster] / (size - 1)
        means = sums / sizes
        means[rows, cluster] = np.inf
        nearest = means.min(axis=1)
        values = (nearest - within) / np.maximum(within, nearest)
    values[size == 1] = 0.0  # scikit-learn's convention for a cluster of one
    return float(np.nan_to_num(values).mean())


def silhouette_precomputed(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette on precomputed distances, noise (-1) left out; NaN when undefined."""
    keep = labels >= 0
    if not keep.all():
        distances, labels = distances[np.ix_(keep, keep)], labels[keep]
    return silhouette_scores(distances, [labels])[0] if labels.size else float("nan")
