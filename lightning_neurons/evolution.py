"""How the neurons and the categories change across epochs, and between two runs or checkpoints.

* :class:`NeuronEvolution`: per layer, each neuron's preferred class and selectivity, epoch by
  epoch (from the :class:`~lightning_neurons.ActivationTracker`'s statistics);
* :class:`ClusteringEvolution`: per view, how far the category clustering moved from one analysed
  epoch to the next: the adjusted Rand index of the consecutive labels and the correlation of the
  consecutive class-distance matrices;
* :func:`compare_runs` / :func:`compare_results`: which neurons changed their preferred class (and
  how their selectivity and class profile moved) and which categories changed cluster, between
  two runs, two epochs of one run, or two checkpoints analysed with ``lightning-neurons analyze``.

The same functions serve a live run (:class:`NeuronHistory` and :class:`ClusteringHistory` keep the
little each epoch needs, and log the figures once two epochs are analysed) and a run read back
with :func:`~lightning_neurons.load_run`. The figures are in
:mod:`lightning_neurons.plots.evolution`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_neurons.errors import NeuronsError
from lightning_neurons.results import CategoryClusteringResult
from lightning_neurons.stats import LayerStats

if TYPE_CHECKING:
    from lightning_neurons.runs import Run

__all__ = [
    "CategoryChange",
    "ClusteringEvolution",
    "ClusteringHistory",
    "LayerChange",
    "NeuronEvolution",
    "NeuronHistory",
    "RunComparison",
    "clustering_evolution",
    "compare_results",
    "compare_runs",
    "distance_correlation",
    "neuron_evolution",
    "run_clustering_evolution",
    "run_neuron_evolution",
]


# ---- across epochs ---------------------------------------------------------------------------


def _numpy(values: torch.Tensor | np.ndarray, dtype: type | None = None) -> np.ndarray:
    """A results tensor (or an array) as a NumPy array of ``dtype`` (default: its own)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype)


@dataclass
class NeuronEvolution:
    """One layer's neurons over the analysed epochs.

    Attributes:
        layer: Layer name.
        epochs: ``[E]`` the epochs, increasing.
        preferred_class: ``[E, K]`` each neuron's class with the largest mean, per epoch.
        selectivity: ``[E, K]`` each neuron's class selectivity index, per epoch.
        steps: ``[E]`` the global step of each analysis, when known (the callbacks' histories):
            an epoch analysed several times (validations within it) appears once per step.
    """

    layer: str
    epochs: np.ndarray
    preferred_class: np.ndarray
    selectivity: np.ndarray
    steps: np.ndarray | None = None

    @property
    def changed_fraction(self) -> np.ndarray:
        """``[E - 1]`` share of the neurons whose preferred class changed from each epoch to the
        next."""
        return (self.preferred_class[1:] != self.preferred_class[:-1]).mean(axis=1)


def _in_order(items: Sequence[Any], steps: Sequence[int] | None) -> tuple[list[Any], Any]:
    """``items`` (each with an ``epoch``) in the order of their epochs and ``steps``, and their
    steps in that order (``None`` when not given)."""
    if steps is not None and len(steps) != len(items):
        raise NeuronsError(f"got {len(items)} analyses and {len(steps)} steps; give one step each")
    given = list(steps) if steps is not None else [0] * len(items)
    order = sorted(range(len(items)), key=lambda i: (items[i].epoch, given[i]))
    return [items[i] for i in order], None if steps is None else np.array([given[i] for i in order])


def neuron_evolution(
    stats: Sequence[LayerStats], steps: Sequence[int] | None = None
) -> NeuronEvolution:
    """A layer's :class:`NeuronEvolution` from its statistics of several analyses.

    Args:
        stats: The layer's :class:`~lightning_neurons.stats.LayerStats` of each epoch (any order).
        steps: The global step of each (for several analyses of an epoch: validations within it).

    Raises:
        NeuronsError: If ``stats`` is empty, mixes layers, or the neuron count changes.
    """
    if not stats:
        raise NeuronsError("neuron_evolution needs the statistics of at least one epoch")
    ordered, in_order = _in_order(stats, steps)
    layers = {s.layer for s in ordered}
    widths = {s.num_neurons for s in ordered}
    if len(layers) > 1 or len(widths) > 1:
        raise NeuronsError(
            f"neuron_evolution takes one layer's statistics; got layers {sorted(layers)} with "
            f"{sorted(widths)} neurons"
        )
    return NeuronEvolution(
        layer=ordered[0].layer,
        epochs=np.array([s.epoch for s in ordered]),
        preferred_class=np.stack([s.preferred_class.numpy() for s in ordered]),
        selectivity=np.stack([s.selectivity.double().numpy() for s in ordered]),
        steps=in_order,
    )


