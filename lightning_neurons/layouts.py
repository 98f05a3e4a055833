"""Where the neurons of a layer output are: channels first, tokens, or channels last.

Every analysis reads a layer's output in one layout, **channels first**: ``[B, K]`` (units of a
linear layer) or ``[B, K, *positions]`` (``[B, K, H, W]``: the channels of a conv layer over the
feature map). The hooks of :mod:`lightning_neurons.hooks` hand every output over in that layout,
as a view (no copy; gradients flow through it):

* ``[B, N, D]`` **token** outputs of transformers (ViT blocks) are ``D`` neurons over ``N``
  positions: handed over as ``[B, D, N]``. The positions are all the tokens, the class and
  register tokens included: a neuron's value is reduced over every token the model computes it
  for (the class token is what a class-token head reads), zeroing a neuron zeroes it on every
  token, and its contribution is summed over them. Only maps on the image (Grad-CAM) drop the
  leading tokens that have no place on the patch grid (see :func:`token_grid`);
* ``[B, H, W, C]`` **channels-last** maps (timm's and torchvision's Swin stages, the layers
  inside torchvision's ConvNeXt blocks) are handed over as ``[B, C, H, W]``. A 4-D output is
  channels last when the module, or the nearest module above it with an ``output_fmt``
  attribute (timm's convention), says ``"NHWC"``; without one, when a ``Permute`` module
  (torchvision's ``[0, 2, 3, 1]``, ``[0, 3, 1, 2]``) before it, in the order the modules are
  defined, left the maps channels last. Convolution, batch norm and pooling layers are always
  channels first;
* 3-D outputs of ``Conv1d``, ``BatchNorm1d``, ``InstanceNorm1d``, 1-D pooling and ``nn.Unfold``
  are ``[B, C, L]`` channels first; every other 3-D output is tokens, ``[B, N, D]``, except
  inside torch's own attention modules built with ``batch_first=False`` (its default:
  ``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention``), whose
  tokens are ``[N, B, D]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn

from lightning_neurons.errors import NeuronsError

_CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Unfold,  # [B, C * kh * kw, L]: each patch's pixels over the L patches
)


class Layout(Enum):
    """How a layer's output holds its neurons."""

    FIRST = "channels_first"  # [B, K] / [B, K, *positions]
    TOKENS = "tokens"  # [B, N, D]
    LAST = "channels_last"  # [B, H, W, C]
    SEQUENCE = "sequence_first"  # [N, B, D]: torch's attention layers at batch_first=False


def _says_nhwc(module: nn.Module) -> bool | None:
    fmt = getattr(module, "output_fmt", None)
    if fmt is None:
        return None
    return str(getattr(fmt, "value", fmt)) == "NHWC"


#: Modules that run (or hold, for their parent's ``forward`` to run) their children in order.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: A ``Permute`` module's ``dims`` -> whether its 4-D output is channels last.
_PERMUTES = {(0, 2, 3, 1): True, (0, 3, 1, 2): False}


def _permutes_to(module: nn.Module) -> bool | None:
    """Whether a ``Permute`` module (torchvision's, or any with that name and ``dims``) makes
    4-D maps channels last (``True``) or first (``False``); ``None`` for other modules."""
    dims = getattr(module, "dims", None)
    if type(module).__name__ != "Permute" or not isinstance(dims, (list, tuple)):
        return None
    return _PERMUTES.get(tuple(dims))


def module_layouts(model: nn.Module) -> dict[str, bool]:
    """``{module name: whether its 4-D outputs are channels last}`` for every module.

    A module's ``output_fmt`` (timm's convention), or its nearest ancestor's, decides. Without
    one, the layout flows through the modules in the order they are defined (the order
    ``nn.Sequential`` calls them, and most models' ``forward``): a ``Permute`` module sets it, a
    convolution, batch norm or pooling layer makes it channels first, and any other module keeps
    the layout it was given. An ``nn.Sequential`` gives the layout its last child left; a module
    with a ``forward`` of its own whose children change the layout is taken to give back the one
    it was given (its ``forward`` may permute back with ``x.permute``, which no walk sees). So
    torchvision's Swin stages (after its patch embedding, an ``nn.Sequential`` ending in a
    ``Permute``) are channels last, and a ConvNeXt block's output (its ``Permute`` back) channels
    first.
    """
    found: dict[str, bool] = {}

    def walk(module: nn.Module, prefix: str, given: bool, declared: bool | None) -> bool:
        """Record ``module`` and its descendants, given maps in the layout ``given``; return
        the layout of its output."""
        own = _says_nhwc(module)
        declared = declared if own is None else own
        last = given
        for name, child in module.named_children():
            last = walk(child, f"{prefix}.{name}" if prefix else name, last, declared)
        if not isinstance(module, _CONTAINERS):  # its own forward: what it returns is unseen
            last = given
        permuted = _permutes_to(module)
        last = last if permuted is None else permuted
        last = (last if declared is None else declared) and not isinstance(module, _CHANNELS_FIRST)
        found[prefix] = last
        return last

    walk(model, "", False, None)
    return found


