"""Reading batches and model outputs: the one place where analyses meet the user's data.

Every analysis of the package reads the model input and the labels of a batch, and the logits of
a model output, through a :class:`BatchReader` (the :class:`~lightning_neurons.ActivationTracker`
owns the one that all callbacks share, configured with its ``input_fn``, ``label_fn`` and
``output_fn``). The data contract:

- **What the loaders yield is what the model gets.** The input read from a batch is fed to the
  model as it is (only moved to the model's device and floating-point type).
- **Display images** are images with values in [0, 1], as shown in figures and produced by
  rendering. :func:`to_model_input` maps them to model inputs with the data's ``input_transform``
  (e.g. :class:`~lightning_neurons.data.Normalize`); :func:`to_display` maps model inputs back
  for showing them.
- **Model outputs**: a tensor is the logits; of a tuple or list (torchvision's aux-logit models)
  the first tensor; of a mapping the ``"logits"`` entry. Anything else needs ``output_fn``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_neurons.errors import NeuronsError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

#: Keys of a mapping batch that hold the model input, in the order they are tried.
INPUT_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values")
#: Keys of a mapping batch that hold the class labels, in the order they are tried.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")
#: Keys of a mapping model output that hold the logits.
OUTPUT_KEYS = ("logits",)

BatchFn = Callable[[Any], torch.Tensor]
InputTransform = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "INPUT_KEYS",
    "LABEL_KEYS",
    "OUTPUT_KEYS",
    "BatchReader",
    "read_inputs",
    "read_labels",
    "check_probabilities",
    "read_logits",
    "model_dtype",
    "as_model_input",
    "to_model_input",
    "to_display",
    "input_transform_of",
]


def _by_key(batch: Mapping[Any, Any], keys: tuple[str, ...], hint: str) -> Any:
    """The entry of a mapping batch under the first of ``keys`` it has; ``hint`` says in the
    error what to pass to ActivationTracker when it has none."""
    key = next((k for k in keys if k in batch), None)
    if key is None:
        raise NeuronsError(
            f"the batch is a mapping with keys {sorted(map(str, batch))} but none of "
            f"{', '.join(keys)}; {hint} to ActivationTracker."
        )
    return batch[key]


def read_inputs(batch: Any, input_fn: BatchFn | None = None) -> torch.Tensor:
    """The model input of a batch, as the loader yielded it.

    Args:
        batch: ``(x, y, ...)`` tuple or list, a mapping with one of :data:`INPUT_KEYS`, or a bare
            tensor.
        input_fn: Takes the batch and returns the input, for other layouts.

    Returns:
        The input tensor.

    Raises:
        NeuronsError: If no input tensor can be found.

    Example:
        >>> read_inputs({"image": torch.zeros(2, 1, 4, 4), "label": torch.tensor([0, 1])}).shape
        torch.Size([2, 1, 4, 4])
    """
    if input_fn is not None:
        x = input_fn(batch)
    elif isinstance(batch, torch.Tensor):
        x = batch
    elif isinstance(batch, Mapping):
        x = _by_key(batch, INPUT_KEYS, "pass `input_fn=lambda batch: batch['my_key']`")
    elif isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    else:
        raise NeuronsError(
            f"cannot find the model input in a batch of type {type(batch).__name__}; batches must be "
            "`(x, y, ...)` tuples or mappings with an 'image'/'input'/'x' key, or pass `input_fn=` "
            "to ActivationTracker."
        )
    if not isinstance(x, torch.Tensor):
        raise NeuronsError(
            f"the model input must be a tensor, got {type(x).__name__}; pass `input_fn=` to "
            "ActivationTracker to read it from your batch."
        )
    return x


def read_labels(
    batch: Any, label_fn: BatchFn | None = None, *, check_rows: bool | None = None
) -> torch.Tensor:
    """The integer class labels of a batch.

    Labels are ``[B]`` class indices (a ``[B, 1]`` column is flattened; floating-point ones such
    as a binary classifier's 0.0 / 1.0 targets must be whole numbers, and booleans are 0 and 1),
    or ``[B, C]`` class probabilities (one-hot of any dtype, mixup, cutmix, label smoothing, a
    teacher's softmax), which are read as their top class: each image counts for the class it
    mostly is. Probability rows must be non-negative and sum to 1 (within 0.01: the rounding of
    bf16 labels, far from the row sums 0 or >= 2 of multi-label targets).

    Args:
        batch: ``(x, y, ...)`` tuple or list, or a mapping with one of :data:`LABEL_KEYS`.
        label_fn: Takes the batch and returns the labels, for other layouts.
        check_rows: Check that probability rows are probabilities (and floating-point class
            indices whole numbers). Default: only on the CPU,
            where the check does not make an accelerator wait (the tracker checks the first
            batch wherever it lies).

    Returns:
        ``[B]`` int64 labels.

    Raises:
        NeuronsError: If the batch has no labels, or they are neither class indices nor class
            probabilities.

    Example:
        >>> read_labels((torch.zeros(2, 1, 4, 4), torch.tensor([[3], [1]])))
        tensor([3, 1])
        >>> read_labels((torch.zeros(2, 1, 4, 4), torch.tensor([[0.3, 0.7], [0.6, 0.4]])))
        tensor([1, 0])
    """
    if label_fn is not None:
        labels = label_fn(batch)
    elif isinstance(batch, Mapping):
        labels = _by_key(
            batch,
            LABEL_KEYS,
            "neuron statistics are per class, so they need labels. "
            "Pass `label_fn=lambda batch: batch['my_key']`",
        )
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[1]
    else:
        kind = type(batch).__name__
        raise NeuronsError(
            f"the batch ({kind}) carries no labels; neuron statistics are per class, so batches must "
            "be `(x, y, ...)` tuples, mappings with a 'label'/'labels'/'target'/'y' key, or you pass "
            "`label_fn=` to ActivationTracker to read the labels from your batch."
        )
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() == 2 and labels.shape[1] > 1:  # probabilities, or one-hot of any dtype
        if check_rows or (check_rows is None and labels.device.type == "cpu"):
            check_probabilities(labels)
        return labels.argmax(dim=1)
    if labels.dim() == 1 and labels.dtype.is_floating_point:  # 0.0 / 1.0 targets of BCE
        if check_rows or (check_rows is None and labels.device.type == "cpu"):
            _check_whole(labels)
        return labels.long()
    if labels.dim() != 1 or labels.dtype.is_complex:
        raise NeuronsError(
            f"labels must be [B] integer class indices or [B, num_classes] class probabilities; "
            f"got dtype {labels.dtype} and shape {tuple(labels.shape)}. For other targets pass "
            "`label_fn=` to ActivationTracker, returning each image's class index."
        )
    return labels.long()


def _check_whole(labels: torch.Tensor) -> None:
    """Check that ``[B]`` floating-point labels are class indices: whole numbers."""
    bad = ~(labels.isfinite() & (labels == labels.round()))
    if bool(bad.any()):
        value = float(labels[bad.nonzero()[0, 0]])
        raise NeuronsError(
            f"[B] floating-point labels are read as class indices (0.0 and 1.0, say), whole "
            f"numbers; one is {value:.4g}. Class probabilities are [B, num_classes]; for other "
            "targets pass `label_fn=` to ActivationTracker, returning [B] class indices."
        )


def check_probabilities(labels: torch.Tensor) -> None:
    """Check that ``[B, C]`` labels are class probabilities: rows non-negative, each summing to 1
    within 0.01.

    Raises:
        NeuronsError: Naming the first row that is not, e.g. multi-label targets or logits.

    Example:
        >>> check_probabilities(torch.tensor([[1.0, 1.0, 0.0]]))
        Traceback (most recent call last):
        ...
        lightning_neurons.errors.NeuronsError: [B, 3] labels are read as class probabilities ...
    """
    rows = labels.detach().double()
    bad = (rows.min(dim=1).values < 0) | ((rows.sum(dim=1) - 1).abs() > 0.01)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    values = [round(v, 4) for v in rows[i].tolist()[:6]]
    raise NeuronsError(
        f"[B, {labels.shape[1]}] labels are read as class probabilities (one-hot, mixup, "
        "cutmix), whose rows are non-negative and sum to 1; row "
        f"{i} sums to {float(rows[i].sum()):.4g} (values {values}"
        f"{', ...' if labels.shape[1] > 6 else ''}). Multi-label targets and logits have no one "
        "class per image: pass `label_fn=` to ActivationTracker, returning [B] class indices."
    )


def read_logits(output: Any, output_fn: BatchFn | None = None) -> torch.Tensor:
    """The ``[B, num_classes]`` logits of a model output.

    Args:
        output: What the model's forward returned: a tensor, a tuple or list whose first tensor
            is the logits (torchvision's aux-logit models, named tuples), or a mapping with a
            ``"logits"`` entry.
        output_fn: Takes the output and returns the logits, for anything else.

    A binary classifier's one logit ``z`` per image (``[B, 1]`` or ``[B]``, trained with a sigmoid)
    is read as two classes' logits ``[-z / 2, z / 2]``, whose softmax is ``(1 - sigmoid(z),
    sigmoid(z))``; a convolutional head's ``[B, C, 1, 1]`` as ``[B, C]``.

    Returns:
        The logits tensor (not detached, in the model's dtype).

    Raises:
        NeuronsError: If no logits can be found, or they are not ``[B, C]``.

    Example:
        >>> read_logits((torch.zeros(2, 5), torch.ones(2, 5))).shape
        torch.Size([2, 5])
    """
    if output_fn is not None:
        logits = output_fn(output)
    elif isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, (tuple, list)):
        logits = next((t for t in output if isinstance(t, torch.Tensor)), None)
    elif isinstance(output, Mapping):
        logits = next((output[k] for k in OUTPUT_KEYS if k in output), None)
    else:
        logits = None
    if not isinstance(logits, torch.Tensor):
        kind = (
            f"a mapping with keys {sorted(map(str, output))}"
            if isinstance(output, Mapping)
            else type(output).__name__
        )
        raise NeuronsError(
            f"the model returned {kind}, and the logits cannot be read from it (a tensor, the first "
            "tensor of a tuple or list, or a mapping's 'logits' entry are read). Pass "
            "`output_fn=lambda out: out['my_logits']` to ActivationTracker."
        )
    if logits.dim() > 2 and math.prod(logits.shape[2:]) == 1:  # [B, C, 1, 1]: a conv head
        logits = logits.flatten(1)
    if logits.dim() == 1:  # one logit per image, squeezed
        logits = logits[:, None]
    if logits.dim() != 2:
        raise NeuronsError(
            f"the model's logits have shape {tuple(logits.shape)}; the analyses need "
            "[batch, num_classes]. Pass `output_fn=` to ActivationTracker to read them from the "
            "model's output."
        )
    if logits.shape[1] == 1:  # a binary classifier's logit z: P(class 1) = sigmoid(z)
        half = logits / 2  # the two classes' logits, whose softmax is (1 - sigmoid z, sigmoid z)
        logits = torch.cat([-half, half], dim=1)
    return logits


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating-point type of the model's first floating parameter or buffer (float32 if none)."""
    floating = (t for t in chain(model.parameters(), model.buffers()) if t.is_floating_point())
    return next((t.dtype for t in floating), torch.float32)


def as_model_input(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on the model's device, floating inputs in the model's floating type (a model trained
    with ``precision="bf16-true"`` takes bfloat16 inputs). Gradients flow through the cast."""
    device = next((t.device for t in chain(model.parameters(), model.buffers())), x.device)
    dtype = model_dtype(model) if x.is_floating_point() else x.dtype
    return x.to(device=device, dtype=dtype)


def to_model_input(images: torch.Tensor, transform: InputTransform | None) -> torch.Tensor:
    """Display images (values in [0, 1]) -> model inputs: ``transform(images)``, or the images
    themselves when there is no transform. The one mapping used by rendering and saliency."""
    return transform(images) if transform is not None else images


def to_display(x: torch.Tensor, transform: InputTransform | None) -> tuple[torch.Tensor, bool]:
    """Model inputs -> display images in [0, 1], for showing what the loaders yielded.

    Args:
        x: ``[B, C, H, W]`` model inputs.
        transform: The display -> input mapping. ``None``: the inputs are display images already
            (returned as they are; ``uint8`` images divided by 255, ``[B, H, W, C]`` ones
            permuted to ``[B, C, H, W]``).
            A transform with an ``inverse`` method (:class:`~lightning_neurons.data.Normalize`)
            is inverted exactly.

    Returns:
        ``(images, exact)``: the display images (float32; clamped to [0, 1] after an inverse) and
        whether they are the exact inverse; for a transform without ``inverse`` each image is rescaled to [0, 1]
        (``exact`` is False).
    """
    shown = x.detach().float()
    if transform is None:  # uint8 images are 0-255 by every convention
        shown = shown.permute(0, 3, 1, 2) if is_channels_last(x) else shown
        return (shown / 255 if x.dtype == torch.uint8 else shown), True
    x = shown
    inverse = getattr(transform, "inverse", None)
    if callable(inverse):
        return inverse(x).float().clamp(0, 1), True
    flat = x.flatten(1)
    shape = (-1,) + (1,) * (x.dim() - 1)  # per row, whatever the input's layout
    low = flat.min(dim=1).values.view(shape)
    high = flat.max(dim=1).values.view(shape)
    return (x - low) / (high - low).clamp_min(1e-12), False


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``[B, H, W, C]`` batch: 1, 3 or 4 channels last, over 4 rows."""
    return x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] > 4


def input_transform_of(trainer: Trainer) -> InputTransform | None:
    """The display image -> model input mapping that every analysis shows and renders images
    through: one of our callbacks' own (FeatureVisualizer's, the one the first batch called for
    included), else the data module's ``input_transform`` attribute, else ``None`` (the loaders
    yield display images)."""
    for callback in getattr(trainer, "callbacks", None) or []:
        ours = type(callback).__module__.startswith("lightning_neurons.")
        names = ("resolved_input_transform", "input_transform") if ours else ()
        transform = next((t for n in names if (t := getattr(callback, n, None)) is not None), None)
        if transform is not None:
            return transform
    return getattr(getattr(trainer, "datamodule", None), "input_transform", None)


@dataclass(frozen=True)
class BatchReader:
    """How every analysis reads batches and model outputs (configured once, on the tracker).

    Args:
        input_fn: Batch -> model input (default: :func:`read_inputs`' rules).
        label_fn: Batch -> labels (default: :func:`read_labels`' rules).
        output_fn: Model output -> ``[B, C]`` logits (default: :func:`read_logits`' rules).

    Example:
        >>> reader = BatchReader(label_fn=lambda b: b["cls"])
        >>> reader.labels({"image": torch.zeros(2, 1, 4, 4), "cls": torch.tensor([1, 0])})
        tensor([1, 0])
    """

    input_fn: BatchFn | None = None
    label_fn: BatchFn | None = None
    output_fn: BatchFn | None = None

    def inputs(self, batch: Any) -> torch.Tensor:
        """The model input of ``batch``."""
        return read_inputs(batch, self.input_fn)

    def labels(self, batch: Any, check_rows: bool | None = None) -> torch.Tensor:
        """The ``[B]`` int64 labels of ``batch`` (see :func:`read_labels`)."""
        return read_labels(batch, self.label_fn, check_rows=check_rows)

    def logits(self, output: Any) -> torch.Tensor:
        """The ``[B, C]`` logits of a model output."""
        return read_logits(output, self.output_fn)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model``'s logits for the input ``x`` (cast to the model's device and dtype)."""
        return self.logits(model(as_model_input(x, model)))


#: Deferred, :class:`LabelRange` reads the range of this many batches at once.
RANGE_BATCHES = 16


class LabelRange:
    """Checks that batches of labels lie in ``[0, num_classes)``, without making a GPU wait.

    Reading a CUDA tensor's range on the host waits for everything the device was given before
    (the previous batches' forward passes too), and a training loop that waits at every batch
    runs host and device one after the other. So on CUDA (or when ``defer`` is set) the range
    of every ``batches`` batches is computed at once and copied to host memory in the
    background, after an event, and read at the first :meth:`check` that finds it copied (when
    the next range is queued, or at :meth:`settle`, at the latest): an error comes about
    ``batches`` batches late. Until then the labels that :meth:`check` returns are clamped into
    range, so that no index operation meets an out-of-range label (on CUDA a device-side
    assert, which ends the process's use of the GPU). A batch costs the device that clamp (its
    copy of the labels) and a ``batches``-th of the range's three operations. On other devices
    each batch is read at once.

    Example:
        >>> labels = LabelRange(defer=True)
        >>> labels.check(torch.tensor([0, 4, 9]), 5)  # clamped; the error waits
        tensor([0, 4, 4])
        >>> labels.settle()
        Traceback (most recent call last):
        ...
        lightning_neurons.errors.NeuronsError: label 9 is outside [0, 5); ...
    """

    def __init__(self, defer: bool | None = None, batches: int = RANGE_BATCHES) -> None:
        self.defer = defer
        self.batches = batches
        self._unread: list[torch.Tensor] = []  # the deferred batches whose range is not queued
        self._classes = 0
        self._pending: tuple[torch.Tensor, Any, int] | None = None
        # a queued range: computed on the labels' device, copied to the host; both buffers are
        # reused (a copy has been read before the next is queued)
        self._span: tuple[torch.Tensor, torch.Tensor] | None = None

    def check(self, labels: torch.Tensor, num_classes: int | None) -> torch.Tensor:
        """Check ``labels`` (where deferred: the batches before whose range is due); return
        them, clamped into range where the check is deferred.

        Raises:
            NeuronsError: If a label of this batch (of an earlier one, when deferred) is
                outside ``[0, num_classes)``.
        """
        if not labels.numel() or num_classes is None:
            return labels
        defer = labels.is_cuda if self.defer is None else self.defer
        if not defer:
            self.settle()
            check_label_range(labels, num_classes)
            return labels
        if self._copied():
            self._read()
        self._unread.append(labels)
        self._classes = num_classes
        if len(self._unread) >= self.batches:
            self._queue()
        return labels.clamp(0, num_classes - 1)

    def _queue(self) -> None:
        """Read the range queued before (if any), and queue the unread batches' range."""
        self._read()
        unread, self._unread = self._unread, []
        labels = unread[0] if len(unread) == 1 else torch.cat([u.reshape(-1) for u in unread])
        span, host = self._buffers(labels)
        torch.aminmax(labels, out=(span[0], span[1]))
        host.copy_(span, non_blocking=True)
        event = None
        if labels.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(labels.device))
        self._pending = (host, event, self._classes)

    def _copied(self) -> bool:
        """Whether a range is queued and has reached host memory (asked without waiting)."""
        if self._pending is None:
            return False
        event = self._pending[1]
        return event is None or bool(event.query())

    def _buffers(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        span = self._span
        if span is None or (span[0].dtype, span[0].device) != (labels.dtype, labels.device):
            self._span = (
                torch.empty(2, dtype=labels.dtype, device=labels.device),
                torch.empty(2, dtype=labels.dtype, pin_memory=labels.is_cuda),
            )
        return self._span

    def settle(self) -> None:
        """Read the range of every deferred batch (waiting only for its copy).

        Raises:
            NeuronsError: If one of their labels is outside ``[0, num_classes)``.
        """
        if self._unread:
            self._queue()
        self._read()

    def _read(self) -> None:
        if self._pending is None:
            return
        host, event, num_classes = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        _check_range(int(host[0]), int(host[1]), num_classes)

    def drop(self) -> None:
        """Forget the deferred batches (their epoch was abandoned)."""
        self._pending = None
        self._unread = []


def check_label_range(
    labels: torch.Tensor, num_classes: int, owner: str = "ActivationTracker"
) -> None:
    """Raise if a label is outside ``[0, num_classes)`` (``owner``: whose ``num_classes=`` the
    message names). It reads the labels where they are: on a GPU, a wait for the device."""
    if labels.numel():
        low, high = labels.aminmax()
        _check_range(int(low), int(high), num_classes, owner)


def _check_range(low: int, high: int, num_classes: int, owner: str = "ActivationTracker") -> None:
    if low < 0 or high >= num_classes:
        raise NeuronsError(
            f"label {low if low < 0 else high} is outside [0, {num_classes}); the model predicts "
            f"{num_classes} classes. Pass the right `num_classes=` to {owner}, or check the "
            "labels."
        )


def check_targets(
    targets: torch.Tensor, batch: int, num_classes: int, what: str = "targets"
) -> torch.Tensor:
    """``targets`` as a 1-D long tensor of ``batch`` class indices in ``[0, num_classes)``
    (``what``: the argument's name in the message)."""
    targets = torch.as_tensor(targets)
    if targets.dim() != 1 or targets.shape[0] != batch or targets.dtype.is_floating_point:
        raise NeuronsError(
            f"`{what}` must be a 1-D integer tensor with one class index per image ({batch}); got "
            f"dtype {targets.dtype} and shape {tuple(targets.shape)}"
        )
    if targets.numel():
        low, high = (int(v) for v in targets.aminmax())  # one read (a wait on a GPU), not four
        if low < 0 or high >= num_classes:
            raise NeuronsError(
                f"`{what}` holds class {low if low < 0 else high}, outside [0, {num_classes}) "
                "(the model's logits)"
            )
    return targets.long()
