"""CategoryClustering and NeuronClustering: the paper's two clusterings, epoch after epoch.

Both read the class profiles that an :class:`~lightning_neurons.ActivationTracker` gathered (one
set of hooks for every analysis), cluster them on rank zero at the end of the tracker's stage,
log figures, tables and scalars to TensorBoard, write the numbers next to the event files, and
keep the latest results in ``callback.results``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassConfusionMatrix
from typing_extensions import override

from lightning_neurons.batch import BatchReader, LoaderRows, analysed_rows
from lightning_neurons.callbacks._base import OnError, StagedCallback, find_callback
from lightning_neurons.callbacks.tracker import ActivationTracker
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.checks import check_choice, check_positive_int
from lightning_neurons.clustering import (
    ActivationReservoir,
    CategoryClusterer,
    CategoryMethod,
    CategoryNormalize,
    Linkage,
    Metric,
    NeuronClusterer,
    NeuronMethod,
    NeuronNormalize,
    normalize_neurons,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import HookSet, reduce_activation, resolve_layers, selects, split_call
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.results import CategoryClusteringResult, NeuronClusteringResult
from lightning_neurons.state import in_analysis
from lightning_neurons.stats import LayerStats

#: Name of the category-clustering view that puts all chosen layers side by side.
COMBINED = "combined"

_STAGES = ("train", "validation", "test")


# ---- shared helpers ---------------------------------------------------------------------------


def class_names_of(trainer: Trainer, num_classes: int) -> list[str]:
    """``trainer.datamodule.class_names`` when it has the right length, else ``"0"``, ``"1"``..."""
    names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(c) for c in range(num_classes)]


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


def distance_confusion_agreement(distances: np.ndarray, confusion: np.ndarray) -> float:
    """How well class distances predict which classes the model confuses.

    Spearman correlation, over the pairs of distinct classes, between the negated class
    distance and the symmetrised confusion rate ``(P[i, j] + P[j, i]) / 2`` (``P`` the
    row-normalised confusion matrix). Positive when classes that are close in the representation
    are the ones mistaken for each other.

    Args:
        distances: ``[C, C]`` class distances.
        confusion: ``[C, C]`` counts, rows the true class.

    Returns:
        The correlation, NaN when undefined (no confusions at all, or constant distances).
    """
    from scipy.stats import spearmanr

    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    similarity = (rates + rates.T) / 2.0
    upper = np.triu_indices(distances.shape[0], k=1)
    x, y = -distances[upper], similarity[upper]
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class _ClusteringCallback(StagedCallback):
    """What both clustering callbacks share: finding the tracker and its layers, and the stage."""

    kind = "clustering"
    reads = (ActivationTracker,)

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        every_n_epochs: int = 1,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(
            layers, every_n_epochs=every_n_epochs, enable_logging=enable_logging, on_error=on_error
        )
        self._stage = "validation"
        self._tracker_layers: list[str] = []
        self._reader = BatchReader()
        self._dataloader_idx = 0
        self._rows = LoaderRows()
        self._batch_size = 0
        self._reduction = "mean"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        tracker = find_callback(trainer, ActivationTracker, required=type(self).__name__)
        self._stage = tracker.stage
        self._reader = tracker.reader
        self._dataloader_idx = tracker.dataloader_idx
        self._reduction = tracker.reduction
        self._tracker_layers = resolve_layers(pl_module, tracker.layer_patterns)
        if self.layer_patterns is None:
            self.layers = list(self._tracker_layers)
            return
        chosen = resolve_layers(pl_module, self.layer_patterns)
        tracked_modules = {split_call(name)[0] for name in self._tracker_layers}
        missing = [name for name in chosen if split_call(name)[0] not in tracked_modules]
        if missing:
            raise NeuronsError(
                f"{type(self).__name__}: layer(s) {', '.join(map(repr, missing))} are not tracked "
                f"by the ActivationTracker, which tracks {', '.join(self._tracker_layers)}. Add them "
                "to the tracker's `layers`, or choose among those."
            )
        self.layers = chosen

    # The previous epoch's labels (for stability across epochs) survive a checkpoint resume.
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"previous": {k: torch.as_tensor(v) for k, v in self._previous.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous = {k: np.asarray(v) for k, v in state_dict.get("previous", {}).items()}

    # Lightning's per-stage hooks arrive here (see StagedCallback); only the tracker's stage counts.
    def _stage_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self._stage:
            self._rows = analysed_rows(trainer, stage, self._dataloader_idx)
        self._start(stage, trainer, pl_module)

    def _stage_batch_start(
        self, stage: str, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> None:
        if dataloader_idx == self._dataloader_idx:
            self._batch_start(stage, batch, batch_idx)

    def _batch_labels(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """The batch's labels, without DistributedSampler's repeated samples (``None``: none)."""
        labels = self._reader.labels(batch)
        rows = self._rows.rows(batch_idx, labels.shape[0])
        self._batch_size = labels.shape[0]
        return labels[:rows] if rows else None

    def _stage_batch_end(self, stage: str) -> None:
        self._labels = None

    def _stage_end(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self._stage:
            self._stop()  # the epoch's batches are done; the data gathered is kept

    @override
    def _consume(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == self._stage:
            self._epoch_analysis(trainer, pl_module)

    def _release(self) -> None:
        self._stop()

    def _start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        """Begin gathering data of ``stage`` (no-op by default)."""

    def _batch_start(self, stage: str, batch: Any, batch_idx: int) -> None:
        """A batch of ``stage`` begins (no-op by default)."""

    def _stop(self) -> None:
        """Remove hooks (no-op by default)."""

    def _epoch_analysis(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The analysis at the end of an epoch of the tracker's stage."""
        raise NotImplementedError

    def _fresh_stats(self, trainer: Trainer) -> dict[str, LayerStats] | None:
        """The tracker's results of this epoch, or ``None`` when the tracker did not analyse this
        epoch or nothing is due."""
        stats = find_callback(trainer, ActivationTracker, required=type(self).__name__).results
        if not self._due(trainer):
            return None
        fresh = {
            n: s
            for n, s in stats.items()
            if selects(self.layers, n) and s.epoch == trainer.current_epoch
        }
        return fresh or None


