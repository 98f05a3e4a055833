"""Grad-CAM's default layer: where in a CNN its maps are read when no layer is named.

:func:`cam_layer` reads every module's output shape in one forward pass of one image and picks
a stage or block output (a ResNet's ``layer4``, the ReLU after a VGG's last convolution) on the
grid of the last ``Conv2d`` with at least :data:`CAM_POSITIONS` positions (or a hybrid's
attention stage whose tokens lie on that grid, or on a later grid of that many image patches:
a hierarchical transformer's last stage); a vision transformer's is one of its blocks
(:func:`~lightning_neurons.defaults.default_cam_layer`, and :func:`read_cam_layer` for one
without a ``Conv2d``). Why these and not the last ``Conv2d``: ``benchmarks/gradcam_layers.py``
and docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_neurons.batch import InputTransform, as_model_input, to_model_input
from lightning_neurons.defaults import (
    auxiliary_classifiers,
    default_cam_layer,
    default_layers,
    token_block,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import hooked
from lightning_neurons.layouts import image_token_grid
from lightning_neurons.state import analysis_mode, model_device


class NoCamLayer(NeuronsError):
    """A model without a layer that Grad-CAM can take by default (an MLP)."""


#: Grad-CAM's default layer has at least this many positions where the model has one (3 x 3):
#: a 2 x 2 map picks a quadrant. On the parts data, a ResNet-18's 2 x 2 maps were less
#: faithful than its 4 x 4 ones at 32 and 64 px, and each against a random map on its own grid,
#: the 2 x 2 stage gained less on deletion than the default in 3 of 3 runs on the parts and the
#: digits (``benchmarks/gradcam_layers.py``, docs/benchmarks.md).
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
    those the last to return (a ResNet's stage, the ReLU after a VGG's last convolution; a
    hybrid's attention stage whose tokens lie on that grid, or the last block of tokens on a
    later grid with as many image patches, see :func:`read_cam_layer`).
    Where no ``Conv2d`` has as many, the same with more than one position, then with one; else
    the last ``Conv2d``. A model without one: its last block of tokens on a grid of image patches
    (:func:`read_cam_layer`). Without ``image``: the last ``Conv2d``.

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
        NoCamLayer: For a model with none of these and no ``layer``.
    """
    if layer:
        return layer
    found = default_cam_layer(model)
    if found:
        return found
    if image is None:
        return conv_layers(model)[-1]
    with analysis_mode(model), layer_outputs(model, 1, graph=True) as outputs:
        # the parameters are frozen: an output has a graph when the image's gradient reaches it;
        # a clone made here is no inference tensor (the image may be one: Lightning's validation)
        x = image[:1].detach().to(model_device(model)).clone().requires_grad_(True)
        model(as_model_input(to_model_input(x, input_transform), model))  # no logits to read
    return read_cam_layer(model, outputs, image_sizes(image, input_transform))


def read_cam_layer(model: nn.Module, outputs: LayerOutputs, sizes: Sequence[Sequence[int]]) -> str:
    """Grad-CAM's default layer from the layers' ``outputs`` in a forward pass of images of
    ``sizes`` (:func:`image_sizes`): :meth:`LayerOutputs.cam_layer` of the model's ``Conv2d``
    layers that give maps of the images and of its blocks (its default layers) whose tokens lie
    on a grid of image patches, where such blocks on the chosen grid, outside its feature maps,
    come first: the last of them, or, when it is the model's last block,
    :func:`~lightning_neurons.defaults.token_block`'s choice. So a hybrid's attention stage on
    its stem's grid (LeViT), a hierarchical transformer's last stage with 3 x 3 patches (Hiera,
    LeViT at 224 px), XCiT's blocks rather than its final norm. A model whose ``Conv2d`` layers
    give no map of the images counts as one without (timm's TNT embeds each patch's pixels with
    one, ``[B * N, C, h, w]``): ``token_block``'s of its blocks on a grid of image patches.

    Raises:
        NoCamLayer: For a model with neither.
    """
    convs = [name for name, m in _modules(model) if isinstance(m, nn.Conv2d)]
    maps = [n for n in convs if len(outputs.shapes.get(n) or ()) == 3]  # of these images
    tokens = [n for n, s in outputs.shapes.items() if s is not None and len(s) == 2]
    blocks = default_layers(model) if any(outputs.grid(n, sizes) for n in tokens) else []
    token_blocks = [n for n in blocks if n in tokens and outputs.grid(n, sizes) is not None]

    def pick(names: list[str]) -> str | None:
        found = [n for n in token_blocks if n in names]
        if found and found[-1] != blocks[-1]:  # later blocks read its patch tokens
            return found[-1]
        return token_block(model, found)

    if maps:  # the default layers read when first needed (a ResNet's stage: never)
        return outputs.cam_layer(
            maps, sizes, pick, token_blocks, lambda: blocks or default_layers(model)
        )
    found = token_block(model, token_blocks)
    if found is None and convs:  # none of them gives a map of the images, nor do tokens
        return convs[-1]
    if found is None:
        raise NoCamLayer(
            f"{type(model).__name__} has no Conv2d layer and no block with transformer tokens "
            "on a grid of image patches; pass the Grad-CAM `layer` explicitly"
        )
    return found


