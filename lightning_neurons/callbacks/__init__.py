"""The Lightning callbacks of lightning-neurons."""

from lightning_neurons.callbacks._base import AnalysisCallback
from lightning_neurons.callbacks.category_clustering import CategoryClustering
from lightning_neurons.callbacks.contribution import NeuronContribution
from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
from lightning_neurons.callbacks.tracker import ActivationTracker
from lightning_neurons.callbacks.visualizer import FeatureVisualizer, RenderOptions

__all__ = [
    "ActivationTracker",
    "AnalysisCallback",
    "CategoryClustering",
    "FeatureVisualizer",
    "NeuronClustering",
    "NeuronContribution",
    "RenderOptions",
]
