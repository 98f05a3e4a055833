"""NeuronClustering: the paper's neuron clustering, epoch after epoch.

It reads the class profiles that an :class:`~lightning_neurons.ActivationTracker` gathered (or a
reservoir of per-image activations), clusters each layer's neurons on rank zero at the end of the
tracker's stage, logs figures, tables, scalars and the embedding projector to TensorBoard, writes
the numbers next to the event files, and keeps the latest results in ``callback.results``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_neurons import progress
from lightning_neurons.callbacks._base import (
    OnError,
    StageBatch,
    checked_options,
    class_names_of,
)
from lightning_neurons.callbacks._clustering import (
    _ClusteringCallback,
    _markdown_table,
    _stability,
    clusterer_options,
)
from lightning_neurons.checks import Constraints, Interval, Options
from lightning_neurons.clustering import (
    ActivationReservoir,
    NeuronClusterer,
    NeuronMethod,
    NeuronNormalize,
    normalize_neurons,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.layouts import reduce_activation
from lightning_neurons.loggers import find_tensorboard
from lightning_neurons.outputs import leading_size
from lightning_neurons.projector import MAX_IMAGES, CropSearch
from lightning_neurons.results import NeuronClusteringResult
from lightning_neurons.state import in_analysis
from lightning_neurons.stats import LayerStats

Source = Literal["class_means", "reservoir"]


class NeuronClustering(_ClusteringCallback):
    """Clusters each layer's neurons by how they respond across the classes (neurons are points).

    Uses :class:`~lightning_neurons.clustering.NeuronClusterer` on the tracker's class profile
    (``source="class_means"``), or on a bounded reservoir of per-image activations gathered by
    this callback's own forward hooks during the tracker's stage (``source="reservoir"``; memory
    ``reservoir_size x neurons`` per layer; under DDP each rank samples its own share and rank
    zero clusters its sample).

    Logged per layer under ``neuron_clustering/<layer>/``: the cluster sizes as a table and
    scalars (``n_clusters``, ``noise_fraction``, ``silhouette``, ``stability``: adjusted Rand
    index with the previous analysis), and each cluster's mean class profile as a figure. Each
    layer's neurons go to TensorBoard's embedding projector (one embedding per layer, of the
    latest epoch: ``relu3, epoch 9``; see :mod:`lightning_neurons.projector`), labelled
    ``relu3/4``, with layer-qualified clusters and as its image the crop of the tracker's analysed
    data that activates it most (among the first 512 images of the epoch, searched by this
    callback's hooks as they go through the model: no second pass over the data). Arrays go to
    ``<log_dir>/neurons/<stage>/neuron_clustering/epoch=EEE/<layer>.npz``.

    Args:
        layers: Tracked layers (default: all the tracker's layers).
        method: ``"hdbscan"``, ``"kmeans"`` or ``"agglomerative"``.
        n_clusters: For k-means / agglomerative; ``None`` chooses by silhouette.
        min_cluster_size: HDBSCAN's smallest cluster; default ``max(3, int(sqrt(n) / 2))`` for
            the ``n`` neurons whose response varies (see
            :func:`~lightning_neurons.clustering.default_min_cluster_size`).
        normalize: How each neuron's response is normalised: ``"zscore"``, ``"l2"``, ``"max"``,
            ``"none"``.
        source: ``"class_means"`` or ``"reservoir"``.
        reservoir_size: Per-image rows kept per layer for ``source="reservoir"``.
        embedding: Write the embedding projector data.
        max_embedding_neurons: At most this many neurons (the most selective of each layer, in
            equal shares) go to the projector.
        seed: Seed of the clusterer and the reservoir.
        every_n_epochs: Analyse every n-th epoch.
        within_epochs: Validations within an epoch too (``False``: its last only).
        enable_logging: Log to TensorBoard and write files (``results`` is always filled).
        on_error: ``"warn"`` or ``"raise"`` when an analysis fails.

    Raises:
        NeuronsError: For bad arguments; at setup, if no ActivationTracker is attached or a layer
            is not tracked.

    Example:
        >>> trainer = Trainer(callbacks=[ActivationTracker(), NeuronClustering()])  # doctest: +SKIP
    """

    kind = "neuron_clustering"
    _parameter_constraints: ClassVar[Constraints] = {
        **_ClusteringCallback._parameter_constraints,
        "method": [Options.of(NeuronMethod)],
        "n_clusters": [Interval(int, 1, None), None],
        "min_cluster_size": [Interval(int, 2, None), None],
        "normalize": [Options.of(NeuronNormalize)],
        "source": [Options.of(Source)],
        "reservoir_size": [Interval(int, 1, None)],
        "embedding": [bool],
        "max_embedding_neurons": [Interval(int, 1, None)],
        "seed": [Interval(int, 0, None)],
    }

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        method: NeuronMethod = "hdbscan",
        n_clusters: int | None = None,
        min_cluster_size: int | None = None,
        normalize: NeuronNormalize = "zscore",
        source: Source = "class_means",
        reservoir_size: int = 1024,
        embedding: bool = True,
        max_embedding_neurons: int = 4096,
        seed: int = 0,
        every_n_epochs: int = 1,
        within_epochs: bool = True,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(**checked_options(self, locals()))
        self._clusterer_options = clusterer_options(NeuronClusterer, locals())
        self.method, self.n_clusters, self.min_cluster_size = method, n_clusters, min_cluster_size
        self.normalize, self.source, self.seed = normalize, source, seed
        self.reservoir_size = int(reservoir_size)
        self.embedding = embedding
        self.max_embedding_neurons = int(max_embedding_neurons)
        self.results: dict[str, NeuronClusteringResult] = {}
        #: The trainer's ``global_step`` when :attr:`results` were made: the model they describe.
        self.results_step: int | None = None
        self._previous: dict[str, torch.Tensor] = {}
        self._reservoirs: dict[str, ActivationReservoir] = {}
        self._crops: CropSearch | None = None  # the projector's images, searched as batches pass
        self._warned_constant: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layer_patterns, method=self.method, source=self.source
        )

    # ---- what the hooks gather during the tracker's stage: reservoir, projector images ----

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop()
        self._reservoirs = {}  # one per call site, made at its first batch
        self._crops = None
        if not self._due(trainer):
            return
        if (
            self.embedding
            and self.enable_logging
            and trainer.is_global_zero
            and find_tensorboard(trainer)
        ):
            self._crops = CropSearch(MAX_IMAGES)  # the batches the model runs anyway
        if self.source == "reservoir" or self._crops is not None:
            self._hooks.add(pl_module, self.layers, self._on_activation)

    def _stop(self) -> None:
        self._hooks.remove()
        self._labels = None
        if self._crops is not None:
            self._crops.end_batch()

    def _gather(self, batch: Any, batch_idx: int) -> None:
        if not len(self._hooks):
            return
        if self.source == "reservoir":
            self._labels = self._batch_labels(batch, batch_idx)
        if self._crops is not None and not self._crops.full:
            self._run_safely("embedding projector images", lambda: self._add_crops(batch))
        self._hooks.new_pass()

    def _add_crops(self, batch: Any) -> None:
        """Hand the batch about to go through the model to the projector's crop search."""
        assert self._crops is not None
        inputs = self.spec.reader.inputs(batch)
        self._hooks.batch_size = leading_size(inputs)
        self._crops.add_batch(inputs)

    def _release(self) -> None:
        super()._release()
        self._crops = None

    def _on_batch_end(self, trainer: Trainer, pl_module: LightningModule, step: StageBatch) -> None:
        super()._on_batch_end(trainer, pl_module, step)
        if self._crops is not None:
            self._crops.end_batch()
            if self._crops.full and self.source != "reservoir":
                self._hooks.remove()  # the rest of the epoch runs without our hooks

    def _on_activation(self, name: str, output: torch.Tensor) -> None:
        if in_analysis():
            return
        if self._crops is not None:
            self._crops.update(name, output)
        if self._labels is None:
            return
        with torch.no_grad():
            values = reduce_activation(output.detach(), self.spec.reduction, name)
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
        self.results_step = trainer.global_step
        self._reservoirs = {}
        self._crops = None

    def _analyse(self, trainer: Trainer, stats: dict[str, LayerStats]) -> None:
        if not trainer.is_global_zero:
            return
        # the last analysis's results go first: they hold each layer's [K, C] features (38 MB
        # for ResNet-50's 17 layers at 1,000 classes), which would be held twice meanwhile
        self.results = {}
        results: dict[str, NeuronClusteringResult] = {}
        for name, layer_stats in stats.items():
            # one layer that cannot be clustered (e.g. all neurons dead) must not sink the others
            progress.phase(f"clustering the neurons of {name}")
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
        # [K, C]: the features shown, and (class means clustered) those clustered
        normalized, constant = normalize_neurons(np.ascontiguousarray(means.T), self.normalize)
        profile = means
        if self.source == "reservoir":
            reservoir = self._reservoirs.get(name)
            if reservoir is None or len(reservoir) < 2:
                raise NeuronsError(f"the reservoir of layer {name!r} holds fewer than 2 images")
            profile = reservoir.values.numpy()
            _, constant = normalize_neurons(np.ascontiguousarray(profile.T), self.normalize)
        clusterer = NeuronClusterer(**self._clusterer_options)
        if int((~constant).sum()) < clusterer.needed_neurons:
            return self._unclustered(
                name, stats, classes, normalized, int(constant.sum()), clusterer.needed_neurons
            )
        clusterer.fit(profile)
        labels = clusterer.labels_
        found = np.unique(labels[labels >= 0])
        cluster_profiles = (
            np.stack([normalized[labels == c].mean(axis=0) for c in found])
            if found.size
            else np.zeros((0, means.shape[0]))
        )
        return NeuronClusteringResult(
            layer=name,
            epoch=stats.epoch,
            classes=torch.as_tensor(classes, dtype=torch.int64),
            labels=torch.as_tensor(labels, dtype=torch.int64),
            n_clusters=clusterer.n_clusters_,
            cluster_sizes=torch.as_tensor(clusterer.cluster_sizes_, dtype=torch.int64),
            noise_fraction=float((labels < 0).mean()),
            cluster_profiles=torch.as_tensor(cluster_profiles),
            silhouette=clusterer.silhouette_,
            preferred_class=stats.preferred_class,
            selectivity=stats.selectivity,
            features=torch.as_tensor(normalized),
            stability=_stability(self._previous.get(name), labels),
            source=self.source,
        )

    def _unclustered(
        self,
        name: str,
        stats: LayerStats,
        classes: np.ndarray,
        normalized: np.ndarray,
        constant: int,
        needed: int,
    ) -> NeuronClusteringResult:
        """A layer whose neurons (nearly) all respond the same to every class (e.g. dead ones):
        nothing to cluster, every neuron unclustered (-1); said once per layer. ``normalized``:
        the ``[K, C]`` normalised class means; ``constant`` of them respond the same to every
        class, and the clusterer needs ``needed`` that do not."""
        neurons, num_classes = normalized.shape
        if name not in self._warned_constant:
            self._warned_constant.add(name)
            why = (
                f"layer {name!r} has {neurons} neuron{'s' if neurons != 1 else ''}"
                if neurons < needed
                else f"{constant} of the {neurons} neurons of layer {name!r} respond the same to "
                f"every class (dead or constant) in epoch {stats.epoch}"
            )
            rank_zero_warn(
                f"NeuronClustering: {why}; clustering needs at least {needed} neurons whose "
                "responses vary, so all are left unclustered (-1)."
            )
        return NeuronClusteringResult(
            layer=name,
            epoch=stats.epoch,
            classes=torch.as_tensor(classes, dtype=torch.int64),
            labels=torch.full((neurons,), -1, dtype=torch.int64),
            n_clusters=0,
            cluster_sizes=torch.zeros(0, dtype=torch.int64),
            noise_fraction=1.0,
            cluster_profiles=torch.zeros(0, num_classes, dtype=torch.float64),
            silhouette=float("nan"),
            preferred_class=stats.preferred_class,
            selectivity=stats.selectivity,
            features=torch.as_tensor(normalized),
            source=self.source,
        )

    def _log(self, trainer: Trainer, results: dict[str, NeuronClusteringResult]) -> None:
        from lightning_neurons.plots.clustering import cluster_profiles_figure

        out = self._file_writer(trainer, self.kind)
        if out is None:
            return
        scalars: dict[str, float] = {}
        for name, res in results.items():
            progress.advance("layer", len(results))
            all_names = class_names_of(trainer, self._num_classes(res))
            names = [all_names[i] for i in res.classes.tolist()]
            out.figure(
                out.tag(name, "cluster_profiles"),
                cluster_profiles_figure,
                res.cluster_profiles.numpy(),
                res.cluster_sizes.numpy(),
                names,
                noise=int((res.labels < 0).sum()),
                title=f"{name}: neuron clusters, epoch {res.epoch}",
            )
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
            from lightning_neurons.projector import log_neuron_projector

            progress.phase("embedding projector")

            num_classes = max(self._num_classes(r) for r in results.values())
            searched = self._crops is not None and self._crops.rows > 0
            log_neuron_projector(
                trainer,
                out.experiment.get_logdir(),
                self.kind,
                results,
                class_names_of(trainer, num_classes),
                spec=self.spec,
                max_neurons=self.max_embedding_neurons,
                tiles=self._crops if searched else None,
                owner=self,
            )

    @staticmethod
    def _num_classes(res: NeuronClusteringResult) -> int:
        indices = torch.cat([res.classes.long(), res.preferred_class.long(), torch.tensor([-1])])
        return int(indices.max()) + 1

    @staticmethod
    def _table(res: NeuronClusteringResult, names: list[str]) -> str:
        rows = []
        for c, (size, profile) in enumerate(
            zip(res.cluster_sizes.tolist(), res.cluster_profiles.tolist(), strict=True)
        ):
            top = np.argsort(-np.asarray(profile), kind="stable")[:3]
            rows.append((c, size, ", ".join(f"{names[i]} ({profile[i]:+.1f})" for i in top)))
        noise = int((res.labels < 0).sum())
        if noise:
            rows.append(("unclustered", noise, ""))
        return _markdown_table(("cluster", "neurons", "strongest classes (mean z)"), rows)
