"""The model's class logits and their input gradients, for the saliency methods: a probe of the
model (its number of classes, the rows a chunk may hold, its layers' output shapes), the target
classes, and the chunks of rows that bound memory."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_neurons.batch import (
    BatchFn,
    InputTransform,
    as_model_input,
    read_logits,
    to_model_input,
)
from lightning_neurons.checks import check_optional_positive_int
from lightning_neurons.errors import NeuronsError
from lightning_neurons.gradients import GIVE_GRAPH, NO_GRAPH, gradients_at
from lightning_neurons.state import model_device
from lightning_neurons.visualize.cam_layers import LayerOutputs, layer_outputs
from lightning_neurons.visualize.sizing import OutputSizes, auto_batch_size, leaf_output_sizes


def class_logits(
    model: nn.Module,
    x: torch.Tensor,
    input_transform: InputTransform | None,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """Float32 logits of display images ``x``, run in the model's dtype."""
    x = as_model_input(to_model_input(x, input_transform), model)
    return read_logits(model(x), output_fn).float()


class Probe:
    """One forward pass of one of ``images``, made when first asked (and then only once): the
    model's number of classes, the rows a chunk may hold
    (:func:`~lightning_neurons.visualize.sizing.auto_batch_size` of its layers' outputs) and,
    with ``watch``, the shapes of the layers' outputs (Grad-CAM's default layer,
    :func:`cam_layer`: hooks on every module)."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        input_transform: InputTransform | None,
        output_fn: BatchFn | None = None,
        watch: bool = False,
    ) -> None:
        self.model, self.images, self.watch = model, images, watch
        self.input_transform, self.output_fn = input_transform, output_fn
        self._found: tuple[int, OutputSizes] | None = None
        self._outputs: LayerOutputs | None = None

    def _run(self) -> tuple[int, OutputSizes]:
        if self._found is None:
            x = as_model_input(to_model_input(self.images[:1], self.input_transform), self.model)
            out: list[object] = []
            with torch.no_grad(), self.watching(len(x)):
                sizes = leaf_output_sizes(self.model, lambda: out.append(self.model(x)))
            self._found = read_logits(out[0], self.output_fn).shape[1], sizes
        return self._found

    @contextmanager
    def watching(self, batch: int) -> Iterator[None]:
        """Notes the layers' output shapes in the forward passes of ``batch`` images inside the
        block (the probe's own, or one of the images that it then need not make); without
        ``watch``, nothing."""
        if not self.watch:
            yield
            return
        with layer_outputs(self.model, batch) as found:
            yield
        if self._outputs is None:
            self._outputs = found

    @property
    def width(self) -> int:
        return self._run()[0]

    @property
    def outputs(self) -> LayerOutputs:
        """The layers' output shapes on the images (made with ``watch``)."""
        assert self.watch
        if self._outputs is None:
            self._run()
        assert self._outputs is not None
        return self._outputs

    def rows(self, n: int, extra: int = 0) -> int:
        """Rows a chunk of ``n`` rows may hold at once; ``extra``: elements a row keeps beyond
        its layer outputs."""
        if n <= 4 or len(self.images) == 0:
            return max(n, 1)
        sizes = self._run()[1]
        largest, total = max(sizes.largest, extra), sizes.total + extra
        return auto_batch_size(n, largest, model_device(self.model), total)


def probe_targets(probe: Probe, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """``[N]`` class per image of ``probe.images``: given, or the model's prediction."""
    images, n = probe.images, probe.images.shape[0]
    if target is None:
        with torch.no_grad(), probe.watching(n):
            logits = class_logits(probe.model, images, probe.input_transform, probe.output_fn)
            return logits.argmax(dim=1)
    if isinstance(target, numbers.Integral):
        target = [int(target)] * n
    target = torch.as_tensor(target).long().flatten()
    if target.numel() != n:
        raise NeuronsError(
            f"`target` must give one class per image: {n} images, {target.numel()} targets"
        )
    width = probe.width
    low, high = (int(v) for v in target.aminmax()) if n else (0, 0)  # where it is: one read
    if low < 0 or high >= width:
        raise NeuronsError(
            f"`target` holds class {high if high >= width else low}, "
            f"outside the model's {width} classes (valid: 0 to {width - 1})"
        )
    return target.to(images.device)


def row_chunks(
    n: int, batch_size: int | None, probe: Probe | None = None, extra: int = 0
) -> list[slice]:
    """Slices of ``n`` rows: ``batch_size`` rows, or by default as many as
    :func:`~lightning_neurons.visualize.sizing.auto_batch_size` allows for the model's layer
    outputs on one of the probe's images (:class:`Probe`) and ``extra`` elements more a row
    (what else a chunk keeps): memory bounded whatever ``n`` (SmoothGrad's ``N x samples``
    copies included)."""
    check_optional_positive_int("batch_size", batch_size)
    size = batch_size or (probe.rows(n, extra) if probe is not None else max(n, 1))
    return [slice(i, i + size) for i in range(0, n, size)]


def input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    input_transform: InputTransform | None,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    logits = class_logits(model, x, input_transform, output_fn)
    if not logits.requires_grad:
        raise logits_without_graph()
    (grad,) = gradients_at(logits.gather(1, target.view(-1, 1)).sum(), [x])
    assert grad is not None
    return grad


def logits_without_graph() -> NeuronsError:
    return NeuronsError(
        f"the model's logits carry no gradient from the images: it computes them {NO_GRAPH}; "
        f"{GIVE_GRAPH}"
    )
