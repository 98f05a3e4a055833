"""FeatureVisualizer's plan: what a round renders, resolved and checked once on the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_neurons.batch import (
    BatchFn,
    InputTransform,
    as_model_input,
    is_channels_last,
    to_display,
)
from lightning_neurons.batch import read_logits as logits_of
from lightning_neurons.checks import check_image_shape
from lightning_neurons.data import ByteImages, ChannelsLast, known_normalization
from lightning_neurons.errors import NeuronsError
from lightning_neurons.gradients import why_no_gradient
from lightning_neurons.hooks import get_module, selects, split_call
from lightning_neurons.state import analysis_mode
from lightning_neurons.visualize.cam_layers import NoCamLayer, cam_layer
from lightning_neurons.visualize.objectives import LOGITS, Channel, ClassLogit
from lightning_neurons.visualize.render import check_objectives
from lightning_neurons.visualize.rollout import has_image_attention
from lightning_neurons.visualize.saliency import METHODS
from lightning_neurons.visualize.sizing import Probe, probe


def _no_graph(what: str, whose: str, names: Sequence[str], found: Probe, then: str) -> str:
    """The warning for ``names`` (called ``what``), whose outputs carry no gradient from the
    image: where the model computes them (by the grad mode where they ran, when they agree),
    what FeatureVisualizer leaves out (``then``), and what would work."""
    modes = {name not in found.grad_mode_off for name in names}  # grad mode on where each ran
    told = len(modes) == 1 and LOGITS not in names  # (the logits are read outside any hook)
    where, fix = why_no_gradient(modes.pop() if told else None)
    return (
        f"FeatureVisualizer: the model computes {what} without a graph from the image ({where}), "
        f"so no image can climb {whose} gradient: {then}. To have them, {fix}."
    )


def is_indices(values: Any) -> bool:
    """A list of non-negative integers (channels, classes)."""
    return (
        isinstance(values, Sequence)
        and not isinstance(values, (str, bytes))
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    )


def is_channel_map(channels: Any) -> bool:
    """``{layer: [channel, ...]}``."""
    return isinstance(channels, Mapping) and all(is_indices(v) for v in channels.values())


def is_image_shape(shape: Any) -> bool:
    """``[C, H, W]``, each >= 1."""
    return (
        isinstance(shape, Sequence)
        and len(shape) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    )


def is_methods(methods: Any) -> bool:
    """A saliency method, or a list of them."""
    if isinstance(methods, str):
        return methods in METHODS
    return isinstance(methods, Sequence) and all(m in METHODS for m in methods)


def saliency_methods(
    pl_module: LightningModule, methods: Sequence[str], gradcam_layer: str | None
) -> list[str]:
    """The saliency methods of a fit (Grad-CAM's layer is chosen with the plan:
    :func:`gradcam_layer_for`).

    Raises:
        NeuronsError: If ``gradcam_layer`` is not a module of the model.
    """
    if "gradcam" in methods and gradcam_layer is not None:
        get_module(pl_module, gradcam_layer)
    return list(methods)


def usable_methods(model: nn.Module, methods: Sequence[str], plan: VisualizerPlan) -> list[str]:
    """``methods`` less those the model cannot give: Grad-CAM without its layer (the plan's,
    :func:`gradcam_layer_for` warned), attention rollout without attention over the image's
    patch tokens (one forward pass of a grey image says; with a warning)."""
    kept = [m for m in methods if m != "gradcam" or plan.cam_layer is not None]
    if "rollout" in kept:
        image = torch.full((1, *plan.shape), 0.5)
        if not has_image_attention(model, image, plan.transform):
            rank_zero_warn(
                f"FeatureVisualizer: {type(model).__name__} computes no attention over the "
                "image's patch tokens ([N, heads, T, T] probabilities of "
                "scaled_dot_product_attention or of a softmax over the keys), which attention "
                "rollout reads; its maps are left out (the other saliency methods are made)."
            )
            kept.remove("rollout")
    return kept


def gradcam_layer_for(
    model: nn.Module,
    layer: str | None,
    shape: Sequence[int] | None,
    transform: InputTransform | None,
) -> str | None:
    """Grad-CAM's layer for images of ``shape`` (:func:`cam_layer` on a grey image). A model that
    fails on it gets the last Conv2d here: the plan's own probe then says what is wrong. ``None``,
    with one warning, for a model without a layer Grad-CAM can take by default (an MLP: no
    ``Conv2d``, no transformer tokens on a grid of image patches)."""
    image = None if shape is None or layer else torch.full((1, *shape), 0.5)
    try:
        try:
            return cam_layer(model, layer, image, transform)
        except NoCamLayer:
            raise
        except Exception:  # noqa: BLE001 - the model failing on the image: make_plan says why
            return cam_layer(model, layer)
    except NoCamLayer:
        rank_zero_warn(
            f"FeatureVisualizer: {type(model).__name__} has no Conv2d layer, nor transformer "
            "tokens on a grid of image patches, for Grad-CAM's default; its maps are left out "
            "(the other saliency methods are made). Pass `gradcam_layer=` to choose a layer with "
            "a spatial output."
        )
        return None


@dataclass(frozen=True)
class VisualizerPlan:
    """What every round of a FeatureVisualizer renders.

    Attributes:
        shape: ``(C, H, W)`` of the rendered images.
        transform: Display image -> model input (``None``: the loaders yield display images).
        layers: The visualized layers' call sites.
        channels: Per layer, the channels rendered.
        classes: The classes rendered (empty when the logits cannot be read).
        class_names: The data module's class names, if it has them.
        saliency: Whether saliency maps can be taken (the logits can be read).
        cam_layer: Grad-CAM's layer (``None``: no Grad-CAM maps, none asked for or its layer
            carries no gradient).
    """

    shape: tuple[int, int, int]
    transform: InputTransform | None
    layers: list[str]
    channels: dict[str, list[int]]
    classes: list[int]
    class_names: list[str] | None
    saliency: bool
    cam_layer: str | None = None

    def class_name(self, c: int) -> str:
        """Class ``c``'s name, or its index when the data module names none."""
        names = self.class_names
        return str(names[c]) if names and c < len(names) else str(c)


