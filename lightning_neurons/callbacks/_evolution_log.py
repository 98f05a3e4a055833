"""Logging the change across epochs: the figures and scalars of
:class:`~lightning_neurons.evolution.NeuronHistory` and
:class:`~lightning_neurons.evolution.ClusteringHistory`, once two epochs or more are analysed;
the scalars every analysed epoch, the figures (which hold every epoch so far) less often."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lightning_neurons.evolution import ClusteringHistory, NeuronHistory
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.plots.evolution import clustering_evolution_figure, neuron_evolution_image
from lightning_neurons.results import CategoryClusteringResult
from lightning_neurons.stats import LayerStats

#: The evolution figures are drawn every this many analysed epochs, and for the last one at the
#: end of the fit: each figure holds every epoch so far, so one drawn per epoch would mostly
#: redraw what the previous one showed.
EVOLUTION_EVERY = 10

#: One figure to draw: its tag, the plot function and its arguments.
Figure = tuple[str, Callable[..., Any], tuple[Any, ...]]


class _LatestFigures:
    """The figures of the latest analysed epoch, drawn when due (every :data:`EVOLUTION_EVERY`
    analysed epochs) or by :meth:`flush` (at the end of the fit), never twice."""

    def __init__(self) -> None:
        self._undrawn: list[Figure] = []
        self._step = 0  # the global step of the epoch they show

    def hold(self, out: AnalysisLogger, figures: list[Figure], epochs: int) -> None:
        """Keep ``figures`` (of the ``epochs``-th analysed epoch) instead of the undrawn ones;
        draw them if they are due."""
        self._undrawn, self._step = figures, out.step
        if epochs and epochs % EVOLUTION_EVERY == 0:
            self.flush(out)

    @property
    def pending(self) -> bool:
        """Whether the latest epoch's figures are yet to be drawn."""
        return bool(self._undrawn)

    def flush(self, out: AnalysisLogger) -> None:
        """Draw the figures of the latest epoch, unless they are drawn already; logged at that
        epoch's step, not at the step of the call (the end of the fit, say)."""
        figures, self._undrawn = self._undrawn, []
        held = out.at_step(self._step)
        for tag, plot, args in figures:
            held.figure(tag, plot, *args)


class NeuronEvolutionLog(_LatestFigures):
    """The tracker's :class:`~lightning_neurons.evolution.NeuronHistory` and its logging: the
    ``<layer>/preference_changed`` scalar (share of the neurons whose preferred class changed
    since the previous analysed epoch) every analysed epoch, the ``<layer>/evolution`` figure
    every :data:`EVOLUTION_EVERY` analysed epochs and, by :meth:`flush`, at the end of the fit."""

    def __init__(self) -> None:
        super().__init__()
        self.history = NeuronHistory()

    def log(
        self,
        out: AnalysisLogger,
        results: Mapping[str, LayerStats],
        class_names: Sequence[str] | None = None,
    ) -> None:
        """``history.update(results)``, its scalars, and the figures when they are due."""
        evolutions = self.history.update(results, out.step)
        scalars = {
            out.tag(layer, "preference_changed"): float(evolution.changed_fraction[-1])
            for layer, evolution in evolutions.items()
        }
        out.scalars(scalars)
        names = list(class_names) if class_names is not None else None
        figures: list[Figure] = [
            (out.tag(layer, "evolution"), neuron_evolution_image, (evolution, names))
            for layer, evolution in evolutions.items()
        ]
        self.hold(out, figures, max((len(e.epochs) for e in evolutions.values()), default=0))


class ClusteringEvolutionLog(_LatestFigures):
    """CategoryClustering's :class:`~lightning_neurons.evolution.ClusteringHistory` and its
    logging: ``<view>/distance_correlation`` (scalar) every analysed epoch, ``<view>/evolution``
    (figure) on the schedule of :class:`NeuronEvolutionLog`. The adjusted Rand index with the
    previous epoch is CategoryClustering's ``stability``."""

    def __init__(self) -> None:
        super().__init__()
        self.history = ClusteringHistory()

    def log(self, out: AnalysisLogger, results: Mapping[str, CategoryClusteringResult]) -> None:
        """``history.update(results)``, its scalars, and the figures when they are due."""
        evolutions = self.history.update(results, out.step)
        scalars = {
            out.tag(view, "distance_correlation"): float(evolution.distance_correlation[-1])
            for view, evolution in evolutions.items()
        }
        out.scalars({tag: value for tag, value in scalars.items() if np.isfinite(value)})
        figures: list[Figure] = [
            (out.tag(view, "evolution"), clustering_evolution_figure, (evolution,))
            for view, evolution in evolutions.items()
        ]
        self.hold(out, figures, max((len(e.epochs) for e in evolutions.values()), default=0))
