"""Causal contribution: what zeroing neurons does to each class's accuracy and logit.

:func:`ablation_effect` zeroes a set of neurons (a forward hook that is always removed) and
measures per-class accuracy and mean true-class logit with and without the ablation;
:func:`ablation_effects` evaluates many neuron sets in one pass over the data by repeating each
batch. The first-order (gradient) contributions are in :mod:`lightning_neurons.contribution`.

Every function puts the model in eval mode and gives everything back as it was: module
``training`` flags, parameters' ``requires_grad`` and ``.grad``, and the random number generators.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import BatchFn, BatchReader, as_model_input, check_targets
from lightning_neurons.errors import NeuronsError
from lightning_neurons.functional import is_function_layer
from lightning_neurons.hooks import (
    HookSet,
    exact_call_site,
    get_module,
)
from lightning_neurons.loaders import limited_batches
from lightning_neurons.outputs import split_element
from lightning_neurons.state import analysis_mode, model_device

__all__ = [
    "AblationResult",
    "ablation_effect",
    "ablation_effects",
    "ablation_results",
    "ablation_selectivity",
    "ablation_sums",
]


# ---- causal: ablation ------------------------------------------------------------------------


@dataclass
class AblationResult:
    """Per-class effect of zeroing a set of neurons (see :func:`ablation_effect`).

    Tensors are on the CPU, float64, ``[C]``; classes without images hold NaN.

    Attributes:
        layer: Module whose output neurons were zeroed.
        neurons: ``[n]`` the zeroed neurons.
        counts: Images per class.
        accuracy: Accuracy per class without the ablation.
        ablated_accuracy: With the ablation.
        logit: Mean true-class logit without the ablation.
        ablated_logit: With the ablation.
    """

    layer: str
    neurons: torch.Tensor
    counts: torch.Tensor
    accuracy: torch.Tensor
    ablated_accuracy: torch.Tensor
    logit: torch.Tensor
    ablated_logit: torch.Tensor

    @property
    def accuracy_drop(self) -> torch.Tensor:
        """``[C]`` accuracy lost per class (negative: the ablation helped)."""
        return self.accuracy - self.ablated_accuracy

    @property
    def logit_drop(self) -> torch.Tensor:
        """``[C]`` fall of the mean true-class logit per class."""
        return self.logit - self.ablated_logit

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """The tensors by name (for ``.npz`` files)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layer"}
        arrays.update(accuracy_drop=self.accuracy_drop, logit_drop=self.logit_drop)
        return arrays


def _neuron_set(
    name: str, neurons: Sequence[int] | torch.Tensor, num_neurons: int | None
) -> torch.Tensor:
    try:
        index = torch.as_tensor(neurons if isinstance(neurons, torch.Tensor) else list(neurons))
    except (TypeError, ValueError, RuntimeError) as err:
        raise NeuronsError(
            f"neuron set {name!r} must be a sequence of integer indices; got {neurons!r}"
        ) from err
    index = index.reshape(-1)
    if index.numel() and (index.dtype.is_floating_point or index.dtype == torch.bool):
        raise NeuronsError(
            f"neuron set {name!r} must hold integer neuron indices, got dtype {index.dtype}"
        )
    index = index.long()
    if index.numel() and int(index.min()) < 0:
        raise NeuronsError(
            f"neuron set {name!r} holds the negative index {int(index.min())}; indices start at 0"
        )
    if num_neurons is not None and index.numel() and int(index.max()) >= num_neurons:
        raise NeuronsError(
            f"neuron set {name!r} holds index {int(index.max())}, but the layer has {num_neurons} neurons "
            f"(valid: 0 to {num_neurons - 1})"
        )
    return torch.unique(index)