def image_sizes(images: torch.Tensor, transform: InputTransform | None) -> list[torch.Size]:
    """The ``(H, W)`` of display images and, when ``transform`` resizes them, of the model's
    inputs (one image transformed): where a token layer's patch grid is looked for."""
    sizes = [images.shape[-2:]]
    if transform is not None:
        x = to_model_input(images[:1], transform)
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[-2:] != sizes[0]:
            sizes.append(x.shape[-2:])
    return sizes


@dataclass
class LayerOutputs:
    """The layers that ran, in the order they returned (a block after its layers), and the
    shape of each one's output without the batch (``None``: neither a ``[K, h, w]`` feature map
    nor ``[D, T]`` channels-first tokens); ``without_graph``: those without a gradient from the
    image when the forward pass returned, when one was asked for."""

    shapes: dict[str, torch.Size | None] = field(default_factory=dict)
    without_graph: set[str] = field(default_factory=set)

    def grid(self, name: str, sizes: Sequence[Sequence[int]]) -> tuple[int, int] | None:
        """The ``h x w`` grid of layer ``name``'s output: a feature map's, or the grid of image
        patches of one of ``sizes`` that its tokens lie on (:func:`image_token_grid`); ``None``
        for another output, or one without a graph."""
        shape = self.shapes.get(name)
        if shape is None or name in self.without_graph:
            return None
        if len(shape) == 3:
            return (shape[1], shape[2])
        return image_token_grid(shape[1], *sizes)

    def cam_layer(
        self,
        convs: Sequence[str],
        sizes: Sequence[Sequence[int]] = (),
        blocks: Callable[[list[str]], str | None] = lambda names: None,
        token_blocks: Sequence[str] = (),
        defaults: Callable[[], Sequence[str]] = lambda: (),
    ) -> str:
        """The outermost layer with a graph (the fewest dots in its name; of those, the last to
        return) whose output lies on the last grid with at least :data:`CAM_POSITIONS`
        positions of ``convs`` and then of ``token_blocks`` (blocks of tokens on grids of image
        patches of ``sizes``: a hierarchical transformer's stages after its convolutional
        stem); a grid where no layer has a graph is passed over. Where token layers lie on
        that grid outside the layers with feature maps on it, ``blocks(their names)`` may pick
        one first: a hybrid's transformer stage after its convolutional stem
        (:func:`read_cam_layer`). An outermost layer that returns before the model's blocks
        on that grid (``defaults()``, its default layers) and holds none gives way to the last
        of them (Hugging Face's PoolFormer: its stage's blocks after its patch embedding, which
        a ResNet's stages hold). A grid whose layers all lie inside a layer with an output on a
        larger grid is passed over (CvT's keys and values, pooled inside its attention), and a
        layer that holds several stages gives way to its last (TinyViT's ``stages.3``, not
        ``stages``: the same tensor). Else the same with more than one position, else with one,
        else the last of ``convs``."""
        on_grid = {n: g for n in self.shapes if (g := self.grid(n, sizes)) is not None}
        for least in (CAM_POSITIONS, 2, 1):
            grids = [
                s[-2:]
                for n in convs
                if (s := self.shapes.get(n)) and len(s) == 3 and s[-2:].numel() >= least
            ]
            grids += [g for n in token_blocks if (g := on_grid.get(n)) and g[0] * g[1] >= least]
            for grid in reversed(grids):
                same = [n for n, g in on_grid.items() if g == tuple(grid)]
                if _inside_larger(same, on_grid):  # an attention's pooled keys and values
                    continue
                maps = {n for n in same if len(self.shapes[n] or ()) == 3}
                tokens = [
                    n
                    for n in same
                    if n not in maps and not any(p in maps for p in _parents(n))  # not in a map
                ]
                picked = blocks(tokens)
                if picked is not None:
                    return picked
                if same:
                    chosen = _past_embedding(same, _outermost(same), defaults)
                    return _stage_of(chosen, same, on_grid, {tuple(g) for g in grids})
        return convs[-1]