# ---- category clustering ----------------------------------------------------------------------


class CategoryClustering(_ClusteringCallback):
    """Clusters the image categories by how the neurons respond to them (categories are points).

    At the end of each analysed epoch it takes the ActivationTracker's class profiles of
    ``layers`` and clusters the classes with :class:`~lightning_neurons.clustering.CategoryClusterer`,
    for each layer and (``combine_layers``) for all of them side by side, each layer's neurons
    z-scored then. It also counts the model's predictions against the labels on the same batches
    (a forward hook on the classifier layer: one ``[C, C]`` confusion matrix, nothing per image)
    to compare the class distances with the classes the model actually confuses.

    Logged per view under ``category_clustering/<view>/``: the dendrogram with class names, the
    class-distance matrix next to the confusion matrix, the assignments as a Markdown table,
    and scalars ``silhouette``, ``n_clusters``, ``distance_confusion_spearman`` and ``stability``
    (adjusted Rand index with the previous analysis). Arrays go to
    ``<log_dir>/neurons/category_clustering/epoch=EEE/<view>.npz``.

    Every view is clustered and logged; :attr:`result` is the *headline* view chosen by ``view``:
    by default the deepest analysed layer, the network's own representation of the categories.

    The defaults come from ``benchmarks/representation_study.py`` (SmallCNN on the parts data
    sets, whose 12 classes form 4 known groups). Where a group's classes share two large parts of
    three (``structure="marks"``), conv2, conv3, their ReLUs and any combination recovered the
    groups exactly with the tracker's ``mean`` reduction (adjusted Rand index 1.0 in 3 of 3
    seeds). Where they share only one of two equally large parts and the network can classify
    without it (``structure="one_shared"``), only the deepest ReLU layer with every neuron
    z-scored across the classes found the groups in every seed (ARI 1.0, 1.0, 1.0); unnormalised
    it gave 0.80 on average (worst seed 0.64), the combined view of all ReLU layers 0.75 in each
    seed (the early layers, which see strokes rather than parts, pull it off) and conv1 0.14. Hence
    ``normalize="zscore"`` and ``view="deepest"``. ``max``-reduced activations and first-order
    contributions did worse in the trained network: keep the tracker's ``reduction="mean"``.

    Args:
        layers: Tracked layers to cluster on (default: all the tracker's layers).
        method: ``"agglomerative"``, ``"kmeans"`` or ``"hdbscan"``.
        metric: ``"correlation"``, ``"cosine"`` or ``"euclidean"`` distance between profiles.
        linkage: Agglomerative linkage.
        normalize: ``"zscore"`` (each neuron standardised across the classes) or ``"none"``.
        n_clusters: Fixed number of clusters, or ``None`` to choose it by silhouette.
        combine_layers: Also cluster on all ``layers`` together (when there are several), each
            neuron z-scored so that every neuron counts equally.
        view: The headline view (:attr:`result`, :attr:`main_view`): ``"deepest"`` (the last
            analysed layer in the forward pass), ``"combined"``, or a layer name.
        classifier_layer: Module whose output are the logits, for the confusion matrix; default:
            the model's last ``Linear``. ``None`` and no Linear: no confusion matrix.
        confusion: Collect the confusion matrix.
        every_n_epochs: Analyse every n-th epoch.
        enable_logging: Log to TensorBoard and write files (``results`` is always filled).
        on_error: ``"warn"`` or ``"raise"`` when an analysis fails.

    Raises:
        NeuronsError: For bad arguments; at setup, if no ActivationTracker is attached, a layer
            is not tracked, or ``classifier_layer`` does not exist.

    Example:
        >>> trainer = Trainer(callbacks=[ActivationTracker(), CategoryClustering()])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> category.result.labels  # the deepest layer's clustering  # doctest: +SKIP
        >>> category.results["combined"].labels  # doctest: +SKIP
    """

    kind = "category_clustering"

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        method: CategoryMethod = "agglomerative",
        metric: Metric = "correlation",
        linkage: Linkage = "average",
        normalize: CategoryNormalize = "zscore",
        n_clusters: int | None = None,
        combine_layers: bool = True,
        view: str = "deepest",
        classifier_layer: str | None = None,
        confusion: bool = True,
        every_n_epochs: int = 1,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(
            layers, every_n_epochs=every_n_epochs, enable_logging=enable_logging, on_error=on_error
        )
        # Building one checks every option now rather than at the first epoch's end.
        self._clusterer_options = {
            "method": method,
            "metric": metric,
            "linkage": linkage,
            "normalize": normalize,
            "n_clusters": n_clusters,
        }
        CategoryClusterer(**self._clusterer_options).check_params()
        self.method, self.metric, self.linkage = method, metric, linkage
        self.normalize, self.n_clusters = normalize, n_clusters
        self.combine_layers = combine_layers
        if not isinstance(view, str) or not view:
            raise NeuronsError(
                f"`view` must be 'deepest', 'combined' or a layer name; got {view!r}"
            )
        self.view = view
        #: The name of the headline view of the latest analysis (see ``view``).
        self.main_view: str | None = None
        self.classifier_layer = classifier_layer
        self.confusion = confusion
        self.results: dict[str, CategoryClusteringResult] = {}
        self._classifier: str | None = None
        self._hooks = HookSet()
        self._labels: torch.Tensor | None = None
        self._confusion: MulticlassConfusionMatrix | None = None
        self._broken = False  # the classifier's output was not logits in this epoch
        self._collecting = False
        self._armed = False
        self._previous: dict[str, np.ndarray] = {}
        self._warned_shape = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layer_patterns,
            method=self.method,
            metric=self.metric,
            normalize=self.normalize,
            view=self.view,
        )

    # ---- Lightning hooks ----

    @property
    def result(self) -> CategoryClusteringResult | None:
        """The headline view's result of the latest analysis (``None`` before the first)."""
        return self.results.get(self.main_view) if self.main_view is not None else None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.view not in ("deepest", COMBINED) and not selects(self.layers, self.view):
            raise NeuronsError(
                f"CategoryClustering: `view` {self.view!r} is not one of its layers "
                f"({', '.join(self.layers)}); use 'deepest', 'combined' or one of those"
            )
        self._classifier = None
        if not self.confusion:
            return
        if self.classifier_layer is not None:
            resolved = resolve_layers(pl_module, [self.classifier_layer])
            self._classifier = resolved[-1]
            return
        linears = [n for n, m in pl_module.named_modules() if n and isinstance(m, nn.Linear)]
        self._classifier = linears[-1] if linears else None

    # ---- confusion matrix: streamed from a hook on the classifier ----

    def _start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage != self._stage:
            return
        self._stop()
        self._confusion, self._broken = None, False
        self._armed = False
        if self._classifier is None or not self._due(trainer):
            return
        tracker = find_callback(trainer, ActivationTracker, required="CategoryClustering")
        self._confusion = MulticlassConfusionMatrix(
            int(tracker.num_classes), validate_args=False
        ).to(pl_module.device)
        self._collecting = True
        self._armed = True  # the same on every rank, unlike `_collecting` (see `_shape_problem`)
        self._hooks.add(pl_module, [self._classifier], self._on_logits)

    def _stop(self) -> None:
        self._hooks.remove()
        self._labels = None
        self._collecting = False

    def _batch_start(self, stage: str, batch: Any, batch_idx: int) -> None:
        if stage != self._stage or not self._collecting:
            return
        self._labels = self._batch_labels(batch, batch_idx)

    def _on_logits(self, name: str, output: torch.Tensor) -> None:
        if in_analysis():
            return  # another analysis running the model
        labels, self._labels = self._labels, None  # one forward per batch counts
        if labels is None:
            return
        with torch.no_grad():
            if output.dim() == 2 and output.shape[0] == self._batch_size:
                output = output[: labels.shape[0]]  # DistributedSampler's repeats left out
            if output.dim() != 2 or output.shape[0] != labels.shape[0]:
                self._shape_problem(name, output, labels)
                return
            num_classes = output.shape[1]
            if self._confusion is None or self._confusion.num_classes != num_classes:
                self._shape_problem(name, output, labels)
                return
            preds = output.detach().argmax(dim=1)
            labels = labels.to(output.device)
            ok = (labels >= 0) & (labels < num_classes)
            self._confusion.update(preds[ok], labels[ok])

    def _shape_problem(self, name: str, output: torch.Tensor, labels: torch.Tensor) -> None:
        self._collecting = False
        self._broken = True
        if not self._warned_shape:
            self._warned_shape = True
            rank_zero_warn(
                f"CategoryClustering: layer {name!r} returned shape {tuple(output.shape)} for "
                f"{labels.shape[0]} labels, not [batch, num_classes] logits; no confusion matrix "
                "is collected. Pass `classifier_layer=` naming the layer that outputs the logits."
            )

    def _confusion_matrix(self, trainer: Trainer) -> np.ndarray | None:
        """The epoch's confusion counts summed over ranks (called on every rank; ``None`` when the
        classifier's output was not ``[batch, num_classes]`` logits on some rank)."""
        metric, broken = self._confusion, self._broken
        self._confusion, self._broken = None, False
        broken = broken or metric is None or metric.update_count == 0
        if trainer.world_size > 1:
            flag = torch.tensor(float(broken), device=trainer.strategy.root_device)
            broken = float(trainer.strategy.reduce(flag, reduce_op="max")) > 0
        if broken:
            return None
        counts = metric.compute()  # torchmetrics sums the counts over the ranks
        return counts.detach().cpu().numpy().astype(np.float64)

    # ---- the analysis ----

    def _epoch_analysis(self, trainer: Trainer, pl_module: LightningModule) -> None:
        armed, self._armed = self._armed, False
        self._stop()
        confusion = self._confusion_matrix(trainer) if armed else None
        stats = self._fresh_stats(trainer)
        if stats is None:
            return
        self._run_safely("category clustering", lambda: self._analyse(trainer, stats, confusion))

    def _views(self, stats: dict[str, LayerStats]) -> dict[str, tuple[list[str], np.ndarray]]:
        views = {name: ([name], s.class_means.numpy()) for name, s in stats.items()}
        if self.combine_layers and len(views) > 1:
            from lightning_neurons.clustering import standardize_columns

            blocks = [standardize_columns(np.nan_to_num(p)) for _, p in views.values()]
            # NaN rows (classes without images) stay NaN so that they are left out below.
            missing = np.any([~np.isfinite(p).all(axis=1) for _, p in views.values()], axis=0)
            combined = np.concatenate(blocks, axis=1)
            combined[missing] = np.nan
            views[COMBINED] = (list(views), combined)
        return views

    def _analyse(
        self, trainer: Trainer, stats: dict[str, LayerStats], confusion: np.ndarray | None
    ) -> None:
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        results: dict[str, CategoryClusteringResult] = {}
        for view, (layers, profile) in self._views(stats).items():
            names = class_names_of(trainer, profile.shape[0])
            res = self._run_safely(  # one view that fails must not sink the others
                f"category clustering of view {view!r}",
                lambda v=view, ls=layers, p=profile, n=names: self._cluster(  # type: ignore[misc]
                    v, ls, p, n, epoch, confusion
                ),
            )
            if res is not None:
                results[view] = res
        self.results = results
        self.main_view = self._main_view(results)
        for view, res in results.items():
            self._previous[view] = res.labels
        if self.enable_logging:
            self._log(trainer, results)

    def _main_view(self, results: dict[str, CategoryClusteringResult]) -> str | None:
        layers = [v for v in results if v != COMBINED]  # in the order the layers ran
        if self.view == "deepest":
            return layers[-1] if layers else None
        if self.view == COMBINED and COMBINED not in results:
            return layers[-1] if layers else None  # a single layer: it is the combination
        return self.view if self.view in results else None

    def _cluster(
        self,
        view: str,
        layers: list[str],
        profile: np.ndarray,
        names: list[str],
        epoch: int,
        confusion: np.ndarray | None,
    ) -> CategoryClusteringResult:
        num_classes = profile.shape[0]
        # Classes without images have NaN rows; neurons with NaN activations NaN entries.
        finite = np.isfinite(profile)
        rows = np.flatnonzero(finite.any(axis=1))
        cols = finite[rows].all(axis=0)
        if rows.size < 3 or not cols.any():
            raise NeuronsError(
                f"layer(s) {', '.join(layers)}: only {rows.size} of {num_classes} classes have "
                "statistics; category clustering needs at least 3 classes with images"
            )
        clusterer = CategoryClusterer(**self._clusterer_options).fit(profile[np.ix_(rows, cols)])
        labels = np.full(num_classes, -1, dtype=np.int64)
        labels[rows] = clusterer.labels_
        distances = np.full((num_classes, num_classes), np.nan)
        distances[np.ix_(rows, rows)] = clusterer.distances_
        if clusterer.linkage_ is not None:
            from scipy.cluster.hierarchy import leaves_list

            order = [int(rows[i]) for i in leaves_list(clusterer.linkage_)]
        else:
            order = [int(rows[i]) for i in np.argsort(clusterer.labels_, kind="stable")]
        agreement = float("nan")
        if confusion is not None and confusion.shape[0] == num_classes:
            agreement = distance_confusion_agreement(
                clusterer.distances_, confusion[np.ix_(rows, rows)]
            )
        previous = self._previous.get(view)
        stability = (
            _ari(previous, labels)
            if previous is not None and previous.shape == labels.shape
            else float("nan")
        )
        return CategoryClusteringResult(
            view=view,
            layers=layers,
            epoch=epoch,
            class_names=names,
            classes=rows,
            labels=labels,
            n_clusters=clusterer.n_clusters_,
            silhouette=clusterer.silhouette_,
            distances=distances,
            linkage=clusterer.linkage_,
            leaf_order=order,
            confusion=confusion,
            agreement=agreement,
            stability=stability,
        )

    def _log(self, trainer: Trainer, results: dict[str, CategoryClusteringResult]) -> None:
        from lightning_neurons.plots.clustering import dendrogram_figure, distance_confusion_figure

        out = AnalysisLogger(trainer, self.kind, owner=self)
        if not out.is_writer:
            return
        scalars: dict[str, float] = {}
        assignments: dict[str, dict[str, int]] = {}
        for view, res in results.items():
            kept = list(res.leaf_order)
            names = [res.class_names[i] for i in kept]
            title = f"{view}: epoch {res.epoch}, {res.n_clusters} clusters, silhouette {res.silhouette:.2f}"
            if out.experiment is not None:
                if res.linkage is not None:
                    leaf_names = [res.class_names[i] for i in res.classes]
                    fig, _ = dendrogram_figure(res.linkage, leaf_names, res.n_clusters, title)
                    out.figure(out.tag(view, "dendrogram"), fig)
                sub = np.ix_(kept, kept)
                fig = distance_confusion_figure(
                    res.distances[sub],
                    None if res.confusion is None else res.confusion[sub],
                    names,
                    agreement=res.agreement if res.confusion is not None else None,
                    title=title,
                )
                out.figure(out.tag(view, "distance_vs_confusion"), fig)
                out.text(out.tag(view, "assignments"), self._table(res))
            scalars[out.tag(view, "silhouette")] = res.silhouette
            scalars[out.tag(view, "n_clusters")] = float(res.n_clusters)
            if np.isfinite(res.agreement):
                scalars[out.tag(view, "distance_confusion_spearman")] = res.agreement
            if np.isfinite(res.stability):
                scalars[out.tag(view, "stability")] = res.stability
            out.save_arrays(
                view,
                res.as_arrays(),
                meta={"view": view, "layers": res.layers, "epoch": res.epoch, **self._meta()},
            )
            assignments[view] = {
                n: int(c) for n, c in zip(res.class_names, res.labels, strict=True)
            }
        out.save_json("assignments", assignments)
        out.scalars({k: v for k, v in scalars.items() if np.isfinite(v)})

    def _meta(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "metric": self.metric,
            "linkage": self.linkage,
            "normalize": self.normalize,
        }

    @staticmethod
    def _table(res: CategoryClusteringResult) -> str:
        rows = []
        for cluster in sorted(set(res.labels.tolist())):
            members = [res.class_names[i] for i in np.flatnonzero(res.labels == cluster)]
            label = "left out" if cluster < 0 else str(cluster)
            rows.append((label, len(members), ", ".join(members)))
        return _markdown_table(("cluster", "classes", "members"), rows)


