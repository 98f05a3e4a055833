"""lightning-neurons: PyTorch Lightning callbacks that show what a CNN's neurons learn.

Attach the callbacks to any ``Trainer``::

    from lightning_neurons import ActivationTracker
    trainer = Trainer(callbacks=[ActivationTracker()])
"""

from lightning_neurons.callbacks import ActivationTracker, AnalysisCallback
from lightning_neurons.errors import NeuronsError
from lightning_neurons.stats import LayerStats

__version__ = "0.1.0"

__all__ = [
    "ActivationTracker",
    "AnalysisCallback",
    "LayerStats",
    "NeuronsError",
    "__version__",
]
