"""Logging the change across epochs: the figures and scalars of
:class:`~lightning_neurons.evolution.NeuronHistory` and
:class:`~lightning_neurons.evolution.ClusteringHistory`, once two epochs or more are analysed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lightning_neurons.evolution import ClusteringHistory, NeuronHistory
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.plots.evolution import clustering_evolution_figure, neuron_evolution_figure
from lightning_neurons.results import CategoryClusteringResult
from lightning_neurons.stats import LayerStats


def log_neuron_evolution(
    history: NeuronHistory,
    out: AnalysisLogger,
    results: Mapping[str, LayerStats],
    class_names: Sequence[str] | None = None,
) -> None:
    """``history.update(results)``, then log ``<layer>/evolution`` (figure) and
    ``<layer>/preference_changed`` (scalar: share of the neurons whose preferred class changed
    since the previous analysed epoch)."""
    scalars = {}
    for layer, evolution in history.update(results).items():
        out.figure(out.tag(layer, "evolution"), neuron_evolution_figure, evolution, class_names)
        scalars[out.tag(layer, "preference_changed")] = float(evolution.changed_fraction[-1])
    out.scalars(scalars)


def log_clustering_evolution(
    history: ClusteringHistory,
    out: AnalysisLogger,
    results: Mapping[str, CategoryClusteringResult],
) -> None:
    """``history.update(results)``, then log ``<view>/evolution`` (figure) and
    ``<view>/distance_correlation`` (scalar; the adjusted Rand index with the previous epoch is
    CategoryClustering's ``stability``)."""
    scalars = {}
    for view, evolution in history.update(results).items():
        out.figure(out.tag(view, "evolution"), clustering_evolution_figure, evolution)
        value = float(evolution.distance_correlation[-1])
        if np.isfinite(value):
            scalars[out.tag(view, "distance_correlation")] = value
    out.scalars(scalars)
