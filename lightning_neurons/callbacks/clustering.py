"""CategoryClustering and NeuronClustering, kept importable from here: they live in
:mod:`lightning_neurons.callbacks.category_clustering` and
:mod:`lightning_neurons.callbacks.neuron_clustering`."""

from lightning_neurons.callbacks._base import class_names_of
from lightning_neurons.callbacks.category_clustering import (
    COMBINED,
    CategoryClustering,
    distance_confusion_agreement,
)
from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
from lightning_neurons.results import CategoryClusteringResult, NeuronClusteringResult

__all__ = [
    "COMBINED",
    "CategoryClustering",
    "CategoryClusteringResult",
    "NeuronClustering",
    "NeuronClusteringResult",
    "class_names_of",
    "distance_confusion_agreement",
]
