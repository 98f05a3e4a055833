"""Hooks inside a compiled forward: what they hand over once the graph has run.

TorchDynamo traces a model's forward hooks into its graph. The hooks of the callbacks that
gather statistics of Lightning's own batches (:class:`~lightning_neurons.hooks.HookSet` with
``lightning_batches=True``: the tracker, and the clusterings while they gather) would break the
graph at every hooked layer if they ran their bookkeeping there, and ``torch.compile(...,
fullgraph=True)`` allows no break (training stopped: "Skip inlining `torch.compiler.disable()`d
function"). So, traced, they only do tensor work: each output becomes what the callback keeps
(:class:`Deferral`: by default a copy, taken where the hook runs, so that an in-place operation
later in the forward does not change it; the tracker keeps each image's means and peaks), which
is appended to a list with its layer's name, and each pass of the model is marked there.
TorchDynamo replays those appends after the graph. At the batch's end the callback hands the
list on (:meth:`~lightning_neurons.hooks.HookSet.replay`): the calls are counted into call
sites, in the order they ran, and each kept value is given to the callback, as the eager hooks
would have given the outputs during the forward.

What is kept cannot replace the output: these hooks only read (ablation's hooks, which replace,
run inside the analyses, where a compiled model runs as written: see
:func:`~lightning_neurons.state.compiled_as_written`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def is_compiling() -> bool:
    """Whether TorchDynamo is tracing the code that calls this (``False`` when it runs)."""
    check = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(check()) if check is not None else bool(torch._dynamo.is_compiling())


def copied(_layer: str, output: torch.Tensor) -> torch.Tensor:
    """The default of :attr:`Deferral.early`: a copy of the output, detached from the graph."""
    return output.detach().clone()


@dataclass(frozen=True)
class Deferral:
    """How a hook set's outputs cross a compiled graph.

    Attributes:
        early: Traced into the graph: ``(layer name, channels-first output) -> what is kept``
            (tensors of their own, never views of the output). The layer name is the selected
            module's or function layer's, not yet the call site.
        late: Called at the batch's end with ``(call site, what was kept)``, for the calls the
            layer list selects.
    """

    early: Callable[[str, torch.Tensor], object]
    late: Callable[[str, object], None]


@dataclass
class DeferredCalls:
    """The outputs compiled forwards handed over, in the order they ran, until taken.

    An item is ``(layer name, what was kept)``, or ``(None, batch size or None)`` where a pass
    of the hooked model started.
    """

    items: list[tuple[str | None, object]] = field(default_factory=list)

    def pass_starts(self, size: int | None) -> None:
        self.items.append((None, size))

    def output(self, layer: str, kept: object) -> None:
        self.items.append((layer, kept))

    def take(self) -> list[tuple[str | None, object]]:
        """The items so far, oldest first; the list starts afresh."""
        items, self.items = self.items, []
        return items
