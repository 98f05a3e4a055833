"""Tracked outputs of one shape, reduced together: one stack and one reduction, not one a layer.

A ResNet-50 validation step at 32 px on a GPU is bounded by the host queuing its kernels, and
:class:`~lightning_neurons.ActivationTracker` reduces every tracked output over its positions
(a kernel, and the Python around it, per layer and batch). The blocks of a stage return outputs
of one shape (``layer3.0`` to ``layer3.5``: ``[B, 1024, 2, 2]`` each); stacked, they are reduced
by one kernel, and the outputs of one position (``layer4`` at 32 px) or none (linear layers),
which are copied to be kept, are copied by one stack. ResNet-50's 17 default layers take 8
kernels a batch so, not 17; and a group's batches are held as its stack and added to its
layers' statistics together (:meth:`~lightning_neurons.held.HeldBatches.add_layers`).

An output is held until the last layer of its group has run, so a layer joins a group only
when nothing changes its output in place meanwhile (``nn.ReLU(inplace=True)`` after a tracked
convolution does): in one forward pass of two images, once a fit, without gradients and with
the model left as it was (:func:`output_groups`), its output was unchanged at the end of the
pass (its version counter). Outputs of more than :data:`GROUP_VALUES` values are reduced on
their own: holding them costs memory and stacking them costs a copy that saves little then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_neurons.hooks import hooked
from lightning_neurons.layouts import held_values
from lightning_neurons.signs import never_negative_layers
from lightning_neurons.state import untouched

#: An output of more values than this is reduced on its own (4 MB in float32: ResNet-50's
#: widest outputs at 32 px and batches of 64; at 224 px its blocks are reduced one by one).
GROUP_VALUES = 2**20


@dataclass(frozen=True)
class OutputGroups:
    """Call sites whose outputs are reduced together, group by group, each group in the order
    the layers run; a group is reduced when its last layer has run.

    Example:
        >>> groups = OutputGroups((("layer3.0", "layer3.1"),))
        >>> groups.group_of("layer3.0"), groups.closes("layer3.0"), groups.closes("layer3.1")
        (0, False, True)
    """

    groups: tuple[tuple[str, ...], ...] = ()
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {name: i for i, names in enumerate(self.groups) for name in names}
        object.__setattr__(self, "_index", index)

    def group_of(self, name: str) -> int | None:
        """The group of call site ``name`` (``None``: reduced on its own)."""
        return self._index.get(name)

    def closes(self, name: str) -> bool:
        """Whether ``name`` is the last layer of its group."""
        group = self._index.get(name)
        return group is not None and self.groups[group][-1] == name


def output_groups(
    model: nn.Module, layers: Sequence[str], forward: Callable[[], object]
) -> OutputGroups:
    """The groups of ``layers`` (call sites of ``model``) whose outputs, in one run of
    ``forward()`` (without gradients, inside :func:`~lightning_neurons.state.untouched`), had
    one shape (but for the batch), type and device, and were unchanged at the end of the pass.

    Raises:
        Exception: What ``forward()`` raises (nothing is known then: hold nothing).
    """
    seen: list[tuple[str, torch.Tensor, int]] = []

    def record(name: str, output: torch.Tensor) -> None:
        seen.append((name, output, output._version))

    with untouched(model), torch.no_grad(), hooked(model, layers, record):
        forward()
    by_kind: dict[tuple, list[str]] = {}
    for name, output, version in seen:
        if output._version == version and output.dim() >= 2:
            kind = (tuple(output.shape[1:]), output.dtype, output.device)
            by_kind.setdefault(kind, []).append(name)
    seen.clear()
    return OutputGroups(tuple(tuple(names) for names in by_kind.values() if len(names) > 1))


@dataclass(frozen=True)
class Reduced:
    """Outputs of one shape reduced together: the ``[B, n, K]`` values of the layers ``names``
    (in this order) and the ``[B, m, K]`` peaks of the first ``m`` of them (``None``: none
    wanted), each a tensor of its own, never a view of an output."""

    names: tuple[str, ...]
    values: torch.Tensor
    peaks: torch.Tensor | None

    @classmethod
    def one(cls, name: str, values: torch.Tensor, peak: torch.Tensor) -> Reduced:
        """Layer ``name`` alone: its ``[B, K]`` values and peaks (``peak`` is ``values`` where its
        values say whether it fired), as :func:`~lightning_neurons.layouts.held_values` gives
        them."""
        return cls((name,), values.unsqueeze(1), None if peak is values else peak.unsqueeze(1))

    def members(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``[(name, [B, K] values, [B, K] peaks)]``, as
        :func:`~lightning_neurons.layouts.held_values` gives them for each layer (the peaks of
        one whose peaks are not wanted: its values, the same tensor)."""
        peaks, members = self.peaks, []
        for j, name in enumerate(self.names):
            own = self.values[:, j]
            members.append(
                (name, own, own if peaks is None or j >= peaks.shape[1] else peaks[:, j])
            )
        return members


