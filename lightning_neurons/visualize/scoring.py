"""Scoring objectives from inside forward hooks, one batch row per objective.

A :class:`BatchScorer` scores row ``i`` of a batch with objective ``i`` in a few tensor
operations per layer. A :class:`Scoring` holds the hook state of one forward pass: it scores
every layer an objective reads as soon as that layer has run (before a later in-place
operation such as ``ReLU(inplace=True)`` could change its output), keeps the Gram matrices the
diversity term compares, and stops the pass once every needed layer has run (unless a class
logit is asked for), so rendering an early layer's channels does not pay for the rest of the
model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lightning_neurons.batch import BatchFn, as_model_input, read_logits
from lightning_neurons.device_copies import DeviceCopies
from lightning_neurons.errors import NeuronsError
from lightning_neurons.gradients import check_gradient
from lightning_neurons.hooks import hooked
from lightning_neurons.visualize.objectives import IMAGE, LOGITS, BatchedFn, Objective, Term


@dataclass(frozen=True)
class _Group:
    """The terms of one primitive type on one layer: ``score(output)`` is their rows' values."""

    score: BatchedFn
    #: The terms' weights (``None``: all 1, no multiplication).
    weights: DeviceCopies | None
    #: Whether the group scores every row of the batch, in order.
    full: bool


