"""What each callback publishes in its ``results``: one typed dataclass per layer (or view), all
documented here.

========================  =========================================  ===============================
callback                  attribute                                  entry
========================  =========================================  ===============================
ActivationTracker         ``spec`` (set at setup)                    :class:`TrackerSpec`
ActivationTracker         ``results[layer]``                         :class:`LayerStats`
FeatureVisualizer         ``results[layer]``, ``results["classes"]``  :class:`Rendering`
FeatureVisualizer         ``saliency_results`` (or ``None``)         :class:`SaliencyMaps`
FeatureVisualizer         ``cluster_results[layer]``                 :class:`ClusterRendering`
CategoryClustering        ``results[view]``                          :class:`CategoryClusteringResult`
NeuronClustering          ``results[layer]``                         :class:`NeuronClusteringResult`
NeuronContribution        ``results[layer]``                         :class:`ContributionResult`
========================  =========================================  ===============================

Each callback publishes its results at the end of its own stage's epoch and reads the others' at
the end of the stage (see :class:`~lightning_neurons.callbacks._base.AnalysisCallback`); every
entry has the ``epoch`` it is from. Arrays are :class:`torch.Tensor` on the CPU, in every
result type. The tracker's :class:`TrackerSpec` says how all of them read the data; peers look it
up with :func:`~lightning_neurons.callbacks.tracker.tracker_spec` and read the tracker's
statistics with :func:`~lightning_neurons.callbacks.tracker.tracker_results`, never through the
tracker object itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lightning_neurons.ablation import AblationResult
from lightning_neurons.batch import BatchReader
from lightning_neurons.class_contribution import ContributionStats
from lightning_neurons.stats import LayerStats

__all__ = [
    "AblationResult",
    "CategoryClusteringResult",
    "ClusterRendering",
    "ContributionResult",
    "ContributionStats",
    "LayerAblation",
    "LayerStats",
    "NeuronClusteringResult",
    "Probes",
    "Rendering",
    "SaliencyMaps",
    "TrackerSpec",
]


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor fields of a dataclass by name (for ``.npz`` files)."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    return {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}


def _scalar(value: float | int | torch.Tensor) -> torch.Tensor:
    """A number as a 0-d float64 or int64 tensor (a tensor as it is)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64)


class _Arrays:
    """``as_arrays()``: the tensor fields by name (for ``.npz`` files)."""

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """The tensors by name (for ``.npz`` files)."""
        return _tensors(self)