def learn_layers(
    model: nn.Module, layers: Sequence[str], forward: Callable[[], object]
) -> tuple[set[str], OutputGroups]:
    """``(never negative, groups)``: the module names of ``layers`` known never negative
    (:func:`~lightning_neurons.signs.never_negative_layers`) and the groups of call sites
    reduced together (:func:`output_groups`), seen in one run of ``forward()``. Where the pass
    fails, neither is known from it."""
    groups: list[OutputGroups] = []
    signs = never_negative_layers(
        model, layers, lambda: groups.append(output_groups(model, layers, forward))
    )
    return signs, groups[0] if groups else OutputGroups()


def reduce_together(
    outputs: Sequence[tuple[str, torch.Tensor]], reduction: str, peaks: Callable[[str], bool]
) -> list[Reduced]:
    """The channels-first ``outputs`` of one shape, type and device stacked and reduced as one
    (``peaks(name)``: whether a layer's peaks are wanted; those layers come first in their
    stack); an output of a shape of its own is reduced alone. In the order of the first
    output of each shape.

    Example:
        >>> a, b = torch.rand(4, 8, 2, 2), torch.rand(4, 8, 2, 2)
        >>> [(r.names, r.values.shape) for r in reduce_together([("a", a), ("b", b)], "mean", bool)]
        [(('a', 'b'), torch.Size([4, 2, 8]))]
    """
    kinds: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, output in outputs:
        kind = (tuple(output.shape), output.dtype, output.device)
        kinds.setdefault(kind, []).append((name, output))
    reduced = []
    for members in kinds.values():
        members.sort(key=lambda member: not peaks(member[0]))  # stable: in order otherwise
        wanted = sum(peaks(name) for name, _ in members)
        names = tuple(name for name, _ in members)
        if len(members) == 1:
            output = members[0][1]
            reduced.append(
                Reduced.one(names[0], *held_values(output, reduction, names[0], wanted > 0))
            )
            continue
        values, peak = _stacked([output for _, output in members], reduction, wanted)
        reduced.append(Reduced(names, values, None if peak is values else peak))
    return reduced


def _stacked(
    outputs: list[torch.Tensor], reduction: str, peaks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, n, K] values, [B, peaks, K] peaks)`` of ``n`` channels-first outputs of one shape
    (the peaks of the first ``peaks`` of them; the values themselves when none is wanted or
    the values are the peaks)."""
    stack = torch.stack(outputs, dim=1)  # [B, n, K, *positions]: the one copy
    if stack.dim() == 3 or math.prod(stack.shape[3:]) == 1:
        values = stack.reshape(stack.shape[:3])
        return values, values
    positions = tuple(range(3, stack.dim()))
    if reduction != "mean":
        values = stack.amax(dim=positions)
        return values, values
    values = stack.mean(dim=positions)
    return values, stack[:, :peaks].amax(dim=positions) if peaks else values
