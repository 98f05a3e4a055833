"""Contributions averaged per class, streamed, and how each class is dominated by its neurons.

"Averaged per class" means here: for each class ``c``, the first-order contribution
(:mod:`lightning_neurons.contribution`) of each neuron to the **true class's** logit ``z_c``,
averaged over the images of class ``c`` -> ``[num_classes, num_neurons]``
(:func:`class_contributions`, streamed by :class:`ClassContributions`: sums only, nothing stored
per image, added up over DDP processes).

**Domination.** Per class, the share of its total positive (mean) contribution that its top-k
neurons carry (:func:`domination`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from lightning_neurons.batch import BatchFn, BatchReader, check_label_range
from lightning_neurons.checks import check_positive_int
from lightning_neurons.contribution import ContributionBatch, contribution_batch, layer_list
from lightning_neurons.errors import NeuronsError
from lightning_neurons.loaders import limited_batches
from lightning_neurons.state import analysis_mode, model_device
from lightning_neurons.stats import (
    ClassNeuronStats,
    class_means,
    class_std,
    dominant_neurons,
    finite_counts,
)

__all__ = ["ClassContributions", "ContributionStats", "class_contributions", "domination"]


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

    Tensors are on the CPU; the ``[C, K]`` statistics float32 (computed in float64 from float64
    sums), the ``[C]`` ones float64; ``C`` classes, ``K`` neurons.

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


#: The states of :class:`~lightning_neurons.stats.ClassNeuronStats` that processes add up.
SUMMED_STATES = ("images", "sum", "sum_sq", "fired", "nan")
#: The name of the true-class logit's sums in :meth:`ClassContributions.sums`.
LOGIT_KEY = "<logit>"


class ClassContributions:
    """Streams per-class sums of contributions, batch after batch (memory ``O(C x K)``).

    The sums are :class:`~lightning_neurons.stats.ClassNeuronStats` (the torchmetrics metric of
    the activation statistics), one per layer and one for the true-class logit, on the device the
    contributions were computed on. They are not synchronised by torchmetrics (the analysis runs
    on some batches, outside the metric's own sync): processes that each analysed their own
    batches add up :meth:`sums` (e.g. with
    :func:`~lightning_neurons.distributed.sum_over_ranks`) and :meth:`load_sums` the totals
    before :meth:`compute`.

    Args:
        num_classes: Number of classes ``C``.
        top_k: Dominant neurons per class in the results.

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> model = SmallCNN(widths=(8, 16, 32)).eval()
        >>> x, y = torch.rand(20, 1, 16, 16), torch.arange(20) % 10
        >>> acc = ClassContributions(num_classes=10)
        >>> acc.update(contribution_batch(model, ["features.relu3"], x, y), y)
        >>> acc.compute()["features.relu3"].class_contribution.shape  # [classes, neurons]
        torch.Size([10, 32])
    """

    def __init__(self, num_classes: int, top_k: int = 5) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.top_k = check_positive_int("top_k", top_k)
        self._logit = self._metric(1)
        self._sums: dict[str, ClassNeuronStats] = {}

    def _metric(self, num_neurons: int, device: torch.device | None = None) -> ClassNeuronStats:
        return ClassNeuronStats(
            self.num_classes, num_neurons, track_max=False, sync_on_compute=False, device=device
        )

    def update(self, batch: ContributionBatch, labels: torch.Tensor) -> None:
        """Add a batch whose contributions were taken for the true-class logits ``labels``."""
        # the sums live where the contributions are computed (the model's device), not in host
        # memory; under DDP the totals come back to the host (see sum_over_ranks)
        device = batch.logits.device
        labels = labels.detach().long()
        # checked where the labels are (NeuronContribution's kept labels: on the host)
        check_label_range(labels, self.num_classes, "ClassContributions")
        labels = labels.to(device)
        self._logit = self._logit.to(device)
        logits = batch.logits.detach().to(torch.float64)
        self._logit.update(logits.gather(1, labels.unsqueeze(1)), labels)
        for name, c in batch.contributions.items():
            if name not in self._sums:
                self._sums[name] = self._metric(c.shape[1], device)
            self._sums[name].update(c.detach().to(device, torch.float64), labels)

    def sums(self) -> dict[str, torch.Tensor]:
        """Every summed state, by ``"<layer>/<state>"`` (``"<logit>/<state>"`` for the true-class
        logit), layers in the order they were first updated: what processes add up. The maxima
        are left out (:meth:`compute` does not use them)."""
        metrics = {LOGIT_KEY: self._logit, **self._sums}
        return {
            f"{name}/{state}": getattr(metric, state)
            for name, metric in metrics.items()
            for state in SUMMED_STATES
        }

    def load_sums(self, sums: dict[str, torch.Tensor]) -> None:
        """Replace the sums by ``sums`` (as :meth:`sums` gives them; e.g. added up over
        processes); layers not seen here are added, in the order of ``sums``."""
        names = list(dict.fromkeys(key.rpartition("/")[0] for key in sums))
        metrics = {}
        for name in names:
            width = sums[f"{name}/sum"].shape[1]
            metric = self._logit if name == LOGIT_KEY else self._metric(width)
            for state in SUMMED_STATES:
                current = getattr(metric, state)
                setattr(metric, state, sums[f"{name}/{state}"].to(dtype=current.dtype))
            metrics[name] = metric
        self._logit = metrics.pop(LOGIT_KEY, self._logit)
        self._sums = metrics

    def compute(self, release: bool = False) -> dict[str, ContributionStats]:
        """The per-class statistics of every layer seen so far.

        The ``[C, K]`` statistics are computed in float64 from the float64 sums and kept in
        float32 (7 significant digits, as many as the float32 gradients and activations they
        come from), at half the memory of float64.

        Args:
            release: Drop each layer's sums once its statistics are computed (the peak memory is
                then the results and one layer's sums; no later :meth:`compute` or :meth:`sums`).
        """
        logit = _summed(self._logit)  # not Metric.compute(): loaded sums have no update
        class_logit = class_means(logit["sum"], finite_counts(logit))[:, 0].cpu()
        results = {}
        f32 = torch.float32
        for name in list(self._sums):
            s = _summed(self._sums.pop(name) if release else self._sums[name])
            count = finite_counts(s)
            mean = class_means(s["sum"], count)
            dominant, share = dominant_neurons(mean, self.top_k)
            results[name] = ContributionStats(
                layer=name,
                counts=s["images"].to("cpu", copy=True),
                class_contribution=mean.to("cpu", f32),
                class_std=class_std(s["sum"], s["sum_sq"], count).to("cpu", f32),
                positive_rate=class_means(
                    s["fired"].float(), s["images"].unsqueeze(1).expand_as(mean).float()
                ).cpu(),
                class_logit=class_logit.clone(),
                dominant=dominant.cpu(),
                domination=share.cpu(),
            )
            del s, count, mean
        return results


def _summed(metric: ClassNeuronStats) -> dict[str, torch.Tensor]:
    return {state: getattr(metric, state) for state in SUMMED_STATES}


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
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_neurons.models import SmallCNN
        >>> model = SmallCNN(widths=(8, 16, 32)).eval()  # 10 classes; train it first
        >>> images, labels = torch.rand(40, 1, 16, 16), torch.arange(40) % 10
        >>> loader = DataLoader(TensorDataset(images, labels), batch_size=20)
        >>> stats = class_contributions(model, ["features.relu3"], loader)
        >>> stats["features.relu3"].domination.shape  # one value per class
        torch.Size([10])
    """
    names = layer_list(model, layers)
    reader = BatchReader(input_fn=input_fn, label_fn=label_fn, output_fn=output_fn)
    acc: ClassContributions | None = None
    with analysis_mode(model):
        device = model_device(model)
        for batch in limited_batches(dataloader, max_batches):
            x = reader.inputs(batch).to(device)
            y = reader.labels(batch).to(device)
            out = contribution_batch(model, names, x, y, output_fn=output_fn)
            if acc is None:
                acc = ClassContributions(num_classes or out.logits.shape[1], top_k)
            acc.update(out, y)
    if acc is None:
        raise NeuronsError("the data loader gave no batch; nothing to analyse")
    return acc.compute()
