"""Streaming per-class neuron statistics (torchmetrics states, DDP sum-reduced) and the maths on them.

Nothing here is stored per image: each batch adds to ``[num_classes, num_neurons]`` sums and counts,
so memory is fixed whatever the number of batches, and ``compute()`` on every DDP rank gives the
statistics of the whole data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torchmetrics import Metric

from lightning_neurons.errors import NeuronsError


class ClassNeuronStats(Metric):
    """Per-class count, sum, sum of squares, maximum and firing count of every neuron.

    Each batch is added with ``index_add_`` and ``index_put_(accumulate=True)`` (``O(B K)`` per
    batch, whatever the number of classes; a batch without NaN or inf skips the masking). The
    states are as small as their exactness allows:

    * ``sum`` and ``sum_sq`` are float64: the variance ``E[x^2] - E[x]^2`` cancels digits, and a
      float32 sum of ``n`` values is only good to about ``n * 6e-8`` relative;
    * ``images``, ``fired`` and ``nan`` are integer counts (int64 for ``images``, int32 per neuron:
      exact up to 2^31 images per class and epoch);
    * ``max`` keeps the activations' own floating type (float32 in most models; the largest of
      float32 values is one of them, exactly);
    * the per-neuron finite count is ``images - nan``, not a state of its own.

    So a ``[C, K]`` entry takes 28 bytes (ResNet-50's 15,168 default neurons at 1,000 classes:
    0.42 GB), and only once: a torchmetrics ``Metric`` also keeps a copy of every state's
    initial value for ``reset()``, which here is a constant broadcast over the shape (no
    memory), and :meth:`summed` gives the states without the copy ``compute()`` makes.

    Args:
        num_classes: Number of classes ``C``.
        num_neurons: Number of neurons ``K`` of the layer.
        max_dtype: Type of the ``max`` state.
        track_max: Keep the ``max`` state (``False``: no maximum, 4 to 8 bytes less per entry).
        device: Where the states are made (``None``: the host; ``.to()`` moves them later, a
            copy of each).

    Example:
        >>> stats = ClassNeuronStats(num_classes=3, num_neurons=4)
        >>> stats.update(torch.rand(8, 4), torch.randint(0, 3, (8,)))
        >>> stats.compute()["sum"].shape
        torch.Size([3, 4])
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        num_classes: int,
        num_neurons: int,
        max_dtype: torch.dtype = torch.float32,
        track_max: bool = True,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.num_neurons = num_neurons
        shape = (num_classes, num_neurons)
        f64, i32 = torch.float64, torch.int32
        self._state("images", (num_classes,), torch.int64, 0, device)
        self._state("sum", shape, f64, 0, device)
        self._state("sum_sq", shape, f64, 0, device)
        self._state("fired", shape, i32, 0, device)
        self._state("nan", shape, i32, 0, device)
        self.track_max = track_max
        if track_max:
            self._state("max", shape, max_dtype, -torch.inf, device, reduce="max")
        if device is not None:
            self.to(device)  # torchmetrics' record of the device; the states are there already

    def _state(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        fill: float,
        device: torch.device | str | None,
        reduce: str = "sum",
    ) -> None:
        """Add state ``name``, made on ``device``: its initial value one element broadcast over
        ``shape`` (``add_state`` would keep a full-size copy of it), ``reset()`` clones it into a
        full tensor."""
        self.add_state(name, torch.full((), fill, dtype=dtype, device=device), reduce)
        setattr(self, name, torch.full(shape, fill, dtype=dtype, device=device))
        self._defaults[name] = self._defaults[name].expand(shape)

    def _lean_defaults(self) -> None:
        """Each state's initial value as one element broadcast over its shape (where moving the
        metric made a full-size copy of it)."""
        for name, default in self._defaults.items():
            if isinstance(default, torch.Tensor) and default.numel() > 1 and any(default.stride()):
                one = default[(0,) * default.dim()].clone()  # a view's element, no full copy
                self._defaults[name] = one.expand(default.shape)

    def _apply(self, fn: Any, exclude_state: Any = "") -> ClassNeuronStats:
        # moving the metric (``.to(device)``) makes full-size copies of the initial values
        this = super()._apply(fn, exclude_state)
        this._lean_defaults()
        return this

    def update(
        self,
        values: torch.Tensor | Rows,
        labels: torch.Tensor | None = None,
        peak: torch.Tensor | None = None,
        column: int = 0,
    ) -> None:
        """Add a batch.

        Args:
            values: ``[B, K]`` reduced activations (one value per image and neuron), or the
                :class:`Rows` of several layers of ``K`` neurons, made once for all of them.
            labels: ``[B]`` integer class indices in ``[0, num_classes)`` (with ``Rows``: none).
            peak: ``[B, K]`` largest value of each neuron anywhere in the image (for conv
                channels, the spatial max); a neuron "fires" on an image when its peak is
                positive. Defaults to ``values``.
            column: The layer of ``Rows`` that this metric adds.
        """
        if not isinstance(values, Rows):
            if labels is None:
                raise TypeError("ClassNeuronStats.update needs labels with its values")
            peaks = None if peak is None or peak is values else peak.unsqueeze(1)
            values = Rows(values.unsqueeze(1), labels, peaks)
        rows = values
        # counts with index_put_(accumulate=True): exact, and on the CPU 3x faster than
        # index_add_ for integers
        self.images.index_put_((rows.labels,), rows.ones, accumulate=True)
        self.sum.index_add_(0, rows.labels, rows.clean[:, column])
        self.sum_sq.index_add_(0, rows.labels, rows.square[:, column])
        self.fired.index_put_((rows.labels,), rows.fired[:, column], accumulate=True)
        if rows.bad is not None:
            self.nan.index_put_((rows.labels,), rows.bad[:, column], accumulate=True)
        if self.track_max:
            masked = rows.masked[:, column].to(self.max.dtype)
            self.max.scatter_reduce_(0, rows.index, masked, reduce="amax", include_self=True)

    def summed(self) -> dict[str, torch.Tensor]:
        """As :meth:`compute` (the states summed over DDP ranks when the metric synchronises),
        but the tensors themselves: on one process the metric's own states, which the next
        ``update`` changes and the next ``reset`` replaces; no copy of the whole state (which
        ``compute()`` makes, and caches until ``reset``)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            return self._states()

    def compute(self) -> dict[str, torch.Tensor]:
        """The summed states in their own types (per class and neuron, the images whose value was
        finite are ``images - nan``: see :func:`finite_counts`)."""
        return self._states()

    def _states(self) -> dict[str, torch.Tensor]:
        states = {
            "images": self.images,
            "sum": self.sum,
            "sum_sq": self.sum_sq,
            "fired": self.fired,
            "nan": self.nan,
        }
        if self.track_max:
            states["max"] = self.max
        return states


class Rows:
    """Rows of ``n`` layers of ``K`` neurons each, prepared once for their
    :meth:`ClassNeuronStats.update`: the non-finite values masked, the float64 values and their
    squares, whether each neuron fired. A flush of a group of layers (the blocks of a ResNet
    stage, stacked by :func:`~lightning_neurons.grouped.reduce_together`) makes these once, not
    once a layer; each layer's states are those its own update would give.

    Args:
        values: ``[R, n, K]`` reduced activations.
        labels: ``[R]`` integer class indices.
        peaks: ``[R, m, K]`` peaks of the first ``m`` layers (``None``: no layer's peaks are its
            own; a neuron fired where its value is positive).
    """

    def __init__(
        self, values: torch.Tensor, labels: torch.Tensor, peaks: torch.Tensor | None = None
    ) -> None:
        values = values.detach()
        self.labels = labels.long()
        self.ones = torch.ones_like(self.labels)
        finite = None if _all_finite(values) else torch.isfinite(values)
        self.clean = (values if finite is None else torch.where(finite, values, 0.0)).double()
        self.square = self.clean * self.clean
        self.fired = _positive(values, peaks).to(torch.int32)
        self.bad = None if finite is None else (~finite).to(torch.int32)
        self._values, self._finite = values, finite
        self._masked: torch.Tensor | None = None

    @property
    def masked(self) -> torch.Tensor:
        """The values, the non-finite ones ``-inf`` (for the maxima; made when first asked)."""
        if self._masked is None:
            finite = self._finite
            self._masked = (
                self._values if finite is None else self._values.where(finite, -torch.inf)
            )
        return self._masked

    @property
    def index(self) -> torch.Tensor:
        """``[R, K]``: each row's label along its neurons (a view)."""
        return self.labels.unsqueeze(1).expand(-1, self._values.shape[2])


