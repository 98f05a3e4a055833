"""ActivationTracker: per-class streaming statistics of chosen layers' neurons."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, overload

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_neurons.activations import check_activations
from lightning_neurons.batch import BatchFn, BatchReader, LabelRange, as_model_input
from lightning_neurons.callbacks._base import (
    OnError,
    StageBatch,
    StagedCallback,
    checked_options,
    class_names_of,
    find_callback,
)
from lightning_neurons.callbacks._evolution_log import NeuronEvolutionLog
from lightning_neurons.callbacks._tracker_log import log_results
from lightning_neurons.callbacks._tracker_notes import TrackerNotes
from lightning_neurons.checks import Constraints, Interval, Options
from lightning_neurons.defaults import infer_num_classes
from lightning_neurons.deferred import Deferral
from lightning_neurons.errors import NeuronsError
from lightning_neurons.grouped import (
    GROUP_VALUES,
    OutputGroups,
    Reduced,
    learn_layers,
    reduce_together,
)
from lightning_neurons.held import HeldBatches
from lightning_neurons.hooks import (
    HookSet,
    resolve_layers,
    signed_layers,
    split_call,
)
from lightning_neurons.layouts import held_values
from lightning_neurons.loaders import LoaderRows, analysed_rows, stage_loaders
from lightning_neurons.results import TrackerSpec
from lightning_neurons.state import in_analysis
from lightning_neurons.stats import ClassNeuronStats, LayerStats

Stage = Literal["validation", "train", "test"]
Reduction = Literal["mean", "max"]


class ActivationTracker(StagedCallback):
    """Streams per-class statistics of the neurons of chosen layers, epoch after epoch.

    A neuron is a channel of a conv layer (its feature map reduced over space by ``reduction``), a
    unit of a linear layer, or a feature of a transformer's ``[B, N, D]`` tokens (reduced over
    the tokens; see :mod:`lightning_neurons.layouts`). For every tracked layer the tracker sums,
    per class and neuron, the count, sum, sum of squares, maximum and firing count of the
    activations (torchmetrics states reduced by sum over DDP ranks; nothing is stored per image)
    and derives the class profile, class selectivity, dead neurons and each class's dominant
    neurons.

    The statistics are published in :attr:`results` (``{layer: LayerStats}``) at the end of each
    analysed epoch of ``stage``; the other analyses (:class:`FeatureVisualizer`, clustering,
    contribution) read them at the end of the stage rather than hooking the model again. What the
    tracker tracks and how it reads batches (its ``input_fn``, ``label_fn`` and ``output_fn``,
    layers, stage, loader, reduction, class count) is its :attr:`spec`, a read-only
    :class:`~lightning_neurons.results.TrackerSpec` that peers look up with :func:`tracker_spec`;
    they read the statistics with :func:`tracker_results`.

    Every image is counted once: only the loader ``dataloader_idx`` is analysed, and under DDP the
    samples that :class:`~torch.utils.data.DistributedSampler` repeats to even out the processes
    are left out (see :class:`~lightning_neurons.loaders.LoaderRows`). The batch layout and labels
    are checked on the first batch the model sees (the sanity check included).

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
        activations: More activation classes (``"Swish"``, ``"timm.layers.activations.GELU"``)
            and functional ops (``"sigmoid"``) for the default layers, beyond those recognised
            (see :mod:`lightning_neurons.activations`); the other callbacks use the tracker's.
        reduction: How a conv channel's ``[H, W]`` map (a transformer neuron's tokens) becomes
            one value: ``"mean"`` or ``"max"``.
        stage: ``"validation"`` (default) or ``"test"`` gather statistics on those batches;
            ``"train"`` piggy-backs on the training batches (no extra forward passes; the model is
            in training mode then).
        every_n_epochs: Analyse every n-th epoch.
        within_epochs: Validations within an epoch too (``False``: its last only).
        top_k: Dominant neurons per class.
        num_classes: Class count; default: the model's ``num_classes`` or its last Linear's width
            (2 for a binary classifier's one logit, read as two classes: see
            :func:`~lightning_neurons.batch.read_logits`).
        label_fn: Reads the labels (``[B]`` class indices or ``[B, C]`` class probabilities,
            read as their top class) from a batch of another layout.
        input_fn: Reads the model input from a batch of another layout.
        output_fn: Reads the ``[B, C]`` logits from the model's output when it is not a tensor,
            a tuple/list with the logits first, or a mapping with a ``"logits"`` entry.
        dataloader_idx: With several validation (or test) loaders, the one analysed (the others
            are left out, with one warning).
        max_batches: Analyse at most this many batches per epoch (default: all).
        enable_logging: Log figures, histograms and scalars and write the numbers to files.
        on_error: ``"warn"`` or ``"raise"`` when logging fails (see :class:`AnalysisCallback`).

    Example:
        >>> tracker = ActivationTracker(layers=["backbone.features.relu2", "backbone.features.relu3"])
        >>> trainer = Trainer(callbacks=[tracker])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # an ImageClassifier(SmallCNN()), say  # doctest: +SKIP
        >>> tracker.results["backbone.features.relu3"].selectivity  # [neurons]  # doctest: +SKIP
    """

    _parameter_constraints: ClassVar[Constraints] = {
        **StagedCallback._parameter_constraints,
        "reduction": [Options.of(Reduction)],
        "stage": [Options.of(Stage)],
        "top_k": [Interval(int, 1, None)],
        "num_classes": [Interval(int, 1, None), None],
        "label_fn": ["callable", None],
        "input_fn": ["callable", None],
        "output_fn": ["callable", None],
        "dataloader_idx": [Interval(int, 0, None)],
        "max_batches": [Interval(int, 1, None), None],
        "activations": [list, tuple, None],
    }

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        activations: list[str] | None = None,
        reduction: Reduction = "mean",
        stage: Stage = "validation",
        every_n_epochs: int = 1,
        within_epochs: bool = True,
        top_k: int = 5,
        num_classes: int | None = None,
        label_fn: BatchFn | None = None,
        input_fn: BatchFn | None = None,
        output_fn: BatchFn | None = None,
        dataloader_idx: int = 0,
        max_batches: int | None = None,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(**checked_options(self, locals()))
        #: Extra activation classes and ops for the default layers (see ``activations``).
        self.activations = list(check_activations(activations))
        self.reduction = reduction
        self.stage = stage
        self.top_k = int(top_k)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.max_batches = None if max_batches is None else int(max_batches)
        self.dataloader_idx = int(dataloader_idx)
        #: How every analysis reads inputs, labels and logits (see :mod:`lightning_neurons.batch`).
        self.reader = BatchReader(input_fn=input_fn, label_fn=label_fn, output_fn=output_fn)
        #: What the tracker tracks and how it reads batches, set at setup (``None`` before):
        #: what its peers read (see :func:`tracker_spec`).
        self.spec: TrackerSpec | None = None
        self.results: dict[str, LayerStats] = {}
        self._metrics: dict[str, ClassNeuronStats] = {}
        self._held = HeldBatches()  # batches not yet added to the metrics
        self._hooks = HookSet(lightning_batches=True)
        self._labels: torch.Tensor | None = None
        self._label_range = LabelRange()  # the labels' range, read without waiting for a GPU
        self._rows = LoaderRows()
        self._batch_size = 0
        self._checked = self._warned_loaders = False
        self._saw_validation = self._warned_no_validation = False
        self._batches = 0
        self._collecting = False
        self._pending_epoch: int | None = None
        self._saved_states: dict[str, dict[str, torch.Tensor]] = {}
        self._saved_epoch: int = -1
        self._notes = TrackerNotes()  # what it tells the user once
        # the layers whose means say whether they fired (lightning_neurons.signs), known once a fit
        self._never_negative: set[str] = set()
        self._signs_known = False
        # the layers whose outputs are reduced together (lightning_neurons.grouped), known once a
        # fit, and the outputs of this pass waiting for the last layer of their group
        self._groups = OutputGroups()
        self._waiting: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._evolution = NeuronEvolutionLog()  # the neuron x epoch figures

    # ---- identity and checkpointing ------------------------------------------------------------

    @property
    def state_key(self) -> str:
        extra = {"activations": self.activations} if self.activations else {}
        return self._generate_state_key(
            layers=self.layer_patterns, reduction=self.reduction, stage=self.stage, **extra
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        states = {
            name: {k: v.detach().to("cpu", copy=True) for k, v in s.items()}
            for name, s in self._saved_states.items()
        }
        return {
            "layers": list(self.layers),
            "states": states,
            "epoch": self._saved_epoch,
            "num_classes": self.num_classes,
        }

    @override
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

    # ---- what the peers read ------------------------------------------------------------------

    def describe(self, pl_module: nn.Module) -> TrackerSpec:
        """What this tracker tracks on ``pl_module`` and how it reads batches (what :attr:`spec`
        is set to at setup). Peers call :func:`tracker_spec` instead.

        Raises:
            NeuronsError: If a layer is not found, or the class count can be neither read from
                the model nor was given.
        """
        num_classes = self.num_classes or infer_num_classes(pl_module)
        if num_classes == 1:  # a binary classifier's one logit reads as two classes
            num_classes = 2
        if num_classes is None:
            raise NeuronsError(
                f"ActivationTracker could not tell how many classes {type(pl_module).__name__} "
                "predicts (no `num_classes` attribute or hyper-parameter, no Linear layer); pass "
                "`num_classes=` to ActivationTracker."
            )
        return TrackerSpec(
            reader=self.reader,
            layers=tuple(self.resolve_layers(pl_module, self.layer_patterns)),
            stage=self.stage,
            dataloader_idx=self.dataloader_idx,
            reduction=self.reduction,
            num_classes=num_classes,
            top_k=self.top_k,
            activations=tuple(self.activations),
        )

    # ---- Lightning hooks -----------------------------------------------------------------------

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._evolution.pending and (out := self._file_writer(trainer, "activations")):
            self._run_safely("logging the evolution figures", lambda: self._evolution.flush(out))
        super().teardown(trainer, pl_module, stage)

    @override
    def _set_up(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super()._set_up(trainer, pl_module, stage)
        self.spec = self.describe(pl_module)
        self.layers = list(self.spec.layers)
        self.num_classes = self.spec.num_classes
        self._notes.signed(signed_layers(pl_module, self.layers))
        self._checked = self._warned_loaders = self._signs_known = False
        self._saw_validation = self._warned_no_validation = False

    @override
    def _start_fit(self) -> None:
        self.results, self._saved_states, self._saved_epoch = {}, {}, -1
        self._evolution, self._notes = NeuronEvolutionLog(), TrackerNotes()

    def resolve_layers(self, pl_module: nn.Module, patterns: list[str] | None) -> list[str]:
        """``patterns`` resolved on ``pl_module`` with the tracker's ``activations`` (``None``:
        the default layers): how every analysis that reads the tracker resolves its layers."""
        return resolve_layers(pl_module, patterns, self.activations)

    # Lightning's per-stage hooks arrive here (see StagedCallback); only ``self.stage`` counts.
    def _stage_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == "validation" and not trainer.sanity_checking:
            self._saw_validation = True
        if stage == self.stage:
            self._rows = self._loader_rows(trainer, stage)
            self._start(trainer, pl_module)

    def _on_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, step: StageBatch
    ) -> None:
        if not self._checked:  # the first batch the model sees, sanity check included
            self.check_batch(step.batch)
            self._checked = True
        if step.stage == self.stage and step.dataloader_idx == self.dataloader_idx:
            self._gather(step.batch, step.batch_idx)
            if self._labels is not None and not self._signs_known:  # on two of its images
                self._signs_known, inputs = True, self.reader.inputs(step.batch)
                run = lambda: pl_module(as_model_input(inputs, pl_module)[:2])  # noqa: E731
                self._never_negative, self._groups = learn_layers(pl_module, self.layers, run)

    def _on_batch_end(self, trainer: Trainer, pl_module: LightningModule, step: StageBatch) -> None:
        self._hooks.replay()  # what the hooks of a compiled forward kept
        self._reduce_waiting()  # groups whose last layer did not run in this batch
        self._labels = None

    def _stage_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self.stage:
            self._publish(trainer)
        if stage == "train" and self.stage == "validation":
            self._warn_no_validation(trainer)

    def _release(self) -> None:
        self._stop()

    # ---- what the analyses read ----------------------------------------------------------------

    def _publish(self, trainer: Trainer) -> None:
        """Finish the epoch being gathered (if any) and publish its statistics in
        :attr:`results`: at the end of the tracker's own stage's epoch, on every rank (the
        statistics are summed over DDP ranks here); the analyses read them at the stage end."""
        if self._pending_epoch is None:
            return
        epoch = self._pending_epoch
        self._pending_epoch = None
        self._stop()
        self._notes.calls(self._hooks.calls, self.layers, self._metrics, self._batches, self.stage)
        self._label_range.settle()
        self._held.flush(self._metrics)
        states = {name: metric.summed() for name, metric in self._metrics.items()}
        # Kept where they are, not copied (`compute()` would copy the whole state): the metric's
        # reset at the next analysed epoch gives it new state tensors, and no batch is added
        # before that reset. `state_dict` copies them.
        self._saved_states = {n: {k: v.detach() for k, v in s.items()} for n, s in states.items()}
        self._saved_epoch = epoch
        self.results = {}  # the last epoch's go before this one's are made (host memory, x C x K)
        self.results = {
            name: LayerStats.from_state(
                name, s, epoch=epoch, reduction=self.reduction, top_k=self.top_k
            )
            for name, s in states.items()
            if s["images"].sum() > 0
        }
        self._notes.absent_classes(self.results, self.stage)
        self._notes.non_finite(self.results)
        if self.enable_logging and self.results:
            self._run_safely("logging activation statistics", lambda: self._log(trainer))

    def check_batch(self, batch: Any) -> torch.Tensor:
        """Read a batch's input and labels as the analyses will, and check the labels' range.

        Called on the first batch the model sees (Lightning's sanity check included), so that a
        wrong batch layout or ``num_classes`` is reported before any training step.

        Returns:
            The ``[B]`` labels.

        Raises:
            NeuronsError: If the input or labels cannot be read, or a label is outside
                ``[0, num_classes)``.
        """
        self.reader.inputs(batch)
        labels = self.reader.labels(batch, check_rows=True)
        LabelRange(defer=False).check(labels, self.num_classes)
        return labels

    # ---- internals ----------------------------------------------------------------------------

    def _loader_rows(self, trainer: Trainer, stage: str) -> LoaderRows:
        """Checks ``dataloader_idx`` against the stage's loaders (one note when there are several)
        and returns which rows of the analysed loader's batches are real images."""
        loaders = stage_loaders(trainer, stage)
        if stage == "train" or not loaders:
            return analysed_rows(trainer, stage)
        if self.dataloader_idx >= len(loaders):
            raise NeuronsError(
                f"ActivationTracker(dataloader_idx={self.dataloader_idx}): the {stage} stage has "
                f"{len(loaders)} data loader(s); choose an index below {len(loaders)}."
            )
        if len(loaders) > 1 and not self._warned_loaders:
            self._warned_loaders = True
            rank_zero_warn(
                f"ActivationTracker: the {stage} stage has {len(loaders)} data loaders; the analyses "
                f"use loader {self.dataloader_idx} only (the others are not counted). Pass "
                "`dataloader_idx=` to ActivationTracker to analyse another one."
            )
        return analysed_rows(trainer, stage, self.dataloader_idx)

    def _warn_no_validation(self, trainer: Trainer) -> None:
        """One warning per fit when a training epoch ends without any validation epoch so far
        (and one was due): the analyses of the validation stage would produce nothing."""
        if self._saw_validation or self._warned_no_validation:
            return
        every = trainer.check_val_every_n_epoch or 1
        if (trainer.current_epoch + 1) < every:
            return
        self._warned_no_validation = True
        rank_zero_warn(
            "ActivationTracker(stage='validation') saw no validation batches in this fit (no "
            "`val_dataloader`, or `limit_val_batches=0`), so none of the lightning-neurons analyses "
            "produce anything. Give the Trainer validation data, or analyse the training batches "
            "with `ActivationTracker(stage='train')`."
        )

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop()
        if not self._due(trainer):
            return
        self._held.drop()
        self._label_range.drop()
        with torch.inference_mode(False):
            for metric in self._metrics.values():
                metric.reset()
        self._batches = 0
        self._collecting = True
        self._pending_epoch = trainer.current_epoch
        self._held.layers = len(self.layers)
        deferral = Deferral(self._held_values, self._on_held_values)  # in compiled forwards
        self._hooks.add(pl_module, self.layers, self._on_activation, deferral=deferral)

    def _stop(self) -> None:
        self._hooks.remove()
        self._labels = None
        self._waiting.clear()
        self._collecting = False

    def _gather(self, batch: Any, batch_idx: int) -> None:
        """Take this batch's labels for the hooks (the batch itself goes through the model next)."""
        if not self._collecting:
            return
        if self.max_batches is not None and self._batches >= self.max_batches:
            self._labels = None
            return
        self._batches += 1
        self._hooks.new_pass()
        self._waiting.clear()
        self.reader.inputs(batch)
        read = self.reader.labels(batch)
        labels = self._label_range.check(read, self.num_classes)  # on a GPU, read later
        rows = self._rows.rows(batch_idx, labels.shape[0])
        # DistributedSampler's repeated samples (the last rows on some ranks) are left out; the
        # labels are held with the batch's values (a copy, unless clamping made one)
        held = labels[:rows] if labels is not read else labels[:rows].clone()
        self._labels = held if rows else None
        self._batch_size = self._hooks.batch_size = labels.shape[0]

    def _metric(self, name: str, values: torch.Tensor) -> ClassNeuronStats:
        num_neurons = values.shape[1]
        metric = self._metrics.get(name)
        if metric is not None and metric.num_neurons != num_neurons:
            # the batches of the layer's former width go to the statistics it is leaving (their
            # last use); those of the layers held with it, to theirs
            self._held.flush(self._metrics, name)
        if metric is None or metric.num_neurons != num_neurons:
            # the maximum in the activations' own type: exact (it is one of them)
            dtype = values.dtype if values.is_floating_point() else torch.float32
            with torch.inference_mode(False):
                metric = ClassNeuronStats(
                    self.num_classes, num_neurons, max_dtype=dtype, device=values.device
                )
            self._metrics[name] = metric
        return metric

    def _on_activation(self, name: str, output: torch.Tensor) -> None:
        if self._labels is None or in_analysis():
            return  # a forward outside a tracked batch, or another analysis running the model
        # detached: no graph, without the cost of entering no_grad at every call
        output = output.detach()
        group = self._groups.group_of(name)
        if group is not None and output.numel() <= GROUP_VALUES:
            self._waiting.setdefault(group, []).append((name, output))
        else:
            values, peak = held_values(output, self.reduction, name, self._peaks(name, output))
            self._hold_layers(Reduced.one(name, values, peak))
        if group is not None and self._groups.closes(name):
            self._reduce_waiting(group)

    def _held_values(self, name: str, output: torch.Tensor) -> object:
        """A compiled forward's hook: the ``[B, K]`` values and peaks of layer ``name``, kept
        until the batch's end (:meth:`_on_held_values`; one small copy per layer)."""
        if output.dim() < 2:  # no neuron axis: the error is raised as written, at the batch's end
            return output.detach().clone()
        return held_values(output.detach(), self.reduction, name, self._peaks(name, output))

    def _on_held_values(self, name: str, kept: object) -> None:
        """At the batch's end: the values and peaks :meth:`_held_values` kept, to hold."""
        if isinstance(kept, torch.Tensor):
            self._on_activation(name, kept)
        elif self._labels is not None and not in_analysis():
            values, peak = kept  # type: ignore[misc]
            if values.device.type != "cpu":  # a CUDA graph's outputs: its next run rewrites them
                own = peak is values  # its values say whether it fired
                values = values.clone()
                peak = values if own else peak.clone()
            self._hold_layers(Reduced.one(name, values, peak))

    def _peaks(self, name: str, output: torch.Tensor) -> bool:
        """Whether layer ``name``'s peaks are read apart from its means (see ``signs``)."""
        return output.dtype == torch.float16 or split_call(name)[0] not in self._never_negative

    def _reduce_waiting(self, group: int | None = None) -> None:
        """Reduce and hold the outputs waiting in ``group`` (``None``: in every group)."""
        for key in [group] if group is not None else list(self._waiting):
            waiting = self._waiting.pop(key, [])
            if not waiting or self._labels is None:
                continue
            peaks = {name: self._peaks(name, output) for name, output in waiting}
            for reduced in reduce_together(waiting, self.reduction, peaks.__getitem__):
                self._hold_layers(reduced)

    def _hold_layers(self, reduced: Reduced) -> None:
        """Hold the ``[B, n, K]`` values (and peaks) of layers of one width with this batch's
        labels; they are added to their statistics together."""
        labels = self._labels
        assert labels is not None
        values, peaks, rows = reduced.values, reduced.peaks, labels.shape[0]
        if values.shape[0] == self._batch_size and rows < values.shape[0]:
            values, peaks = values[:rows], None if peaks is None else peaks[:rows]
        if values.shape[0] != rows:
            raise NeuronsError(
                f"layer {reduced.names[0]!r} produced {values.shape[0]} rows for a batch of "
                f"{rows} labels; track layers whose first dimension is the batch (of a module "
                "that returns a tuple, name the element that has a row per image: 'name[1]')"
            )
        metrics = [self._metric(name, values[:, j]) for j, name in enumerate(reduced.names)]
        if labels.device != values.device:  # a layer on another device (model parallel)
            labels = labels.to(values.device)
        self._held.add_layers(reduced.names, metrics, values, labels, peaks)

    def _log(self, trainer: Trainer) -> None:
        out = self._file_writer(trainer, "activations")
        if out is not None:
            names = class_names_of(trainer, int(self.num_classes or 0))
            log_results(out, self.results, self.stage)
            self._evolution.log(out, self.results, names)


@overload
def tracker_spec(trainer: Trainer, *, required: Literal[False] = False) -> TrackerSpec | None: ...


@overload
def tracker_spec(trainer: Trainer, *, required: str) -> TrackerSpec: ...


def tracker_spec(trainer: Trainer, *, required: str | Literal[False] = False) -> TrackerSpec | None:
    """The :class:`~lightning_neurons.results.TrackerSpec` of the trainer's ActivationTracker:
    the one way its peers learn what it tracks and how it reads batches. It can be called in a
    peer's ``setup``, whether the tracker's own ``setup`` has run or not.

    Args:
        trainer: The trainer (its ``lightning_module`` is the model the layers are resolved on).
        required: The name of the callback that needs a tracker: a missing one then raises
            (see :func:`~lightning_neurons.callbacks._base.find_callback`). ``False``: a
            missing one gives ``None``.

    Returns:
        The spec, or ``None`` when no tracker is attached and none is required.

    Raises:
        NeuronsError: If no tracker is attached and ``required`` names who needs one, or the
            tracker's layers or class count do not fit the model.

    Example:
        >>> spec = tracker_spec(trainer, required="CategoryClustering")  # doctest: +SKIP
        >>> spec.layers, spec.stage  # doctest: +SKIP
        (('features.relu1', 'features.relu2'), 'validation')
    """
    tracker = find_callback(trainer, ActivationTracker, required=required)
    if tracker is None:
        return None
    return tracker.describe(trainer.lightning_module)


def tracker_results(
    trainer: Trainer, *, required: str | Literal[False] = False
) -> dict[str, LayerStats]:
    """The statistics the trainer's ActivationTracker published (``{layer: LayerStats}``, each
    with the ``epoch`` it is from): with :func:`tracker_spec`, all that peers read of the
    tracker. Empty before its first analysis.

    Args:
        trainer: The trainer.
        required: As in :func:`tracker_spec`: the name of the callback that needs a tracker (a
            missing one raises), or ``False`` (a missing one gives ``{}``).

    Raises:
        NeuronsError: If no tracker is attached and ``required`` names who needs one.
    """
    tracker = find_callback(trainer, ActivationTracker, required=required)
    return dict(tracker.results) if tracker is not None else {}