# ---- neuron clustering ------------------------------------------------------------------------


class NeuronClustering(_ClusteringCallback):
    """Clusters each layer's neurons by how they respond across the classes (neurons are points).

    Uses :class:`~lightning_neurons.clustering.NeuronClusterer` on the tracker's class profile
    (``source="class_means"``), or on a bounded reservoir of per-image activations gathered by
    this callback's own forward hooks during the tracker's stage (``source="reservoir"``; memory
    ``reservoir_size x neurons`` per layer; under DDP each rank samples its own share and rank
    zero clusters its sample).

    Logged per layer under ``neuron_clustering/<layer>/``: the cluster sizes as a table and
    scalars (``n_clusters``, ``noise_fraction``, ``silhouette``, ``stability``: adjusted Rand
    index with the previous analysis), and each cluster's mean class profile as a figure. All
    layers' neurons go to TensorBoard's embedding projector (tag ``neuron_clustering``) with
    metadata columns layer, neuron, cluster, preferred class and selectivity; when a
    ``FeatureVisualizer`` has rendered images of the neurons they become the projector's
    sprites. Arrays go to ``<log_dir>/neurons/neuron_clustering/epoch=EEE/<layer>.npz``.

    Args:
        layers: Tracked layers (default: all the tracker's layers).
        method: ``"hdbscan"``, ``"kmeans"`` or ``"agglomerative"``.
        n_clusters: For k-means / agglomerative; ``None`` chooses by silhouette.
        min_cluster_size: HDBSCAN's smallest cluster (default ``max(3, neurons // 50)``).
        normalize: How each neuron's response is normalised: ``"zscore"``, ``"l2"``, ``"max"``,
            ``"none"``.
        source: ``"class_means"`` or ``"reservoir"``.
        reservoir_size: Per-image rows kept per layer for ``source="reservoir"``.
        embedding: Write the embedding projector data.
        max_embedding_neurons: At most this many neurons (the most selective of each layer, in
            equal shares) go to the projector.
        seed: Seed of the clusterer and the reservoir.
        every_n_epochs: Analyse every n-th epoch.
        enable_logging: Log to TensorBoard and write files (``results`` is always filled).
        on_error: ``"warn"`` or ``"raise"`` when an analysis fails.

    Raises:
        NeuronsError: For bad arguments; at setup, if no ActivationTracker is attached or a layer
            is not tracked.

    Example:
        >>> trainer = Trainer(callbacks=[ActivationTracker(), NeuronClustering()])  # doctest: +SKIP
    """

    kind = "neuron_clustering"
    reads = (ActivationTracker, FeatureVisualizer)  # the visualizer's renders: projector sprites

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        method: NeuronMethod = "hdbscan",
        n_clusters: int | None = None,
        min_cluster_size: int | None = None,
        normalize: NeuronNormalize = "zscore",
        source: Literal["class_means", "reservoir"] = "class_means",
        reservoir_size: int = 1024,
        embedding: bool = True,
        max_embedding_neurons: int = 4096,
        seed: int = 0,
        every_n_epochs: int = 1,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(
            layers, every_n_epochs=every_n_epochs, enable_logging=enable_logging, on_error=on_error
        )
        self._clusterer_options = {
            "method": method,
            "n_clusters": n_clusters,
            "min_cluster_size": min_cluster_size,
            "normalize": normalize,
            "random_state": seed,
        }
        NeuronClusterer(**self._clusterer_options).check_params()  # now, not at the epoch's end
        check_choice("source", source, ("class_means", "reservoir"))
        self.method, self.n_clusters, self.min_cluster_size = method, n_clusters, min_cluster_size
        self.normalize, self.source, self.seed = normalize, source, seed
        self.reservoir_size = check_positive_int("reservoir_size", reservoir_size)
        self.embedding = embedding
        self.max_embedding_neurons = check_positive_int(
            "max_embedding_neurons", max_embedding_neurons
        )
        self.results: dict[str, NeuronClusteringResult] = {}
        self._previous: dict[str, np.ndarray] = {}
        self._hooks = HookSet()
        self._reservoirs: dict[str, ActivationReservoir] = {}
        self._labels: torch.Tensor | None = None
        self._warned_constant: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layer_patterns, method=self.method, source=self.source
        )

    # ---- the reservoir of per-image activations ----

    def _start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage != self._stage or self.source != "reservoir":
            return
        self._stop()
        self._reservoirs = {}
        if not self._due(trainer):
            return
        self._reservoirs = {}  # one per call site, made at its first batch
        self._hooks.add(pl_module, self.layers, self._on_activation)

    def _stop(self) -> None:
        self._hooks.remove()
        self._labels = None

    def _batch_start(self, stage: str, batch: Any, batch_idx: int) -> None:
        if stage != self._stage or not len(self._hooks):
            return
        self._labels = self._batch_labels(batch, batch_idx)
        self._hooks.new_pass()

    def _on_activation(self, name: str, output: torch.Tensor) -> None:
        if self._labels is None or in_analysis():
            return
        with torch.no_grad():
            values = reduce_activation(output.detach(), self._reduction, name)
            values = values[: self._labels.shape[0]]  # DistributedSampler's repeats left out
            if name not in self._reservoirs:
                self._reservoirs[name] = ActivationReservoir(self.reservoir_size, seed=self.seed)
            self._reservoirs[name].update(values, self._labels)

    # ---- the analysis ----

    def _epoch_analysis(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop()
        stats = self._fresh_stats(trainer)
        if stats is None:
            return
        self._run_safely("neuron clustering", lambda: self._analyse(trainer, stats))
        self._reservoirs = {}

    def _analyse(self, trainer: Trainer, stats: dict[str, LayerStats]) -> None:
        if not trainer.is_global_zero:
            return
        results: dict[str, NeuronClusteringResult] = {}
        for name, layer_stats in stats.items():
            # one layer that cannot be clustered (e.g. all neurons dead) must not sink the others
            res = self._run_safely(
                f"neuron clustering of layer {name!r}",
                lambda name=name, s=layer_stats: self._cluster(name, s),  # type: ignore[misc]
            )
            if res is not None:
                results[name] = res
        self.results = results
        for name, res in results.items():
            self._previous[name] = res.labels
        if self.enable_logging:
            self._log(trainer, results)

    def _cluster(self, name: str, stats: LayerStats) -> NeuronClusteringResult:
        means = stats.class_means.numpy()
        classes = np.flatnonzero(np.isfinite(means).any(axis=1))  # classes with images
        means = np.nan_to_num(means[classes])
        if self.source == "reservoir":
            reservoir = self._reservoirs.get(name)
            if reservoir is None or len(reservoir) < 2:
                raise NeuronsError(f"the reservoir of layer {name!r} holds fewer than 2 images")
            profile = reservoir.values.numpy()
        else:
            profile = means
        clusterer = NeuronClusterer(**self._clusterer_options)
        _, constant = normalize_neurons(np.ascontiguousarray(profile.T), self.normalize)
        if int((~constant).sum()) < clusterer.needed_neurons:
            return self._unclustered(name, stats, classes, means, int(constant.sum()))
        clusterer.fit(profile)
        labels = clusterer.labels_
        normalized, _ = normalize_neurons(means.T, self.normalize)
        found = np.unique(labels[labels >= 0])
        cluster_profiles = (
            np.stack([normalized[labels == c].mean(axis=0) for c in found])
            if found.size
            else np.zeros((0, means.shape[0]))
        )
        previous = self._previous.get(name)
        stability = (
            _ari(previous, labels)
            if previous is not None and previous.shape == labels.shape
            else float("nan")
        )
        return NeuronClusteringResult(
            layer=name,
            epoch=stats.epoch,
            classes=classes,
            labels=labels,
            n_clusters=clusterer.n_clusters_,
            cluster_sizes=clusterer.cluster_sizes_,
            noise_fraction=float((labels < 0).mean()),
            cluster_profiles=cluster_profiles,
            silhouette=clusterer.silhouette_,
            preferred_class=stats.preferred_class.numpy(),
            selectivity=stats.selectivity.numpy(),
            stability=stability,
            source=self.source,
            extra={"features": normalized},
        )

    def _unclustered(
        self, name: str, stats: LayerStats, classes: np.ndarray, means: np.ndarray, constant: int
    ) -> NeuronClusteringResult:
        """A layer whose neurons (nearly) all respond the same to every class (e.g. dead ones):
        nothing to cluster, every neuron unclustered (-1); said once per layer."""
        if name not in self._warned_constant:
            self._warned_constant.add(name)
            rank_zero_warn(
                f"NeuronClustering: {constant} of the {means.shape[1]} neurons of layer {name!r} "
                f"respond the same to every class (dead or constant) in epoch {stats.epoch}; too "
                "few vary to be clustered, so all are left unclustered (-1)."
            )
        normalized, _ = normalize_neurons(means.T, self.normalize)
        labels = np.full(means.shape[1], -1, dtype=np.int64)
        return NeuronClusteringResult(
            layer=name,
            epoch=stats.epoch,
            classes=classes,
            labels=labels,
            n_clusters=0,
            cluster_sizes=np.zeros(0, dtype=np.int64),
            noise_fraction=1.0,
            cluster_profiles=np.zeros((0, means.shape[0])),
            silhouette=float("nan"),
            preferred_class=stats.preferred_class.numpy(),
            selectivity=stats.selectivity.numpy(),
            source=self.source,
            extra={"features": normalized},
        )

    def _log(self, trainer: Trainer, results: dict[str, NeuronClusteringResult]) -> None:
        from lightning_neurons.plots.clustering import cluster_profiles_figure

        out = AnalysisLogger(trainer, self.kind, owner=self)
        if not out.is_writer:
            return
        scalars: dict[str, float] = {}
        for name, res in results.items():
            all_names = class_names_of(trainer, self._num_classes(res))
            names = [all_names[i] for i in res.classes]
            if out.experiment is not None:
                fig = cluster_profiles_figure(
                    res.cluster_profiles,
                    res.cluster_sizes,
                    names,
                    noise=int((res.labels < 0).sum()),
                    title=f"{name}: neuron clusters, epoch {res.epoch}",
                )
                out.figure(out.tag(name, "cluster_profiles"), fig)
                out.text(out.tag(name, "clusters"), self._table(res, names))
            scalars[out.tag(name, "n_clusters")] = float(res.n_clusters)
            scalars[out.tag(name, "noise_fraction")] = res.noise_fraction
            if np.isfinite(res.silhouette):
                scalars[out.tag(name, "silhouette")] = res.silhouette
            if np.isfinite(res.stability):
                scalars[out.tag(name, "stability")] = res.stability
            out.save_arrays(
                name,
                res.as_arrays(),
                meta={
                    "layer": name,
                    "epoch": res.epoch,
                    "method": self.method,
                    "source": self.source,
                },
            )
        out.scalars(scalars)
        if self.embedding and out.experiment is not None and results:
            self._embedding(trainer, out, results)

    @staticmethod
    def _num_classes(res: NeuronClusteringResult) -> int:
        return int(max(res.classes.max(initial=-1), res.preferred_class.max(initial=-1))) + 1

    @staticmethod
    def _table(res: NeuronClusteringResult, names: list[str]) -> str:
        rows = []
        for c, (size, profile) in enumerate(
            zip(res.cluster_sizes, res.cluster_profiles, strict=True)
        ):
            top = np.argsort(-profile)[:3]
            rows.append((c, int(size), ", ".join(f"{names[i]} ({profile[i]:+.1f})" for i in top)))
        noise = int((res.labels < 0).sum())
        if noise:
            rows.append(("unclustered", noise, ""))
        return _markdown_table(("cluster", "neurons", "strongest classes (mean z)"), rows)

    def _embedding(
        self, trainer: Trainer, out: AnalysisLogger, results: dict[str, NeuronClusteringResult]
    ) -> None:
        share = max(1, self.max_embedding_neurons // len(results))
        features, metadata, picks = [], [], []
        for name, res in results.items():
            order = np.argsort(-np.nan_to_num(res.selectivity, nan=-1.0), kind="stable")[:share]
            order = np.sort(order)
            names = class_names_of(trainer, self._num_classes(res))
            for k in order.tolist():
                pref = int(res.preferred_class[k])
                metadata.append(
                    [
                        name,
                        str(k),
                        str(int(res.labels[k])),
                        names[pref] if pref < len(names) else str(pref),
                        f"{float(res.selectivity[k]):.3f}",
                    ]
                )
            features.append(res.extra["features"][order])
            picks.append((name, order))
        widths = {f.shape[1] for f in features}
        if len(widths) != 1:
            return
        mat = torch.as_tensor(np.concatenate(features), dtype=torch.float32)
        sprites = self._sprites(trainer, picks)
        out.experiment.add_embedding(
            mat,
            metadata=metadata,
            metadata_header=["layer", "neuron", "cluster", "preferred_class", "selectivity"],
            label_img=sprites,
            global_step=trainer.global_step,
            tag=self.kind,
        )

    @staticmethod
    def _sprites(trainer: Trainer, picks: list[tuple[str, np.ndarray]]) -> torch.Tensor | None:
        """Rendered images of the picked neurons from a FeatureVisualizer, if any (else None)."""
        found: dict[str, tuple[list[int], torch.Tensor]] = {}
        visualizer = find_callback(trainer, FeatureVisualizer)
        renderings = visualizer.results if visualizer is not None else {}
        for layer, _ in picks:
            entry = renderings.get(layer)
            if entry is not None:
                found[layer] = (entry.channels.tolist(), entry.images.detach().float().cpu())
        if not found:
            return None
        first = next(iter(found.values()))[1]
        channels_out = 3 if any(img.shape[1] == 3 for _, img in found.values()) else first.shape[1]
        size = min(32, first.shape[-1])
        blank = torch.full((channels_out, size, size), 0.5)
        rows = []
        for layer, order in picks:
            channels, images = found.get(layer, ([], torch.zeros(0)))
            position = {c: i for i, c in enumerate(channels)}
            for k in order.tolist():
                if k not in position:
                    rows.append(blank)
                    continue
                img = images[position[k]].clamp(0, 1)
                img = F.interpolate(
                    img[None], size=(size, size), mode="bilinear", align_corners=False
                )[0]
                if img.shape[0] != channels_out:
                    img = (
                        img.expand(channels_out, -1, -1)
                        if img.shape[0] == 1
                        else img[:channels_out]
                    )
                rows.append(img)
        return torch.stack(rows)