def _width(module: nn.Module) -> int | None:
    for attr in ("out_channels", "out_features", "num_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


class _ZeroNeurons:
    """The forward hook of :func:`ablation_effects` on the ablated layer.

    During a pass over ``1 + len(chunk)`` copies of a batch it zeroes, in copy ``i``, the neurons
    of ``chunk[i - 1]`` (copy 0 is the unablated baseline). With ``shared`` the layers before run
    once and the layer's output is repeated here; otherwise the input was repeated. Outside the
    passes (``chunk is None``) it does nothing. A chunk's mask is made once for each width and
    device, not at every pass: on a GPU each set's indices are a copy from the host, which waits
    for the device.
    """

    def __init__(
        self, layer: str, names: list[str], sets: list[torch.Tensor], *, shared: bool
    ) -> None:
        self.layer, self.names, self.sets = layer, names, sets
        self.chunk: list[torch.Tensor] | None = None
        self.shared = shared
        # by the chunk's sets (held in self.sets: their ids stay theirs), width and device
        self._masks: dict[tuple[tuple[int, ...], int, torch.device], torch.Tensor] = {}

    def __call__(self, _name: str, out: torch.Tensor) -> torch.Tensor | None:
        chunk = self.chunk
        if chunk is None:  # a forward outside our passes
            return None
        if out.dim() < 2:  # channels first (see lightning_neurons.layouts)
            raise NeuronsError(
                f"layer {self.layer!r} returned shape {tuple(out.shape)}; ablation needs [B, K], "
                "[B, K, H, W] or [B, N, D] (tokens)"
            )
        copies = 1 + len(chunk)
        if self.shared:
            grouped = out.unsqueeze(0).expand(copies, *out.shape)
        elif out.shape[0] % copies == 0:
            grouped = out.view(copies, out.shape[0] // copies, *out.shape[1:])
        else:
            raise NeuronsError(
                f"layer {self.layer!r} saw {out.shape[0]} rows, not a multiple of the {copies} copies of the batch"
            )
        zeroed = self._zeroed(chunk, out.shape[1], out.device)
        mask = zeroed.view(copies, 1, out.shape[1], *([1] * (out.dim() - 2)))
        return grouped.masked_fill(mask, 0).reshape(-1, *out.shape[1:])

    def _zeroed(
        self, chunk: list[torch.Tensor], num_neurons: int, device: torch.device
    ) -> torch.Tensor:
        """``[1 + len(chunk), K]``: where copy ``i`` zeroes a neuron (none in copy 0)."""
        key = (tuple(id(index) for index in chunk), num_neurons, device)
        if key not in self._masks:
            for index in chunk:
                if index.numel() and int(index.max()) >= num_neurons:
                    name = self.names[next(i for i, s in enumerate(self.sets) if s is index)]
                    raise NeuronsError(
                        f"neuron set {name!r} holds index {int(index.max())}, but layer "
                        f"{self.layer!r} has {num_neurons} neurons (valid: 0 to {num_neurons - 1})"
                    )
            zeroed = torch.zeros(1 + len(chunk), num_neurons, dtype=torch.bool)
            for row, index in enumerate(chunk, start=1):
                zeroed[row, index] = True
            self._masks[key] = zeroed.to(device)
        return self._masks[key]


def ablation_effects(
    model: nn.Module,
    layer: str,
    neuron_sets: Mapping[str, Sequence[int] | torch.Tensor],
    dataloader: Iterable[Any],
    *,
    max_batches: int | None = None,
    sets_per_pass: int = 8,
    share_prefix: bool | Literal["auto"] = "auto",
    label_fn: BatchFn | None = None,
    input_fn: BatchFn | None = None,
    output_fn: BatchFn | None = None,
) -> dict[str, AblationResult]:
    """The effect of zeroing each of several neuron sets, in one pass over the data.

    Each batch is repeated ``1 + sets_per_pass`` times and run as one batch: copy 0 is the
    unablated baseline, copy ``i`` has set ``i``'s neurons zeroed by a forward hook on ``layer``.
    The data loader is iterated once. Without grad, in eval mode; the model's state, hooks and the
    random number generators are as before afterwards, also on error.

    Args:
        model: Maps images to ``[B, C]`` logits.
        layer: Module whose output neurons (channels of ``[B, K, H, W]``, units of ``[B, K]``) are
            zeroed; for a module run several times per forward pass, ``"name"`` is its first call
            and ``"name#i"`` its call ``i`` (only that call is ablated).
        neuron_sets: ``{name: neuron indices}``; an empty set measures nothing (drop 0).
        dataloader: Any iterable of ``(x, y, ...)`` batches.
        max_batches: Use at most this many batches (default: all).
        sets_per_pass: Sets evaluated per forward pass (memory grows with it).
        share_prefix: ``True``: run the layers before ``layer`` once per batch and repeat only
            ``layer``'s output (much faster for late layers); valid only when nothing computed
            before ``layer`` bypasses it (no skip connection across it). ``False``: repeat the
            input (always valid). ``"auto"``: check on two images of the first batch that both
            give the same logits, and share when they do.
        label_fn: Reads the ``[B]`` labels from a batch of another layout.
        input_fn: Reads the model input from a batch of another layout.
        output_fn: Reads the logits from the model's output.

    Returns:
        ``{name: AblationResult}`` in the order of ``neuron_sets``.

    Raises:
        NeuronsError: For an unknown layer, indices that are negative or not below the layer's
            width, bad batches, an empty loader or bad arguments.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_neurons.models import SmallCNN
        >>> model = SmallCNN(widths=(8, 16, 32)).eval()  # 10 classes; train it first
        >>> images, labels = torch.rand(40, 1, 16, 16), torch.arange(40) % 10
        >>> loader = DataLoader(TensorDataset(images, labels), batch_size=20)
        >>> res = ablation_effects(model, "features.relu3", {"a": [0, 4], "b": [7]}, loader)
        >>> list(res), res["a"].accuracy_drop.shape  # one drop per class
        (['a', 'b'], torch.Size([10]))
    """
    reader = BatchReader(input_fn=input_fn, label_fn=label_fn, output_fn=output_fn)
    batches = limited_batches(dataloader, max_batches)
    sums = ablation_sums(
        model,
        layer,
        neuron_sets,
        batches,
        reader,
        sets_per_pass=sets_per_pass,
        share_prefix=share_prefix,
    )
    if not neuron_sets:
        return {}
    if sums is None:
        raise NeuronsError("the data loader gave no batch; nothing to analyse")
    return ablation_results(layer, neuron_sets, sums)


def ablation_sums(
    model: nn.Module,
    layer: str,
    neuron_sets: Mapping[str, Sequence[int] | torch.Tensor],
    batches: Iterable[Any],
    reader: BatchReader,
    *,
    sets_per_pass: int = 8,
    share_prefix: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor] | None:
    """The sums behind :func:`ablation_effects` (same other arguments) over all of ``batches``,
    read by ``reader``: float64 ``counts`` ``[C]`` (images per class), ``correct`` and
    ``logit_sum`` ``[1 + S, C]`` (correct predictions and true-class logits per class; row 0
    without ablation, row ``1 + i`` with set ``i`` zeroed). Sums of several processes' data add
    up (DDP); :func:`ablation_results` turns them into results. ``None`` for no batch.

    Raises:
        NeuronsError: As :func:`ablation_effects`.
    """
    module = get_module(model, layer)
    site = exact_call_site(layer)
    if isinstance(sets_per_pass, bool) or not isinstance(sets_per_pass, int) or sets_per_pass < 1:
        raise NeuronsError(f"`sets_per_pass` must be a positive integer, got {sets_per_pass!r}")
    named = site[: site.rindex("#")]
    # a function layer's or a tuple element's width: checked on its output
    own_output = not isinstance(module, nn.Sequential) and not is_function_layer(named)
    width = _width(module) if own_output and not split_element(named)[1] else None
    names = list(neuron_sets)
    sets = [_neuron_set(name, neuron_sets[name], width) for name in names]
    if not sets:
        return None
    zero = _ZeroNeurons(layer, names, sets, shared=share_prefix is True)

    sums = _Sums(len(sets))
    hooks = HookSet()
    hooks.add(model, [site], zero)  # that call of the module only
    try:
        with analysis_mode(model, grad=False):
            device = model_device(model)
            for batch in batches:
                x = as_model_input(reader.inputs(batch), model)
                y = reader.labels(batch)  # checked where it is (kept batches: the host), once
                if share_prefix == "auto":
                    zero.shared = share_prefix = _can_share_prefix(
                        model, x[:2], sets[:sets_per_pass], zero, reader
                    )
                onehot: torch.Tensor | None = None  # [B, C], once a batch
                for start in range(0, len(sets), sets_per_pass):
                    progress.advance("forward pass")
                    logits = _ablated_logits(
                        model, x, sets[start : start + sets_per_pass], zero, reader
                    )
                    if onehot is None:
                        num_classes = logits.shape[2]
                        labels = check_targets(y, x.shape[0], num_classes, "labels").to(device)
                        onehot = torch.nn.functional.one_hot(labels, num_classes).double()
                    sums.add(logits, labels, onehot, start)
    finally:
        hooks.remove()
        zero.chunk = None
    return sums.on_host()


def _ablated_logits(
    model: nn.Module,
    x: torch.Tensor,
    chunk: list[torch.Tensor],
    zero: _ZeroNeurons,
    reader: BatchReader,
) -> torch.Tensor:
    """``[1 + len(chunk), B, C]`` float64 logits of the batch ``x``: the baseline, then with each
    set of ``chunk`` zeroed."""
    copies, batch_size = 1 + len(chunk), x.shape[0]
    zero.chunk = chunk
    try:
        inputs = x if zero.shared else x.repeat(copies, *([1] * (x.dim() - 1)))
        logits = reader.logits(model(inputs))
    finally:
        zero.chunk = None
    if logits.shape[0] != copies * batch_size:
        raise NeuronsError(
            f"the model returned {logits.shape[0]} rows of logits for {copies * batch_size} "
            "images; with `share_prefix=True` the layer must lie on a path that carries "
            "the whole batch"
        )
    return logits.view(copies, batch_size, -1).double()


class _Sums:
    """The sums of :func:`ablation_sums`, on the model's device until :meth:`on_host`."""

    def __init__(self, num_sets: int) -> None:
        self.num_sets = num_sets
        self.counts: torch.Tensor | None = None  # [C]
        self.correct: torch.Tensor | None = None  # [1 + S, C]: row 0 is the baseline
        self.logit_sum: torch.Tensor | None = None

    def add(
        self, logits: torch.Tensor, labels: torch.Tensor, onehot: torch.Tensor, start: int
    ) -> None:
        """Add the ``[copies, B, C]`` logits of the batch with sets ``start, ...`` zeroed."""
        copies, _, num_classes = logits.shape
        if self.correct is None:
            self.correct = logits.new_zeros(1 + self.num_sets, num_classes)
            self.logit_sum = torch.zeros_like(self.correct)
            self.counts = logits.new_zeros(num_classes)
        assert self.logit_sum is not None and self.counts is not None
        hit = (logits.argmax(dim=2) == labels.unsqueeze(0)).double()  # [copies, B]
        true_logit = logits.gather(2, labels.view(1, -1, 1).expand(copies, -1, 1))[..., 0]
        # copy 0 (the baseline) is counted once per batch, from the first chunk; a slice of
        # rows, not a list (a list index is a copy from the host)
        first = 0 if start == 0 else 1
        rows = slice(0 if start == 0 else 1 + start, start + copies)
        self.correct[rows] += hit[first:] @ onehot
        self.logit_sum[rows] += true_logit[first:] @ onehot
        if start == 0:
            self.counts += onehot.sum(dim=0)

    def on_host(self) -> dict[str, torch.Tensor] | None:
        """``counts``, ``correct`` and ``logit_sum`` on the CPU (``None``: no batch)."""
        if self.correct is None or self.counts is None or self.logit_sum is None:
            return None
        return {
            "counts": self.counts.cpu(),
            "correct": self.correct.cpu(),
            "logit_sum": self.logit_sum.cpu(),
        }


def ablation_results(
    layer: str,
    neuron_sets: Mapping[str, Sequence[int] | torch.Tensor],
    sums: Mapping[str, torch.Tensor],
) -> dict[str, AblationResult]:
    """``{name: AblationResult}`` from the :func:`ablation_sums` of ``neuron_sets`` (summed over
    processes or not).

    Raises:
        NeuronsError: When the sums do not have a row per neuron set (and one for the baseline).
    """
    names = list(neuron_sets)
    sets = [_neuron_set(name, neuron_sets[name], None) for name in names]
    counts, correct, logit_sum = (sums[k].double() for k in ("counts", "correct", "logit_sum"))
    if correct.shape[0] != 1 + len(sets):
        raise NeuronsError(
            f"the ablation sums have {correct.shape[0]} rows; {len(sets)} neuron sets need "
            f"{1 + len(sets)} (the first is the baseline)"
        )
    per_class = counts.clamp_min(1)
    nan = torch.full_like(counts, math.nan)
    accuracy = torch.where(counts > 0, correct / per_class, nan)
    logit = torch.where(counts > 0, logit_sum / per_class, nan)
    return {
        name: AblationResult(
            layer=layer,
            neurons=index,
            counts=counts.cpu(),
            accuracy=accuracy[0],
            ablated_accuracy=accuracy[i + 1],
            logit=logit[0],
            ablated_logit=logit[i + 1],
        )
        for i, (name, index) in enumerate(zip(names, sets, strict=True))
    }


def _can_share_prefix(
    model: nn.Module,
    x: torch.Tensor,
    chunk: list[torch.Tensor],
    zero: _ZeroNeurons,
    reader: BatchReader,
) -> bool:
    """Whether running the layers before the ablated one once gives the same logits as repeating
    the input (it does unless something bypasses the layer, e.g. a skip connection)."""
    copies = 1 + len(chunk)
    try:
        zero.chunk, zero.shared = chunk, False
        reference = reader.logits(model(x.repeat(copies, *([1] * (x.dim() - 1))))).float()
        zero.shared = True
        try:
            shared = reader.logits(model(x)).float()
        except (RuntimeError, ValueError):  # shapes that do not fit: a bypass of the layer
            return False
    finally:
        zero.chunk, zero.shared = None, False
    if shared.shape != reference.shape:
        return False
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return bool(torch.allclose(shared, reference, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def ablation_effect(
    model: nn.Module,
    layer: str,
    neurons: Sequence[int] | torch.Tensor,
    dataloader: Iterable[Any],
    max_batches: int | None = None,
    **kwargs: Any,
) -> AblationResult:
    """Per-class accuracy and mean true-class logit with and without zeroing ``neurons`` of ``layer``.

    A forward hook zeroes the neurons; it is removed afterwards, also on error. The model runs in
    eval mode without grad; its training flags, parameters and the random number generators are
    untouched. See :func:`ablation_effects` to measure many sets in one pass.

    Args:
        model: Maps images to ``[B, C]`` logits.
        layer: Module whose output neurons are zeroed.
        neurons: Neuron (channel or unit) indices.
        dataloader: Any iterable of ``(x, y, ...)`` batches.
        max_batches: Use at most this many batches (default: all).
        **kwargs: ``share_prefix``, ``label_fn``, ``input_fn``, ``output_fn`` of
            :func:`ablation_effects`.

    Returns:
        An :class:`AblationResult`.

    Raises:
        NeuronsError: For an unknown layer, out-of-range neuron indices, bad batches.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_neurons.models import SmallCNN
        >>> model = SmallCNN(widths=(8, 16, 32)).eval()  # 10 classes; train it first
        >>> images, labels = torch.rand(40, 1, 16, 16), torch.arange(40) % 10
        >>> loader = DataLoader(TensorDataset(images, labels), batch_size=20)
        >>> res = ablation_effect(model, "features.relu3", [3, 17], loader)
        >>> res.accuracy_drop.shape  # [num_classes]
        torch.Size([10])
    """
    return ablation_effects(
        model, layer, {"ablated": neurons}, dataloader, max_batches=max_batches, **kwargs
    )["ablated"]


def ablation_selectivity(
    accuracy_drop: torch.Tensor, classes: Sequence[int] | None = None
) -> dict[str, float]:
    """How selective zeroing each class's own (dominant) neurons is.

    Args:
        accuracy_drop: ``[S, C]``: row ``i`` is the per-class accuracy drop when the dominant neurons
            of class ``classes[i]`` are zeroed.
        classes: The class of each row; default ``0, 1, ..., S - 1``.

    Returns:
        ``own_drop`` (mean over rows of the drop of the row's own class), ``other_drop`` (mean over
        rows of the mean drop of the other classes), ``difference`` (``own - other``) and ``ratio``
        (``own / other``; ``inf`` when the other classes do not drop). Classes without data (NaN)
        are left out.

    Raises:
        NeuronsError: If the shapes do not fit or a class index is out of range.

    Example:
        >>> round(ablation_selectivity(torch.tensor([[0.8, 0.0], [0.2, 0.6]]))["difference"], 2)
        0.6
    """
    drop = torch.as_tensor(accuracy_drop, dtype=torch.float64)
    if drop.dim() != 2 or drop.shape[1] < 2:
        raise NeuronsError(
            f"`accuracy_drop` must be [num_sets, num_classes] with at least two classes, got {tuple(drop.shape)}"
        )
    rows = list(range(drop.shape[0])) if classes is None else [int(c) for c in classes]
    if len(rows) != drop.shape[0] or any(c < 0 or c >= drop.shape[1] for c in rows):
        raise NeuronsError(
            f"`classes` must give one class in [0, {drop.shape[1]}) per row of `accuracy_drop` "
            f"({drop.shape[0]} rows); got {rows}"
        )
    own_mask = torch.zeros_like(drop, dtype=torch.bool)
    own_mask[torch.arange(drop.shape[0]), torch.tensor(rows, dtype=torch.long)] = True
    own = drop[own_mask].nanmean()
    off = torch.where(own_mask, torch.full_like(drop, math.nan), drop).nanmean(dim=1).nanmean()
    own_f, off_f = float(own), float(off)
    ratio = own_f / off_f if off_f > 0 else (math.inf if own_f > 0 else math.nan)
    return {"own_drop": own_f, "other_drop": off_f, "difference": own_f - off_f, "ratio": ratio}
