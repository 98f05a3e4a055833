"""Preference and focus: batched gradient-ascent visualization and saliency.

*Preference* (what image a channel, a group of channels or a class wants to see) is found by
gradient ascent on the pixels: :func:`render` optimises one image per :class:`Objective`, all in
one batch. *Focus* (which pixels of a real image drive a prediction) is shown by saliency maps:
:func:`gradient`, :func:`smoothgrad` and :func:`grad_cam`.

Example:
    >>> from lightning_neurons.visualize import Channel, ClassLogit, render, grad_cam
    >>> images = render(model, [Channel("features.conv2", i) for i in range(64)],
    ...                 image_shape=(1, 32, 32), steps=128).images  # doctest: +SKIP
    >>> classes = render(model, [ClassLogit(c) for c in range(10)], image_shape=(1, 32, 32))  # doctest: +SKIP
    >>> classes.images.shape, classes.steps  # doctest: +SKIP
    >>> maps = grad_cam(model, real_images)  # doctest: +SKIP
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
from lightning_neurons.visualize.saliency import (
    grad_cam,
    gradient,
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
    "check_objectives",
    "evaluate",
    "grad_cam",
    "gradient",
    "normalize_maps",
    "render",
    "saliency",
    "smoothgrad",
]
