"""Preference and focus: batched gradient-ascent visualization and saliency.

*Preference* (what image a channel, a group of channels or a class wants to see) is found by
gradient ascent on the pixels: :func:`render` optimises one image per :class:`Objective`, all in
one batch. *Focus* (which pixels of a real image drive a prediction) is shown by saliency maps:
:func:`gradient`, :func:`smoothgrad` and :func:`grad_cam`.

Example:
    >>> from lightning_neurons.visualize import Channel, ClassLogit, render, grad_cam
    >>> images = render(model, [Channel("features.conv2", i) for i in range(64)],
    ...                 image_shape=(1, 32, 32), steps=128)  # doctest: +SKIP
    >>> classes = render(model, [ClassLogit(c) for c in range(10)], image_shape=(1, 32, 32))  # doctest: +SKIP
    >>> maps = grad_cam(model, real_images)  # doctest: +SKIP
"""

from lightning_neurons.state import analysis_mode
from lightning_neurons.visualize.objectives import (
    IMAGE,
    L2,
    LOGITS,
    Channel,
    ChannelGroup,
    ClassLogit,
    ClassLogProb,
    Neuron,
    Objective,
    Term,
    TotalVariation,
    l2_penalty,
    total_variation,
)
from lightning_neurons.visualize.param import (
    fft_image,
    maco_image,
    parametrize,
    pixel_image,
    row_seed,
    soft_clip,
)
from lightning_neurons.visualize.prior import DataPrior, DataPriorEstimate, amplitude_spectrum
from lightning_neurons.visualize.render import check_objectives, evaluate, render
from lightning_neurons.visualize.saliency import (
    grad_cam,
    gradient,
    normalize_maps,
    saliency,
    smoothgrad,
)
from lightning_neurons.visualize.transforms import (
    CenterCrop,
    Jitter,
    Pad,
    RandomAffine,
    RandomRotate,
    RandomScale,
    apply_transforms,
    resolve_transforms,
    robust_transforms,
    standard_transforms,
)

__all__ = [
    "DataPrior",
    "DataPriorEstimate",
    "IMAGE",
    "L2",
    "LOGITS",
    "CenterCrop",
    "Channel",
    "ChannelGroup",
    "ClassLogit",
    "ClassLogProb",
    "Jitter",
    "Neuron",
    "Objective",
    "Pad",
    "RandomAffine",
    "RandomRotate",
    "RandomScale",
    "Term",
    "TotalVariation",
    "amplitude_spectrum",
    "analysis_mode",
    "apply_transforms",
    "check_objectives",
    "evaluate",
    "fft_image",
    "grad_cam",
    "gradient",
    "l2_penalty",
    "maco_image",
    "normalize_maps",
    "parametrize",
    "pixel_image",
    "render",
    "resolve_transforms",
    "robust_transforms",
    "row_seed",
    "saliency",
    "smoothgrad",
    "soft_clip",
    "standard_transforms",
    "total_variation",
]
