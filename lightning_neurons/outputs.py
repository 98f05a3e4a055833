"""Which tensor of what a module returns holds the images' values.

Most layers return one tensor. Some return a tuple: a layer's output and extras (attention
weights, a cache, the grid's size), read from its first tensor, also inside nested tuples
(Hugging Face's PVT-v2 stages return ``((hidden_states,), height, width)``); and a few return
several streams of tokens, not all of them per image: timm's TNT blocks return ``(pixel tokens
[B * N, P, C], patch tokens [B, N, D])``, where only the patch tokens have a row per image. The
hooks read the first tensor, or, when the size of the batch is known and the first tensor does
not hold a row per image, the first tensor that does (:func:`image_tensor`); a tensor handed
back by an analysis replaces that element (:func:`with_tensor`).

A layer name may also name the element: ``"blocks.0[1]"`` is the tensor at index 1 of what
module ``blocks.0`` returns (timm's CrossViT blocks return both branches' tokens, a dual-path
block ``(residual, dense)``, both per image), ``"stage[0][0]"`` one inside a nested tuple, and an
index that holds a tuple means its first tensor (:func:`split_element`, :func:`element`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lightning_neurons.errors import NeuronsError

#: How deep :func:`tensors` looks into nested tuples: Hugging Face's PVT-v2 stages return
#: ``((hidden_states,), height, width)``.
MAX_DEPTH = 3

#: Where a tensor lies in a module's output: the indices into its nested tuples (``()``: the
#: output is the tensor).
Path = tuple[int, ...]


#: Indices of a module's output at the end of a layer name: ``"blocks.0[1]"``, ``"m[0][2]"``.
_ELEMENT = re.compile(r"(?:\[\d+\])+$")


def split_element(name: str) -> tuple[str, Path]:
    """The module name and element path of a layer name without its call part.

    Example:
        >>> split_element("blocks.0[1]"), split_element("stage[0][0]"), split_element("layer1")
        (('blocks.0', (1,)), ('stage', (0, 0)), ('layer1', ()))
    """
    match = _ELEMENT.search(name)
    if match is None:
        return name, ()
    return name[: match.start()], tuple(int(i) for i in re.findall(r"\d+", match.group()))


def element_name(module: str, path: Path) -> str:
    """The layer name of the element at ``path`` of ``module``'s output: the inverse of
    :func:`split_element`."""
    return module + "".join(f"[{i}]" for i in path)


def tensors(output: object, depth: int = MAX_DEPTH) -> list[tuple[Path, torch.Tensor]]:
    """The tensors of ``output`` with their paths, depth first through tuples and lists (at
    most ``depth`` deep): ``[((), output)]`` for a tensor, ``[]`` for a dict or ``None``."""
    if isinstance(output, torch.Tensor):
        return [((), output)]
    if depth == 0 or not isinstance(output, (tuple, list)):
        return []
    return [((i, *p), t) for i, item in enumerate(output) for p, t in tensors(item, depth - 1)]


def has_tensor(output: object) -> bool:
    """Whether :func:`first_tensor` finds one in ``output``."""
    return bool(tensors(output))


def first_tensor(output: object, layer: str = "") -> torch.Tensor:
    """The tensor a module returned (the first one, for modules that return tuples).

    Raises:
        NeuronsError: For an output without a tensor (a dict, ``None``).
    """
    found = tensors(output)
    if not found:
        raise NeuronsError(
            f"layer {layer!r} returned {type(output).__name__}, not a tensor; choose a layer "
            "whose output is a tensor shaped [B, K], [B, K, H, W] or [B, N, D]"
        )
    return found[0][1]


def _rows(tensor: torch.Tensor, sequence_first: bool) -> int | None:
    """The size of the batch axis of a layer's output (dim 1 of ``[N, B, D]`` tokens)."""
    if tensor.dim() == 0:
        return None
    return tensor.shape[1] if sequence_first and tensor.dim() == 3 else tensor.shape[0]


def image_tensor(
    output: object, batch_size: int | None, sequence_first: bool = False, layer: str = ""
) -> tuple[torch.Tensor, Path]:
    """The tensor of ``output`` with a row per image, and its path in the output's nested tuples
    (``()``: the output is that tensor).

    The first tensor (depth first), unless ``batch_size`` is known, the first tensor's batch
    axis (dim 1 of a ``sequence_first`` module's 3-D outputs) is not that size, and a later
    tensor's is.

    Raises:
        NeuronsError: For an output without a tensor (a dict, ``None``).

    Example:
        >>> pixels, patches = torch.zeros(2 * 16, 4, 8), torch.zeros(2, 17, 24)
        >>> tensor, path = image_tensor((pixels, patches), batch_size=2)
        >>> tuple(tensor.shape), path
        ((2, 17, 24), (1,))
    """
    if isinstance(output, torch.Tensor):
        return output, ()
    found = tensors(output)
    if not found:
        first_tensor(output, layer)  # raises: no tensor
    if batch_size is not None:
        for path, tensor in found:
            if _rows(tensor, sequence_first) == batch_size:
                return tensor, path
    return found[0][1], found[0][0]


def element(output: object, path: Path, layer: str = "") -> tuple[torch.Tensor, Path]:
    """The tensor at ``path`` of ``output`` (the first tensor inside, when ``path`` holds a
    tuple), and its whole path.

    Raises:
        NeuronsError: When ``output`` holds no tensor at ``path``; the message lists those it
            holds, by layer name.

    Example:
        >>> hidden, size = torch.zeros(2, 16, 8), (4, 4)
        >>> tensor, path = element(((hidden,), *size), (0,), "stage[0]")
        >>> tuple(tensor.shape), path
        ((2, 16, 8), (0, 0))
    """
    found = tensors(output)
    for whole, tensor in found:
        if whole[: len(path)] == path:
            return tensor, whole
    module = split_element(layer)[0]
    held = ", ".join(f"{element_name(module, p)} {list(t.shape)}" for p, t in found)
    if isinstance(output, torch.Tensor):
        hint = f"it returned one tensor: name it {module!r}"
    else:
        hint = f"the tensors it returned: {held or 'none'}"
    raise NeuronsError(
        f"layer {layer!r}: module {module!r} returned {type(output).__name__} with no tensor at "
        f"{element_name('', path)}; {hint}"
    )


def with_tensor(output: object, path: Path, tensor: torch.Tensor) -> object:
    """``output`` with the element at ``path`` replaced by ``tensor`` (``path=()``: ``tensor``
    itself); tuples and lists keep their types (a named tuple stays one)."""
    if not path:
        return tensor
    assert isinstance(output, (tuple, list))
    index, rest = path[0], path[1:]
    items = [*output[:index], with_tensor(output[index], rest, tensor), *output[index + 1 :]]
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
