"""lightning-neurons: PyTorch Lightning callbacks that show what a CNN's neurons learn.

Attach the callbacks to any ``Trainer``::

    from lightning_neurons import ActivationTracker, FeatureVisualizer
    trainer = Trainer(callbacks=[ActivationTracker(), FeatureVisualizer()])

The analyses read one shared :class:`ActivationTracker` (what it tracks and how it reads batches
is its :class:`TrackerSpec`); each callback's ``results`` are the dataclasses of
:mod:`lightning_neurons.results`. The libraries under them are
:mod:`lightning_neurons.visualize`, :mod:`lightning_neurons.clustering`,
:mod:`lightning_neurons.contribution`, :mod:`lightning_neurons.class_contribution` and
:mod:`lightning_neurons.ablation`.
"""

from lightning_neurons.callbacks import (
    ActivationTracker,
    AnalysisCallback,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    RenderOptions,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.loggers import load_index
from lightning_neurons.results import TrackerSpec
from lightning_neurons.runs import Run, load_run
from lightning_neurons.stats import LayerStats

__version__ = "0.1.0"

#: The Lightning callbacks, in the order their analyses build on each other.
CALLBACKS = (
    "ActivationTracker",
    "FeatureVisualizer",
    "CategoryClustering",
    "NeuronClustering",
    "NeuronContribution",
)

__all__ = [
    "CALLBACKS",
    "ActivationTracker",
    "AnalysisCallback",
    "CategoryClustering",
    "FeatureVisualizer",
    "LayerStats",
    "NeuronClustering",
    "NeuronContribution",
    "NeuronsError",
    "RenderOptions",
    "TrackerSpec",
    "Run",
    "__version__",
    "load_index",
    "load_run",
]
