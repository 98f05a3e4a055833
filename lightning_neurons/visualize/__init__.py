"""Preference and focus: batched gradient-ascent visualization and saliency.

*Preference* (what image a channel, a group of channels or a class wants to see) is found by
gradient ascent on the pixels: :func:`render` optimises one image per :class:`Objective`, all in
one batch. *Focus* (which pixels of a real image drive a prediction) is shown by saliency maps:
:func:`gradient`, :func:`smoothgrad`, :func:`integrated_gradients`, :func:`grad_cam` and, for
transformers, :func:`attention_rollout`.

Example:
    >>> import torch
    >>> from lightning_neurons.models import SmallCNN
    >>> from lightning_neurons.visualize import Channel, ClassLogit, grad_cam, render
    >>> model = SmallCNN(widths=(8, 16, 32)).eval()  # 1 x 16 x 16 images; train it first
    >>> channels = render(model, [Channel("features.conv2", i) for i in range(16)],
    ...                   image_shape=(1, 16, 16), steps=32).images
    >>> classes = render(model, [ClassLogit(c) for c in range(10)], image_shape=(1, 16, 16), steps=32)
    >>> channels.shape, classes.images.shape
    (torch.Size([16, 1, 16, 16]), torch.Size([10, 1, 16, 16]))
    >>> grad_cam(model, torch.rand(4, 1, 16, 16)).shape  # where each predicted class is seen
    torch.Size([4, 16, 16])
"""

from lightning_neurons.visualize.anchors import ClassAnchor, ClassAnchors
from lightning_neurons.visualize.objectives import (
    Channel,
    ChannelGroup,
    ClassLogit,
    ClassLogProb,
    Neuron,
    Objective,
)
from lightning_neurons.visualize.penalties import L2, TotalVariation
from lightning_neurons.visualize.prior import DataPrior
from lightning_neurons.visualize.render import RenderResult, check_objectives, evaluate, render
from lightning_neurons.visualize.rollout import attention_rollout
from lightning_neurons.visualize.saliency import (
    grad_cam,
    gradient,
    integrated_gradients,
    normalize_maps,
    saliency,
    smoothgrad,
)

# The public API: objectives to render, the render loop, the data prior of "maco", and saliency.
# Parametrizations, transforms and helpers live in their modules (``visualize.param``,
# ``visualize.transforms``, ``visualize.objectives``, ``visualize.sizing``, ...).
__all__ = [
    "L2",
    "Channel",
    "ChannelGroup",
    "ClassAnchor",
    "ClassAnchors",
    "ClassLogProb",
    "ClassLogit",
    "DataPrior",
    "Neuron",
    "Objective",
    "RenderResult",
    "TotalVariation",
    "attention_rollout",
    "check_objectives",
    "evaluate",
    "grad_cam",
    "gradient",
    "integrated_gradients",
    "normalize_maps",
    "render",
    "saliency",
    "smoothgrad",
]
