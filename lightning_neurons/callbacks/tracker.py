"""ActivationTracker: per-class streaming statistics of chosen layers' neurons."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_neurons.callbacks._base import (
    OnError,
    StagedCallback,
    check_choice,
    check_positive_int,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import (
    HookSet,
    call_site,
    reduce_activation,
    resolve_layers,
    selects,
    signed_layers,
)
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.stats import ClassNeuronStats, LayerStats

Stage = Literal["validation", "train", "test"]
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def extract_labels(
    batch: Any, label_fn: Callable[[Any], torch.Tensor] | None = None
) -> torch.Tensor:
    """The integer class labels of a batch.

    Args:
        batch: ``(x, y, ...)`` tuple or list, or a mapping with a ``label``, ``labels``, ``target``,
            ``targets`` or ``y`` key.
        label_fn: Takes the batch and returns the labels, for other layouts.

    Returns:
        ``[B]`` int64 labels.

    Raises:
        NeuronsError: If the batch has no labels or they are not integer class indices.
    """
    if label_fn is not None:
        labels = label_fn(batch)
    elif isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise NeuronsError(
                f"the batch is a mapping with keys {sorted(map(str, batch))} but none of "
                f"{', '.join(LABEL_KEYS)}; neuron statistics are per class, so they need labels. "
                "Pass `label_fn=lambda batch: batch['my_key']` to ActivationTracker."
            )
        labels = batch[key]
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
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise NeuronsError(
            f"labels must be a 1-D tensor of integer class indices; got dtype {labels.dtype} and "
            f"shape {tuple(labels.shape)}. For one-hot or soft labels pass "
            "`label_fn=lambda batch: batch[1].argmax(dim=1)`."
        )
    return labels.long()


def infer_num_classes(model: nn.Module) -> int | None:
    """The class count from ``num_classes`` (attribute or hparams) or the last Linear's width."""
    for source in (model, getattr(model, "hparams", {})):
        value = (
            source.get("num_classes")
            if isinstance(source, Mapping)
            else getattr(source, "num_classes", None)
        )
        if isinstance(value, int) and value > 0:
            return value
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