def _sequence_first(module: nn.Module) -> bool | None:
    """Whether one of torch's attention modules takes and gives ``[N, B, D]`` tokens (its
    ``batch_first=False``, the default); ``None`` for other modules."""
    if isinstance(module, (nn.MultiheadAttention, nn.Transformer)):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return _sequence_first(module.layers[0])
    return None


def sequence_first_modules(model: nn.Module) -> set[str]:
    """The names of the modules whose 3-D outputs are ``[N, B, D]`` tokens, sequence first: torch's
    ``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention`` and their
    kin built with ``batch_first=False`` (torch's default), and every module inside one."""
    found: set[str] = set()
    for name, module in model.named_modules():
        if name in found or not _sequence_first(module):
            continue
        found.update(f"{name}.{n}" if name and n else name or n for n, _ in module.named_modules())
    return found


def layout_of(
    output: torch.Tensor,
    module: nn.Module | None,
    channels_last: bool,
    sequence_first: bool = False,
) -> Layout:
    """The layout of ``output`` of ``module`` (``None``: a function call of a module whose 4-D
    outputs are ``channels_last`` and 3-D ones ``sequence_first``)."""
    if output.dim() == 3 and not isinstance(module, _CHANNELS_FIRST):
        return Layout.SEQUENCE if sequence_first else Layout.TOKENS
    if output.dim() == 4 and channels_last:
        return Layout.LAST
    return Layout.FIRST


