"""CategoryClustering: the paper's category clustering, epoch after epoch.

It reads the class profiles that an :class:`~lightning_neurons.ActivationTracker` gathered (one
set of hooks for every analysis), clusters the categories on rank zero at the end of the tracker's
stage, logs figures, tables and scalars to TensorBoard, writes the numbers next to the event files,
and keeps the latest results in ``callback.results``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_neurons import progress
from lightning_neurons.callbacks._base import OnError, checked_options, class_names_of
from lightning_neurons.callbacks._clustering import (
    _ClusteringCallback,
    _markdown_table,
    _stability,
    clusterer_options,
)
from lightning_neurons.callbacks._evolution_log import ClusteringEvolutionLog
from lightning_neurons.checks import Constraints, Interval, Options, Satisfies
from lightning_neurons.clustering import (
    CategoryClusterer,
    CategoryMethod,
    CategoryNormalize,
    Linkage,
    Metric,
)
from lightning_neurons.distributed import gather
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import resolve_layers, selects
from lightning_neurons.results import CategoryClusteringResult
from lightning_neurons.state import in_analysis
from lightning_neurons.stats import ConfusionCounts, LayerStats

#: Name of the category-clustering view that puts all chosen layers side by side.
COMBINED = "combined"
_VIEWS = "'deepest', 'combined' or a layer name"
#: How many of the deepest layers are views by default (with the combined view): the work of an
#: epoch does not grow with the number of tracked layers.
DEEPEST_VIEWS = 1
_VIEW_CHOICE = (
    "an integer >= 1 (the deepest layers), 'all', or a list of layer names and 'combined'"
)


def _is_view_choice(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    if isinstance(value, str):
        return value == "all"
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(v, str) and v for v in value)
    )


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
    return _agreement(distances, _confusion_ranks(confusion))


def _confusion_ranks(confusion: np.ndarray) -> np.ndarray | None:
    """The ranks of the symmetrised confusion rates over the pairs of distinct classes (the
    same for every view of an epoch); ``None`` when they are constant."""
    from scipy.stats import rankdata

    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    similarity = (rates + rates.T) / 2.0
    y = similarity[np.triu_indices(confusion.shape[0], k=1)]
    return rankdata(y) if y.size >= 2 and np.ptp(y) > 0 else None


def _agreement(distances: np.ndarray, confusion_ranks: np.ndarray | None) -> float:
    """Spearman's correlation: Pearson's of the ranks (ties share their mean rank)."""
    from scipy.stats import rankdata

    x = -distances[np.triu_indices(distances.shape[0], k=1)]
    if confusion_ranks is None or x.size < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(x), confusion_ranks)[0, 1])


# ---- category clustering ----------------------------------------------------------------------


class CategoryClustering(_ClusteringCallback):
    """Clusters the image categories by how the neurons respond to them (categories are points).

    At the end of each analysed epoch it takes the ActivationTracker's class profiles of
    ``layers`` and clusters the classes with :class:`~lightning_neurons.clustering.CategoryClusterer`,
    for the layers ``views`` chooses and (``combine_layers``) for all of them side by side, each
    layer's neurons z-scored then. It also counts the model's predictions against the labels on
    the same batches (a forward hook on the classifier layer: one ``[C, C]`` confusion matrix,
    nothing per image) to compare the class distances with the classes the model confuses.

    Logged per view under ``category_clustering/<view>/``: the dendrogram with class names, the
    class-distance matrix next to the confusion matrix, the assignments as a Markdown table,
    and scalars ``silhouette``, ``n_clusters``, ``distance_confusion_spearman`` and ``stability``
    (adjusted Rand index with the previous analysis). Arrays go to
    ``<log_dir>/neurons/<stage>/category_clustering/epoch=EEE/<view>.npz``.

    The views clustered and logged are chosen by ``views``: by default the deepest layer and the
    combined view, so that the work of an epoch does not grow with the number of tracked layers
    (``views="all"``: every layer). :attr:`result` is the *headline* view chosen by ``view``
    (always among the views): by default the deepest analysed layer, the network's own
    representation of the categories.

    The defaults (``normalize="zscore"``, ``view="deepest"``, with the tracker's
    ``reduction="mean"``) are the choices that recovered known class groups on the parts data
    sets (:mod:`lightning_neurons.parts`); see ``docs/benchmarks.md``.

    Args:
        layers: Tracked layers to cluster on (default: all the tracker's layers).
        method: ``"agglomerative"``, ``"kmeans"`` or ``"hdbscan"``.
        metric: ``"correlation"``, ``"cosine"`` or ``"euclidean"`` distance between profiles.
        linkage: Agglomerative linkage.
        normalize: ``"zscore"`` (each neuron standardised across the classes) or ``"none"``.
        n_clusters: Fixed number of clusters, or ``None`` to choose it by silhouette.
        combine_layers: Also cluster on all ``layers`` together (when there are several), each
            neuron z-scored so that every neuron counts equally.
        views: The views clustered and logged: an integer ``n``, the ``n`` deepest layers (and the
            combined view, with ``combine_layers``); ``"all"``, every layer (and the combined
            view); or a list of layer names and ``"combined"``. The headline view ``view`` is
            always added.
        view: The headline view (:attr:`result`, :attr:`main_view`): ``"deepest"`` (the last
            analysed layer in the forward pass), ``"combined"``, or a layer name.
        classifier_layer: Module whose output are the logits, for the confusion matrix; default:
            the model's last ``Linear``. ``None`` and no Linear: no confusion matrix.
        confusion: Collect the confusion matrix.
        every_n_epochs: Analyse every n-th epoch.
        within_epochs: Validations within an epoch too (``False``: its last only).
        enable_logging: Log to TensorBoard and write files (``results`` is always filled).
        on_error: ``"warn"`` or ``"raise"`` when an analysis fails.

    Raises:
        NeuronsError: For bad arguments; at setup, if no ActivationTracker is attached, a layer
            is not tracked, ``views`` or ``view`` names a layer that is not among ``layers``, or
            ``classifier_layer`` does not exist.

    Example:
        >>> category = CategoryClustering()
        >>> trainer = Trainer(callbacks=[ActivationTracker(), category])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> category.result.labels  # the deepest layer's clustering  # doctest: +SKIP
        >>> category.results["combined"].labels  # doctest: +SKIP
    """

    kind = "category_clustering"
    _parameter_constraints: ClassVar[Constraints] = {
        **_ClusteringCallback._parameter_constraints,
        "method": [Options.of(CategoryMethod)],
        "metric": [Options.of(Metric)],
        "linkage": [Options.of(Linkage)],
        "normalize": [Options.of(CategoryNormalize)],
        "n_clusters": [Interval(int, 1, None), None],
        "combine_layers": [bool],
        "views": [Satisfies(_is_view_choice, _VIEW_CHOICE)],
        "view": [Satisfies(lambda v: isinstance(v, str) and bool(v), _VIEWS)],
        "classifier_layer": [str, None],
        "confusion": [bool],
    }

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
        views: int | Literal["all"] | list[str] = DEEPEST_VIEWS,
        view: str = "deepest",
        classifier_layer: str | None = None,
        confusion: bool = True,
        every_n_epochs: int = 1,
        within_epochs: bool = True,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(**checked_options(self, locals()))
        self._clusterer_options = clusterer_options(CategoryClusterer, locals())
        self.method, self.metric, self.linkage = method, metric, linkage
        self.normalize, self.n_clusters = normalize, n_clusters
        self.combine_layers = combine_layers
        if not isinstance(views, (int, str)):
            views = list(views)
            if COMBINED in views and not combine_layers:
                raise NeuronsError(
                    "CategoryClustering: `views` names 'combined' but combine_layers=False; "
                    "pass combine_layers=True, or leave 'combined' out of `views`"
                )
        self.views = views
        self.view = view
        #: The name of the headline view of the latest analysis (see ``view``).
        self.main_view: str | None = None
        self.classifier_layer = classifier_layer
        self.confusion = confusion
        self.results: dict[str, CategoryClusteringResult] = {}
        self._classifier: str | None = None
        self._confusion: ConfusionCounts | None = None
        self._broken = False  # the classifier's output was not logits in this epoch
        self._collecting = False
        self._armed = False
        self._previous: dict[str, torch.Tensor] = {}
        self._warned_shape = False
        self._evolution = ClusteringEvolutionLog()  # the across-epochs figures
        self._ranked: tuple[bytes, np.ndarray | None] | None = None  # this epoch's confusions

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
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._evolution.pending and (out := self._file_writer(trainer, self.kind)):
            self._run_safely("logging the evolution figures", lambda: self._evolution.flush(out))
        super().teardown(trainer, pl_module, stage)

    @override
    def _start_fit(self) -> None:
        super()._start_fit()
        self._evolution = ClusteringEvolutionLog()

    @override
    def _set_up(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super()._set_up(trainer, pl_module, stage)
        if self.spec.num_classes < 3:
            raise NeuronsError(
                f"CategoryClustering groups the categories by how the neurons respond to them: it "
                f"needs 3 classes or more, and the model predicts {self.spec.num_classes}. Leave "
                "it out of the callbacks (the other analyses work with 2 classes)."
            )
        if self.view not in ("deepest", COMBINED) and not selects(self.layers, self.view):
            raise NeuronsError(
                f"CategoryClustering: `view` {self.view!r} is not one of its layers "
                f"({', '.join(self.layers)}); use 'deepest', 'combined' or one of those"
            )
        if isinstance(self.views, list):
            unknown = [v for v in self.views if v != COMBINED and not selects(self.layers, v)]
            if unknown:
                raise NeuronsError(
                    f"CategoryClustering: `views` names {', '.join(map(repr, unknown))}, not "
                    f"among its layers ({', '.join(self.layers)}); use 'combined' or those "
                    "layer names (or views=N for the N deepest, views='all' for every layer)"
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

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop()
        self._confusion, self._broken = None, False
        self._armed = False
        if self._classifier is None or not self._due(trainer):
            return
        self._confusion = ConfusionCounts(self.spec.num_classes).to(pl_module.device)
        self._collecting = True
        self._armed = True  # the same on every rank, unlike `_collecting` (see `_shape_problem`)
        self._hooks.add(pl_module, [self._classifier], self._on_logits)

    def _stop(self) -> None:
        self._hooks.remove()
        self._labels = None
        self._collecting = False

    def _gather(self, batch: Any, batch_idx: int) -> None:
        if self._collecting:
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
            self._confusion.update(output, labels)

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

    def _confusion_matrix(self, trainer: Trainer) -> torch.Tensor | None:
        """The epoch's confusion counts summed over ranks (called on every rank; ``None`` when the
        classifier's output was not ``[batch, num_classes]`` logits on some rank)."""
        metric, broken = self._confusion, self._broken
        self._confusion, self._broken = None, False
        broken = broken or metric is None or metric.update_count == 0
        if any(gather(broken, trainer.world_size, "collecting the confusion matrix")):
            return None
        counts = metric.compute()  # torchmetrics sums the counts over the ranks
        return counts.detach().cpu().double()

    # ---- the analysis ----

    def _epoch_analysis(self, trainer: Trainer, pl_module: LightningModule) -> None:
        armed, self._armed = self._armed, False
        self._stop()
        confusion = self._confusion_matrix(trainer) if armed else None
        stats = self._fresh_stats(trainer)
        if stats is None:
            return
        self._run_safely("category clustering", lambda: self._analyse(trainer, stats, confusion))

    def _chosen_views(self, layers: list[str]) -> list[str]:
        """The views clustered for these analysed layers (in the forward pass's order), as
        ``views`` and ``view`` choose them: layer names in that order, then ``"combined"``."""
        combined = self.combine_layers and len(layers) > 1
        if self.views == "all":
            chosen = set(layers) | ({COMBINED} if combined else set())
        elif isinstance(self.views, int):
            chosen = set(layers[-self.views :]) | ({COMBINED} if combined else set())
        else:
            chosen = {n for n in layers if any(selects([v], n) for v in self.views)}
            chosen |= {COMBINED} if combined and COMBINED in self.views else set()
        if self.view == "deepest" and layers:
            chosen.add(layers[-1])
        elif self.view == COMBINED:
            chosen.add(COMBINED if combined else layers[-1])
        else:
            chosen |= {n for n in layers if selects([self.view], n)}
        return [n for n in [*layers, COMBINED] if n in chosen]

    def _views(self, stats: dict[str, LayerStats]) -> dict[str, tuple[list[str], np.ndarray]]:
        layers = list(stats)
        chosen = self._chosen_views(layers)
        views = {
            name: ([name], stats[name].class_means.numpy()) for name in chosen if name != COMBINED
        }
        if COMBINED in chosen:
            from lightning_neurons.clustering import standardize_columns

            profiles = [s.class_means.numpy() for s in stats.values()]
            blocks = [standardize_columns(np.nan_to_num(p)) for p in profiles]
            # NaN rows (classes without images) stay NaN so that they are left out below.
            missing = np.any([~np.isfinite(p).all(axis=1) for p in profiles], axis=0)
            combined = np.concatenate(blocks, axis=1)
            combined[missing] = np.nan
            views[COMBINED] = (layers, combined)
        return views

    def _analyse(
        self, trainer: Trainer, stats: dict[str, LayerStats], confusion: torch.Tensor | None
    ) -> None:
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        self._ranked = None
        results: dict[str, CategoryClusteringResult] = {}
        for view, (layers, profile) in self._views(stats).items():
            names = class_names_of(trainer, profile.shape[0])
            progress.phase(f"clustering view {view}")
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
        confusion: torch.Tensor | None,
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
        options = self._clusterer_options
        whole = rows.size == num_classes and bool(cols.all())
        if view == COMBINED and whole:
            # Its blocks are z-scored already (see `_views`): again would change only the rounding.
            options = {**options, "normalize": "none"}
        clusterer = CategoryClusterer(**options).fit(
            profile if whole else profile[np.ix_(rows, cols)]
        )
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
            key = rows.tobytes()  # the classes clustered: the same in most views
            if self._ranked is None or self._ranked[0] != key:
                self._ranked = (key, _confusion_ranks(confusion.numpy()[np.ix_(rows, rows)]))
            agreement = _agreement(clusterer.distances_, self._ranked[1])
        linkage = clusterer.linkage_
        return CategoryClusteringResult(
            view=view,
            layers=layers,
            epoch=epoch,
            class_names=names,
            classes=torch.as_tensor(rows, dtype=torch.int64),
            labels=torch.as_tensor(labels, dtype=torch.int64),
            n_clusters=clusterer.n_clusters_,
            silhouette=clusterer.silhouette_,
            distances=torch.as_tensor(distances),
            linkage=None if linkage is None else torch.as_tensor(np.asarray(linkage)),
            leaf_order=torch.tensor(order, dtype=torch.int64),
            confusion=confusion,
            agreement=agreement,
            stability=_stability(self._previous.get(view), labels),
        )

    def _log(self, trainer: Trainer, results: dict[str, CategoryClusteringResult]) -> None:
        from lightning_neurons.plots.clustering import distance_confusion_figure

        out = self._file_writer(trainer, self.kind)
        if out is None:
            return
        scalars: dict[str, float] = {}
        assignments: dict[str, dict[str, int]] = {}
        for view, res in results.items():
            kept = res.leaf_order.tolist()
            names = [res.class_names[i] for i in kept]
            title = f"{view}: epoch {res.epoch}, {res.n_clusters} clusters, silhouette {res.silhouette:.2f}"
            if res.linkage is not None:
                leaf_names = [res.class_names[i] for i in res.classes.tolist()]
                args = (res.linkage.numpy(), leaf_names, res.n_clusters, title)
                out.figure(out.tag(view, "dendrogram"), _dendrogram, *args)
            sub = np.ix_(kept, kept)
            out.figure(
                out.tag(view, "distance_vs_confusion"),
                distance_confusion_figure,
                res.distances.numpy()[sub],
                None if res.confusion is None else res.confusion.numpy()[sub],
                names,
                agreement=res.agreement if res.confusion is not None else None,
                title=title,
            )
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
            assignments[view] = dict(zip(res.class_names, res.labels.tolist(), strict=True))
        out.save_json("assignments", assignments)
        out.scalars({k: v for k, v in scalars.items() if np.isfinite(v)})
        self._evolution.log(out, results)

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
        labels = res.labels.tolist()
        for cluster in sorted(set(labels)):
            members = [n for n, c in zip(res.class_names, labels, strict=True) if c == cluster]
            label = "left out" if cluster < 0 else str(cluster)
            rows.append((label, len(members), ", ".join(members)))
        return _markdown_table(("cluster", "classes", "members"), rows)


def _dendrogram(*args: Any) -> np.ndarray:
    """The image of :func:`~lightning_neurons.plots.clustering.dendrogram_figure`."""
    from lightning_neurons.plots.clustering import dendrogram_figure

    return dendrogram_figure(*args)[0]