def _positive(values: torch.Tensor, peaks: torch.Tensor | None) -> torch.Tensor:
    """``[R, n, K]``: where the first ``m`` layers' peaks and the others' values are positive."""
    if peaks is None:
        return values > 0
    if peaks.shape[1] == values.shape[1]:
        return peaks.detach() > 0
    return torch.cat([peaks.detach() > 0, values[:, peaks.shape[1] :] > 0], dim=1)


def add_rows(
    stats: Sequence[ClassNeuronStats],
    values: torch.Tensor,
    labels: torch.Tensor,
    peaks: torch.Tensor | None = None,
) -> None:
    """Add ``[R, n, K]`` values of ``n`` layers to their statistics ``stats`` (in that order),
    the preparation they share made once (:class:`Rows`)."""
    rows = Rows(values, labels, peaks)
    for column, metric in enumerate(stats):
        metric.update(rows, column=column)


class ConfusionCounts(Metric):
    """A ``[C, C]`` confusion matrix (rows: true class, columns: predicted class) that a batch
    updates without the device waiting: one ``index_put_(accumulate=True)``, where labels
    outside ``[0, C)`` add 0 (torchmetrics' confusion matrices count with ``bincount`` and
    drop such labels by boolean indexing; on a GPU each makes the host wait for the device at
    every batch). Summed over DDP ranks by ``compute()``.

    Example:
        >>> counts = ConfusionCounts(3)
        >>> counts.update(torch.tensor([[2.0, 1, 0], [0, 0, 1]]), torch.tensor([0, 7]))
        >>> counts.compute().tolist()
        [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.add_state("counts", counts, dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``[B, C]`` logits (or scores) and ``[B]`` integer labels."""
        preds = logits.detach().argmax(dim=1)
        labels = labels.to(preds.device).long()
        inside = (labels >= 0) & (labels < self.num_classes)
        rows = labels.clamp(0, self.num_classes - 1)
        self.counts.index_put_((rows, preds), inside.long(), accumulate=True)

    def compute(self) -> torch.Tensor:
        return self.counts