class BatchScorer:
    """Scores row ``i`` of a batch with objective ``i``, in a few tensor operations per layer.

    The terms of all objectives are grouped by (primitive type, layer); each group scores its rows
    of the layer's whole output with the type's :meth:`Term.batched_rows` function (one gather for
    the primitives). :meth:`total` puts the groups' values together: side by side when every row
    has one term and the groups' rows follow each other (a channel rendering: each layer's rows in
    turn), else added to their rows with one ``index_add``. Because each row's value depends only
    on that row's image (the model runs in eval mode), the sum of the rows has independent
    gradients per image.

    Args:
        objectives: One objective per row.
    """

    def __init__(self, objectives: Sequence[Objective]) -> None:
        self.size = len(objectives)
        grouped: dict[tuple[type, str], list[tuple[int, float, Term]]] = {}
        for row, objective in enumerate(objectives):
            for weight, term in objective.terms():
                grouped.setdefault((type(term), term.layer), []).append((row, weight, term))
        #: Each layer's groups, as ``(position in the groups' order, group)``.
        self.groups: dict[str, list[tuple[int, _Group]]] = {}
        self._ordered: list[_Group] = []  # every group, in that order
        partial: list[int] = []  # the rows of the groups that score some rows, in group order
        for (kind, layer), items in grouped.items():
            rows = [r for r, _, _ in items]
            weights = [w for _, w, _ in items]
            full = rows == list(range(self.size))
            group = _Group(
                kind.batched_rows([t for _, _, t in items], rows),
                None if all(w == 1.0 for w in weights) else DeviceCopies(torch.tensor(weights)),
                full,
            )
            self.groups.setdefault(layer, []).append((len(self._ordered), group))
            self._ordered.append(group)
            partial.extend([] if full else rows)
        self._side_by_side = partial == list(range(self.size))
        # copied to the model's device once, not at every step (a copy to a GPU waits)
        self._partial_rows = DeviceCopies(torch.tensor(partial, dtype=torch.long))
        self.layers = tuple(n for n in self.groups if n not in (LOGITS, IMAGE))
        self.needs_logits = LOGITS in self.groups
        self.needs_image = IMAGE in self.groups

    def parts(self, layer: str, output: torch.Tensor) -> dict[int, torch.Tensor]:
        """The values of ``layer``'s groups on its ``[R, ...]`` output for the whole batch, by
        the groups' positions (``layer``: a layer name, :data:`LOGITS` or :data:`IMAGE`)."""
        found = {}
        for position, group in self.groups.get(layer, []):
            value = group.score(output)
            found[position] = value if group.weights is None else group.weights.like(value) * value
        return found

    def total(self, parts: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Every row's value, ``[R]``, from the values of every group (:meth:`parts`)."""
        full = [parts[i] for i, group in enumerate(self._ordered) if group.full]
        rest = [parts[i] for i, group in enumerate(self._ordered) if not group.full]
        total = None
        if rest:
            values = rest[0] if len(rest) == 1 else torch.cat(rest)
            if not self._side_by_side:
                index = self._partial_rows.on(values.device)
                values = values.new_zeros(self.size).index_add(0, index, values)
            total = values
        for value in full:
            total = value if total is None else total + value
        assert total is not None  # an objective has at least one term
        return total

    def score_all(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Every row's value on ``outputs`` (``{layer: [R, ...] output}``, every layer read)."""
        parts: dict[int, torch.Tensor] = {}
        for layer, output in outputs.items():
            parts.update(self.parts(layer, output))
        return self.total(parts)


class StopForward(Exception):
    """Raised from a forward hook once every needed layer has run."""


def gram_matrices(output: torch.Tensor) -> torch.Tensor:
    """Each row's Gram matrix of its channels over the positions, flattened: ``[R, C * C]``.

    ``[R, C, H, W]`` (or ``[R, C, L]``) -> ``G[r, c, d] = mean_p a[r, c, p] * a[r, d, p]``: which
    channels fire together, wherever they fire (the style of the image, Gatys et al.), in
    float32 whatever the model's type.

    Example:
        >>> gram_matrices(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 9])
    """
    flat = output.float().flatten(2)
    return (flat @ flat.transpose(1, 2) / flat.shape[2]).flatten(1)


class Scoring:
    """Forward hooks that score each needed layer as it runs, stopping the pass when done.

    Args:
        objectives: One objective per batch row.
        output_fn: Reads the logits from the model's output.
        gram_layers: Layers whose Gram matrices the diversity term compares, each with the
            batch rows that compare them (kept in :attr:`grams` during the forward pass, those
            rows' only, in that order).
    """

    def __init__(
        self,
        objectives: Sequence[Objective],
        output_fn: BatchFn | None = None,
        gram_layers: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.scorer = scorer = BatchScorer(objectives)
        self.output_fn = output_fn
        self.stop = not scorer.needs_logits
        self.found: dict[int, torch.Tensor] = {}  # the groups' values in this forward pass
        self.seen: set[str] = set()
        self.grad = False  # this forward pass is asked for the image's gradient
        self.gram_rows = {
            n: DeviceCopies(torch.as_tensor(r, dtype=torch.long))
            for n, r in (gram_layers or {}).items()
        }
        self.grams: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the last forward pass."""
        self.found = {}
        self.seen = set()
        self.grams = {}

    def add(self, layer: str, output: torch.Tensor) -> None:
        """Score ``layer``'s groups on its output (now: a later in-place operation may change
        it)."""
        self.found.update(self.scorer.parts(layer, output))

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        if layer in self.seen or layer not in self.scorer.groups:
            return  # a module called twice in one forward counts once; others' layers not at all
        self.seen.add(layer)
        if self.grad:
            check_gradient(layer, output)
        self.add(layer, output)
        rows = self.gram_rows.get(layer)
        if rows is not None:
            # computed now: a later in-place op (ReLU(inplace=True)) may change ``output``
            every = len(rows.tensor) == len(output)  # the rows ascend: every row, in order
            picked = output if every else output.index_select(0, rows.on(output.device))
            self.grams[layer] = gram_matrices(picked)
        if self.stop and len(self.seen) == len(self.scorer.layers):
            raise StopForward

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """The forward hooks, registered inside the block only."""
        with hooked(model, list(self.scorer.layers), self):
            yield

    def forward(
        self, model: nn.Module, x: torch.Tensor, image: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the model on ``x`` (in the model's dtype) and return every row's score ``[R]``
        (``image``: the display image of every row, for objectives on the pixels)."""
        self.reset()
        self.grad = torch.is_grad_enabled() and x.requires_grad
        if self.scorer.needs_image:
            assert image is not None, "objectives on the pixels need the display images"
            self.add(IMAGE, image)
        try:
            output = model(as_model_input(x, model))
        except StopForward:
            output = None
        missing = [n for n in self.scorer.layers if n not in self.seen]
        if missing:
            raise NeuronsError(
                f"layers {missing} did not run in {type(model).__name__}'s forward pass, so "
                "their objectives cannot be scored; choose layers the forward pass uses"
            )
        if self.scorer.needs_logits:
            assert output is not None
            self.add(LOGITS, read_logits(output, self.output_fn))
        return self.scorer.total(self.found)


class Dispatch:
    """One forward hook for all chunks of a rendering, passing outputs to the current scoring."""

    def __init__(self) -> None:
        self.current: Scoring | None = None

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        assert self.current is not None
        self.current(layer, output)
