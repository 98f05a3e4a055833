"""NeuronContribution's ablations: which neuron sets are zeroed, and their summed effects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lightning_neurons import progress
from lightning_neurons.ablation import ablation_results, ablation_selectivity, ablation_sums
from lightning_neurons.batch import BatchFn, BatchReader
from lightning_neurons.callbacks._base import class_names_of, find_callback
from lightning_neurons.callbacks._contribution_probes import Batch
from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
from lightning_neurons.class_contribution import ContributionStats
from lightning_neurons.distributed import Failed, attempt, broadcast_from_zero, sum_over_ranks
from lightning_neurons.results import LayerAblation


def cluster_sets(labels: Any) -> dict[str, torch.Tensor]:
    """``{"cluster i": neuron indices}`` from a ``[K]`` array of cluster ids (-1: noise, left out).

    Example:
        >>> cluster_sets(torch.tensor([1, -1, 1, 0]))
        {'cluster 0': tensor([3]), 'cluster 1': tensor([0, 2])}
    """
    ids = torch.as_tensor(labels).reshape(-1).long()
    return {
        f"cluster {int(c)}": torch.nonzero(ids == c)[:, 0]
        for c in torch.unique(ids).tolist()
        if c >= 0
    }


@dataclass(frozen=True)
class AblationSets:
    """The neuron sets of one layer to zero.

    Attributes:
        sets: ``{name: neuron indices}``: each class's dominant neurons, then each cluster.
        classes: Each set's class (-1 for clusters).
        clusters_epoch: The epoch of NeuronClustering's clusters (``None`` without clusters).
        clusters_step: The global step they were made at (``None`` without clusters).
    """

    sets: dict[str, torch.Tensor]
    classes: list[int]
    clusters_epoch: int | None
    clusters_step: int | None = None


def neuron_clusters(
    trainer: Trainer, layer: str, num_neurons: int
) -> tuple[dict[str, torch.Tensor], int | None, int | None]:
    """The neuron clusters of an attached NeuronClustering callback for ``layer`` (or none),
    the epoch they are from and the ``global_step`` they were made at."""
    clustering = find_callback(trainer, NeuronClustering)
    entry = clustering.results.get(layer) if clustering is not None else None
    if entry is None:
        return {}, None, None
    ids = torch.as_tensor(entry.labels).reshape(-1)
    if ids.numel() != num_neurons:
        rank_zero_warn(
            f"NeuronContribution: NeuronClustering's labels for {layer!r} are {ids.numel()} values "
            f"of type {ids.dtype}, but the layer has {num_neurons} neurons; its clusters are not "
            "ablated."
        )
        return {}, None, None
    return cluster_sets(ids), entry.epoch, clustering.results_step


def ablation_sets(
    trainer: Trainer,
    layer: str,
    stats: ContributionStats,
    clusters: dict[str, torch.Tensor],
    epoch: int | None,
    max_classes: int,
    made_at: int | None = None,
) -> AblationSets:
    """The sets to zero: the dominant neurons of each of the first ``max_classes`` classes (that
    have images), then each neuron cluster (of the epoch ``epoch``, made at the step
    ``made_at``; a warning says when that is another model than the one ablated: an earlier
    validation's, or before a checkpoint was loaded)."""
    names = class_names_of(trainer, stats.num_classes)
    sets: dict[str, torch.Tensor] = {}
    classes: list[int] = []
    for c in range(min(stats.num_classes, max_classes)):
        if stats.counts[c] > 0:
            sets[f"class {names[c]} top{stats.dominant.shape[1]}"] = stats.dominant[c]
            classes.append(c)
    older = made_at if made_at != trainer.global_step else None
    if clusters and epoch is not None and older is not None:
        rank_zero_warn(
            f"NeuronContribution: the neuron clusters of {layer!r} ablated in epoch "
            f"{trainer.current_epoch} are NeuronClustering's of epoch {epoch}, made at step "
            f"{older} (it did not analyse this validation, at step {trainer.global_step}); "
            "`results[layer].ablation.clusters_epoch` and `clusters_step` record it."
        )
    for name, neurons in clusters.items():
        sets[name] = neurons
        classes.append(-1)
    return AblationSets(sets, classes, epoch if clusters else None, made_at if clusters else None)


def ablate_layer(
    trainer: Trainer,
    pl_module: LightningModule,
    layer: str,
    stats: ContributionStats,
    batches: list[Batch],
    *,
    max_classes: int,
    share_prefix: bool | Literal["auto"],
    output_fn: BatchFn | None,
) -> LayerAblation | None:
    """Each rank ablates on its own kept batches; the correct counts and logit sums (float64)
    are added up over the ranks. The neuron clusters exist on rank zero (NeuronClustering
    clusters there): they are sent to every rank first. ``None`` when there is nothing to
    ablate."""
    progress.phase(f"ablation of {layer}")
    rank, world = trainer.global_rank, trainer.world_size
    clusters, epoch, made_at = broadcast_from_zero(
        lambda: neuron_clusters(trainer, layer, stats.num_neurons),
        rank,
        world,
        "reading NeuronClustering's clusters",
    )

    def plan() -> tuple[AblationSets, dict[str, torch.Tensor] | None]:
        chosen = ablation_sets(trainer, layer, stats, clusters, epoch, max_classes, made_at)
        if not chosen.sets or not batches:
            return chosen, None
        reader = BatchReader(output_fn=output_fn)  # the kept batches are (inputs, labels)
        sums = ablation_sums(
            pl_module,
            layer,
            chosen.sets,
            batches,
            reader,
            sets_per_pass=8,
            share_prefix=share_prefix,
        )
        return chosen, sums

    planned = attempt(plan, world)
    mine = planned if isinstance(planned, Failed) else planned[1]
    summed = sum_over_ranks(mine, world, pl_module.device, f"ablation of {layer!r}")
    assert not isinstance(planned, Failed)  # sum_over_ranks raised
    chosen = planned[0]
    if not chosen.sets or summed is None:
        return None
    effects = ablation_results(layer, chosen.sets, summed)
    names = list(effects)
    drop = torch.stack([effects[n].accuracy_drop for n in names])
    classes = chosen.classes
    rows = [i for i, c in enumerate(classes) if c >= 0]
    return LayerAblation(
        effects=effects,
        sets=names,
        classes=classes,
        neurons=[effects[n].neurons for n in names],
        accuracy_drop=drop,
        logit_drop=torch.stack([effects[n].logit_drop for n in names]),
        baseline_accuracy=effects[names[0]].accuracy,
        clusters_epoch=chosen.clusters_epoch,
        clusters_step=chosen.clusters_step,
        selectivity=(
            ablation_selectivity(drop[rows], [classes[i] for i in rows])
            if rows and stats.num_classes >= 2
            else None
        ),
    )