def _all_finite(values: torch.Tensor) -> bool:
    """Whether ``values`` are all finite, known cheaply: on the CPU, by their sum (finite only
    when every value is; a sum that overflows only sends a batch down the masking path); on an
    accelerator ``False``, so that no batch waits for the device to answer."""
    return values.device.type == "cpu" and bool(values.sum().isfinite())


# ---- the maths, as pure functions -------------------------------------------------------------


def finite_counts(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[C, K]``: per class and neuron, the images whose value was finite (``images - nan``, or
    the state's ``count`` entry when it has one)."""
    if "count" in state:
        return state["count"]
    return state["images"].unsqueeze(1) - state["nan"]


def class_means(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` per class and neuron; NaN where a class has no (finite) value."""
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, torch.nan))


def class_std(total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Population standard deviation per class and neuron."""
    mean = class_means(total, count)
    var = class_means(total_sq, count) - mean * mean
    return var.clamp_min(0).sqrt()


def selectivity_index(means: torch.Tensor) -> torch.Tensor:
    """Class selectivity index (Morcos et al. 2018) of every neuron.

    ``SI = (mu_max - mu_rest) / (mu_max + mu_rest)`` with ``mu_max`` the largest class mean and
    ``mu_rest`` the mean of the other class means; in [0, 1] for non-negative activations.

    Conventions for other activations (pre-ReLU layers):
      * a neuron with a negative class mean is measured on its means shifted so that the smallest
        is zero, i.e. relative to its least responsive class (SI = 1 then means: responds to one
        class only, relative to the baseline of the others);
      * a neuron whose class means are all equal (an all-zero, dead neuron included) has SI 0;
      * classes without data (NaN means) are ignored; a neuron with fewer than two classes of
        data has SI NaN.

    Args:
        means: ``[C, K]`` class profile.

    Returns:
        ``[K]`` float tensor.
    """
    valid = torch.isfinite(means)
    n_valid = valid.sum(dim=0)
    big = torch.where(valid, means, torch.full_like(means, torch.inf))
    low = big.min(dim=0).values
    shift = torch.where(low < 0, -low, torch.zeros_like(low))
    shifted = torch.where(valid, means + shift, torch.zeros_like(means))
    mu_max = torch.where(valid, shifted, torch.full_like(means, -torch.inf)).max(dim=0).values
    rest_sum = shifted.sum(dim=0) - mu_max
    mu_rest = rest_sum / (n_valid - 1).clamp_min(1)
    denom = mu_max + mu_rest
    si = torch.where(
        denom > 0, (mu_max - mu_rest) / denom.clamp_min(1e-300), torch.zeros_like(denom)
    )
    return torch.where(n_valid >= 2, si, torch.full_like(si, torch.nan))


def dead_neurons(fired: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``[K]`` bool: neurons that were never positive on any analysed image."""
    return (fired.sum(dim=0) == 0) & (count.sum(dim=0) > 0)


def dominant_neurons(means: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` neurons carrying most of each class's positive activation.

    Args:
        means: ``[C, K]`` class profile.
        top_k: Neurons per class (capped at ``K``).

    Returns:
        ``(dominant, domination)``: ``[C, top_k]`` neuron indices, strongest first, and ``[C]``
        the share of the class's total positive mean activation that they carry (0 when the class
        has none).
    """
    positive = torch.nan_to_num(means, nan=0.0).clamp_min(0)
    k = min(top_k, means.shape[1])
    top = positive.topk(k, dim=1)
    total = positive.sum(dim=1)
    share = torch.where(
        total > 0, top.values.sum(dim=1) / total.clamp_min(1e-300), torch.zeros_like(total)
    )
    return top.indices, share


@dataclass
class LayerStats:
    """What the :class:`~lightning_neurons.ActivationTracker` knows about one layer.

    Tensors are on the CPU; ``C`` classes, ``K`` neurons.

    Attributes:
        layer: Module name.
        epoch: Epoch the statistics were gathered in.
        reduction: ``"mean"`` or ``"max"`` spatial reduction of conv channels.
        counts: ``[C]`` images per class.
        class_means: ``[C, K]`` float32, the class profile (NaN where a class had no finite
            value).
        class_std: ``[C, K]`` float32, standard deviation per class.
        class_max: ``[C, K]`` largest reduced activation per class (the activations' type).
        firing_rate: ``[C, K]`` float32, share of a class's images on which the neuron was
            positive.
        nan_counts: ``[K]`` non-finite activations seen (excluded from the means).
        selectivity: ``[K]`` class selectivity index.
        dead: ``[K]`` bool, never positive.
        dominant: ``[C, top_k]`` dominant neurons of each class.
        domination: ``[C]`` share of the class's positive activation its dominant neurons carry.
        preferred_class: ``[K]`` the class with the largest mean, per neuron.
    """

    layer: str
    epoch: int
    reduction: str
    counts: torch.Tensor
    class_means: torch.Tensor
    class_std: torch.Tensor
    class_max: torch.Tensor
    firing_rate: torch.Tensor
    nan_counts: torch.Tensor
    selectivity: torch.Tensor
    dead: torch.Tensor
    dominant: torch.Tensor
    domination: torch.Tensor
    preferred_class: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.class_means.shape[0]

    @property
    def num_neurons(self) -> int:
        return self.class_means.shape[1]

    @property
    def max_activation(self) -> torch.Tensor:
        """``[K]`` largest reduced activation of each neuron over all analysed images."""
        return self.class_max.amax(dim=0)

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """The tensors by name (for ``.npz`` files)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in {"layer", "reduction", "epoch"}
        }

    @classmethod
    def from_state(
        cls, layer: str, state: dict[str, torch.Tensor], *, epoch: int, reduction: str, top_k: int
    ) -> LayerStats:
        """Build the results from summed states (``ClassNeuronStats.compute()``).

        The maths runs on the states' device, and the results are moved to the CPU.

        Means and standard deviations are computed in float64 from the float64 sums (the
        variance cancels digits), then kept in float32 like the other ``[C, K]`` statistics:
        7 significant digits, as many as the float32 activations they summarise, at half the
        memory of float64. Selectivity and domination are computed from the float64 means.
        """
        s = {k: v.detach() for k, v in state.items()}
        if int(s["images"].sum()) == 0:
            raise NeuronsError(f"no images were analysed for layer {layer!r}")
        count = finite_counts(s)
        total, total_sq = s["sum"].double(), s["sum_sq"].double()
        means = class_means(total, count)
        dominant, domination = dominant_neurons(means, top_k)
        rate = s["fired"].float() / s["images"].clamp_min(1).unsqueeze(1).float()

        def cpu(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            return t.to("cpu", dtype)

        f32 = torch.float32
        return cls(
            layer=layer,
            epoch=epoch,
            reduction=reduction,
            counts=cpu(s["images"]),
            class_means=cpu(means, f32),
            class_std=cpu(class_std(total, total_sq, count), f32),
            class_max=cpu(s["max"]),
            firing_rate=cpu(rate),
            nan_counts=cpu(s["nan"].sum(dim=0)),
            selectivity=cpu(selectivity_index(means)),
            dead=cpu(dead_neurons(s["fired"], count)),
            dominant=cpu(dominant),
            domination=cpu(domination),
            preferred_class=cpu(torch.nan_to_num(means, nan=-torch.inf).argmax(dim=0)),
        )
