"""Call sites: a layer is one call of a module (or function) in a forward pass.

A module that runs more than once in one forward pass (torchvision's ``BasicBlock`` calls its
``relu`` twice; a model may share one activation module) is several layers, never one mixed
profile. The first call of a module is named by the module's name (``layer1.0.relu``), its
second call ``layer1.0.relu#1``, its third ``layer1.0.relu#2`` and so on (:func:`call_site`).
A module that runs once is simply its name.

In a *list* of layers a module name selects **every** call of that module, each as its own
layer; ``name#i`` selects the call ``i`` only (``name#0``: the first call only), and
``name#<glob>`` (``"layer*.relu#1"``, ``"relu#*"``) selects the matching calls of the matching
modules (:func:`selects`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from lightning_neurons.errors import NeuronsError

#: Separates a module's name from the index of its call: ``"layer1.0.relu#1"``.
CALL_SEPARATOR = "#"


def call_site(module_name: str, index: int) -> str:
    """The layer name of call ``index`` (0-based) of a module in one forward pass.

    Example:
        >>> call_site("layer1.0.relu", 0), call_site("layer1.0.relu", 1)
        ('layer1.0.relu', 'layer1.0.relu#1')
    """
    return module_name if index == 0 else f"{module_name}{CALL_SEPARATOR}{index}"


def split_call(name: str) -> tuple[str, str | None]:
    """``"m#1" -> ("m", "1")``, ``"m" -> ("m", None)`` (the call part may be a glob)."""
    module, sep, call = name.partition(CALL_SEPARATOR)
    return module, (call if sep else None)


def parse_call_site(name: str) -> tuple[str, int]:
    """The module name and call index of a layer name: ``"m#1" -> ("m", 1)``, ``"m" -> ("m", 0)``.

    Raises:
        NeuronsError: If the part after ``#`` is not a non-negative integer.
    """
    module, call = split_call(name)
    if call is None:
        return module, 0
    if not call.isdigit():
        raise NeuronsError(
            f"layer {name!r}: after {CALL_SEPARATOR!r} comes the index of the module's call in one "
            f"forward pass (0, 1, ...), e.g. '{module}{CALL_SEPARATOR}1' for its second call"
        )
    return module, int(call)


def exact_call_site(layer: str) -> str:
    """The layer list entry selecting exactly the call site ``layer`` (``"m"`` is the first call).

    Example:
        >>> exact_call_site("layer1.0.relu"), exact_call_site("layer1.0.relu#1")
        ('layer1.0.relu#0', 'layer1.0.relu#1')
    """
    module, index = parse_call_site(layer)
    return f"{module}{CALL_SEPARATOR}{index}"


def selects(layers: Sequence[str], name: str) -> bool:
    """Whether the layer list ``layers`` (as returned by :func:`resolve_layers`) selects the call
    site ``name``: a module name selects all its calls, ``m#i`` / ``m#<glob>`` the matching ones.

    Example:
        >>> selects(["layer1.0.relu"], "layer1.0.relu#1"), selects(["layer1.0.relu#0"], "layer1.0.relu#1")
        (True, False)
    """
    module, index = parse_call_site(name)
    for spec in layers:
        spec_module, call = split_call(spec)
        if spec_module == module and (call is None or fnmatch.fnmatchcase(str(index), call)):
            return True
    return False


def call_matcher(calls: list[str | None]) -> Callable[[int], bool]:
    """Which call indices of one module a layer list selects, from its entries' call parts
    (``None``: every call; else ``"1"`` or a glob such as ``"*"``)."""
    if any(c is None for c in calls):
        return lambda index: True
    patterns = [c for c in calls if c is not None]
    return lambda index: any(fnmatch.fnmatchcase(str(index), p) for p in patterns)