class ActivationTracker(StagedCallback):
    """Streams per-class statistics of the neurons of chosen layers, epoch after epoch.

    A neuron is a channel of a conv layer (its feature map reduced over space by ``reduction``) or
    a unit of a linear layer. For every tracked layer the tracker sums, per class and neuron, the
    count, sum, sum of squares, maximum and firing count of the activations (torchmetrics states
    reduced by sum over DDP ranks; nothing is stored per image) and derives the class profile,
    class selectivity, dead neurons and each class's dominant neurons.

    Other analyses (:class:`FeatureVisualizer`, clustering, contribution) read these results via
    :meth:`finalize` rather than hooking the model again.

    Args:
        layers: Module names as in ``pl_module.named_modules()``; glob patterns allowed
            (``"features.*"``). A module run several times per forward pass (a shared
            activation) gives one layer per call: ``"layer1.0.relu"`` (first call) and
            ``"layer1.0.relu#1"`` (second call); ``"name#i"`` selects call ``i`` only (see
            :mod:`lightning_neurons.hooks`). Default: the responses of the network, i.e. its
            activation modules and block outputs (:func:`~lightning_neurons.hooks.default_layers`).
            Signed layers (Conv, Linear, BatchNorm outputs) picked here are analysed with the
            conventions of :func:`~lightning_neurons.stats.selectivity_index` (a one-time warning
            says so).
        reduction: How a conv channel's ``[H, W]`` map becomes one value: ``"mean"`` or ``"max"``.
        stage: ``"validation"`` (default) or ``"test"`` gather statistics on those batches;
            ``"train"`` piggy-backs on the training batches (no extra forward passes; the model is
            in training mode then).
        every_n_epochs: Analyse every n-th epoch.
        top_k: Dominant neurons per class.
        num_classes: Class count; default: the model's ``num_classes`` or its last Linear's width.
        label_fn: Reads the ``[B]`` integer labels from a batch of another layout.
        max_batches: Analyse at most this many batches per epoch (default: all).
        enable_logging: Log figures, histograms and scalars and write the numbers to files.
        on_error: ``"warn"`` or ``"raise"`` when logging fails (see :class:`AnalysisCallback`).

    Example:
        >>> tracker = ActivationTracker(layers=["features.conv2", "features.conv3"])
        >>> trainer = Trainer(callbacks=[tracker])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> tracker.results["features.conv3"].selectivity  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        reduction: Literal["mean", "max"] = "mean",
        stage: Stage = "validation",
        every_n_epochs: int = 1,
        top_k: int = 5,
        num_classes: int | None = None,
        label_fn: Callable[[Any], torch.Tensor] | None = None,
        max_batches: int | None = None,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, on_error=on_error)
        if layers is not None and (isinstance(layers, str) or not isinstance(layers, Sequence)):
            layers = [layers] if isinstance(layers, str) else layers
        self.layer_patterns = list(layers) if layers is not None else None
        self.reduction = check_choice("reduction", reduction, ("mean", "max"))
        self.stage = check_choice("stage", stage, ("validation", "train", "test"))
        self.top_k = check_positive_int("top_k", top_k)
        self.num_classes = (
            None if num_classes is None else check_positive_int("num_classes", num_classes)
        )
        self.max_batches = (
            None if max_batches is None else check_positive_int("max_batches", max_batches)
        )
        self.label_fn = label_fn
        self.enable_logging = enable_logging
        self.layers: list[str] = []
        self.results: dict[str, LayerStats] = {}
        self._metrics: dict[str, ClassNeuronStats] = {}
        self._hooks = HookSet()
        self._labels: torch.Tensor | None = None
        self._batches = 0
        self._collecting = False
        self._pending_epoch: int | None = None
        self._saved_states: dict[str, dict[str, torch.Tensor]] = {}
        self._saved_epoch: int = -1
        self._noted: set[str] = set()

    # ---- identity and checkpointing ------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layer_patterns, reduction=self.reduction, stage=self.stage
        )

    def state_dict(self) -> dict[str, Any]:
        states = {
            name: {k: v.detach().cpu().clone() for k, v in s.items()}
            for name, s in self._saved_states.items()
        }
        return {
            "layers": list(self.layers),
            "states": states,
            "epoch": self._saved_epoch,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_states = {k: dict(v) for k, v in state_dict.get("states", {}).items()}
        self._saved_epoch = int(state_dict.get("epoch", -1))
        self.num_classes = self.num_classes or state_dict.get("num_classes")
        self.results = {
            name: LayerStats.from_state(
                name, s, epoch=self._saved_epoch, reduction=self.reduction, top_k=self.top_k
            )
            for name, s in self._saved_states.items()
        }

    # ---- Lightning hooks -----------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.layers = resolve_layers(pl_module, self.layer_patterns)
        self._note_signed(pl_module)
        if self.num_classes is None:
            self.num_classes = infer_num_classes(pl_module)
        if self.num_classes is None:
            raise NeuronsError(
                f"ActivationTracker could not tell how many classes {type(pl_module).__name__} "
                "predicts (no `num_classes` attribute or hyper-parameter, no Linear layer); pass "
                "`num_classes=` to ActivationTracker."
            )

    # Lightning's per-stage hooks arrive here (see StagedCallback); only ``self.stage`` counts.
    def _stage_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self.stage:
            self._start(trainer, pl_module)

    def _stage_batch_start(self, stage: str, batch: Any) -> None:
        if stage == self.stage:
            self._batch_start(batch)

    def _stage_batch_end(self, stage: str) -> None:
        self._labels = None

    def _stage_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self.stage:
            self.finalize(trainer)

    def _release(self) -> None:
        self._stop()

    # ---- the seam for other analyses ------------------------------------------------------------

    def finalize(self, trainer: Trainer) -> dict[str, LayerStats]:
        """Finish the epoch being gathered (if any) and return the latest results.

        Analyses that read the tracker call this from their own epoch-end hooks **on every rank**
        (the statistics are summed over DDP ranks here), so the order of callbacks does not
        matter. Calling it again in the same epoch returns the same results.

        Returns:
            ``{layer_name: LayerStats}``; empty when no epoch has been analysed yet.
        """
        if self._pending_epoch is None:
            return self.results
        epoch = self._pending_epoch
        self._pending_epoch = None
        self._stop()
        self._note_calls()
        states = {name: metric.compute() for name, metric in self._metrics.items()}
        self._saved_states = {
            n: {k: v.detach().cpu().clone() for k, v in s.items()} for n, s in states.items()
        }
        self._saved_epoch = epoch
        self.results = {
            name: LayerStats.from_state(
                name, s, epoch=epoch, reduction=self.reduction, top_k=self.top_k
            )
            for name, s in states.items()
            if s["images"].sum() > 0
        }
        self._warn_nan()
        if self.enable_logging and self.results:
            self._run_safely("logging activation statistics", lambda: self._log(trainer))
        return self.results

    # ---- internals ----------------------------------------------------------------------------

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop()
        if not self._due(trainer):
            return
        with torch.inference_mode(False):
            for metric in self._metrics.values():
                metric.reset()
        self._batches = 0
        self._collecting = True
        self._pending_epoch = trainer.current_epoch
        self._hooks.add(pl_module, self.layers, self._on_activation)

    def _stop(self) -> None:
        self._hooks.remove()
        self._labels = None
        self._collecting = False

    def _batch_start(self, batch: Any) -> None:
        if not self._collecting:
            return
        if self.max_batches is not None and self._batches >= self.max_batches:
            self._labels = None
            return
        self._batches += 1
        self._hooks.new_pass()
        labels = extract_labels(batch, self.label_fn)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise NeuronsError(
                f"label {low if low < 0 else high} is outside [0, {self.num_classes}); the model "
                f"predicts {self.num_classes} classes. Pass the right `num_classes=` to "
                "ActivationTracker, or check the labels."
            )
        self._labels = labels

    def _metric(self, name: str, num_neurons: int, device: torch.device) -> ClassNeuronStats:
        metric = self._metrics.get(name)
        if metric is None or metric.num_neurons != num_neurons:
            with torch.inference_mode(False):
                metric = ClassNeuronStats(self.num_classes, num_neurons).to(device)
            self._metrics[name] = metric
        return metric

    def _on_activation(self, name: str, output: torch.Tensor) -> None:
        labels = self._labels
        if labels is None:
            return  # a forward outside a tracked batch (e.g. another analysis rendering)
        with torch.no_grad():
            output = output.detach()
            values = reduce_activation(output, self.reduction, name)
            peak = (
                output.amax(dim=(2, 3))
                if output.dim() == 4 and self.reduction == "mean"
                else values
            )
            if values.shape[0] != labels.shape[0]:
                raise NeuronsError(
                    f"layer {name!r} produced {values.shape[0]} rows for a batch of {labels.shape[0]} "
                    "labels; track layers whose first dimension is the batch."
                )
            self._metric(name, values.shape[1], values.device).update(
                values, labels.to(values.device), peak
            )

    def _note_signed(self, pl_module: LightningModule) -> None:
        signed = [n for n in signed_layers(pl_module, self.layers) if n not in self._noted]
        if signed:
            self._noted.update(signed)
            rank_zero_warn(
                f"ActivationTracker: {', '.join(signed)} output signed values (convolution, Linear or "
                "normalisation layers, before the nonlinearity). Selectivity is then measured on "
                "each neuron's class means shifted so that the smallest is 0, 'dead' means never "
                "positive and dominance counts positive means only; zeroing such a neuron is not a "
                "knock-out. The default layers (activations and block outputs) are responses."
            )

    def _note_calls(self) -> None:
        """Once: modules that ran several times per forward pass (one layer per call), and
        named calls that never ran."""
        for module, runs in self._hooks.calls.items():
            if runs > 1 and module not in self._noted:
                self._noted.add(module)
                sites = [call_site(module, i) for i in range(runs)]
                tracked = [s for s in sites if selects(self.layers, s)]
                rank_zero_warn(
                    f"ActivationTracker: module {module!r} runs {runs} times per forward pass; each "
                    f"call is its own layer ({', '.join(sites)}); tracked: {', '.join(tracked)}."
                )
        for spec in self.layers:
            if spec in self._noted or not self._batches:
                continue
            if not any(selects([spec], name) for name in self._metrics):
                self._noted.add(spec)
                module = spec.split("#")[0]
                runs = self._hooks.calls.get(module, 0)
                rank_zero_warn(
                    f"ActivationTracker: layer {spec!r} did not run in the forward passes of this "
                    f"epoch (module {module!r} ran {runs} time(s) per pass); it has no statistics."
                )

    def _warn_nan(self) -> None:
        for name, res in self.results.items():
            bad = int(res.nan_counts.sum())
            if bad:
                neurons = int((res.nan_counts > 0).sum())
                rank_zero_warn(
                    f"ActivationTracker: layer {name!r} gave {bad} non-finite (NaN/inf) activations in "
                    f"{neurons} of {res.num_neurons} neurons in epoch {res.epoch}; they were left out "
                    "of the statistics (see `results[...].nan_counts`). Check the learning rate and "
                    "the input data."
                )

    def _log(self, trainer: Trainer) -> None:
        from lightning_neurons.plots.activation import class_profile_heatmap

        out = AnalysisLogger(trainer, "activations", owner=self)
        if not out.is_writer:
            return
        scalars: dict[str, float] = {}
        for name, res in self.results.items():
            out.figure(out.tag(name, "class_profile"), class_profile_heatmap(res))
            out.histogram(out.tag(name, "selectivity"), res.selectivity)
            overall = (res.class_means * res.counts.unsqueeze(1)).nansum(dim=0) / res.counts.sum()
            out.histogram(out.tag(name, "mean_activation"), overall)
            scalars[out.tag(name, "dead_fraction")] = float(res.dead.double().mean())
            scalars[out.tag(name, "mean_selectivity")] = float(res.selectivity.nanmean())
            scalars[out.tag(name, "mean_domination")] = float(res.domination.mean())
            scalars[out.tag(name, "nan_count")] = float(res.nan_counts.sum())
            out.save_arrays(
                name,
                res.as_arrays(),
                meta={
                    "layer": name,
                    "reduction": res.reduction,
                    "stage": self.stage,
                    "epoch": res.epoch,
                },
            )
        out.scalars(scalars)
