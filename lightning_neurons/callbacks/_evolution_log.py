"""Logging the change across epochs: the figures and scalars of
:class:`~lightning_neurons.evolution.NeuronHistory` and
:class:`~lightning_neurons.evolution.ClusteringHistory`, once two epochs or more are analysed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lightning_neurons.evolution import ClusteringHistory, NeuronEvolution, NeuronHistory
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.plots.evolution import clustering_evolution_figure, neuron_evolution_figure
from lightning_neurons.results import CategoryClusteringResult
from lightning_neurons.stats import LayerStats

#: The tracker draws its neuron x epoch figures every this many analysed epochs, and for the
#: last one at the end of the fit: each figure holds every epoch so far, so one drawn per epoch
#: would mostly redraw what the previous one showed.
EVOLUTION_EVERY = 10


class NeuronEvolutionLog:
    """The tracker's :class:`~lightning_neurons.evolution.NeuronHistory` and its logging: the
    ``<layer>/preference_changed`` scalar (share of the neurons whose preferred class changed
    since the previous analysed epoch) every analysed epoch, the ``<layer>/evolution`` figure
    every :data:`EVOLUTION_EVERY` analysed epochs and, by :meth:`flush`, at the end of the fit."""

    def __init__(self) -> None:
        self.history = NeuronHistory()
        self._undrawn: tuple[dict[str, NeuronEvolution], list[str] | None] | None = None

    def log(
        self,
        out: AnalysisLogger,
        results: Mapping[str, LayerStats],
        class_names: Sequence[str] | None = None,
    ) -> None:
        """``history.update(results)``, its scalars, and the figures when they are due."""
        evolutions = self.history.update(results)
        scalars = {
            out.tag(layer, "preference_changed"): float(evolution.changed_fraction[-1])
            for layer, evolution in evolutions.items()
        }
        out.scalars(scalars)
        names = list(class_names) if class_names is not None else None
        self._undrawn = (evolutions, names) if evolutions else None
        epochs = max((len(e.epochs) for e in evolutions.values()), default=0)
        if epochs and epochs % EVOLUTION_EVERY == 0:
            self.flush(out)

    @property
    def pending(self) -> bool:
        """Whether the latest epoch's figures are yet to be drawn."""
        return self._undrawn is not None

    def flush(self, out: AnalysisLogger) -> None:
        """Draw the figures of the latest epoch, unless they are drawn already."""
        if self._undrawn is None:
            return
        evolutions, names = self._undrawn
        self._undrawn = None
        for layer, evolution in evolutions.items():
            out.figure(out.tag(layer, "evolution"), neuron_evolution_figure, evolution, names)


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
