"""What CategoryClustering and NeuronClustering share: finding the tracker and its layers, the
stage, class names and small table helpers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_neurons.callbacks._base import StageBatch, StagedCallback
from lightning_neurons.callbacks.tracker import ActivationTracker, tracker_results, tracker_spec
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import HookSet, selects, split_call
from lightning_neurons.loaders import LoaderRows, analysed_rows
from lightning_neurons.results import TrackerSpec
from lightning_neurons.stats import LayerStats

# ---- shared helpers ---------------------------------------------------------------------------


def _stability(previous: torch.Tensor | None, labels: torch.Tensor | np.ndarray) -> float:
    """Adjusted Rand index of the previous analysis's labels with these (NaN without them)."""
    if previous is None or tuple(previous.shape) != tuple(labels.shape):
        return float("nan")
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(previous), np.asarray(labels)))


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def clusterer_options(clusterer: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a clustering callback's ``__init__`` (its ``locals()``) that ``clusterer``
    takes, by name (``seed`` as its ``random_state``): what every analysis builds its clusterer
    with. The options that depend on each other (``n_clusters`` with HDBSCAN, say) are checked
    here, when the callback is made, not at an epoch's end.

    Raises:
        NeuronsError: If the options do not fit together (see the clusterer's ``check_params``).
    """
    given = {**params, "random_state": params["seed"]} if "seed" in params else dict(params)
    names = inspect.signature(clusterer).parameters
    options = {name: given[name] for name in names if name in given}
    clusterer(**options).check_params()
    return options


class _ClusteringCallback(StagedCallback):
    """What both clustering callbacks share: finding the tracker and its layers, and the stage."""

    kind = "clustering"
    reads = (ActivationTracker,)

    def __init__(self, layers: list[str] | None = None, **options: Any) -> None:
        super().__init__(layers, **options)  # every_n_epochs, enable_logging, on_error
        self._spec: TrackerSpec | None = None  # the tracker's, from setup on
        self._rows = LoaderRows()
        self._batch_size = 0
        self._labels: torch.Tensor | None = None  # of the batch going through the model
        self._hooks = HookSet(lightning_batches=True)  # on the model during the gathered batches

    @property
    def spec(self) -> TrackerSpec:
        """The tracker's :class:`~lightning_neurons.results.TrackerSpec` (read at setup)."""
        if self._spec is None:
            raise NeuronsError(f"{type(self).__name__} has not been set up by a Trainer yet")
        return self._spec

    @override
    def _start_fit(self) -> None:
        self.results = {}
        self._previous = {}  # the last analysed epoch's labels, for the stability

    @override
    def _set_up(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super()._set_up(trainer, pl_module, stage)
        self._spec = tracker_spec(trainer, required=type(self).__name__)
        tracked = self._spec.layers
        if self.layer_patterns is None:
            self.layers = list(tracked)
            return
        chosen = self._spec.resolve(pl_module, self.layer_patterns)
        tracked_modules = {split_call(name)[0] for name in tracked}
        missing = [name for name in chosen if split_call(name)[0] not in tracked_modules]
        if missing:
            raise NeuronsError(
                f"{type(self).__name__}: layer(s) {', '.join(map(repr, missing))} are not tracked "
                f"by the ActivationTracker, which tracks {', '.join(tracked)}. Add them "
                "to the tracker's `layers`, or choose among those."
            )
        self.layers = chosen

    # The previous epoch's labels (for stability across epochs) survive a checkpoint resume.
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"previous": {k: torch.as_tensor(v) for k, v in self._previous.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous = {k: torch.as_tensor(v) for k, v in state_dict.get("previous", {}).items()}

    # Lightning's per-stage hooks arrive here (see StagedCallback); only the batches the tracker
    # analyses count.
    def _stage_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self.spec.stage:
            self._rows = analysed_rows(trainer, stage, self.spec.dataloader_idx)
            self._start(trainer, pl_module)

    def _on_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, step: StageBatch
    ) -> None:
        if self.spec.analyses(step.stage, step.dataloader_idx):
            self._gather(step.batch, step.batch_idx)

    def _on_batch_end(self, trainer: Trainer, pl_module: LightningModule, step: StageBatch) -> None:
        self._hooks.replay()  # what the hooks of a compiled forward kept
        self._labels = None

    def _stage_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self.spec.stage:
            self._stop()  # the epoch's batches are done; the data gathered is kept

    @override
    def _consume(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self.spec.stage:
            self._epoch_analysis(trainer, pl_module)

    def _release(self) -> None:
        self._stop()

    def _batch_labels(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """The batch's labels, without DistributedSampler's repeated samples (``None``: none)."""
        labels = self.spec.reader.labels(batch)
        rows = self._rows.rows(batch_idx, labels.shape[0])
        self._batch_size = self._hooks.batch_size = labels.shape[0]
        return labels[:rows] if rows else None

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """An epoch of the tracker's stage begins (no-op by default)."""

    def _gather(self, batch: Any, batch_idx: int) -> None:
        """An analysed batch is about to go through the model (no-op by default)."""

    def _stop(self) -> None:
        """Remove hooks (no-op by default)."""

    def _epoch_analysis(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The analysis at the end of an epoch of the tracker's stage."""
        raise NotImplementedError

    def _fresh_stats(self, trainer: Trainer) -> dict[str, LayerStats] | None:
        """The tracker's results of this epoch, or ``None`` when the tracker did not analyse this
        epoch or nothing is due."""
        stats = tracker_results(trainer, required=type(self).__name__)
        if not self._due(trainer):
            return None
        fresh = {
            n: s
            for n, s in stats.items()
            if selects(self.layers, n) and s.epoch == trainer.current_epoch
        }
        return fresh or None
