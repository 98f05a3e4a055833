"""The Lightning callbacks of lightning-neurons."""

from lightning_neurons.callbacks._base import AnalysisCallback
from lightning_neurons.callbacks.tracker import ActivationTracker

__all__ = ["ActivationTracker", "AnalysisCallback"]