def default_classes(num_classes: int, max_classes: int | None) -> list[int]:
    """All classes, or ``max_classes`` of them spread evenly: ``floor(i * C / max_classes)``.

    Example:
        >>> default_classes(1000, 4)
        [0, 250, 500, 750]
    """
    if max_classes is None or num_classes <= max_classes:
        return list(range(num_classes))
    return [i * num_classes // max_classes for i in range(max_classes)]


def data_attr(trainer: Trainer, name: str) -> Any:
    """Attribute ``name`` of the trainer's data module (``None`` without one or it)."""
    return getattr(getattr(trainer, "datamodule", None), name, None)


def byte_images_transform(
    model: Callable[[torch.Tensor], Any],
    inputs: torch.Tensor,
    output_fn: BatchFn | None,
    module: nn.Module | None = None,
) -> InputTransform | None:
    """How a model fed ``uint8`` images reads float ones, the renderings' input: as 0-255
    values (its ``forward`` scales them, ``x.float() / 255``: :class:`ByteImages`) or as [0, 1]
    values (torchvision's ``ConvertImageDtype``: ``None``): whichever gives the logits closest to
    those of 4 of the ``uint8`` images. The right one runs the model's own cast, so it matches to
    rounding; more than 1% of the logits' size off (a half-precision input's rounding is 0.2%),
    neither does, and the user is told. ``model`` runs the images: ``module`` itself, or a
    function calling it (``module``, then, to be run in analysis mode)."""
    x, module = inputs[:4], module if module is not None else model
    try:
        with analysis_mode(module, grad=False):
            logits = [
                logits_of(model(as_model_input(v, module)), output_fn).float()
                for v in (x, x.float(), x.float() / 255)
            ]
    except Exception:  # noqa: BLE001 - the set-up check that follows reports the model's error
        return None
    byte_gap, unit_gap = (float((v - logits[0]).abs().max()) for v in logits[1:])
    if min(byte_gap, unit_gap) > 0.01 * float(logits[0].abs().max()) + 1e-6:
        rank_zero_warn(
            "FeatureVisualizer: the images are uint8, and the model's logits on them match "
            "neither float images in [0, 1] nor float 0-255 values; images are rendered "
            "as [0, 1] floats. Pass `input_transform` (display image in [0, 1] -> model input) "
            "if the model reads floats otherwise."
        )
    return ByteImages() if byte_gap < unit_gap else None


def guessed_normalization(inputs: torch.Tensor, world_size: int = 1) -> InputTransform | None:
    """For float images outside [0, 1] and no ``input_transform``: the normalisation that made
    them, when their range fits one people use (see
    :func:`~lightning_neurons.data.known_normalization`); a warning either way, since the
    renderings and figures depend on it. Under DDP (``world_size > 1``) it is only named: each
    process guesses from its own batch, and the processes must render alike."""
    low, high = float(inputs.min()), float(inputs.max())
    if inputs.dim() != 4 or (low >= -0.01 and high <= 1.01):
        return None  # display images
    found = known_normalization(inputs)
    seen = f"the images are not display images in [0, 1] (values in [{low:.3g}, {high:.3g}])"
    if found is None:
        rank_zero_warn(
            f"FeatureVisualizer: {seen}, and no normalisation people use fits their range: "
            "images are rendered in [0, 1], and the data's are shown clipped to it. Pass "
            "`input_transform=lightning_neurons.data.Normalize(mean, std)` with the data's "
            "normalisation (or give the data module an `input_transform`)."
        )
        return None
    name, normalize = found
    if world_size > 1:
        rank_zero_warn(
            f"FeatureVisualizer: {seen}; their range fits the {name} normalisation, but under DDP "
            "it is not taken on a guess (each process sees other images): images are rendered "
            f"in [0, 1]. Pass `input_transform=lightning_neurons.data.{normalize!r}` if it is the "
            "data's (or give the data module an `input_transform`)."
        )
        return None
    rank_zero_warn(
        f"FeatureVisualizer: {seen}; their range fits the {name} normalisation, {normalize!r}, "
        "through which images are rendered and shown. Pass `input_transform` (or give the data "
        "module an `input_transform`) to say so, or to name the right one."
    )
    return normalize


def _read_inputs(
    trainer: Trainer,
    pl_module: LightningModule,
    inputs: torch.Tensor,
    image_shape: Sequence[int],
    output_fn: BatchFn | None,
    guess: bool = True,
) -> tuple[InputTransform | None, Sequence[int]]:
    """The input transform (and image shape) that the first batch's ``inputs`` call for, when
    none is given: channels last (:class:`~lightning_neurons.data.ChannelsLast`), ``uint8``
    (:func:`byte_images_transform`) or normalised (:func:`guessed_normalization`; not with
    ``guess`` False: see :func:`later_normalization`) images."""
    last = is_channels_last(inputs)
    images = inputs.permute(0, 3, 1, 2) if last else inputs
    if last:
        rank_zero_warn(
            f"FeatureVisualizer: the images are {list(inputs.shape)} batches, read as channels "
            "last [B, H, W, C]: images are rendered [C, H, W] and fed the model permuted. Pass "
            "`input_transform` (display image [B, C, H, W] in [0, 1] -> model input) if not."
        )
        if tuple(image_shape) == tuple(inputs.shape[1:]):
            image_shape = images.shape[1:]
    if images.dtype == torch.uint8:
        model = (lambda x: pl_module(x.permute(0, 2, 3, 1))) if last else pl_module
        transform = byte_images_transform(model, images, output_fn, pl_module)
    else:
        transform = guessed_normalization(images, trainer.world_size) if guess else None
    return (ChannelsLast(transform) if last else transform), image_shape


def later_normalization(
    plan: VisualizerPlan, inputs: torch.Tensor, world_size: int = 1
) -> VisualizerPlan:
    """``plan`` with the normalisation that a validation batch's float ``inputs`` call for
    (:func:`guessed_normalization`), when its transform came from a training batch: an
    augmentation such as RandomErasing's random values (after the normalisation) gives a range
    that no normalisation fits, which the validation images do not."""
    last = isinstance(plan.transform, ChannelsLast) and plan.transform.inner is None
    if not (plan.transform is None or last) or not inputs.is_floating_point():
        return plan
    guess = guessed_normalization(inputs.permute(0, 3, 1, 2) if last else inputs, world_size)
    if guess is None:
        return plan
    return replace(plan, transform=ChannelsLast(guess) if last else guess)


def make_plan(
    trainer: Trainer,
    pl_module: LightningModule,
    *,
    layers: list[str],
    channels: dict[str, list[int]],
    max_channels: int | None,
    classes: list[int] | None,
    max_classes: int | None,
    image_shape: Sequence[int] | None,
    input_transform: InputTransform | None,
    output_fn: BatchFn | None,
    read_logits: Callable[[Callable[[], Any]], Any],
    inputs: torch.Tensor | None = None,
    guess: bool = True,
    gradcam: bool = False,
    gradcam_layer: str | None = None,
) -> VisualizerPlan:
    """Resolve image shape, input transform, channels and classes; check them with one forward
    pass per kind of objective.

    ``read_logits(fn)`` runs ``fn`` (the check of the logits) under the callback's ``on_error``:
    it returns ``None`` when the logits cannot be read (no class images, no saliency). Without an
    ``input_transform``, the first batch's ``inputs`` pick one (:func:`_read_inputs`): channels
    last, ``uint8`` or normalised images (normalised ones only with ``guess``: the first batch
    may be an augmented training batch, and :func:`later_normalization` reads a validation one).
    With ``gradcam``, Grad-CAM's layer is ``gradcam_layer`` or the default for the images read
    (:func:`gradcam_layer_for`). The layers (and a named Grad-CAM layer) whose outputs carry no
    gradient from the image are left out with one warning: no image can climb it.

    Raises:
        NeuronsError: For an unknown image size, or a shape, layer, channel or class that does
            not fit the model.
    """
    if image_shape is None:
        raise NeuronsError(
            "FeatureVisualizer cannot tell the image size: the data module has no `image_shape` "
            "and no validation images were seen. Pass `image_shape=[C, H, W]`."
        )
    if input_transform is None and inputs is not None:
        input_transform, image_shape = _read_inputs(
            trainer, pl_module, inputs, image_shape, output_fn, guess
        )
    shape = check_image_shape(list(image_shape))
    cam = gradcam_layer_for(pl_module, gradcam_layer, shape, input_transform) if gradcam else None

    def check(objectives: list) -> dict[str, Any]:
        return check_objectives(
            pl_module, objectives, shape, input_transform=input_transform, output_fn=output_fn
        )

    wanted = [Channel(layer, i) for layer in layers for i in channels.get(layer, [])]
    wanted += [Channel(split_call(layer)[0], 0) for layer in layers]
    wanted += [Channel(cam, 0)] if cam is not None else []
    # a wrong image shape, layer or channel raises here
    found = probe(pl_module, wanted, shape, input_transform, output_fn, gradients=True)
    # The layer list becomes the call sites it selects (one per call of a shared module).
    sites = _with_gradient([n for n in found.shapes if n != LOGITS and selects(layers, n)], found)
    logits = read_logits(lambda: check([ClassLogit(0)])[LOGITS])
    if logits is not None and LOGITS in found.without_gradient:
        then = "no class images or saliency maps"
        rank_zero_warn(_no_graph("its logits", "their", [LOGITS], found, then))
        logits = None
    if logits is not None and classes:  # a class outside the logits raises here
        check([ClassLogit(c) for c in classes])
    if logits is None:
        chosen: list[int] = []
    elif classes is not None:
        chosen = classes
    else:
        chosen = default_classes(logits[0], max_classes)
    if cam is not None and cam in found.without_gradient - found.graph_on_return:
        if logits is not None:  # (else: no saliency maps at all, said above)
            then = "no Grad-CAM maps (pass `gradcam_layer=` to choose another layer)"
            rank_zero_warn(_no_graph(f"Grad-CAM's layer {cam!r}", "its", [cam], found, then))
        cam = None
    names = data_attr(trainer, "class_names")
    return VisualizerPlan(
        shape=shape,
        transform=input_transform,
        layers=sites,
        channels={
            layer: channels.get(layer)
            or list(range(min(found.shapes[layer][0], max_channels or found.shapes[layer][0])))
            for layer in sites
        },
        classes=chosen,
        class_names=list(names) if names else None,
        saliency=logits is not None,
        cam_layer=cam,
    )


def _with_gradient(sites: list[str], found: Probe) -> list[str]:
    """The layers ``sites`` whose outputs carry a gradient from the image (one warning for the
    others: their channels cannot be rendered)."""
    lost = [site for site in sites if site in found.without_gradient]
    if lost:
        then = "their channels are not rendered"
        rank_zero_warn(_no_graph(f"layers {lost}", "their", lost, found, then))
    return [site for site in sites if site not in found.without_gradient]


def layer_widths(model: nn.Module, plan: VisualizerPlan, layers: Sequence[str]) -> dict[str, int]:
    """Each layer's channel count (its output's second dimension), from one forward pass."""
    if not layers:
        return {}
    wanted = [Channel(layer, 0) for layer in layers]
    shapes = check_objectives(model, wanted, plan.shape, input_transform=plan.transform)
    return {layer: shapes[layer][0] for layer in layers}


def shows_images(inputs: torch.Tensor, plan: VisualizerPlan | None) -> bool:
    """Whether model inputs are images: ``[B, C, H, W]``, or mapped back to images exactly by
    the input transform's ``inverse`` (:class:`~lightning_neurons.data.Flatten`)."""
    if inputs.dim() == 4:
        return True
    if plan is None or not len(inputs):
        return False
    images, exact = to_display(inputs[:1], plan.transform)
    return exact and images.dim() == 4
