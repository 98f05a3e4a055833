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
    estimator: BaseEstimator, profile: Any, rows: str, cols: str, *, min_rows: int = 1
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
    dtype = np.float32 if size > FLOAT32_ABOVE else np.float64
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
    best_score, best_labels = -np.inf, None
    for k in candidates:
        labels = labels_for(k)
        scores[k] = value = score(labels)
        if np.isfinite(value) and value > best_score + 1e-12:
            best_score, best_labels = value, labels
    return best_labels if best_labels is not None else labels_for(candidates[0])


def silhouette_precomputed(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette on precomputed distances, noise (-1) left out; NaN when undefined."""
    from sklearn.metrics import silhouette_score

    keep = labels >= 0
    found = np.unique(labels[keep])
    if found.size < 2 or found.size >= keep.sum():
        return float("nan")
    sub = distances[np.ix_(keep, keep)]
    return float(silhouette_score(sub, labels[keep], metric="precomputed"))
