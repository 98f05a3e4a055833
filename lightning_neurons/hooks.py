"""Finding named layers and hooking them, always removing the hooks again.

Every analysis in this package reaches into the user's model through this module: layer names
are resolved once (with glob patterns and a helpful error), and forward hooks live only inside a
context manager that removes them in ``finally``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_neurons.errors import NeuronsError

#: A function called with ``(layer_name, output_tensor)`` from inside a forward hook.
ActivationFn = Callable[[str, torch.Tensor], None]


def _describe(model: nn.Module) -> str:
    return type(model).__name__


def _layer_names(model: nn.Module) -> list[str]:
    """Module names that could be layers (torchmetrics metrics and their children left out)."""
    from torchmetrics import Metric

    names: list[str] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skipped):
            continue
        if isinstance(module, Metric):
            skipped.append(name)
        else:
            names.append(name)
    return names


def _available(model: nn.Module, limit: int = 40) -> str:
    names = _layer_names(model)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown or "(the model has no sub-modules)"


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (as in ``model.named_modules()``).

    Args:
        model: The model to search.
        name: A dotted module name such as ``"features.conv2"`` or ``"layer4.1.conv2"``.

    Returns:
        The module.

    Raises:
        NeuronsError: If no module has that name; the message lists the available names.

    Example:
        >>> conv = get_module(model, "features.conv1")  # doctest: +SKIP
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    candidates = _layer_names(model)
    close = [n for n in candidates if name in n or n.endswith("." + name)]
    close += [
        n for n in difflib.get_close_matches(name, candidates, n=3, cutoff=0.75) if n not in close
    ]
    hint = f" Did you mean: {', '.join(close[:5])}?" if close else ""
    raise NeuronsError(
        f"layer {name!r} not found in {_describe(model)}.{hint} Available: {_available(model)}"
    )


def default_layers(model: nn.Module) -> list[str]:
    """Every ``Conv2d`` and ``Linear`` layer except the final classifier (the last ``Linear``).

    Args:
        model: The model.

    Returns:
        Module names in definition order.
    """
    names = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
    linears = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    if linears:
        names.remove(linears[-1])
    return names


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Resolve layer names and glob patterns to module names, in definition order.

    Args:
        model: The model whose layers are meant.
        layers: Names as in ``model.named_modules()`` or glob patterns (``"features.*"``,
            ``"layer?.0.conv1"``); ``None`` means :func:`default_layers`.

    Returns:
        The matched module names, without duplicates, in the model's order.

    Raises:
        NeuronsError: If a name or pattern matches nothing, or nothing is left to track.
    """
    if layers is None:
        names = default_layers(model)
        if not names:
            raise NeuronsError(
                f"{_describe(model)} has no Conv2d or Linear layer besides its final classifier; "
                f"name the layers to analyse with `layers=[...]`. Available: {_available(model)}"
            )
        return names
    if isinstance(layers, str):
        layers = [layers]
    all_names = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for pattern in layers:
        if any(ch in pattern for ch in "*?["):
            hits = fnmatch.filter(all_names, pattern)
            if not hits:
                raise NeuronsError(
                    f"layer pattern {pattern!r} matches no module of {_describe(model)}. "
                    f"Available: {_available(model)}"
                )
            chosen.update(hits)
        else:
            get_module(model, pattern)
            chosen.add(pattern)
    if not chosen:
        raise NeuronsError("`layers` is empty; give at least one layer name, or None for defaults")
    return [n for n in all_names if n in chosen]


def reduce_activation(output: torch.Tensor, reduction: str, layer: str = "") -> torch.Tensor:
    """Reduce a layer output to one value per neuron: ``[B, K, H, W] -> [B, K]``.

    Args:
        output: ``[B, K]`` (linear units) or ``[B, K, H, W]`` (conv channels).
        reduction: ``"mean"`` or ``"max"`` over the spatial positions.
        layer: The layer's name, for the error message.

    Returns:
        A ``[B, K]`` tensor.

    Raises:
        NeuronsError: For any other shape.
    """
    if output.dim() == 2:
        return output
    if output.dim() == 4:
        if reduction == "mean":
            return output.mean(dim=(2, 3))
        return output.amax(dim=(2, 3))
    raise NeuronsError(
        f"layer {layer!r} returned a tensor of shape {tuple(output.shape)}; neurons are read from "
        "outputs shaped [B, K] (linear units) or [B, K, H, W] (conv channels). Choose a Conv2d, "
        "Linear or activation layer instead."
    )


def first_tensor(output: object, layer: str = "") -> torch.Tensor:
    """The tensor a module returned (the first one, for modules that return tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise NeuronsError(
        f"layer {layer!r} returned {type(output).__name__}, not a tensor; choose a layer whose "
        "output is a tensor shaped [B, K] or [B, K, H, W]"
    )


@contextmanager
def hooked(model: nn.Module, layers: Sequence[str], fn: ActivationFn) -> Iterator[None]:
    """Call ``fn(layer_name, output)`` on every forward of the named layers, inside the block.

    The hooks are removed when the block exits, also when it raises.

    Args:
        model: The model to hook.
        layers: Resolved module names (see :func:`resolve_layers`).
        fn: Called from inside each forward hook with the module's output tensor. It must not
            keep per-batch tensors alive: reduce or detach inside.

    Example:
        >>> seen = {}
        >>> with hooked(model, ["features.conv1"], lambda n, t: seen.update({n: t.shape})):
        ...     model(x)  # doctest: +SKIP
    """
    handles = HookSet()
    try:
        handles.add(model, layers, fn)
        yield
    finally:
        handles.remove()


class HookSet:
    """Forward-hook handles kept together so they can always be removed.

    Used by callbacks whose hooks live across several Lightning hook calls (registered at
    epoch start, removed at epoch end, and again in ``teardown`` / ``on_exception``).
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, model: nn.Module, layers: Sequence[str], fn: ActivationFn) -> None:
        """Register ``fn`` as a forward hook on each named layer."""
        for name in layers:
            module = get_module(model, name)

            def hook(
                _module: nn.Module, _inputs: object, output: object, _name: str = name
            ) -> None:
                fn(_name, first_tensor(output, _name))

            self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove every hook; safe to call more than once."""
        while self._handles:
            self._handles.pop().remove()


def count_forward_hooks(model: nn.Module) -> int:
    """Number of forward hooks registered on ``model`` and its sub-modules (for tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