def _inside_larger(same: list[str], on_grid: dict[str, tuple[int, int]]) -> bool:
    """Whether every layer of ``same`` (on one grid) lies inside a layer whose output is on a
    grid with more positions: a grid inside a block only (CvT's attention computes its keys
    and values on a pooled grid, by a strided conv, and returns tokens on its input's)."""

    def area(grid: Sequence[int]) -> int:
        return grid[0] * grid[1]

    size = area(on_grid[same[0]]) if same else 0
    return bool(same) and all(
        any(p in on_grid and area(on_grid[p]) > size for p in _parents(n)) for n in same
    )


def _spans(name: str, on_grid: dict[str, tuple[int, int]], grids: set[tuple[int, int]]) -> bool:
    """Whether a child of layer ``name`` returns on another of ``grids`` (the grids of the
    model's convolutions and blocks of tokens) than ``name``: a container of several stages
    (TinyViT's ``stages`` returns its last stage's tensor), not a stage. A child's output read
    as a grid but on none of them (a channels-last map, NesT's blocked tokens) does not count."""
    grid, prefix = on_grid[name], f"{name}."
    return any(
        g != grid and g in grids and "." not in n[len(prefix) :]
        for n, g in on_grid.items()
        if n.startswith(prefix)
    )


def _stage_of(
    chosen: str, same: list[str], on_grid: dict[str, tuple[int, int]], grids: set[tuple[int, int]]
) -> str:
    """``chosen``, or, while it holds several stages (:func:`_spans`), its last child on its grid
    (of ``same``): the same tensor under the name of the stage that made it (TinyViT's
    ``stages.3``, not ``stages``)."""
    while _spans(chosen, on_grid, grids):
        prefix = f"{chosen}."
        children = [n for n in same if n.startswith(prefix) and "." not in n[len(prefix) :]]
        if not children:
            break
        chosen = children[-1]
    return chosen


def _outermost(names: Sequence[str]) -> str:
    """Of ``names`` (in the order they returned), the last of those with the fewest dots."""
    depth = min(n.count(".") for n in names)
    return [n for n in names if n.count(".") == depth][-1]


def _past_embedding(same: list[str], chosen: str, defaults: Callable[[], Sequence[str]]) -> str:
    """``chosen``, or, when it returned before the model's last block on its grid (of
    ``same``, the layers on that grid in the order they returned) and neither is nor holds a
    block: the outermost of that block and the layers on the grid that enclose it."""
    if chosen == same[-1]:  # nothing returned after it on its grid (a ResNet's stage)
        return chosen
    blocks = set(defaults())
    if chosen in blocks or any(n.startswith(f"{chosen}.") for n in blocks):
        return chosen
    later = [n for n in same[same.index(chosen) + 1 :] if n in blocks]
    if not later:
        return chosen
    return _outermost([n for n in same if n == later[-1] or later[-1].startswith(f"{n}.")])


def _parents(name: str) -> list[str]:
    """The modules that enclose module ``name``: ``"a.b.c" -> ["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@contextmanager
def layer_outputs(model: nn.Module, batch: int, graph: bool = False) -> Iterator[LayerOutputs]:
    """The layers' output shapes (:class:`LayerOutputs`), filled by the forward passes of
    ``batch`` images inside the block (an output of another batch size is no map of them:
    MobileViT's unfolded patches); with ``graph``, the outputs without a gradient from the image
    when the forward pass returns (a reentrant checkpoint's block gets its graph when the
    checkpoint returns its output, and Grad-CAM reads it then)."""
    found = LayerOutputs()
    pending: dict[str, torch.Tensor] = {}  # outputs without a graph yet

    def seen(name: str, output: torch.Tensor) -> None:
        if name not in found.shapes:
            spatial = output.dim() in (3, 4) and len(output) == batch
            found.shapes[name] = torch.Size(output.shape[1:]) if spatial else None
            if graph and spatial and not output.requires_grad:
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
        raise NoCamLayer(
            f"{type(model).__name__} has no Conv2d layer; pass the Grad-CAM `layer` explicitly"
        )
    return names
