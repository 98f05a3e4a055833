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

import torch
from torch import nn

from lightning_neurons.batch import BatchFn, as_model_input, read_logits
from lightning_neurons.device_copies import DeviceCopies
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import hooked
from lightning_neurons.visualize.objectives import IMAGE, LOGITS, BatchedFn, Objective, Term


class BatchScorer:
    """Scores row ``i`` of a batch with objective ``i``, in a few tensor operations per layer.

    The terms of all objectives are grouped by (primitive type, layer); each group is scored with
    the type's :meth:`Term.batched` function and added to its rows with ``index_add``. Because
    each row's value depends only on that row's image (the model runs in eval mode), the sum of
    the rows has independent gradients per image.

    Args:
        objectives: One objective per row.
    """

    def __init__(self, objectives: Sequence[Objective]) -> None:
        self.size = len(objectives)
        grouped: dict[tuple[type, str], list[tuple[int, float, Term]]] = {}
        for row, objective in enumerate(objectives):
            for weight, term in objective.terms():
                grouped.setdefault((type(term), term.layer), []).append((row, weight, term))
        self.groups: dict[str, list[tuple[BatchedFn, DeviceCopies, DeviceCopies, bool]]] = {}
        for (kind, layer), items in grouped.items():
            rows = torch.tensor([r for r, _, _ in items])
            weights = torch.tensor([w for _, w, _ in items])
            full = len(items) == self.size and bool((rows == torch.arange(self.size)).all())
            fn = kind.batched([t for _, _, t in items])
            # copied to the model's device once, not at every step (a copy to a GPU waits)
            group = (fn, DeviceCopies(rows), DeviceCopies(weights), full)
            self.groups.setdefault(layer, []).append(group)
        self.layers = tuple(n for n in self.groups if n not in (LOGITS, IMAGE))
        self.needs_logits = LOGITS in self.groups
        self.needs_image = IMAGE in self.groups

    def score(self, layer: str, output: torch.Tensor) -> torch.Tensor:
        """The contribution of ``layer``'s terms to every row: ``[R]``.

        Args:
            layer: A layer name, :data:`LOGITS` or :data:`IMAGE`.
            output: That layer's ``[R, ...]`` output for the whole batch.
        """
        total = output.new_zeros(self.size)
        for fn, rows, weights, full in self.groups.get(layer, []):
            if full:
                total = total + weights.like(output) * fn(output)
            else:
                index = rows.on(output.device)
                part = fn(output.index_select(0, index))
                total = total.index_add(0, index, weights.like(output) * part)
        return total


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
        self.total: torch.Tensor | None = None
        self.seen: set[str] = set()
        self.gram_rows = {
            n: DeviceCopies(torch.as_tensor(r, dtype=torch.long))
            for n, r in (gram_layers or {}).items()
        }
        self.grams: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the last forward pass."""
        self.total = None
        self.seen = set()
        self.grams = {}

    def add(self, layer: str, output: torch.Tensor) -> None:
        """Add every row's score on ``layer``'s output to the running total."""
        part = self.scorer.score(layer, output)
        self.total = part if self.total is None else self.total + part

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        if layer in self.seen or layer not in self.scorer.groups:
            return  # a module called twice in one forward counts once; others' layers not at all
        self.seen.add(layer)
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

    def forward(self, model: nn.Module, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Run the model on ``x`` (in the model's dtype) and return every row's score ``[R]``."""
        self.reset()
        if self.scorer.needs_image:
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
        assert self.total is not None
        return self.total


class Dispatch:
    """One forward hook for all chunks of a rendering, passing outputs to the current scoring."""

    def __init__(self) -> None:
        self.current: Scoring | None = None

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        assert self.current is not None
        self.current(layer, output)