# ---- ActivationTracker ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrackerSpec:
    """What an :class:`~lightning_neurons.ActivationTracker` tracks and how it reads batches:
    what its peers need to analyse the same images the same way. Read-only; the tracker sets it
    at setup (``tracker.spec``) and peers look it up with
    :func:`~lightning_neurons.callbacks.tracker.tracker_spec`.

    Attributes:
        reader: How inputs, labels and logits are read from batches and model outputs.
        layers: The tracked layers, resolved on the model (module names and ``name#i`` call
            sites, in the model's order).
        stage: The stage whose batches are analysed: ``"validation"``, ``"train"`` or ``"test"``.
        dataloader_idx: The analysed loader of that stage.
        reduction: How a conv channel's ``[H, W]`` map becomes one value: ``"mean"`` or ``"max"``.
        num_classes: Classes the model predicts.
        top_k: Dominant neurons per class.
        activations: Extra activation classes and ops counted as default layers.

    Example:
        >>> spec = TrackerSpec(BatchReader(), ("relu1",), "validation", 0, "mean", 10, 5)
        >>> spec.analyses("validation", 0), spec.analyses("validation", 1)
        (True, False)
    """

    reader: BatchReader
    layers: tuple[str, ...]
    stage: Literal["validation", "train", "test"]
    dataloader_idx: int
    reduction: Literal["mean", "max"]
    num_classes: int
    top_k: int
    activations: tuple[str, ...] = ()

    def resolve(self, model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
        """``patterns`` resolved on ``model`` as the tracker resolves its own (with its
        ``activations``; ``None``: the default layers)."""
        from lightning_neurons.hooks import resolve_layers

        return resolve_layers(model, patterns, self.activations)

    def analyses(self, stage: str, dataloader_idx: int = 0) -> bool:
        """Whether the batches of ``stage``'s loader ``dataloader_idx`` are the analysed ones."""
        return stage == self.stage and dataloader_idx == self.dataloader_idx


# ---- FeatureVisualizer ----------------------------------------------------------------------


@dataclass
class Rendering(_Arrays):
    """Images rendered for one layer's channels, or for classes (``results["classes"]``).

    ``N`` images; with ``n_images > 1`` each channel's images are consecutive rows.

    Attributes:
        channels: ``[N]`` channel (or class) index of each image.
        images: ``[N, C, H, W]`` display images in [0, 1].
        activation: ``[N]`` the channel's activation (the tracker's reduction) or the class logit.
        epoch: Epoch of the rendering.
        reference: ``[N]`` the channel's largest activation on the tracker's data (``None``
            without a tracker, and for classes).
        strength: ``[N]`` ``activation / reference`` (NaN where the reference is not positive).
        reference_epoch: Epoch of ``reference`` (older when the tracker gathers the train stage).
        probability: Classes only: ``[N]`` softmax probability of the class for its image.
        predicted: Classes only: ``[N]`` the model's predicted class for the image.
        judge_predicted: Classes with a judge model: ``[N]`` the judge's predicted class.
        judge_probability: Classes with a judge model: ``[N]`` its probability of the class.
        steps: ``[N]`` Adam steps each image was optimised for in this round (fewer than
            FeatureVisualizer's ``steps`` or ``continue_steps`` where ``converge_tol`` stopped
            it early).
    """

    channels: torch.Tensor
    images: torch.Tensor
    activation: torch.Tensor
    epoch: int
    reference: torch.Tensor | None = None
    strength: torch.Tensor | None = None
    reference_epoch: int | None = None
    probability: torch.Tensor | None = None
    predicted: torch.Tensor | None = None
    judge_predicted: torch.Tensor | None = None
    judge_probability: torch.Tensor | None = None
    steps: torch.Tensor | None = None

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """The tensors by name, and ``reference_epoch`` when known (for ``.npz`` files)."""
        arrays = _tensors(self)
        if self.reference_epoch is not None:
            arrays["reference_epoch"] = torch.tensor(self.reference_epoch)
        return arrays


@dataclass
class ClusterRendering(_Arrays):
    """Preferred images of one layer's largest neuron clusters (NeuronClustering's labels).

    ``K`` clusters, largest first; each image maximises the mean of its cluster's channels.

    Attributes:
        clusters: ``[K]`` cluster ids (NeuronClustering's labels).
        sizes: ``[K]`` neurons in each cluster.
        images: ``[K, C, H, W]`` display images in [0, 1].
        preferred_class: ``[K]`` the class the cluster responds to most (its mean class profile's
            largest entry).
        predicted: ``[K]`` the class the model predicts for the cluster's image.
        clusters_epoch: Epoch of the clustering the images were rendered for.
        epoch: Epoch of the rendering.
        judge_predicted: With a judge model: ``[K]`` the judge's predicted class.
        judge_probability: With a judge model: ``[K]`` its probability of ``preferred_class``.
        steps: ``[K]`` Adam steps each image was optimised for in this round (see
            :attr:`Rendering.steps`).
    """

    clusters: torch.Tensor
    sizes: torch.Tensor
    images: torch.Tensor
    preferred_class: torch.Tensor
    predicted: torch.Tensor
    clusters_epoch: int
    epoch: int
    judge_predicted: torch.Tensor | None = None
    judge_probability: torch.Tensor | None = None
    steps: torch.Tensor | None = None


@dataclass
class SaliencyMaps:
    """Saliency maps of the probe images.

    Attributes:
        images: ``[P, C, H, W]`` display images in [0, 1].
        inputs: ``[P, ...]`` the model inputs as the loader yielded them.
        labels: ``[P]`` labels.
        predicted: ``[P]`` predicted classes (the maps explain these).
        maps: ``{method: [P, H, W]}``.
        epoch: Epoch of the maps.
        gradcam_layer: The layer of the Grad-CAM maps (``None`` without them).
    """

    images: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor
    predicted: torch.Tensor
    maps: dict[str, torch.Tensor]
    epoch: int
    gradcam_layer: str | None = None

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """The tensors by name, maps as ``map_<method>`` (for ``.npz`` files)."""
        arrays = _tensors(self)
        arrays.update({f"map_{m}": v for m, v in self.maps.items()})
        return arrays


# ---- CategoryClustering and NeuronClustering ------------------------------------------------


@dataclass
class CategoryClusteringResult:
    """Category clustering of one view (a layer, or ``"combined"`` for all side by side).

    Attributes:
        view: Layer name or ``"combined"``.
        layers: Layers whose profiles were used.
        epoch: Epoch of the statistics.
        class_names: Names of the classes.
        classes: ``[C']`` indices of the classes that were clustered (those with statistics).
        labels: ``[C]`` cluster of each class (-1: left out, e.g. a class without images).
        n_clusters: Clusters found.
        silhouette: Mean silhouette of the labels on the class distances.
        distances: ``[C, C]`` class distances (NaN rows for classes left out).
        linkage: ``[C' - 1, 4]`` SciPy linkage matrix over the classes kept (agglomerative
            only, else ``None``).
        leaf_order: ``[C']`` class indices in dendrogram order (or cluster order).
        confusion: ``[C, C]`` confusion counts of the same epoch (rows: true), if collected.
        agreement: Spearman agreement of distances and confusions
            (:func:`~lightning_neurons.callbacks.category_clustering.distance_confusion_agreement`);
            NaN when undefined.
        stability: Adjusted Rand index with the previous analysis's labels (NaN the first time).
    """

    view: str
    layers: list[str]
    epoch: int
    class_names: list[str]
    classes: torch.Tensor
    labels: torch.Tensor
    n_clusters: int
    silhouette: float
    distances: torch.Tensor
    linkage: torch.Tensor | None
    leaf_order: torch.Tensor
    confusion: torch.Tensor | None = None
    agreement: float = float("nan")
    stability: float = float("nan")

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """The arrays by name (for ``.npz`` files): the ``[C, C]`` distances in float32 (7
        significant digits), the confusion counts as integers, and the class names as strings."""
        out: dict[str, Any] = {
            "labels": self.labels,
            "classes": self.classes,
            "distances": self.distances.float(),
            "leaf_order": self.leaf_order,
            "silhouette": _scalar(self.silhouette),
            "agreement": _scalar(self.agreement),
            "stability": _scalar(self.stability),
            "n_clusters": torch.tensor(self.n_clusters),
            "class_names": np.asarray([str(n) for n in self.class_names], dtype=str),
        }
        if self.linkage is not None:
            out["linkage"] = self.linkage
        if self.confusion is not None:
            out["confusion"] = self.confusion.round().long()
        return out


@dataclass
class NeuronClusteringResult:
    """Neuron clustering of one layer.

    Attributes:
        layer: Layer name.
        epoch: Epoch of the statistics.
        classes: ``[C']`` indices of the classes with statistics (the columns of
            ``cluster_profiles``).
        labels: ``[K]`` cluster of each neuron (-1: unclustered: HDBSCAN noise or constant).
        n_clusters: Clusters found (noise not counted).
        cluster_sizes: ``[n_clusters]`` neurons per cluster.
        noise_fraction: Share of neurons labelled -1.
        cluster_profiles: ``[n_clusters, C']`` mean normalised class profile of each cluster.
        silhouette: Mean silhouette of the clusters (NaN when undefined).
        preferred_class: ``[K]`` each neuron's class with the largest mean.
        selectivity: ``[K]`` class selectivity index.
        features: ``[K, C']`` the normalised class profile of each neuron (what the embedding
            projector shows).
        stability: Adjusted Rand index with the previous analysis's labels (NaN the first time).
        source: ``"class_means"`` or ``"reservoir"``.
    """

    layer: str
    epoch: int
    classes: torch.Tensor
    labels: torch.Tensor
    n_clusters: int
    cluster_sizes: torch.Tensor
    noise_fraction: float
    cluster_profiles: torch.Tensor
    silhouette: float
    preferred_class: torch.Tensor
    selectivity: torch.Tensor
    features: torch.Tensor
    stability: float = float("nan")
    source: str = "class_means"

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """The arrays by name (for ``.npz`` files); numbers as 0-d tensors."""
        skip = {"layer", "source"}
        return {f.name: _scalar(getattr(self, f.name)) for f in fields(self) if f.name not in skip}


# ---- NeuronContribution -------------------------------------------------------------------


@dataclass
class LayerAblation:
    """What zeroing neuron sets of one layer did (all sets measured on the same kept images).

    Attributes:
        effects: ``{set name: AblationResult}``.
        sets: The set names, in row order: each class's dominant neurons, then the neuron
            clusters of a :class:`~lightning_neurons.NeuronClustering`.
        classes: The class of each set (-1 for clusters).
        neurons: The zeroed neurons of each set.
        accuracy_drop: ``[S, C]`` accuracy lost per set and class.
        logit_drop: ``[S, C]`` fall of the mean true-class logit.
        baseline_accuracy: ``[C]`` accuracy without ablation.
        clusters_epoch: Epoch of the ablated clusters (``None``: no clusters).
        clusters_step: Global step the ablated clusters were made at (``None``: no clusters,
            or a file written before it was recorded).
        selectivity: :func:`~lightning_neurons.ablation.ablation_selectivity` of the class
            sets (``None`` with fewer than 2 classes or no class sets).
    """

    effects: dict[str, AblationResult]
    sets: list[str]
    classes: list[int]
    neurons: list[torch.Tensor]
    accuracy_drop: torch.Tensor
    logit_drop: torch.Tensor
    baseline_accuracy: torch.Tensor
    clusters_epoch: int | None = None
    selectivity: dict[str, float] | None = None
    clusters_step: int | None = None

    def effect_arrays(self) -> dict[str, torch.Tensor]:
        """What rebuilds each set's :class:`AblationResult` from a file, by name: the ablated
        ``[S, C]`` accuracies and logits, and the baseline logit and counts that the sets share
        (they are measured on the same images)."""
        effects = [self.effects[name] for name in self.sets]
        if not effects:
            return {}
        return {
            "ablated_accuracy": torch.stack([e.ablated_accuracy for e in effects]),
            "ablated_logit": torch.stack([e.ablated_logit for e in effects]),
            "baseline_logit": effects[0].logit,
            "ablation_counts": effects[0].counts,
        }


@dataclass
class Probes:
    """Every neuron's contribution to every logit for a few kept images (the first of each class).

    Attributes:
        index: ``[P]`` rows of the kept images.
        images: ``[P, ...]`` the images (model inputs).
        labels: ``[P]`` labels.
        predictions: ``[P]`` predicted classes.
        contribution: ``[P, L, K]`` contribution of each neuron to each explained logit.
        classes: ``[P, L]`` the logits explained for each probe: every class (``L = C``) up to
            :data:`~lightning_neurons.callbacks.contribution.PROBE_LOGITS` classes, else the
            probe's highest ones.
        top_neurons: ``[P, top]`` neurons that contribute most to the predicted logit.
        top_contribution: ``[P, top]`` their contributions.
        preferred: For each probe, an image each top neuron prefers.
        preferred_source: ``"rendered"`` (a FeatureVisualizer's) or ``"top example"`` (the kept
            image that activates it most), per image of ``preferred``.
    """

    index: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    contribution: torch.Tensor
    classes: torch.Tensor
    top_neurons: torch.Tensor
    top_contribution: torch.Tensor
    preferred: list[list[torch.Tensor]] = field(default_factory=list)
    preferred_source: list[list[str]] = field(default_factory=list)


@dataclass
class ContributionResult:
    """:class:`~lightning_neurons.NeuronContribution`'s analysis of one layer.

    Attributes:
        layer: Layer name.
        epoch: Epoch analysed.
        stats: The first-order class contributions (counts, class x neuron matrix, dominant
            neurons, domination).
        top_example_index: ``[K]`` row of the kept image that activates each neuron most.
        ablation: For ``ablation_layers``: the effect of zeroing neuron sets, else ``None``.
        probes: With ``max_probes > 0``: the probe images' contributions, else ``None``.
    """

    layer: str
    epoch: int
    stats: ContributionStats
    top_example_index: torch.Tensor
    ablation: LayerAblation | None = None
    probes: Probes | None = None

    @property
    def class_contribution(self) -> torch.Tensor:
        """``[C, K]`` (see :class:`ContributionStats`)."""
        return self.stats.class_contribution

    @property
    def counts(self) -> torch.Tensor:
        return self.stats.counts

    @property
    def dominant(self) -> torch.Tensor:
        return self.stats.dominant

    @property
    def domination(self) -> torch.Tensor:
        return self.stats.domination
