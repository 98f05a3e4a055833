"""Focus: which pixels of a real image drive the model's prediction, batched over images.

- :func:`gradient` (Simonyan et al. 2014): ``|d logit_c / d pixel|``, largest over channels.
- :func:`smoothgrad` (Smilkov et al. 2017): the gradient averaged over noisy copies of the image
  (all copies of all images in one batch), which removes most of the gradient's speckle; each
  image's noise comes from its own seed, so its map does not depend on the other images.
- :func:`integrated_gradients` (Sundararajan et al. 2017): the image minus a baseline (black, or
  the image blurred), times the gradient averaged along the straight path between them; the attributions add up to
  the logit's change from the baseline (completeness), and depend on no layer, so they suit
  transformers as well as CNNs.
- :func:`grad_cam` (Selvaraju et al. 2017): a layer's feature maps weighted by the spatially
  averaged gradient of the class logit, rectified and upsampled to the image.

Every function takes display images (``[N, C, H, W]`` in [0, 1]) and an optional
``input_transform`` (display -> model input, see :func:`~lightning_neurons.batch.to_model_input`),
so the gradients are with respect to what a person sees. The model runs in its own floating-point
type (bfloat16 / float16 models too); logits are read with
:func:`~lightning_neurons.batch.read_logits` (``output_fn`` for other outputs). The model runs in eval mode with frozen parameters and is left exactly as found. Maps are
``[N, H, W]``, non-negative, not normalised (see :func:`normalize_maps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from lightning_neurons import progress
from lightning_neurons.batch import (
    BatchFn,
    InputTransform,
)
from lightning_neurons.checks import (
    check_choice,
    check_image_batch,
    check_int,
    check_non_negative,
    check_positive_int,
)
from lightning_neurons.defaults import default_cam_layer
from lightning_neurons.errors import NeuronsError
from lightning_neurons.gradients import (
    gradients_at,
    no_gradient,
)
from lightning_neurons.hooks import get_module, hooked
from lightning_neurons.layouts import (
    image_token_grid,
    on_grid,
    patch_embedding,
    token_grid,
    token_order,
)
from lightning_neurons.state import analysis_mode, model_device
from lightning_neurons.visualize.cam_layers import (  # cam_layer: this module's too
    cam_layer,
    image_sizes,
    read_cam_layer,
)
from lightning_neurons.visualize.param import row_seed
from lightning_neurons.visualize.probe import (
    Probe,
    class_logits,
    input_gradient,
    logits_without_graph,
    probe_targets,
    row_chunks,
)
from lightning_neurons.visualize.rollout import attention_rollout

Method = Literal["gradient", "smoothgrad", "integrated", "gradcam", "rollout"]
METHODS: tuple[str, ...] = ("gradient", "smoothgrad", "integrated", "gradcam", "rollout")
#: Integrated Gradients' baselines by name (:func:`saliency`): a black image, or the image blurred.
Baseline = Literal["black", "blur"]


def gradient(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    input_transform: InputTransform | None = None,
    batch_size: int | None = None,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """Vanilla gradient saliency: ``max_c |d logit_target / d image_c|`` per pixel.

    Args:
        model: Maps model inputs to ``[N, num_classes]`` logits.
        images: ``[N, C, H, W]`` display images.
        target: Class per image (or one for all); default: the predicted class.
        input_transform: Display image -> model input.
        batch_size: Images per forward pass (default: chunks bounded in memory, see
            :func:`~lightning_neurons.visualize.sizing.auto_batch_size`).
        output_fn: Reads the logits from the model's output (see
            :func:`~lightning_neurons.batch.read_logits`).

    Returns:
        ``[N, H, W]`` non-negative maps (CPU, float32).

    Raises:
        NeuronsError: For a bad ``images`` shape or a ``target`` outside the model's classes.

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> maps = gradient(SmallCNN().eval(), torch.rand(2, 1, 32, 32), target=[3, 7])
        >>> maps.shape, bool((maps >= 0).all())
        (torch.Size([2, 32, 32]), True)
    """
    check_image_batch(images)
    device = model_device(model)
    out = []
    with analysis_mode(model):
        images = images.detach().clone().to(device)
        probe = Probe(model, images, input_transform, output_fn)
        target = probe_targets(probe, target)
        for part in row_chunks(len(images), batch_size, probe):
            progress.update("gradient", min(part.stop, len(images)), len(images))
            grad = input_gradient(model, images[part], target[part], input_transform, output_fn)
            out.append(grad.abs().amax(dim=1).float().cpu())
    return torch.cat(out)


def smoothgrad(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    samples: int = 16,
    noise: float = 0.15,
    seed: int = 0,
    first_index: int = 0,
    input_transform: InputTransform | None = None,
    batch_size: int | None = None,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """SmoothGrad: the input gradient averaged over noisy copies, then ``max_c |.|``.

    The ``samples`` noisy copies of all images go through the model in chunks (of ``batch_size``
    copies, or bounded in memory by default). The noise is Gaussian with standard deviation
    ``noise`` times each image's value range. Each image draws its own noise, from a generator
    seeded with :func:`~lightning_neurons.visualize.param.row_seed` of ``(seed, first_index + i)``
    for image ``i``: an image's map does not depend on the other images passed with it, so maps
    computed in parts (``first_index`` the part's first image, as under DDP) are those of one call.

    Args:
        model: Maps model inputs to logits.
        images: ``[N, C, H, W]`` display images.
        target: Class per image (or one for all); default: the predicted class of the clean image.
        samples: Noisy copies per image (SmoothGrad's paper: 5 to 50).
        noise: Noise level as a share of the image's value range (paper: 0.1 to 0.2).
        seed: Seed of the noise.
        first_index: Index of ``images[0]`` in a larger set of images whose maps are computed in
            parts: image ``i`` gets the noise of image ``first_index + i`` of the set.
        input_transform: Display image -> model input.
        batch_size: Noisy copies per forward pass (default: chunks of the ``N * samples``
            copies bounded in memory, see :func:`~lightning_neurons.visualize.sizing.auto_batch_size`).
        output_fn: Reads the logits from the model's output.

    Returns:
        ``[N, H, W]`` non-negative maps (CPU, float32).

    Raises:
        NeuronsError: For bad arguments or targets.
    """
    check_image_batch(images)
    check_positive_int("samples", samples)
    check_non_negative("noise", noise)
    check_int("first_index", first_index, minimum=0)
    device = model_device(model)
    n = images.shape[0]
    with analysis_mode(model):
        images = images.detach().clone().to(device)
        probe = Probe(model, images, input_transform, output_fn)
        target = probe_targets(probe, target)
        span = (images.flatten(1).amax(dim=1) - images.flatten(1).amin(dim=1)).clamp_min(1e-6)
        sigma = (noise * span).view(1, n, 1, 1, 1)
        draws = _noise(samples, images.shape, int(seed), first_index).to(device)
        noisy = (images.unsqueeze(0) + sigma * draws).flatten(0, 1)  # row s * n + i: image i
        targets = target.repeat(samples)
        total = torch.zeros_like(images)
        for part in row_chunks(noisy.shape[0], batch_size, probe):
            progress.update("smoothgrad", min(part.stop, noisy.shape[0]), noisy.shape[0])
            grad = input_gradient(model, noisy[part], targets[part], input_transform, output_fn)
            rows = torch.arange(part.start, part.start + grad.shape[0], device=device) % n
            total.index_add_(0, rows, grad)
    return (total / samples).abs().amax(dim=1).float().cpu()


def integrated_gradients(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    steps: int = 32,
    baseline: float | torch.Tensor | Literal["blur"] = 0.0,
    signed: bool = False,
    input_transform: InputTransform | None = None,
    batch_size: int | None = None,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """Integrated Gradients: ``(image - baseline) x`` the gradient averaged over ``steps`` points
    of the straight path from the baseline to the image (the midpoint rule), summed over the
    channels, then ``|.|``.

    The attributions (``signed=True``: ``[N, C, H, W]``) add up to ``logit(image) -
    logit(baseline)`` of the target class, up to the rule's error, which shrinks as ``steps``
    grows (completeness: the tests check it). The ``N x steps`` points go through the model in
    chunks, as SmoothGrad's copies do.

    Args:
        model: Maps model inputs to logits.
        images: ``[N, C, H, W]`` display images.
        target: Class per image (or one for all); default: the predicted class.
        steps: Points on each path (the paper: 20 to 300).
        baseline: The image that explains nothing: a value for every pixel (default 0: black,
            when the maps are taken on display images), a tensor that broadcasts to ``images``,
            or ``"blur"``: each image blurred (:func:`blurred`), which keeps its colours and
            coarse layout, so that dark pixels (a black background, the digits') can matter.
        signed: Return the ``[N, C, H, W]`` attributions instead of the maps.
        input_transform: Display image -> model input.
        batch_size: Path points per forward pass (default: chunks bounded in memory).
        output_fn: Reads the logits from the model's output.

    Returns:
        ``[N, H, W]`` non-negative maps (CPU, float32), or the signed attributions.

    Raises:
        NeuronsError: For bad arguments or targets.

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> maps = integrated_gradients(SmallCNN().eval(), torch.rand(2, 1, 32, 32), steps=8)
        >>> maps.shape
        torch.Size([2, 32, 32])
    """
    check_image_batch(images)
    check_positive_int("steps", steps)
    device = model_device(model)
    n = images.shape[0]
    with analysis_mode(model):
        images = images.detach().clone().to(device)
        start = _baseline_of(images, baseline)
        probe = Probe(model, images, input_transform, output_fn)
        target = probe_targets(probe, target)
        alphas = (torch.arange(steps, device=device, dtype=images.dtype) + 0.5) / steps
        path = start + alphas.view(-1, 1, 1, 1, 1) * (images - start)  # [steps, N, C, H, W]
        points, targets = path.flatten(0, 1), target.repeat(steps)  # row s * n + i: image i
        total = torch.zeros_like(images)
        for part in row_chunks(points.shape[0], batch_size, probe):
            progress.update("integrated gradients", min(part.stop, len(points)), len(points))
            grad = input_gradient(model, points[part], targets[part], input_transform, output_fn)
            rows = torch.arange(part.start, part.start + grad.shape[0], device=device) % n
            total.index_add_(0, rows, grad)
    attributions = ((images - start) * total / steps).float().cpu()
    return attributions if signed else attributions.sum(dim=1).abs()


def blurred(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """``[N, C, H, W]`` images under a Gaussian blur of ``sigma`` pixels, by default an eighth of
    their larger side (4 px at 32 px): Integrated Gradients' ``baseline="blur"`` (Sturmfels et
    al. 2020, "Visualizing the Impact of Feature Attribution Baselines"); another blur is
    ``baseline=blurred(images, sigma)``."""
    if sigma is None:
        sigma = max(images.shape[-2:]) / 8
    elif not sigma > 0:
        raise NeuronsError(f"`sigma` must be a positive number of pixels; got {sigma!r}")
    size = 2 * min(math.ceil(3 * sigma), min(images.shape[-2:]) - 1) + 1  # reflect padding < side
    blur = torchvision.transforms.functional.gaussian_blur
    return blur(images.float(), [size, size], [sigma, sigma]).to(images.dtype)


def _baseline_of(images: torch.Tensor, baseline: float | torch.Tensor | str) -> torch.Tensor:
    if isinstance(baseline, str):
        if baseline != "blur":
            raise NeuronsError(f"`baseline` must be a number, a tensor or 'blur'; got {baseline!r}")
        return blurred(images)
    return torch.as_tensor(baseline, dtype=images.dtype, device=images.device).expand_as(images)


def _noise(samples: int, shape: torch.Size, seed: int, first_index: int) -> torch.Tensor:
    """``[samples, N, C, H, W]`` standard normal draws, image ``i``'s from its own generator
    seeded with ``row_seed(seed, first_index + i)`` (on the CPU: the same numbers on any device)."""
    per_image = [
        torch.randn(
            (samples, *shape[1:]),
            generator=torch.Generator().manual_seed(row_seed(seed, first_index + i)),
        )
        for i in range(shape[0])
    ]
    if not per_image:
        return torch.zeros((samples, *shape))
    return torch.stack(per_image, dim=1)


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    layer: str | None = None,
    input_transform: InputTransform | None = None,
    batch_size: int | None = None,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """Grad-CAM: ``ReLU(sum_k w_k A_k)`` with ``w_k`` the mean gradient over ``A_k``'s positions.

    Args:
        model: Maps model inputs to logits.
        images: ``[N, C, H, W]`` display images.
        target: Class per image (or one for all); default: the predicted class.
        layer: A layer with ``[N, K, h, w]`` output, or a transformer's ``[N, T, D]`` tokens
            (read on the patch grid of its patch embedding, the leading class and register
            tokens left out); default: :func:`cam_layer`'s on these images (a stage or block
            output on the grid of the last ``Conv2d`` with 3 x 3 positions, or a vision
            transformer's block), read in the forward pass that predicts the targets or probes
            the model; when the model computes it without a graph, :func:`cam_layer`'s among the
            layers with one (one more forward pass).
        input_transform: Display image -> model input.
        batch_size: Images per forward pass (as in :func:`gradient`).
        output_fn: Reads the logits from the model's output.

    Returns:
        ``[N, H, W]`` non-negative maps upsampled (bilinear) to the image size (CPU, float32).

    Raises:
        NeuronsError: For an unknown layer, a layer without spatial output, or bad targets.
    """
    check_image_batch(images)
    named, layer = layer, layer or default_cam_layer(model)
    if layer is not None:
        get_module(model, layer)
    patch = patch_embedding(model)  # a token layer's grid is the patch embedding's output's
    device = model_device(model)
    height, width = images.shape[-2:]
    out = []
    captured: dict[str, torch.Tensor] = {}
    grad_mode: list[bool] = []  # where the layer ran: tells why its output has no graph

    def keep(name: str, output: torch.Tensor) -> torch.Tensor | None:
        if name in captured:
            return None
        captured[name] = output
        if name != layer:
            return None
        grad_mode[:] = [torch.is_grad_enabled()]
        # the model may change the output in place further on (`out += identity`, an in-place
        # ReLU): it goes on with a copy, and the maps read the layer's own values. (Without a
        # graph yet, it is kept: a reentrant checkpoint gives a block's last output one when
        # it returns, and the copy would take it.)
        return output.clone() if output.requires_grad else None

    with analysis_mode(model):
        images = images.detach().clone().to(device)
        probe = Probe(model, images, input_transform, output_fn, watch=layer is None)
        target = probe_targets(probe, target)
        sizes = image_sizes(images, input_transform)
        layer = layer or read_cam_layer(model, probe.outputs, sizes)
        watched = [layer] if patch is None or patch == layer else [layer, patch]
        with hooked(model, watched, keep):
            parts = row_chunks(len(images), batch_size, probe)
            for part in parts:
                progress.update("grad-cam", min(part.stop, len(images)), len(images))
                captured.clear()
                x = images[part].clone().requires_grad_(True)  # parameters are frozen
                logits = class_logits(model, x, input_transform, output_fn)
                features = captured.get(layer)
                patches = captured.get(patch) if patch else None
                grid = None if features is None else _grid(features, patches, sizes)
                if grid is None:
                    shape = None if features is None else tuple(features.shape)
                    raise NeuronsError(
                        f"Grad-CAM needs a layer with [N, K, h, w] output (or transformer tokens "
                        f"on a grid of image patches) that runs in the forward pass; {layer!r} "
                        f"gave {shape}"
                    )
                if not features.requires_grad and features.is_floating_point():
                    if named is None:  # a default without a graph: one that has one, below
                        break
                    raise no_gradient(layer, grad_mode[0])
                if not logits.requires_grad:
                    raise logits_without_graph()
                picked = logits.gather(1, target[part].view(-1, 1)).sum()
                (grad,) = gradients_at(picked, [features])  # (the parameters are frozen)
                if grad is None:  # the logits do not depend on it through a graph
                    raise no_gradient(layer)
                if features.dim() == 3:  # [N, K, T] channels-first tokens, in the grid's order
                    index = token_order(model, layer, features.shape[-1])
                    if index is not None:  # Hiera's unrolled tokens
                        index = index.to(features.device)
                        features, grad = features[..., index], grad[..., index]
                out.append(_cam(on_grid(features, grid), on_grid(grad, grid), (height, width)))
    if len(out) < len(parts):  # the default layer had no graph: the last layer that has one
        other = cam_layer(model, None, images[:1], input_transform)
        return grad_cam(
            model,
            images,
            target,
            layer=other,
            input_transform=input_transform,
            batch_size=batch_size,
            output_fn=output_fn,
        )
    return torch.cat(out)


def _cam(features: torch.Tensor, grad: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM's ``[N, H, W]`` maps (CPU, float32) from a layer's ``[N, K, h, w]`` output and
    its gradient: ``ReLU(sum_k w_k A_k)``, ``w_k`` the mean gradient, upsampled to ``size``."""
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features.detach().float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam[:, 0].detach().float().cpu()


def _grid(
    features: torch.Tensor, patches: torch.Tensor | None, sizes: Sequence[Sequence[int]]
) -> Sequence[int] | None:
    """The ``h x w`` grid of Grad-CAM's layer output ``features``: a feature map's own; for
    ``[N, K, T]`` tokens, the patch embedding's output's (``patches``, a map of the images)
    where the tokens hold it (:func:`token_grid`), else the grid of image patches that holds
    them (:func:`image_token_grid`) on an image of one of ``sizes`` (the display images', the
    model inputs'; CrossViT's second branch, on patches of another size); ``None`` for another
    output.

    Raises:
        NeuronsError: For tokens on neither (:func:`token_grid`'s error).
    """
    if features.dim() == 4:
        return features.shape[-2:]
    if features.dim() != 3:
        return None
    tokens = features.shape[-1]
    found = image_token_grid(tokens, *sizes)
    if patches is None or patches.dim() != 4 or len(patches) != len(features):
        return found  # no patch embedding, or one run on each patch (TNT's pixel embedding)
    try:
        token_grid(tokens, patches.shape[-2:])
    except NeuronsError:
        if found is None:
            raise
        return found
    return patches.shape[-2:]


def saliency(
    model: nn.Module,
    images: torch.Tensor,
    method: Method = "gradient",
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    layer: str | None = None,
    input_transform: InputTransform | None = None,
    batch_size: int | None = None,
    samples: int = 16,
    noise: float = 0.15,
    seed: int = 0,
    first_index: int = 0,
    steps: int = 32,
    baseline: Baseline = "black",
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """Saliency maps by ``method``: ``"gradient"``, ``"smoothgrad"``, ``"integrated"``
    (Integrated Gradients from a black or blurred image), ``"gradcam"`` or ``"rollout"``
    (plain attention rollout, :func:`~lightning_neurons.visualize.rollout.attention_rollout`).

    Args:
        model: Maps model inputs to logits.
        images: ``[N, C, H, W]`` display images.
        method: Which map.
        target: Class per image; default: the predicted class.
        layer: Grad-CAM's layer (default: see :func:`cam_layer`).
        input_transform: Display image -> model input.
        batch_size: Images (SmoothGrad: noisy copies) per forward pass.
        samples: SmoothGrad's noisy copies per image.
        noise: SmoothGrad's noise level.
        seed: SmoothGrad's seed (image ``i`` draws its noise from ``(seed, first_index + i)``).
        first_index: SmoothGrad: index of ``images[0]`` in a set whose maps are computed in parts
            (see :func:`smoothgrad`); every map of the set is then that of one call.
        steps: Integrated Gradients' points on each path.
        baseline: Integrated Gradients' start: ``"black"`` (0) or ``"blur"`` (:func:`blurred`).
        output_fn: Reads the logits from the model's output.

    Returns:
        ``[N, H, W]`` maps.

    Raises:
        NeuronsError: For an unknown method (and see the functions).
    """
    check_choice("method", method, METHODS)
    common = dict(input_transform=input_transform, batch_size=batch_size, output_fn=output_fn)
    if method == "gradient":
        return gradient(model, images, target, **common)
    if method == "smoothgrad":
        smooth = dict(samples=samples, noise=noise, seed=seed, first_index=first_index)
        return smoothgrad(model, images, target, **smooth, **common)
    if method == "integrated":
        start = 0.0 if check_choice("baseline", baseline, ("black", "blur")) == "black" else "blur"
        return integrated_gradients(model, images, target, steps=steps, baseline=start, **common)
    if method == "rollout":
        return attention_rollout(model, images, target, **common)
    return grad_cam(model, images, target, layer=layer, **common)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Scale each ``[H, W]`` map to [0, 1] by its own maximum (all-zero maps stay zero)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, *([1] * (maps.dim() - 1)))
    return (maps / peak).clamp(0, 1)
