"""Grad-CAM's default layer: where in a CNN its maps are read when no layer is named.

:func:`cam_layer` reads every module's output shape in one forward pass of one image and picks
a stage or block output (a ResNet's ``layer4``, the ReLU after a VGG's last convolution) on the
grid of the last ``Conv2d`` with at least :data:`CAM_POSITIONS` positions; a vision
transformer's is one of its blocks (:func:`~lightning_neurons.defaults.default_cam_layer`). Why
these and not the last ``Conv2d``: ``benchmarks/gradcam_layers.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_neurons.batch import InputTransform, as_model_input, to_model_input
from lightning_neurons.defaults import auxiliary_classifiers, default_cam_layer
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import hooked
from lightning_neurons.state import analysis_mode, model_device

#: Grad-CAM's default layer has at least this many positions where the model has one (3 x 3):
#: a 2 x 2 map picks a quadrant. On the parts data, a ResNet-18's 2 x 2 maps were less
#: faithful than its 4 x 4 ones at 32 and 64 px (``benchmarks/gradcam_layers.py``).
CAM_POSITIONS = 9


def cam_layer(
    model: nn.Module,
    layer: str | None = None,
    image: torch.Tensor | None = None,
    input_transform: InputTransform | None = None,
) -> str:
    """Grad-CAM's layer: ``layer``, or by default a block of a vision transformer
    (:func:`default_cam_layer`), else a stage or block output on the grid of the last ``Conv2d``
    whose output has at least :data:`CAM_POSITIONS` (3 x 3) positions on ``image`` (a
    ``[1, C, H, W]`` display image: one forward pass) and a gradient from it: of the layers whose
    outputs have that grid and a gradient, the outermost (the fewest dots in its name), and of
    those the last to return (a ResNet's stage, the ReLU after a VGG's last convolution). Where
    no ``Conv2d`` has as many, the same with more than one position, then with one; else the last
    ``Conv2d``. Without ``image``: the last ``Conv2d``.

    At one position Grad-CAM's map is flat: a ResNet's ``layer4`` on 32 px images, or a 1x1
    convolution that classifies after the global pooling (DLA's ``fc``); at 2 x 2 it picks a
    quadrant; without a gradient there is none (a block the model runs under
    ``torch.no_grad()``, the layers inside a reentrant ``checkpoint``). Whether an output has
    one is read when the forward pass returns, as :func:`grad_cam` reads it: the block that a
    reentrant checkpoint runs gets its graph when the checkpoint returns its output. The block's
    output, after its normalisation, residual sum and activation, gives more faithful maps than
    its last convolution (``benchmarks/gradcam_layers.py``), as pytorch-grad-cam recommends
    (``model.layer4[-1]``).

    Example:
        >>> import torchvision
        >>> resnet = torchvision.models.resnet18(num_classes=10)
        >>> cam_layer(resnet)  # with no image: the last Conv2d
        'layer4.1.conv2'
        >>> cam_layer(resnet, image=torch.rand(1, 3, 224, 224))  # layer4: 7 x 7
        'layer4'
        >>> cam_layer(resnet, image=torch.rand(1, 3, 32, 32))  # layer4: 1 x 1, layer3: 2 x 2
        'layer2'

    Raises:
        NeuronsError: For a model without either and no ``layer``.
    """
    if layer:
        return layer
    found = default_cam_layer(model)
    if found:
        return found
    convs = conv_layers(model)
    if image is None:
        return convs[-1]
    with analysis_mode(model), layer_outputs(model, graph=True) as outputs:
        # the parameters are frozen: an output has a graph when the image's gradient reaches it;
        # a clone made here is no inference tensor (the image may be one: Lightning's validation)
        x = image[:1].detach().to(model_device(model)).clone().requires_grad_(True)
        model(as_model_input(to_model_input(x, input_transform), model))  # no logits to read
    return outputs.cam_layer(convs)


@dataclass
class LayerOutputs:
    """The layers that ran, in the order they returned (a block after its layers), and the
    ``[K, h, w]`` shape of each one's output (``None``: not a feature map); ``without_graph``:
    the feature maps without a gradient from the image when the forward pass returned, when one
    was asked for."""

    shapes: dict[str, torch.Size | None] = field(default_factory=dict)
    without_graph: set[str] = field(default_factory=set)

    def cam_layer(self, convs: Sequence[str]) -> str:
        """The outermost layer with a graph (the fewest dots in its name; of those, the last to
        return) whose output has the grid of the last of ``convs`` with at least
        :data:`CAM_POSITIONS` positions: a stage or block output (where no layer on that grid
        has a graph, the grid of the conv before). Else the same with more than one position,
        else with one, else the last of ``convs``."""
        for least in (CAM_POSITIONS, 2, 1):
            grids = [s[-2:] for n in convs if (s := self.shapes.get(n)) and s[-2:].numel() >= least]
            for grid in reversed(grids):
                same = [
                    n
                    for n, s in self.shapes.items()
                    if s is not None and s[-2:] == grid and n not in self.without_graph
                ]
                if same:
                    depth = min(n.count(".") for n in same)
                    return [n for n in same if n.count(".") == depth][-1]
        return convs[-1]


@contextmanager
def layer_outputs(model: nn.Module, graph: bool = False) -> Iterator[LayerOutputs]:
    """The layers' output shapes (:class:`LayerOutputs`), filled by the forward passes inside the
    block; with ``graph``, the feature maps without a gradient from the image when the forward
    pass returns (a reentrant checkpoint's block gets its graph when the checkpoint returns its
    output, and Grad-CAM reads it then)."""
    found = LayerOutputs()
    pending: dict[str, torch.Tensor] = {}  # feature maps without a graph yet

    def seen(name: str, output: torch.Tensor) -> None:
        if name not in found.shapes:
            found.shapes[name] = torch.Size(output.shape[1:]) if output.dim() == 4 else None
            if graph and output.dim() == 4 and not output.requires_grad:
                pending[name] = output

    names = [name for name, _ in _modules(model) if name]
    with hooked(model, names, seen, skip_others=True):
        yield found
    found.without_graph.update(n for n, output in pending.items() if not output.requires_grad)


def _modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named modules outside the auxiliary classifiers (they run in training mode only)."""
    aux = tuple(f"{name}." for name in auxiliary_classifiers(model))
    return [(n, m) for n, m in model.named_modules() if not (aux and n.startswith(aux))]


def conv_layers(model: nn.Module) -> list[str]:
    """The ``Conv2d`` layers outside the auxiliary classifiers, at least one.

    Raises:
        NeuronsError: For a model without one.
    """
    names = [name for name, m in _modules(model) if isinstance(m, nn.Conv2d)]
    if not names:
        raise NeuronsError(
            f"{type(model).__name__} has no Conv2d layer; pass the Grad-CAM `layer` explicitly"
        )
    return names
