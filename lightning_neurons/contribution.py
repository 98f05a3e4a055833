"""Which neurons drive a prediction: first-order contribution and causal ablation.

**First order.** The contribution of neuron ``k`` of a layer to the logit ``z_c`` of class ``c``
on image ``x`` is activation x gradient, summed over the neuron's spatial positions::

    contribution[x, c, k] = sum_{h, w} A[x, k, h, w] * d z_c(x) / d A[x, k, h, w]

It is the first-order (Taylor) estimate of how much ``z_c`` would fall if the neuron were zeroed.
For a layer feeding a linear classifier through global average pooling it is exact:
``contribution = mean activation x weight``, and the contributions plus the bias sum to the logit.

"Averaged per class" means here: for each class ``c``, the contribution of each neuron to the
**true class's** logit ``z_c``, averaged over the images of class ``c`` -> ``[num_classes,
num_neurons]`` (:func:`class_contributions`, streamed: sums only, nothing stored per image). The
full per-image tensor over **all** logits, ``[images, num_classes, num_neurons]``, is what
:func:`neuron_contributions` gives for a few probe images (which neurons drove *this* prediction,
and which pushed towards the other classes).

**Domination.** Per class, the share of its total positive (mean) contribution that its top-k
neurons carry (:func:`domination`).

**Causal.** :func:`ablation_effect` zeroes a set of neurons (a forward hook that is always removed)
and measures per-class accuracy and mean true-class logit with and without the ablation;
:func:`ablation_effects` evaluates many neuron sets in one pass over the data by repeating each batch.

Efficiency: the gradients of all images come from **one** backward pass per batch (the sum of the
images' selected logits is differentiated; in eval mode an image's logits depend only on that
image, so each image receives exactly its own gradient). All-class contributions for probe images
repeat the images once per class and use the same trick, in chunks. All analysed layers share the
forward and the backward pass.

Every function puts the model in eval mode and gives everything back as it was: module
``training`` flags, parameters' ``requires_grad`` and ``.grad``, and the random number generators.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from lightning_neurons.batch import BatchFn, BatchReader, as_model_input, read_logits
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import (
    HookSet,
    get_module,
    parse_call_site,
    selects,
)
from lightning_neurons.state import analysis_mode
from lightning_neurons.stats import dominant_neurons

__all__ = [
    "AblationResult",
    "ContributionBatch",
    "ContributionStats",
    "ClassContributions",
    "ablation_effect",
    "ablation_effects",
    "ablation_selectivity",
    "class_contributions",
    "contribution_batch",
    "domination",
    "neuron_contributions",
]


# ---- batches, model state --------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _analysis_mode(model: nn.Module, *, grad: bool) -> Iterator[None]:
    """Eval mode and frozen parameters inside, gradients on or off; everything restored on exit
    (see :func:`lightning_neurons.state.analysis_mode`)."""
    with analysis_mode(model), torch.set_grad_enabled(grad):
        yield


def _check_targets(
    targets: torch.Tensor, batch: int, num_classes: int, what: str = "targets"
) -> torch.Tensor:
    targets = torch.as_tensor(targets)
    if targets.dim() != 1 or targets.shape[0] != batch or targets.dtype.is_floating_point:
        raise NeuronsError(
            f"`{what}` must be a 1-D integer tensor with one class index per image ({batch}); got "
            f"dtype {targets.dtype} and shape {tuple(targets.shape)}"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        bad = int(targets.min()) if int(targets.min()) < 0 else int(targets.max())
        raise NeuronsError(
            f"`{what}` holds class {bad}, outside [0, {num_classes}) (the model's logits)"
        )
    return targets.long()


def _layer_names(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """The layer list (names, or ``name#call``; a module name selects each of its calls)."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise NeuronsError("`layers` is empty; name at least one layer")
    for name in names:
        get_module(model, name)
    return list(dict.fromkeys(names))


def _exact(layer: str) -> str:
    """The layer list entry selecting exactly the call site ``layer`` (``"m"`` is the first call)."""
    module, index = parse_call_site(layer)
    return f"{module}#{index}"


# ---- first order ----------------------------------------------------------------------------


@dataclass
class ContributionBatch:
    """One batch's first-order contributions (see :func:`contribution_batch`).

    Attributes:
        contributions: ``{layer: [B, K]}`` contribution of each neuron to the selected logit.
        activations: ``{layer: [B, K]}`` the neurons' activations (conv channels averaged over space).
        logits: ``[B, C]`` the model's logits.
    """

    contributions: dict[str, torch.Tensor]
    activations: dict[str, torch.Tensor]
    logits: torch.Tensor


def contribution_batch(
    model: nn.Module,
    layers: str | Sequence[str],
    x: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    output_fn: BatchFn | None = None,
) -> ContributionBatch:
    """Contributions of the layers' neurons to one logit per image, in one forward and one backward.

    The caller is responsible for eval mode (see :func:`neuron_contributions`, which handles it):
    the images of the batch must not influence each other's logits.

    Args:
        model: Maps ``x`` to ``[B, C]`` logits.
        layers: Module names; their outputs ``[B, K]`` or ``[B, K, H, W]`` are the neurons. A
            module run several times per forward pass gives one layer per call (``"relu"``,
            ``"relu#1"``, ...; ``"relu#1"`` selects that call only).
        x: ``[B, ...]`` input on the model's device.
        targets: ``[B]`` class whose logit is explained, per image; default: the predicted class.
        output_fn: Reads the logits from the model's output (see
            :func:`~lightning_neurons.batch.read_logits`).

    Returns:
        A :class:`ContributionBatch` on the model's device, detached, keyed by call site
        (float32 contributions and activations, also for a bfloat16 or float16 model).

    Raises:
        NeuronsError: For unknown layers, bad targets, a layer that is not run, or whose output
            does not depend on the input or is not batch-first.
    """
    names = _layer_names(model, layers)
    outputs: dict[str, torch.Tensor] = {}

    def capture(name: str, output: torch.Tensor) -> torch.Tensor:
        outputs[name] = output
        # the model may modify our output in place further on (ReLU(inplace=True)): hand it a copy
        return output.clone()

    x = as_model_input(x.detach(), model).clone().requires_grad_(x.is_floating_point())
    hooks = HookSet()
    try:
        hooks.add(model, names, capture)
        logits = read_logits(model(x), output_fn)
    finally:
        hooks.remove()
    batch = x.shape[0]
    if logits.shape[0] != batch:
        raise NeuronsError(
            f"the model returned {logits.shape[0]} rows of logits for {batch} images"
        )
    if targets is None:
        targets = logits.detach().argmax(dim=1)
    targets = _check_targets(targets.to(logits.device), batch, logits.shape[1]).to(logits.device)
    for spec in names:
        if not any(selects([spec], name) for name in outputs):
            raise NeuronsError(
                f"layer {spec!r} was not run by the model's forward; choose a layer on the path to the logits"
            )
    names = list(outputs)  # the call sites, in the order they ran
    acts = []
    for name in names:
        act = outputs[name]
        if act.dim() not in (2, 4) or act.shape[0] != batch:
            raise NeuronsError(
                f"layer {name!r} returned a tensor of shape {tuple(act.shape)}; neurons are read from "
                f"outputs shaped [B, K] or [B, K, H, W] with B = {batch} images"
            )
        if not act.requires_grad:
            raise NeuronsError(
                f"the output of layer {name!r} does not depend on the input; nothing flows through it"
            )
        acts.append(act)
    selected = logits.gather(1, targets.unsqueeze(1)).sum()
    grads = torch.autograd.grad(selected, acts, allow_unused=True)
    contributions, activations = {}, {}
    for name, act, grad in zip(names, acts, grads, strict=True):
        act = act.detach().float()
        grad = torch.zeros_like(act) if grad is None else grad.float()  # None: not on the path
        product = act * grad
        if act.dim() == 4:
            contributions[name] = product.sum(dim=(2, 3))
            activations[name] = act.mean(dim=(2, 3))
        else:
            contributions[name] = product
            activations[name] = act
    return ContributionBatch(contributions, activations, logits.detach().float())


def neuron_contributions(
    model: nn.Module,
    layers: str | Sequence[str],
    x: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    classes: torch.Tensor | None = None,
    chunk_size: int = 256,
    output_fn: BatchFn | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image contributions of the layers' neurons to the logits: which neurons drove *this*
    prediction.

    Args:
        model: Maps ``x`` to ``[B, C]`` logits. Run in eval mode inside; its state is restored.
        layers: Module names (outputs ``[B, K]`` or ``[B, K, H, W]``).
        x: ``[B, ...]`` images (any device; moved to the model's).
        targets: ``[B]`` class per image: the contribution to that class's logit, ``[B, K]``. ``None``:
            the contribution to **every** logit, ``[B, C, K]`` (costs about ``C`` forward and
            backward passes per image, batched in chunks of ``chunk_size`` image-class pairs).
        classes: ``[B, L]``: with ``targets`` ``None``, the contributions to these ``L`` logits of
            each image only, ``[B, L, K]`` (row ``j`` of image ``i`` explains logit
            ``classes[i, j]``): ``L`` instead of ``C`` passes per image (at 1,000 classes, e.g.
            the top 10 logits).
        chunk_size: Image-class pairs per forward/backward pass when ``targets`` is ``None``.
        output_fn: Reads the logits from the model's output.

    Returns:
        ``{layer: tensor}`` on the CPU, float32.

    Raises:
        NeuronsError: For unknown layers, bad targets or a non-positive ``chunk_size``.

    Example:
        >>> c = neuron_contributions(model, "features.relu3", x)  # doctest: +SKIP
        >>> c["features.relu3"].shape  # [images, classes, neurons]  # doctest: +SKIP
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise NeuronsError(f"`chunk_size` must be a positive integer, got {chunk_size!r}")
    names = _layer_names(model, layers)
    with _analysis_mode(model, grad=True):
        x = x.to(_device(model))
        if targets is not None:
            out = contribution_batch(model, names, x, targets, output_fn=output_fn)
            return {n: c.float().cpu() for n, c in out.contributions.items()}
        batch = x.shape[0]
        if classes is None:
            with torch.no_grad():
                num_classes = read_logits(model(as_model_input(x[:1], model)), output_fn).shape[1]
            pairs = torch.arange(batch * num_classes, device=x.device)
            image_of, class_of = pairs // num_classes, pairs % num_classes
        else:
            classes = torch.as_tensor(classes, dtype=torch.long)
            if classes.dim() != 2 or classes.shape[0] != batch:
                raise NeuronsError(
                    f"`classes` must be [images, L] = [{batch}, L] class indices, got shape "
                    f"{tuple(classes.shape)}"
                )
            num_classes = classes.shape[1]
            image_of = torch.arange(batch, device=x.device).repeat_interleave(num_classes)
            class_of = classes.to(x.device).flatten()
            pairs = image_of
        result: dict[str, torch.Tensor] = {}
        for start in range(0, pairs.numel(), chunk_size):
            sl = slice(start, start + chunk_size)
            out = contribution_batch(
                model, names, x[image_of[sl]], class_of[sl], output_fn=output_fn
            )
            for name, c in out.contributions.items():
                if name not in result:
                    result[name] = torch.zeros(batch * num_classes, c.shape[1])
                result[name][sl] = c.float().cpu()
        return {n: r.view(batch, num_classes, -1) for n, r in result.items()}


def domination(
    class_contribution: torch.Tensor, top_k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's dominant neurons and the share of its positive contribution they carry.

    Args:
        class_contribution: ``[C, K]`` mean contribution of each neuron to each class's logit
            (NaN rows, classes without images, count as no contribution).
        top_k: Neurons per class (capped at ``K``).

    Returns:
        ``(dominant, share)``: ``[C, top_k]`` neuron indices, largest contribution first, and ``[C]``
        the share of the class's total positive contribution ``sum_k max(M[c, k], 0)`` carried by
        them, in [0, 1] (0 for a class without positive contribution).

    Raises:
        NeuronsError: If ``class_contribution`` is not 2-D or ``top_k`` is not positive.

    Example:
        >>> domination(torch.tensor([[3.0, 1.0, -2.0]]), top_k=1)
        (tensor([[0]]), tensor([0.7500]))
    """
    if class_contribution.dim() != 2:
        raise NeuronsError(
            f"`class_contribution` must be [num_classes, num_neurons], got {tuple(class_contribution.shape)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise NeuronsError(f"`top_k` must be a positive integer, got {top_k!r}")
    return dominant_neurons(class_contribution, top_k)


@dataclass
class ContributionStats:
    """First-order contributions of one layer's neurons, per class (see :func:`class_contributions`).

    Tensors are on the CPU, float64; ``C`` classes, ``K`` neurons.

    Attributes:
        layer: Module name.
        counts: ``[C]`` images per class.
        class_contribution: ``[C, K]`` mean contribution of each neuron to the logit of the class,
            over the images of that class (NaN for classes without images).
        class_std: ``[C, K]`` its standard deviation over those images.
        positive_rate: ``[C, K]`` share of the class's images on which the contribution was positive.
        class_logit: ``[C]`` mean true-class logit (first order: the contributions are the parts of
            it that the layer's neurons carry).
        dominant: ``[C, top_k]`` neurons with the largest mean contribution, per class.
        domination: ``[C]`` share of the class's positive contribution carried by ``dominant``.
    """

    layer: str
    counts: torch.Tensor
    class_contribution: torch.Tensor
    class_std: torch.Tensor
    positive_rate: torch.Tensor
    class_logit: torch.Tensor
    dominant: torch.Tensor
    domination: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.class_contribution.shape[0]

    @property
    def num_neurons(self) -> int:
        return self.class_contribution.shape[1]

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """The tensors by name (for ``.npz`` files)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layer"}


class ClassContributions:
    """Streams per-class sums of contributions, batch after batch (memory ``O(C x K)``).

    Args:
        num_classes: Number of classes ``C``.
        top_k: Dominant neurons per class in the results.

    Example:
        >>> acc = ClassContributions(num_classes=10)
        >>> acc.update(contribution_batch(model, ["fc"], x, y), y)  # doctest: +SKIP
        >>> acc.compute()["fc"].class_contribution.shape  # doctest: +SKIP
    """

    def __init__(self, num_classes: int, top_k: int = 5) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise NeuronsError(f"`num_classes` must be a positive integer, got {num_classes!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise NeuronsError(f"`top_k` must be a positive integer, got {top_k!r}")
        self.num_classes = num_classes
        self.top_k = top_k
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.logit_sum = torch.zeros(num_classes, dtype=torch.float64)
        self._sums: dict[str, list[torch.Tensor]] = {}

    def update(self, batch: ContributionBatch, labels: torch.Tensor) -> None:
        """Add a batch whose contributions were taken for the true-class logits ``labels``."""
        labels = labels.detach().to("cpu", torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise NeuronsError(
                f"label {int(labels.max())} is outside [0, {self.num_classes}); pass the right `num_classes`"
            )
        onehot = torch.nn.functional.one_hot(labels, self.num_classes).to(torch.float64).T  # [C, B]
        self.counts += onehot.sum(dim=1)
        true_logit = (
            batch.logits.detach().to("cpu", torch.float64).gather(1, labels.unsqueeze(1))[:, 0]
        )
        self.logit_sum += onehot @ true_logit
        for name, c in batch.contributions.items():
            c = c.detach().to("cpu", torch.float64)
            if name not in self._sums:
                zeros = torch.zeros(self.num_classes, c.shape[1], dtype=torch.float64)
                self._sums[name] = [zeros, zeros.clone(), zeros.clone()]
            total, total_sq, positive = self._sums[name]
            total += onehot @ c
            total_sq += onehot @ (c * c)
            positive += onehot @ (c > 0).to(torch.float64)

    def compute(self) -> dict[str, ContributionStats]:
        """The per-class statistics of every layer seen so far."""
        count = self.counts.unsqueeze(1)
        has = count > 0
        results = {}
        for name, (total, total_sq, positive) in self._sums.items():
            mean = torch.where(has, total / count.clamp_min(1), torch.full_like(total, math.nan))
            var = (
                torch.where(has, total_sq / count.clamp_min(1), torch.full_like(total, math.nan))
                - mean * mean
            )
            dominant, share = dominant_neurons(mean, self.top_k)
            results[name] = ContributionStats(
                layer=name,
                counts=self.counts.clone(),
                class_contribution=mean,
                class_std=var.clamp_min(0).sqrt(),
                positive_rate=torch.where(
                    has, positive / count.clamp_min(1), torch.full_like(total, math.nan)
                ),
                class_logit=torch.where(
                    has[:, 0],
                    self.logit_sum / self.counts.clamp_min(1),
                    torch.full_like(self.logit_sum, math.nan),
                ),
                dominant=dominant,
                domination=share,
            )
        return results


def _limited(batches: Iterable[Any], max_batches: int | None) -> Iterator[Any]:
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise NeuronsError(f"`max_batches` must be a positive integer or None, got {max_batches!r}")
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def class_contributions(
    model: nn.Module,
    layers: str | Sequence[str],
    dataloader: Iterable[Any],
    *,
    num_classes: int | None = None,
    top_k: int = 5,
    max_batches: int | None = None,
    label_fn: BatchFn | None = None,
    input_fn: BatchFn | None = None,
    output_fn: BatchFn | None = None,
) -> dict[str, ContributionStats]:
    """Per class, the mean contribution of each neuron to the true class's logit, streamed.

    One forward and one backward pass per batch serve every layer; only ``[C, K]`` sums are kept.

    Args:
        model: Maps images to ``[B, C]`` logits. Run in eval mode; its state is restored.
        layers: Module names.
        dataloader: Any iterable of ``(x, y, ...)`` batches (or see ``label_fn`` / ``input_fn``).
        num_classes: Default: the width of the logits.
        top_k: Dominant neurons per class.
        max_batches: Use at most this many batches (default: all).
        label_fn: Reads the ``[B]`` labels from a batch of another layout.
        input_fn: Reads the model input from a batch of another layout.
        output_fn: Reads the logits from the model's output.

    Returns:
        ``{layer: ContributionStats}``.

    Raises:
        NeuronsError: For unknown layers, bad batches or labels, an empty loader, bad arguments.

    Example:
        >>> stats = class_contributions(model, ["features.relu3"], dm.val_dataloader())  # doctest: +SKIP
        >>> stats["features.relu3"].domination  # doctest: +SKIP
    """
    names = _layer_names(model, layers)
    reader = BatchReader(input_fn=input_fn, label_fn=label_fn, output_fn=output_fn)
    acc: ClassContributions | None = None
    with _analysis_mode(model, grad=True):
        device = _device(model)
        for batch in _limited(dataloader, max_batches):
            x = reader.inputs(batch).to(device)
            y = reader.labels(batch).to(device)
            out = contribution_batch(model, names, x, y, output_fn=output_fn)
            if acc is None:
                acc = ClassContributions(num_classes or out.logits.shape[1], top_k)
            acc.update(out, y)
    if acc is None:
        raise NeuronsError("the data loader gave no batch; nothing to analyse")
    return acc.compute()


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
        >>> res = ablation_effects(model, "features.relu3", {"a": [0, 4], "b": [7]}, loader)  # doctest: +SKIP
        >>> res["a"].accuracy_drop  # doctest: +SKIP
    """
    module = get_module(model, layer)
    site = _exact(layer)
    if isinstance(sets_per_pass, bool) or not isinstance(sets_per_pass, int) or sets_per_pass < 1:
        raise NeuronsError(f"`sets_per_pass` must be a positive integer, got {sets_per_pass!r}")
    width = _width(module) if not isinstance(module, nn.Sequential) else None
    names = list(neuron_sets)
    sets = [_neuron_set(name, neuron_sets[name], width) for name in names]
    if not sets:
        return {}
    reader = BatchReader(input_fn=input_fn, label_fn=label_fn, output_fn=output_fn)
    state: dict[str, Any] = {"chunk": None, "shared": share_prefix is True}

    def hook(_name: str, out: torch.Tensor) -> torch.Tensor | None:
        chunk = state["chunk"]
        if chunk is None:  # a forward outside our passes
            return None
        if out.dim() not in (2, 4):
            raise NeuronsError(
                f"layer {layer!r} returned shape {tuple(out.shape)}; ablation needs [B, K] or [B, K, H, W]"
            )
        num_neurons = out.shape[1]
        for name, index in zip(names, sets, strict=True):
            if index.numel() and int(index.max()) >= num_neurons:
                raise NeuronsError(
                    f"neuron set {name!r} holds index {int(index.max())}, but layer {layer!r} has "
                    f"{num_neurons} neurons (valid: 0 to {num_neurons - 1})"
                )
        copies = 1 + len(chunk)
        keep = torch.ones(copies, num_neurons, dtype=torch.bool, device=out.device)
        for row, index in enumerate(chunk, start=1):
            keep[row, index.to(out.device)] = False
        if state["shared"]:
            grouped = out.unsqueeze(0).expand(copies, *out.shape)
        elif out.shape[0] % copies == 0:
            grouped = out.view(copies, out.shape[0] // copies, *out.shape[1:])
        else:
            raise NeuronsError(
                f"layer {layer!r} saw {out.shape[0]} rows, not a multiple of the {copies} copies of the batch"
            )
        mask = keep.view(copies, 1, num_neurons, *([1] * (out.dim() - 2)))
        return grouped.masked_fill(~mask, 0).reshape(-1, *out.shape[1:])

    counts: torch.Tensor | None = None
    correct: torch.Tensor | None = None  # [1 + S, C]: row 0 is the baseline
    logit_sum: torch.Tensor | None = None
    hooks = HookSet()
    hooks.add(model, [site], hook)  # that call of the module only
    try:
        with _analysis_mode(model, grad=False):
            device = _device(model)
            for batch in _limited(dataloader, max_batches):
                x = as_model_input(reader.inputs(batch), model)
                y = reader.labels(batch).to(device)
                batch_size = x.shape[0]
                if share_prefix == "auto":
                    state["shared"] = share_prefix = _can_share_prefix(
                        model, x[:2], sets[:sets_per_pass], state, reader
                    )
                for start in range(0, len(sets), sets_per_pass):
                    chunk = sets[start : start + sets_per_pass]
                    copies = 1 + len(chunk)
                    state["chunk"] = chunk
                    inputs = x if state["shared"] else x.repeat(copies, *([1] * (x.dim() - 1)))
                    logits = reader.logits(model(inputs))
                    state["chunk"] = None
                    if logits.shape[0] != copies * batch_size:
                        raise NeuronsError(
                            f"the model returned {logits.shape[0]} rows of logits for {copies * batch_size} "
                            "images; with `share_prefix=True` the layer must lie on a path that carries "
                            "the whole batch"
                        )
                    logits = logits.view(copies, batch_size, -1).double()
                    num_classes = logits.shape[2]
                    labels = _check_targets(y, batch_size, num_classes, "labels")
                    onehot = torch.nn.functional.one_hot(labels, num_classes).double()  # [B, C]
                    hit = (logits.argmax(dim=2) == labels.unsqueeze(0)).double()  # [copies, B]
                    true_logit = logits.gather(2, labels.view(1, -1, 1).expand(copies, -1, 1))[
                        ..., 0
                    ]
                    if correct is None:
                        correct = torch.zeros(
                            1 + len(sets), num_classes, dtype=torch.float64, device=device
                        )
                        logit_sum = torch.zeros_like(correct)
                        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
                    # copy 0 (the baseline) is counted once per batch, from the first chunk
                    first = 0 if start == 0 else 1
                    rows = [0, *range(1 + start, 1 + start + len(chunk))][first:]
                    correct[rows] += hit[first:] @ onehot
                    logit_sum[rows] += true_logit[first:] @ onehot
                    if start == 0:
                        counts += onehot.sum(dim=0)
    finally:
        hooks.remove()
        state["chunk"] = None
    if correct is None or counts is None or logit_sum is None:
        raise NeuronsError("the data loader gave no batch; nothing to analyse")
    per_class = counts.clamp_min(1)
    nan = torch.full_like(counts, math.nan)
    accuracy = torch.where(counts > 0, correct / per_class, nan).cpu()
    logit = torch.where(counts > 0, logit_sum / per_class, nan).cpu()
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
    state: dict[str, Any],
    reader: BatchReader,
) -> bool:
    """Whether running the layers before the ablated one once gives the same logits as repeating
    the input (it does unless something bypasses the layer, e.g. a skip connection)."""
    copies = 1 + len(chunk)
    try:
        state.update(chunk=chunk, shared=False)
        reference = reader.logits(model(x.repeat(copies, *([1] * (x.dim() - 1))))).float()
        state["shared"] = True
        try:
            shared = reader.logits(model(x)).float()
        except (RuntimeError, ValueError):  # shapes that do not fit: a bypass of the layer
            return False
    finally:
        state.update(chunk=None, shared=False)
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
        >>> res = ablation_effect(model, "features.relu3", [3, 17], dm.val_dataloader())  # doctest: +SKIP
        >>> res.accuracy_drop  # [num_classes]  # doctest: +SKIP
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
