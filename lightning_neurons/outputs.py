"""Which tensor of what a module returns holds the images' values.

Most layers return one tensor. Some return a tuple: a layer's output and extras (attention
weights, a cache), read from its first tensor; and a few return several streams of tokens, not
all of them per image: timm's TNT blocks return ``(pixel tokens [B * N, P, C], patch tokens
[B, N, D])``, where only the patch tokens have a row per image. The hooks read the first tensor
of a tuple, or, when the size of the batch is known and the first tensor does not hold a row
per image, the first tensor that does (:func:`image_tensor`); a tensor handed back by an
analysis replaces that element (:func:`with_tensor`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_neurons.errors import NeuronsError


def has_tensor(output: object) -> bool:
    """Whether :func:`first_tensor` finds one in ``output``."""
    return isinstance(output, torch.Tensor) or (
        isinstance(output, (tuple, list)) and bool(output) and isinstance(output[0], torch.Tensor)
    )


def first_tensor(output: object, layer: str = "") -> torch.Tensor:
    """The tensor a module returned (the first one, for modules that return tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise NeuronsError(
        f"layer {layer!r} returned {type(output).__name__}, not a tensor; choose a layer whose "
        "output is a tensor shaped [B, K], [B, K, H, W] or [B, N, D]"
    )


def _rows(tensor: torch.Tensor, sequence_first: bool) -> int | None:
    """The size of the batch axis of a layer's output (dim 1 of ``[N, B, D]`` tokens)."""
    if tensor.dim() == 0:
        return None
    return tensor.shape[1] if sequence_first and tensor.dim() == 3 else tensor.shape[0]


def image_tensor(
    output: object, batch_size: int | None, sequence_first: bool = False, layer: str = ""
) -> tuple[torch.Tensor, int]:
    """The tensor of ``output`` with a row per image, and its index in the tuple (``-1``: the
    output is that tensor).

    A tuple's first tensor, unless ``batch_size`` is known, the first tensor's batch axis (dim 1
    of a ``sequence_first`` module's 3-D outputs) is not that size, and a later tensor's is.

    Raises:
        NeuronsError: For an output with no tensor first (a dict, ``None``).

    Example:
        >>> pixels, patches = torch.zeros(2 * 16, 4, 8), torch.zeros(2, 17, 24)
        >>> tensor, index = image_tensor((pixels, patches), batch_size=2)
        >>> tuple(tensor.shape), index
        ((2, 17, 24), 1)
    """
    first = first_tensor(output, layer)
    if first is output:
        return first, -1
    if batch_size is None or _rows(first, sequence_first) == batch_size:
        return first, 0
    assert isinstance(output, (tuple, list))
    for index, item in enumerate(output):
        if isinstance(item, torch.Tensor) and _rows(item, sequence_first) == batch_size:
            return item, index
    return first, 0


def with_tensor(output: object, index: int, tensor: torch.Tensor) -> object:
    """``output`` with its element ``index`` replaced by ``tensor`` (``index=-1``: ``tensor``
    itself); a named tuple stays one."""
    if index < 0:
        return tensor
    assert isinstance(output, (tuple, list))
    items = [*output[:index], tensor, *output[index + 1 :]]
    return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)


def leading_size(inputs: object) -> int | None:
    """The leading size of the first tensor with an axis in ``inputs`` (nested tuples, lists and
    mappings, in order): the batch size of a model's call, ``None`` when it has no tensor."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else None
    if isinstance(inputs, Mapping):
        inputs = list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        for item in inputs:
            size = leading_size(item)
            if size is not None:
                return size
    return None
