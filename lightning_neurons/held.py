"""Batches held per group of layers and added to their statistics together.

On a layer of a few hundred neurons a :class:`~lightning_neurons.stats.ClassNeuronStats` update
is a dozen operations on a ``[B, K]`` tensor, each costing more in fixed overhead (on a GPU, a
kernel launch) than in work: :class:`HeldBatches` holds a layer's batches (or those of layers
reduced together, :mod:`lightning_neurons.grouped`) within bounds of memory, and adds them as
one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_neurons.stats import ClassNeuronStats, add_rows

#: A layer's held batches are added to its statistics once they hold this many values (on the
#: CPU, where the update's work on them outweighs its fixed costs beyond this)...
FLUSH_VALUES = 2**18
#: ... on an accelerator, where each of the update's operations is a kernel launch: a layer's
#: share of :data:`HELD_VALUES_DEVICE`, at least this many values...
FLUSH_VALUES_DEVICE_MIN = 2**20
#: ... and at most this many (32 MB a layer, its values and peaks in float32: ResNet-50's widest
#: layers are added every 61 batches of 64, their peaks their values, not every 4 as on the CPU)...
FLUSH_VALUES_DEVICE = 2**22
#: Values held on an accelerator over all the layers of a :class:`HeldBatches` (512 MB as float32
#: values and peaks; a model tracked at more than 64 layers holds 8 MB a layer, more in all).
HELD_VALUES_DEVICE = 2**26
#: ... or this many rows (images)...
FLUSH_ROWS = 1024
#: ... on an accelerator (a narrow layer's rows are few bytes: 65,536 rows of 64 neurons are
#: 32 MB, and the values bound above caps the wide ones).
FLUSH_ROWS_DEVICE = 65536


class HeldBatches:
    """Batches held per layer (or per group of layers reduced together, :meth:`add_layers`) and
    added to their :class:`ClassNeuronStats` together.

    On a layer of a few hundred neurons an update is a dozen operations on a ``[B, K]`` tensor,
    each costing more in fixed overhead (or, on a GPU, in kernel launches) than in work; a
    layer's batches are held until they hold :data:`FLUSH_VALUES` values or :data:`FLUSH_ROWS`
    rows (on an accelerator, the layer's share of :data:`HELD_VALUES_DEVICE` among ``layers``
    layers, within :data:`FLUSH_VALUES_DEVICE_MIN` and :data:`FLUSH_VALUES_DEVICE`, or
    :data:`FLUSH_ROWS_DEVICE` rows), then added as one. The bounds count a value with its peak:
    a layer whose peaks are its values (see :mod:`lightning_neurons.signs`) holds twice as many
    values in the same memory. The states are those of batch-by-batch updates (counts, maxima
    and float64 sums of the same values; only the order of the float64 additions differs).
    Memory is bounded by that size per layer, whatever the number of batches. Call
    :meth:`flush` before reading the statistics.

    Example:
        >>> held, stats = HeldBatches(), ClassNeuronStats(3, 4)
        >>> held.add("fc", stats, torch.rand(8, 4), torch.randint(0, 3, (8,)))
        >>> int(stats.compute()["images"].sum())  # held, not yet added
        0
        >>> held.flush({"fc": stats})
        >>> int(stats.compute()["images"].sum())
        8
    """

    def __init__(self, layers: int = 1) -> None:
        #: The layers held, for each one's share of :data:`HELD_VALUES_DEVICE`.
        self.layers = layers
        # per group of layers (one layer: a group of one), its batches: [B, n, K] values, [B]
        # labels, [B, m, K] peaks of its first m layers or None
        self._held: dict[tuple[str, ...], list[_Held]] = {}
        self._rows: dict[tuple[str, ...], int] = {}  # rows held per group
        self._size: dict[tuple[str, ...], int] = {}  # values and peaks held per group

    def add(
        self,
        name: str,
        stats: ClassNeuronStats,
        values: torch.Tensor,
        labels: torch.Tensor,
        peak: torch.Tensor | None = None,
    ) -> None:
        """Hold a batch of layer ``name`` (the arguments of :meth:`ClassNeuronStats.update`);
        add the layer's held batches to ``stats`` once they are large enough. The tensors are
        kept as they are: pass none that a later in-place operation changes. Peaks that are the
        values (``peak`` is ``values`` or ``None``) take no room of their own: such a layer holds
        twice the values."""
        peaks = None if peak is None or peak is values else peak.unsqueeze(1)
        self.add_layers((name,), [stats], values.unsqueeze(1), labels, peaks)

    def add_layers(
        self,
        names: tuple[str, ...],
        stats: Sequence[ClassNeuronStats],
        values: torch.Tensor,
        labels: torch.Tensor,
        peaks: torch.Tensor | None = None,
    ) -> None:
        """Hold a batch of the layers ``names``, of ``K`` neurons each: ``[B, n, K]`` values and
        the ``[B, m, K]`` peaks of the first ``m`` (``None``: their values say whether they fired);
        add their held batches to ``stats`` together (:func:`add_rows`) once they hold the
        layers' bounds, each layer's as :meth:`add` counts it."""
        self._held.setdefault(names, []).append(_Held(values, labels, peaks))
        rows = self._rows[names] = self._rows.get(names, 0) + values.shape[0]
        # in halves of a value with its peak: a value is one, its peak (where its own) another
        size = values.numel() + (0 if peaks is None else peaks.numel())
        size = self._size[names] = self._size.get(names, 0) + size
        most, most_rows = self.limits(values.device)
        if rows >= most_rows or size >= 2 * most * len(names):
            self._add(stats, self._take(names))

    def limits(self, device: torch.device) -> tuple[int, int]:
        """``(values, rows)``: a layer's held batches on ``device`` are added at either."""
        if device.type == "cpu":
            return FLUSH_VALUES, FLUSH_ROWS
        share = HELD_VALUES_DEVICE // max(self.layers, 1)
        return min(FLUSH_VALUES_DEVICE, max(FLUSH_VALUES_DEVICE_MIN, share)), FLUSH_ROWS_DEVICE

    def flush(self, stats: Mapping[str, ClassNeuronStats], name: str | None = None) -> None:
        """Add the held batches to their layers' statistics in ``stats``: every one, or (given
        ``name``) those of layer ``name`` and of the layers held with it."""
        for names in list(self._held):
            if name is None or name in names:
                self._add([stats[layer] for layer in names], self._take(names))

    def drop(self, name: str | None = None) -> None:
        """Forget the held batches of layer ``name`` (``None``: of every layer), and of the
        layers held with it."""
        for names in list(self._held):
            if name is None or name in names:
                self._take(names)

    def _take(self, names: tuple[str, ...]) -> list[_Held]:
        self._rows.pop(names, None)
        self._size.pop(names, None)
        return self._held.pop(names, [])

    @staticmethod
    def _add(stats: Sequence[ClassNeuronStats], held: list[_Held]) -> None:
        if not held:
            return
        if len(held) == 1:
            add_rows(stats, held[0].values, held[0].labels, held[0].peaks)
            return
        values = torch.cat([h.values for h in held])
        labels = torch.cat([h.labels for h in held])
        widths = {h.peaks.shape[1] for h in held if h.peaks is not None}
        peaks = None
        if widths:  # a batch without peaks of its own: its values are its peaks
            m = max(widths)
            peaks = torch.cat([h.values[:, :m] if h.peaks is None else h.peaks for h in held])
        add_rows(stats, values, labels, peaks)


@dataclass(frozen=True)
class _Held:
    """A batch held by :class:`HeldBatches`: ``[B, n, K]`` values, ``[B]`` labels, the
    ``[B, m, K]`` peaks of the first ``m`` layers (``None``: none of their own)."""

    values: torch.Tensor
    labels: torch.Tensor
    peaks: torch.Tensor | None