def to_channels_first(output: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A channels-first view of ``output``."""
    if layout is Layout.TOKENS:
        return output.transpose(1, 2)
    if layout is Layout.SEQUENCE:
        return output.permute(1, 2, 0)
    if layout is Layout.LAST:
        return output.permute(0, 3, 1, 2)
    return output


def from_channels_first(output: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The inverse of :func:`to_channels_first` (contiguous when it moved an axis)."""
    if layout is Layout.TOKENS:
        return output.transpose(1, 2).contiguous()
    if layout is Layout.SEQUENCE:
        return output.permute(2, 0, 1).contiguous()
    if layout is Layout.LAST:
        return output.permute(0, 2, 3, 1).contiguous()
    return output


def reduce_positions(output: torch.Tensor, reduction: str) -> torch.Tensor:
    """``[B, K, *positions] -> [B, K]`` by ``"mean"`` or ``"max"`` (``[B, K]`` as it is).

    The positions are reduced where they lie (a channels-last or permuted output is not copied
    into a flat one first)."""
    if output.dim() == 2:
        return output
    positions = tuple(range(2, output.dim()))
    return output.mean(dim=positions) if reduction == "mean" else output.amax(dim=positions)


def held_values(
    output: torch.Tensor, reduction: str, layer: str = "", peaks: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, K] values, [B, K] peaks)`` of a channels-first output, for statistics kept past the
    forward pass: tensors of their own, never views of ``output`` (a later in-place operation
    may change it). One position (ResNet's last blocks at 32 px) is its own mean and peak: one
    copy then, not two reductions. ``reduction="max"`` gives the values as the peaks, and so
    does ``peaks=False`` (for outputs whose mean is positive exactly when their peak is).

    Raises:
        NeuronsError: For a tensor without a neuron axis.
    """
    check_neurons(output, layer)
    if output.dim() > 2 and math.prod(output.shape[2:]) == 1:
        output = output.reshape(output.shape[:2])
    if output.dim() == 2:
        values = output.clone()
        return values, values
    values = reduce_positions(output, reduction)
    peak = reduce_positions(output, "max") if reduction == "mean" and peaks else values
    return values, peak


def check_neurons(output: torch.Tensor, layer: str) -> None:
    """Raise when a channels-first output has no neuron axis (a 0-D or 1-D tensor)."""
    if output.dim() < 2:
        raise NeuronsError(
            f"layer {layer!r} returned a tensor of shape {tuple(output.shape)}; neurons are read "
            "from outputs shaped [B, K] (linear units), [B, K, H, W] (conv channels) or [B, N, D] "
            "(transformer tokens). Choose another layer."
        )


def reduce_activation(output: torch.Tensor, reduction: str, layer: str = "") -> torch.Tensor:
    """Reduce a channels-first layer output to one value per neuron: ``[B, K, *positions] ->
    [B, K]`` (the hooks hand outputs over channels first, see :mod:`lightning_neurons.layouts`).

    Args:
        output: ``[B, K]`` (linear units), ``[B, K, H, W]`` (conv channels) or ``[B, D, N]``
            (transformer tokens).
        reduction: ``"mean"`` or ``"max"`` over the positions.
        layer: The layer's name, for the error message.

    Returns:
        A ``[B, K]`` tensor.

    Raises:
        NeuronsError: For a tensor without a neuron axis.
    """
    check_neurons(output, layer)
    return reduce_positions(output, reduction)


def token_grid(tokens: int, grid: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """``(prefix, (h, w))``: the leading tokens that are not on a grid of patches (class,
    register, distillation tokens) and the ``h x w`` grid of the tokens after them.

    The grid is the patch embedding's, ``grid``, when it fits in ``tokens``; a later stage of a
    hierarchical transformer (Swin's patch merging) holds that grid with each side halved (and
    rounded up) once or more, and then only it: its tokens are exactly the halved grid's cells.

    Raises:
        NeuronsError: If neither the grid nor a halved one fits the tokens.

    Example:
        >>> token_grid(1 + 64, (8, 8)), token_grid(16, (8, 8))
        ((1, (8, 8)), (0, (4, 4)))
    """
    height, width = int(grid[0]), int(grid[1])
    if 0 < height * width <= tokens:
        return tokens - height * width, (height, width)
    h, w = height, width
    while h * w > 1:
        h, w = -(-h // 2), -(-w // 2)
        if h * w == tokens:
            return 0, (h, w)
    raise NeuronsError(
        f"a token output of {tokens} tokens cannot hold the {height}x{width} patch grid of the "
        "model's patch embedding, nor that grid halved (as a hierarchical transformer's later "
        "stages hold it); choose a Grad-CAM layer whose tokens lie on such a grid "
        "(FeatureVisualizer's `gradcam_layer=`)"
    )


#: The most leading tokens (class, distillation, register tokens) that :func:`image_token_grid`
#: looks past for the patch tokens.
MAX_PREFIX_TOKENS = 16


def image_token_grid(tokens: int, *sizes: Sequence[int]) -> tuple[int, int] | None:
    """The ``h x w`` grid of patch tokens on an image of one of ``sizes`` ``(H, W)`` (the display
    images', the model inputs'), for a model without a patch-embedding convolution (patches
    flattened into a ``Linear``, LeViT's convolutional stem): the grid of ``P x P`` patches
    (``ceil(H / P) x ceil(W / P)``: a hierarchical model's halved grids too) whose cells are the
    tokens after the fewest leading ones (at most :data:`MAX_PREFIX_TOKENS`), on the first size
    where that many leading tokens leave a grid; ``None`` when none does.

    Example:
        >>> image_token_grid(1 + 64, (32, 32)), image_token_grid(12, (224, 160))
        ((8, 8), (4, 3))
    """
    grids: list[dict[int, tuple[int, int]]] = []
    for size in sizes:
        height, width = int(size[0]), int(size[1])
        cells: dict[int, tuple[int, int]] = {}
        for patch in range(1, max(height, width) + 1):
            grid = (-(-height // patch), -(-width // patch))
            cells.setdefault(grid[0] * grid[1], grid)
        grids.append(cells)
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        for cells in grids:
            if tokens - prefix in cells:
                return cells[tokens - prefix]
    return None


def patch_embedding(model: nn.Module) -> str | None:
    """The name of the model's patch embedding: the first ``Conv2d`` whose kernel equals its
    stride (non-overlapping patches), or ``None``."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Conv2d)
            and tuple(module.kernel_size) == tuple(module.stride)
            and max(module.stride) > 1
        ):
            return name
    return None


def token_order(model: nn.Module, layer: str, tokens: int) -> torch.Tensor | None:
    """For tokens not in raster order, the token on each cell of their grid, cell by cell in
    raster order (a ``[tokens]`` index); ``None`` for tokens in raster order.

    Hiera unrolls its tokens (the patches of each pooling window lie together, so that pooling
    is a reshape) until its last stage. A block of timm's Hiera (``blocks.i``, whose model has a
    ``reroll`` module) and a stage of Hugging Face's (``encoder.stages.i``, whose encoder has a
    ``reroll`` method and its ``schedule``) are read through the model's own ``reroll(tokens,
    i)``, which puts them back on the grid; any other layer is taken to be in raster order.
    """
    parts = layer.split(".")
    if len(parts) < 2 or parts[-2] not in ("blocks", "stages") or not parts[-1].isdigit():
        return None
    owner, step = model.get_submodule(".".join(parts[:-2])), int(parts[-1])
    reroll = getattr(owner, "reroll", None)
    schedule = getattr(reroll if isinstance(reroll, nn.Module) else owner, "schedule", None)
    if not callable(reroll) or not isinstance(schedule, dict) or step not in schedule:
        return None
    if math.prod(schedule[step][1]) != tokens:
        return None
    index = torch.arange(tokens, dtype=torch.float64).view(1, tokens, 1)
    with torch.no_grad():
        return reroll(index, step).flatten().long()


def on_grid(features: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Channels-first tokens ``[N, K, T]`` on the ``h x w`` patch grid (or the halved grid of a
    hierarchical transformer's later stage, see :func:`token_grid`): ``[N, K, h, w]``, the
    leading tokens that are not patches (class, register tokens) left out; a 4-D map as it is.

    Raises:
        NeuronsError: If the grid does not fit the tokens.

    Example:
        >>> on_grid(torch.zeros(2, 8, 1 + 16), (4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """
    if features.dim() == 4:
        return features
    prefix, (height, width) = token_grid(features.shape[-1], grid)
    return features[..., prefix:].reshape(*features.shape[:2], height, width)