def distance_correlation(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Pearson correlation of two ``[C, C]`` class-distance matrices over the pairs of distinct
    classes that both hold (a Mantel statistic without the test): 1 when the categories keep
    their relative distances. NaN when fewer than 3 pairs are finite or one side is constant."""
    upper = np.triu_indices(a.shape[0], k=1)
    x, y = _numpy(a, np.float64)[upper], _numpy(b, np.float64)[upper]
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _adjusted_rand(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Adjusted Rand index of two labellings over the classes both kept (label -1: left out)."""
    from sklearn.metrics import adjusted_rand_score

    a, b = _numpy(a), _numpy(b)
    keep = (a >= 0) & (b >= 0)
    if keep.sum() < 2:
        return float("nan")
    return float(adjusted_rand_score(a[keep], b[keep]))


@dataclass
class ClusteringEvolution:
    """How one view's category clustering moved over the analysed epochs.

    Attributes:
        view: Layer name or ``"combined"``.
        epochs: ``[E]`` the epochs, increasing.
        labels: ``[E, C]`` each class's cluster per epoch (-1: left out).
        adjusted_rand: ``[E - 1]`` adjusted Rand index of each epoch's labels with the next's
            (1: the same partition of the categories).
        distance_correlation: ``[E - 1]`` correlation of each epoch's class distances with the
            next's (:func:`distance_correlation`).
        class_names: The class names.
        steps: ``[E]`` the global step of each analysis, when known (as
            :attr:`NeuronEvolution.steps`).
    """

    view: str
    epochs: np.ndarray
    labels: np.ndarray
    adjusted_rand: np.ndarray
    distance_correlation: np.ndarray
    class_names: list[str] = field(default_factory=list)
    steps: np.ndarray | None = None


def clustering_evolution(
    results: Sequence[CategoryClusteringResult], steps: Sequence[int] | None = None
) -> ClusteringEvolution:
    """A view's :class:`ClusteringEvolution` from its category clusterings of several analyses
    (``steps``: as :func:`neuron_evolution`'s).

    Raises:
        NeuronsError: If ``results`` is empty or mixes views.
    """
    if not results:
        raise NeuronsError("clustering_evolution needs the clustering of at least one epoch")
    ordered, in_order = _in_order(results, steps)
    if len({r.view for r in ordered}) > 1:
        raise NeuronsError("clustering_evolution takes one view's results")
    pairs = list(zip(ordered[:-1], ordered[1:], strict=True))
    return ClusteringEvolution(
        view=ordered[0].view,
        epochs=np.array([r.epoch for r in ordered]),
        labels=np.stack([_numpy(r.labels) for r in ordered]),
        adjusted_rand=np.array([_adjusted_rand(a.labels, b.labels) for a, b in pairs]),
        distance_correlation=np.array(
            [distance_correlation(a.distances, b.distances) for a, b in pairs]
        ),
        class_names=list(ordered[-1].class_names),
        steps=in_order,
    )


# ---- live: what the callbacks keep and log --------------------------------------------------------


#: An analysis's place in training: its epoch and global step (-1: not given).
Point = tuple[int, int]


def _steps(points: Sequence[Point]) -> np.ndarray | None:
    return np.array([s for _, s in points]) if all(s >= 0 for _, s in points) else None


@dataclass
class _NeuronEpoch:
    epoch: int
    preferred_class: np.ndarray  # [K]
    selectivity: np.ndarray  # [K]


class NeuronHistory:
    """Each layer's preferred classes and selectivities of the analyses so far (``[K]`` per
    analysis and layer), for the :class:`~lightning_neurons.ActivationTracker`'s evolution
    figures."""

    def __init__(self) -> None:
        self._layers: dict[str, dict[Point, _NeuronEpoch]] = {}

    def update(
        self, results: Mapping[str, LayerStats], step: int | None = None
    ) -> dict[str, NeuronEvolution]:
        """Add an analysis's statistics (of an epoch, at ``step``: several analyses of an epoch,
        validations within it, are kept apart); the evolution of each layer analysed twice or
        more. An analysis of the same epoch and step replaces the earlier one."""
        out = {}
        for layer, stats in results.items():
            kept = self._layers.setdefault(layer, {})
            if any(e.preferred_class.size != stats.num_neurons for e in kept.values()):
                kept.clear()  # another model under the same name: start again
            kept[(stats.epoch, -1 if step is None else step)] = _NeuronEpoch(
                stats.epoch,
                stats.preferred_class.numpy().copy(),
                stats.selectivity.double().numpy().copy(),
            )
            if len(kept) >= 2:
                points = sorted(kept)
                ordered = [kept[p] for p in points]
                out[layer] = NeuronEvolution(
                    layer=layer,
                    epochs=np.array([e.epoch for e in ordered]),
                    preferred_class=np.stack([e.preferred_class for e in ordered]),
                    selectivity=np.stack([e.selectivity for e in ordered]),
                    steps=_steps(points),
                )
        return out


@dataclass
class _ViewHistory:
    points: list[Point] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    adjusted_rand: list[float] = field(default_factory=list)
    distance_correlation: list[float] = field(default_factory=list)
    distances: np.ndarray | None = None  # of the latest epoch


class ClusteringHistory:
    """Each view's category labels of the epochs analysed so far, and how far the clustering
    moved between consecutive ones (only the latest ``[C, C]`` distances are kept), for
    :class:`~lightning_neurons.CategoryClustering`'s evolution figures."""

    def __init__(self) -> None:
        self._views: dict[str, _ViewHistory] = {}

    def update(
        self, results: Mapping[str, CategoryClusteringResult], step: int | None = None
    ) -> dict[str, ClusteringEvolution]:
        """Add an analysis's clusterings (of an epoch, at ``step``; analyses come in order, and
        one not after the latest, a repeated validate, is left out); the evolution of each view
        analysed twice or more."""
        out = {}
        for view, res in results.items():
            h = self._views.setdefault(view, _ViewHistory())
            if h.points and h.labels[-1].shape != res.labels.shape:
                h = self._views[view] = _ViewHistory()  # another data set: start again
            point = (res.epoch, -1 if step is None else step)
            if h.points and point <= h.points[-1]:
                continue  # an analysis again (a repeated validate)
            if h.points:
                h.adjusted_rand.append(_adjusted_rand(h.labels[-1], res.labels))
                assert h.distances is not None
                h.distance_correlation.append(distance_correlation(h.distances, res.distances))
            h.points.append(point)
            h.labels.append(_numpy(res.labels).copy())
            h.distances = _numpy(res.distances, np.float32)
            if len(h.points) >= 2:
                out[view] = ClusteringEvolution(
                    view=view,
                    epochs=np.array([e for e, _ in h.points]),
                    labels=np.stack(h.labels),
                    adjusted_rand=np.array(h.adjusted_rand),
                    distance_correlation=np.array(h.distance_correlation),
                    class_names=list(res.class_names),
                    steps=_steps(h.points),
                )
        return out


# ---- two runs, epochs or checkpoints -----------------------------------------------------------


@dataclass
class LayerChange:
    """How one layer's neurons differ between two analyses ``a`` and ``b``.

    Attributes:
        layer: Layer name.
        preferred_a: ``[K]`` each neuron's preferred class in ``a``.
        preferred_b: ``[K]`` in ``b``.
        selectivity_a: ``[K]`` class selectivity in ``a``.
        selectivity_b: ``[K]`` in ``b``.
        profile_correlation: ``[K]`` correlation of each neuron's class profile in ``a`` with
            its profile in ``b`` (NaN where one is constant).
        changed: ``[K]`` neurons whose preferred class changed, indices.
    """

    layer: str
    preferred_a: np.ndarray
    preferred_b: np.ndarray
    selectivity_a: np.ndarray
    selectivity_b: np.ndarray
    profile_correlation: np.ndarray
    changed: np.ndarray

    @property
    def changed_fraction(self) -> float:
        return float(self.changed.size / max(self.preferred_a.size, 1))


@dataclass
class CategoryChange:
    """How one view's category clustering differs between ``a`` and ``b``.

    Attributes:
        view: Layer name or ``"combined"``.
        class_names: The class names.
        labels_a: ``[C]`` each class's cluster in ``a``.
        labels_b: ``[C]`` in ``b``.
        adjusted_rand: Adjusted Rand index of the two labellings.
        distance_correlation: Correlation of the two class-distance matrices.
        mates_overlap: ``[C]`` per class, the Jaccard overlap of its cluster-mates (the classes
            in its cluster, itself included) in ``a`` and in ``b``: 1 where it kept the same
            company, whatever the clusters are numbered.
        moved: The classes whose cluster-mates changed, indices.
    """

    view: str
    class_names: list[str]
    labels_a: np.ndarray
    labels_b: np.ndarray
    adjusted_rand: float
    distance_correlation: float
    mates_overlap: np.ndarray
    moved: np.ndarray


@dataclass
class RunComparison:
    """What changed between two analyses (see :func:`compare_results`).

    Attributes:
        epoch_a: The epoch of ``a``.
        epoch_b: The epoch of ``b``.
        layers: ``{layer: LayerChange}`` of the layers both analysed.
        categories: ``{view: CategoryChange}`` of the views both clustered.
        label_a: How ``a`` is called in figures.
        label_b: How ``b`` is called.
    """

    epoch_a: int
    epoch_b: int
    layers: dict[str, LayerChange]
    categories: dict[str, CategoryChange]
    label_a: str = "a"
    label_b: str = "b"


def _profile_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[K]`` Pearson correlation of columns of two ``[C, K]`` class profiles (NaN-safe)."""
    a, b = np.nan_to_num(np.asarray(a, np.float64)), np.nan_to_num(np.asarray(b, np.float64))
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    norm = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (a * b).sum(axis=0) / norm, np.nan)


def _mates_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[C]`` Jaccard overlap of each class's cluster-mates in two labellings."""
    mates_a = (a[:, None] == a[None, :]) & (a[:, None] >= 0)
    mates_b = (b[:, None] == b[None, :]) & (b[:, None] >= 0)
    union = (mates_a | mates_b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, (mates_a & mates_b).sum(axis=1) / union, np.nan)


def _layer_change(layer: str, a: LayerStats, b: LayerStats) -> LayerChange:
    if a.num_neurons != b.num_neurons:
        raise NeuronsError(
            f"layer {layer!r} has {a.num_neurons} neurons in one analysis and {b.num_neurons} in "
            "the other; compare runs of the same model"
        )
    pa, pb = a.preferred_class.numpy(), b.preferred_class.numpy()
    return LayerChange(
        layer=layer,
        preferred_a=pa,
        preferred_b=pb,
        selectivity_a=a.selectivity.double().numpy(),
        selectivity_b=b.selectivity.double().numpy(),
        profile_correlation=_profile_correlation(a.class_means.numpy(), b.class_means.numpy()),
        changed=np.flatnonzero(pa != pb),
    )


def _category_change(
    view: str, a: CategoryClusteringResult, b: CategoryClusteringResult
) -> CategoryChange:
    labels_a, labels_b = _numpy(a.labels), _numpy(b.labels)
    overlap = _mates_overlap(labels_a, labels_b)
    return CategoryChange(
        view=view,
        class_names=list(b.class_names),
        labels_a=labels_a,
        labels_b=labels_b,
        adjusted_rand=_adjusted_rand(labels_a, labels_b),
        distance_correlation=distance_correlation(a.distances, b.distances),
        mates_overlap=overlap,
        moved=np.flatnonzero(np.nan_to_num(overlap, nan=1.0) < 1.0),
    )


def compare_results(
    tracker_a: Mapping[str, LayerStats],
    tracker_b: Mapping[str, LayerStats],
    categories_a: Mapping[str, CategoryClusteringResult] | None = None,
    categories_b: Mapping[str, CategoryClusteringResult] | None = None,
    *,
    labels: tuple[str, str] = ("a", "b"),
) -> RunComparison:
    """Which neurons and which categories changed between two analyses.

    Args:
        tracker_a: An ActivationTracker's results (``{layer: LayerStats}``), live or loaded.
        tracker_b: The other's.
        categories_a: CategoryClustering's results of ``a`` (optional).
        categories_b: Of ``b``.
        labels: How ``a`` and ``b`` are called in figures.

    Returns:
        A :class:`RunComparison` over the layers (and views) both analysed.

    Raises:
        NeuronsError: If they share no layer, or a layer's neuron count differs.
    """
    shared = [layer for layer in tracker_a if layer in tracker_b]
    if not shared:
        raise NeuronsError(
            f"the two analyses share no layer ({', '.join(tracker_a) or 'none'} vs "
            f"{', '.join(tracker_b) or 'none'}); compare runs that tracked the same layers"
        )
    layers = {layer: _layer_change(layer, tracker_a[layer], tracker_b[layer]) for layer in shared}
    categories = {}
    if categories_a and categories_b:
        categories = {
            view: _category_change(view, categories_a[view], categories_b[view])
            for view in categories_a
            if view in categories_b
        }
    first = tracker_a[shared[0]]
    return RunComparison(
        epoch_a=first.epoch,
        epoch_b=tracker_b[shared[0]].epoch,
        layers=layers,
        categories=categories,
        label_a=labels[0],
        label_b=labels[1],
    )


def compare_runs(
    a: Run, b: Run | None = None, *, epoch_a: int | None = None, epoch_b: int | None = None
) -> RunComparison:
    """Compare two runs read with :func:`~lightning_neurons.load_run`, or two epochs of one run
    (two checkpoints analysed with ``lightning-neurons analyze`` are two epochs of its run).

    Args:
        a: A run.
        b: The other run; default: ``a`` itself (then give two epochs).
        epoch_a: The epoch of ``a``; default: its first analysed epoch when ``b`` is ``a``, else
            its latest.
        epoch_b: The epoch of ``b``; default: its latest.

    Returns:
        A :class:`RunComparison` (draw it with
        :func:`lightning_neurons.plots.evolution.comparison_figure`).

    Example:
        >>> change = compare_runs(load_run("runs/digits/version_0"))  # first vs last epoch  # doctest: +SKIP
        >>> change.layers["backbone.features.relu3"].changed  # doctest: +SKIP
    """
    b = a if b is None else b
    tracker = "ActivationTracker"
    if epoch_a is None:
        epochs = a.epochs_of(tracker)
        epoch_a = epochs[0] if b is a and epochs else None
    stats_a, stats_b = a.results(tracker, epoch_a), b.results(tracker, epoch_b)
    epoch_a = next(iter(stats_a.values())).epoch
    epoch_b = next(iter(stats_b.values())).epoch
    cats_a = cats_b = None
    if "CategoryClustering" in a.callbacks() and "CategoryClustering" in b.callbacks():
        cats_a = _clustering_at(a, epoch_a)
        cats_b = _clustering_at(b, epoch_b)
    same = b is a
    labels = (
        (f"epoch {epoch_a}", f"epoch {epoch_b}")
        if same
        else (
            f"{a.log_dir.name} epoch {epoch_a}",
            f"{b.log_dir.name} epoch {epoch_b}",
        )
    )
    return compare_results(stats_a, stats_b, cats_a, cats_b, labels=labels)


def _clustering_at(run: Run, epoch: int) -> dict[str, CategoryClusteringResult] | None:
    """CategoryClustering's results of ``epoch`` (``None`` if it did not analyse it)."""
    if epoch not in run.epochs_of("CategoryClustering"):
        return None
    return run.results("CategoryClustering", epoch)


def run_neuron_evolution(
    run: Run, layers: Sequence[str] | None = None
) -> dict[str, NeuronEvolution]:
    """Each tracked layer's :class:`NeuronEvolution` over every epoch of a run.

    Args:
        run: A run read back with :func:`~lightning_neurons.load_run`.
        layers: Only these layers (default: every layer of the ActivationTracker's files).

    Example:
        >>> run_neuron_evolution(run)["features.relu3"].preferred_class  # [E, K]  # doctest: +SKIP
    """
    by_layer = _per_key(run, "ActivationTracker", layers)
    return {layer: neuron_evolution(*zip(*pairs, strict=True)) for layer, pairs in by_layer.items()}


def run_clustering_evolution(
    run: Run, views: Sequence[str] | None = None
) -> dict[str, ClusteringEvolution]:
    """Each view's :class:`ClusteringEvolution` over every epoch of a run in which
    CategoryClustering ran.

    Args:
        run: A run read back with :func:`~lightning_neurons.load_run`.
        views: Only these views (layer names or ``"combined"``; default: all).

    Example:
        >>> run_clustering_evolution(run)["combined"].adjusted_rand  # [E - 1]  # doctest: +SKIP
    """
    by_view = _per_key(run, "CategoryClustering", views)
    return {
        view: clustering_evolution(*zip(*pairs, strict=True)) for view, pairs in by_view.items()
    }


def _per_key(
    run: Run, callback: str, keys: Sequence[str] | None
) -> dict[str, list[tuple[Any, int]]]:
    """``callback``'s results and steps over every analysis (every step: several of an epoch
    when it validated within epochs), by key (layer or view; ``keys``: only those), in order."""
    by_key: dict[str, list[tuple[Any, int]]] = {}
    for step in run.steps_of(callback):
        for key, res in run.results(callback, step=step).items():
            if keys is None or key in keys:
                by_key.setdefault(key, []).append((res, step))
    return by_key
