"""What to maximise: objectives that compose linearly and evaluate a whole batch at once.

An :class:`Objective` gives one number per image. The primitives read one layer's output
(:class:`Channel`, :class:`Neuron`, :class:`ChannelGroup`), the model's logits
(:class:`ClassLogit`) or the display image itself (the penalties
:class:`~lightning_neurons.visualize.penalties.L2` and
:class:`~lightning_neurons.visualize.penalties.TotalVariation`). They combine with ``+``,
``-`` and ``*`` / ``/`` by numbers into weighted sums::

    Channel("features.conv2", 3) - 0.5 * Channel("features.conv2", 7)

:func:`~lightning_neurons.visualize.render` optimises one image per objective in one batch: row
``i`` of the batch is scored by objective ``i``. To make that cheap, every primitive type knows
how to score a whole batch of rows, each with its own primitive, in a few tensor operations
(:meth:`Term.batched`, :meth:`Term.batched_rows`;
:class:`~lightning_neurons.visualize.scoring.BatchScorer`), instead of one Python call per row.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence

import torch

from lightning_neurons.checks import check_index, check_layer_name, check_weight
from lightning_neurons.device_copies import DeviceCopies
from lightning_neurons.errors import NeuronsError

#: Pseudo-layer name of the model's output (logits).
LOGITS = "<logits>"
#: Pseudo-layer name of the display image being optimised (values in [0, 1]).
IMAGE = "<image>"

#: Scores row ``r`` of a ``[R, ...]`` tensor with the ``r``-th of a list of terms: ``[R]``.
BatchedFn = Callable[[torch.Tensor], torch.Tensor]


class Objective:
    """A quantity to maximise, one value per image; a weighted sum of :class:`Term` s.

    Objectives support ``a + b``, ``a - b``, ``-a``, ``2 * a``, ``a * 2`` and ``a / 2``, and
    ``sum([...])`` of objectives.

    Example:
        >>> obj = Channel("features.conv2", 3) - 0.5 * ClassLogit(7)
        >>> [(w, t) for w, t in obj.terms()]
        [(1.0, Channel('features.conv2', 3)), (-0.5, ClassLogit(7))]
    """

    def terms(self) -> tuple[tuple[float, Term], ...]:
        """The ``(weight, primitive)`` pairs whose weighted sum this objective is."""
        raise NotImplementedError

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the model layers read (without the pseudo-layers for logits and image)."""
        names = [t.layer for _, t in self.terms() if t.layer not in (LOGITS, IMAGE)]
        return tuple(dict.fromkeys(names))

    @property
    def needs_logits(self) -> bool:
        """Whether the model's output is read (so the forward pass cannot stop early)."""
        return any(t.layer == LOGITS for _, t in self.terms())

    def __call__(self, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Score every row of a batch with this objective.

        Args:
            outputs: Layer name (or :data:`LOGITS`, :data:`IMAGE`) -> that layer's ``[B, ...]``
                output.

        Returns:
            ``[B]`` values.

        Raises:
            NeuronsError: If a needed output is missing.
        """
        total: torch.Tensor | None = None
        for weight, term in self.terms():
            if term.layer not in outputs:
                raise NeuronsError(
                    f"{term!r} reads {term.layer!r}, which is not among the outputs given "
                    f"({', '.join(map(repr, outputs))})"
                )
            value = weight * term.value(outputs[term.layer])
            total = value if total is None else total + value
        assert total is not None
        return total

    # ---- arithmetic ----------------------------------------------------------------------------

    def __add__(self, other: object) -> Objective:
        if isinstance(other, Objective):
            return Sum((*self.terms(), *other.terms()))
        if isinstance(other, numbers.Real) and not isinstance(other, bool) and other == 0:
            return self  # so that sum([...]) works
        return NotImplemented

    def __radd__(self, other: object) -> Objective:
        return self.__add__(other)

    def __neg__(self) -> Objective:
        return self * -1.0

    def __sub__(self, other: object) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return self + (-other)

    def __mul__(self, factor: object) -> Objective:
        if isinstance(factor, Objective):
            raise NeuronsError(
                "objectives can only be multiplied by numbers (their sum stays linear and "
                f"each image's gradient independent); got {self!r} * {factor!r}"
            )
        factor = check_weight(factor)
        return Sum(tuple((w * factor, t) for w, t in self.terms()))

    def __rmul__(self, factor: object) -> Objective:
        return self.__mul__(factor)

    def __truediv__(self, divisor: object) -> Objective:
        divisor = check_weight(divisor)
        if divisor == 0:
            raise NeuronsError("cannot divide an objective by zero")
        return self * (1.0 / divisor)


class Sum(Objective):
    """A weighted sum of primitives; made by the arithmetic operators.

    Args:
        terms: ``(weight, primitive)`` pairs; pairs with the same primitive are merged.
    """

    def __init__(self, terms: Sequence[tuple[float, Term]]) -> None:
        merged: dict[Term, float] = {}
        for weight, term in terms:
            merged[term] = merged.get(term, 0.0) + float(weight)
        self._terms = tuple((w, t) for t, w in merged.items())
        if not self._terms:
            raise NeuronsError("an objective needs at least one term")

    def terms(self) -> tuple[tuple[float, Term], ...]:
        return self._terms

    def __repr__(self) -> str:
        parts = []
        for i, (weight, term) in enumerate(self._terms):
            sign = "-" if weight < 0 else "+"
            size = abs(weight)
            text = repr(term) if size == 1.0 else f"{size:g} * {term!r}"
            parts.append(("-" + text if sign == "-" else text) if i == 0 else f"{sign} {text}")
        return " ".join(parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sum) and self._terms == other._terms

    def __hash__(self) -> int:
        return hash(self._terms)


class Term(Objective):
    """A primitive objective reading one layer (or :data:`LOGITS` / :data:`IMAGE`).

    Subclasses implement :meth:`value` (score every row with this term), :meth:`check` (validate
    against the layer's real output shape) and may override :meth:`batched` for speed.
    """

    layer: str

    def terms(self) -> tuple[tuple[float, Term], ...]:
        return ((1.0, self),)

    def _key(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def value(self, output: torch.Tensor) -> torch.Tensor:
        """This term's value on every row of ``output`` (``[B, ...]`` -> ``[B]``)."""
        raise NotImplementedError

    def check(self, shape: Sequence[int]) -> None:
        """Raise :class:`NeuronsError` if this term does not fit an output of ``[B, *shape]``."""

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        """A function scoring row ``r`` of a ``[R, ...]`` tensor with ``terms[r]``.

        The default calls :meth:`value` row by row; primitives override it with a gather.
        """

        def score(output: torch.Tensor) -> torch.Tensor:
            return torch.cat([t.value(output[r : r + 1]) for r, t in enumerate(terms)])

        return score

    @classmethod
    def batched_rows(cls, terms: Sequence[Term], rows: Sequence[int]) -> BatchedFn:
        """A function scoring rows ``rows`` of a whole batch's ``[B, ...]`` output, row
        ``rows[i]`` with ``terms[i]``: ``[len(rows)]``.

        The default picks those rows (a view where they are consecutive) and scores them with
        :meth:`batched`. The primitives that gather index the whole output at their rows
        instead: one operation where picking the rows first makes two, and two instead of four
        in the backward pass (each a kernel launch on a GPU, at every rendering step and layer).
        A subclass of a primitive that overrides :meth:`batched` overrides this too.
        """
        score, pick = cls.batched(terms), _rows_of(rows)
        return lambda output: score(pick(output))


def _rows_of(rows: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Picks rows ``rows`` of a ``[B, ...]`` tensor: the tensor itself when they are all of its
    rows in order, a view when they are consecutive, else one ``index_select``."""
    rows = list(rows)
    start, count = (rows[0], len(rows)) if rows else (0, 0)
    if rows == list(range(start, start + count)):

        def consecutive(output: torch.Tensor) -> torch.Tensor:
            return output if count == len(output) else output.narrow(0, start, count)

        return consecutive
    index = DeviceCopies(torch.tensor(rows, dtype=torch.long))
    return lambda output: output.index_select(0, index.on(output.device))


class _RowIndex:
    """The gather behind the primitives' :meth:`Term.batched_rows`: row ``rows[i]`` of a
    ``[B, K, ...]`` tensor at ``terms[i].index`` (and at the given positions along the next
    dimensions); ``rows`` defaults to ``0, 1, ...``."""

    def __init__(self, terms: Sequence[Term], rows: Sequence[int] | None = None) -> None:
        found = torch.arange(len(terms)) if rows is None else torch.tensor(list(rows))
        self.rows = DeviceCopies(found.long())
        self.index = DeviceCopies(torch.tensor([t.index for t in terms]))  # type: ignore[attr-defined]

    def __call__(self, output: torch.Tensor, *positions: torch.Tensor) -> torch.Tensor:
        dev = output.device
        return output[(self.rows.on(dev), self.index.on(dev), *positions)]


def _width_error(term: Term, what: str, index: int, width: int, unit: str) -> NeuronsError:
    return NeuronsError(
        f"{term!r}: {what} {index} is out of range; layer {term.layer!r} has {width} {unit} "
        f"(valid: 0 to {width - 1})"
    )


def _check_neuron_shape(term: Term, shape: Sequence[int]) -> None:
    # shapes are channels first (lightning_neurons.layouts): [B, N, D] tokens arrive as [B, D, N]
    if len(shape) not in (1, 2, 3):
        raise NeuronsError(
            f"{term!r}: layer {term.layer!r} outputs [B, {', '.join(map(str, shape))}]; channels "
            "are read from [B, K] (linear units), [B, K, H, W] (conv feature maps) or [B, N, D] "
            "(transformer tokens) outputs"
        )


class Channel(Term):
    """The mean of one channel's feature map (or one unit of a linear layer).

    Args:
        layer: Module name, as in ``model.named_modules()`` (the module's first call;
            ``"name#1"`` for its second call in one forward pass, see :mod:`lightning_neurons.hooks`).
        index: Channel index.

    Raises:
        NeuronsError: For a negative or non-integer index (a too large one is caught when
            rendering, against the layer's real width).

    Example:
        >>> Channel("features.conv2", 3)
        Channel('features.conv2', 3)
    """

    def __init__(self, layer: str, index: int) -> None:
        self.layer = check_layer_name(layer)
        self.index = check_index("index", index)

    def _key(self) -> tuple:
        return (self.layer, self.index)

    def __repr__(self) -> str:
        return f"Channel({self.layer!r}, {self.index})"

    def value(self, output: torch.Tensor) -> torch.Tensor:
        picked = output[:, self.index]
        return picked.flatten(1).mean(dim=1) if picked.dim() > 1 else picked

    def check(self, shape: Sequence[int]) -> None:
        _check_neuron_shape(self, shape)
        if self.index >= shape[0]:
            raise _width_error(self, "channel", self.index, shape[0], "channels")

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        return cls.batched_rows(terms, range(len(terms)))

    @classmethod
    def batched_rows(cls, terms: Sequence[Term], rows: Sequence[int]) -> BatchedFn:
        pick = _RowIndex(terms, rows)

        def score(output: torch.Tensor) -> torch.Tensor:
            picked = pick(output)
            return picked.flatten(1).mean(dim=1) if picked.dim() > 1 else picked

        return score


class Neuron(Term):
    """One spatial position of one channel's feature map.

    Args:
        layer: Module name (``"name#i"``: its call ``i`` in one forward pass).
        index: Channel index.
        y: Row of the feature map; default: the centre row.
        x: Column of the feature map; default: the centre column.

    Raises:
        NeuronsError: For negative or non-integer indices.

    Example:
        >>> Neuron("features.conv1", 0, y=4, x=4)
        Neuron('features.conv1', 0, y=4, x=4)
    """

    def __init__(self, layer: str, index: int, y: int | None = None, x: int | None = None) -> None:
        self.layer = check_layer_name(layer)
        self.index = check_index("index", index)
        self.y = None if y is None else check_index("y", y)
        self.x = None if x is None else check_index("x", x)

    def _key(self) -> tuple:
        return (self.layer, self.index, self.y, self.x)

    def __repr__(self) -> str:
        where = "" if self.y is None and self.x is None else f", y={self.y}, x={self.x}"
        return f"Neuron({self.layer!r}, {self.index}{where})"

    def _position(self, height: int, width: int) -> tuple[int, int]:
        return (height // 2 if self.y is None else self.y, width // 2 if self.x is None else self.x)

    def value(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() == 2:
            return output[:, self.index]
        if output.dim() == 3:  # tokens: x is the token
            return output[:, self.index, self._position(1, output.shape[-1])[1]]
        y, x = self._position(output.shape[-2], output.shape[-1])
        return output[:, self.index, y, x]

    def check(self, shape: Sequence[int]) -> None:
        _check_neuron_shape(self, shape)
        if self.index >= shape[0]:
            raise _width_error(self, "channel", self.index, shape[0], "channels")
        if len(shape) == 1:
            if self.y is not None or self.x is not None:
                raise NeuronsError(
                    f"{self!r}: layer {self.layer!r} is a linear layer ([B, {shape[0]}]) with no "
                    "spatial positions; leave y and x as None"
                )
            return
        if len(shape) == 2:
            if self.y is not None or self._position(1, shape[1])[1] >= shape[1]:
                raise NeuronsError(
                    f"{self!r}: layer {self.layer!r} outputs {shape[1]} tokens of {shape[0]} "
                    f"neurons; `x` is the token (0 to {shape[1] - 1}) and `y` stays None"
                )
            return
        y, x = self._position(shape[1], shape[2])
        if y >= shape[1] or x >= shape[2]:
            raise NeuronsError(
                f"{self!r}: position (y={y}, x={x}) is outside the {shape[1]}x{shape[2]} feature "
                f"map of layer {self.layer!r}"
            )

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        return cls.batched_rows(terms, range(len(terms)))

    @classmethod
    def batched_rows(cls, terms: Sequence[Term], rows: Sequence[int]) -> BatchedFn:
        pick = _RowIndex(terms, rows)
        cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

        def positions(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
            """The terms' positions in an output of ``shape``, on ``device`` (copied once)."""
            key = (shape, device)
            if key not in cache:
                if len(shape) == 1:  # tokens: the position is the token
                    pos = [(t._position(1, shape[0])[1],) for t in terms]  # type: ignore[attr-defined]
                else:
                    pos = [t._position(*shape) for t in terms]  # type: ignore[attr-defined]
                cache[key] = tuple(torch.tensor(p, device=device) for p in zip(*pos, strict=True))
            return cache[key]

        def score(output: torch.Tensor) -> torch.Tensor:
            if output.dim() == 2:
                return pick(output)
            return pick(output, *positions(tuple(output.shape[2:]), output.device))

        return score


class ChannelGroup(Term):
    """The mean of several channels' means: what a group (a cluster) of neurons prefers.

    Args:
        layer: Module name (``"name#i"``: its call ``i`` in one forward pass).
        indices: Channel indices (at least one).

    Raises:
        NeuronsError: If ``indices`` is empty or holds a negative or non-integer index.

    Example:
        >>> ChannelGroup("features.conv3", [4, 9, 17])
        ChannelGroup('features.conv3', [4, 9, 17])
    """

    def __init__(self, layer: str, indices: Sequence[int]) -> None:
        self.layer = check_layer_name(layer)
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
            raise NeuronsError(
                f"`indices` must be a non-empty list of channel indices, got {indices!r}"
            )
        self.indices = tuple(check_index("indices", i) for i in indices)

    def _key(self) -> tuple:
        return (self.layer, self.indices)

    def __repr__(self) -> str:
        return f"ChannelGroup({self.layer!r}, {list(self.indices)})"

    def value(self, output: torch.Tensor) -> torch.Tensor:
        picked = output[:, list(self.indices)]
        return picked.flatten(1).mean(dim=1)

    def check(self, shape: Sequence[int]) -> None:
        _check_neuron_shape(self, shape)
        bad = [i for i in self.indices if i >= shape[0]]
        if bad:
            raise _width_error(self, "channel", bad[0], shape[0], "channels")

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        cache: dict[int, DeviceCopies] = {}  # by the layer's width

        def weights(width: int) -> DeviceCopies:
            if width not in cache:  # one operation, not one per channel (clusters of hundreds)
                groups = [t.indices for t in terms]  # type: ignore[attr-defined]
                rows = torch.repeat_interleave(torch.tensor([len(g) for g in groups]))
                columns = torch.tensor([i for g in groups for i in g])
                share = 1.0 / torch.tensor([len(g) for g in groups], dtype=torch.float32)
                w = torch.zeros(len(terms), width)
                w.index_put_((rows, columns), share[rows], accumulate=True)
                cache[width] = DeviceCopies(w)
            return cache[width]

        def score(output: torch.Tensor) -> torch.Tensor:
            means = output.flatten(2).mean(dim=2) if output.dim() > 2 else output
            return (means * weights(means.shape[1]).like(means)).sum(dim=1)

        return score


class ClassLogit(Term):
    """The model's pre-softmax output for one class.

    Args:
        index: Class index.

    Raises:
        NeuronsError: For a negative or non-integer index (a too large one is caught when
            rendering, against the model's real output width).

    Example:
        >>> ClassLogit(3)
        ClassLogit(3)
    """

    def __init__(self, index: int) -> None:
        self.layer = LOGITS
        self.index = check_index("index", index)

    def _key(self) -> tuple:
        return (self.index,)

    def __repr__(self) -> str:
        return f"ClassLogit({self.index})"

    def value(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, self.index]

    def check(self, shape: Sequence[int]) -> None:
        if len(shape) != 1:
            raise NeuronsError(
                f"{self!r}: the model returns [B, {', '.join(map(str, shape))}]; class logits "
                "are read from a [B, num_classes] output"
            )
        if self.index >= shape[0]:
            raise NeuronsError(
                f"{self!r}: class {self.index} is out of range; the model outputs {shape[0]} "
                f"logits (valid: 0 to {shape[0] - 1})"
            )

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        return _RowIndex(terms)

    @classmethod
    def batched_rows(cls, terms: Sequence[Term], rows: Sequence[int]) -> BatchedFn:
        return _RowIndex(terms, rows)


class ClassLogProb(ClassLogit):
    """The log-probability of one class: its logit minus the log-sum-exp of all logits.

    Maximising a logit alone also raises the other classes' logits when they share features;
    the log-probability asks for evidence of this class *against* the others (measured by
    ``benchmarks/visualization.py --quality``; it did not make class images transfer better, so it
    is not a default). Index checks are :class:`ClassLogit`'s.

    Args:
        index: Class index.

    Example:
        >>> ClassLogProb(3)
        ClassLogProb(3)
    """

    def __repr__(self) -> str:
        return f"ClassLogProb({self.index})"

    def value(self, output: torch.Tensor) -> torch.Tensor:
        return output.float().log_softmax(dim=1)[:, self.index].to(output.dtype)

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        return cls.batched_rows(terms, range(len(terms)))

    @classmethod
    def batched_rows(cls, terms: Sequence[Term], rows: Sequence[int]) -> BatchedFn:
        pick = ClassLogit.batched_rows(terms, rows)

        def score(output: torch.Tensor) -> torch.Tensor:
            return pick(output.float().log_softmax(dim=1).to(output.dtype))

        return score


def as_objectives(objectives: Objective | Sequence[Objective]) -> list[Objective]:
    """A list of objectives from one objective or a sequence of them.

    Raises:
        NeuronsError: If the list is empty or holds something that is not an :class:`Objective`.
    """
    if isinstance(objectives, Objective):
        return [objectives]
    if isinstance(objectives, (str, bytes)) or not isinstance(objectives, Sequence):
        raise NeuronsError(
            "`objectives` must be an Objective or a list of them (e.g. [Channel('features.conv2', "
            f"i) for i in range(64)]); got {type(objectives).__name__}"
        )
    items = list(objectives)
    if not items:
        raise NeuronsError("`objectives` is empty; give at least one objective")
    for item in items:
        if not isinstance(item, Objective):
            raise NeuronsError(
                f"`objectives` must hold Objective instances (Channel, Neuron, ClassLogit, "
                f"ChannelGroup or sums of them); got {type(item).__name__} {item!r}"
            )
    return items
