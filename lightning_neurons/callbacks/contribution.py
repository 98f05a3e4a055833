"""NeuronContribution: which neurons carry each class's logit, and what zeroing them does."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_neurons import progress
from lightning_neurons.ablation import ablation_results, ablation_selectivity, ablation_sums
from lightning_neurons.batch import BatchReader, LoaderRows, analysed_rows
from lightning_neurons.callbacks._base import (
    OnError,
    StagedCallback,
    class_names_of,
    find_callback,
)
from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
from lightning_neurons.callbacks.tracker import ActivationTracker
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.checks import (
    check_choice,
    check_int,
    check_layers,
    check_optional_positive_int,
    check_positive_int,
)
from lightning_neurons.contribution import (
    ClassContributions,
    ContributionStats,
    contribution_batch,
    neuron_contributions,
)
from lightning_neurons.distributed import (
    Failed,
    attempt,
    broadcast_from_zero,
    gather,
    share,
    sum_over_ranks,
)
from lightning_neurons.hooks import resolve_layers, selects
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.results import ContributionResult, LayerAblation, Probes
from lightning_neurons.state import analysis_mode
from lightning_neurons.strategies import refuse_sharded

Batch = tuple[torch.Tensor, torch.Tensor]


def cluster_sets(labels: Any) -> dict[str, torch.Tensor]:
    """``{"cluster i": neuron indices}`` from a ``[K]`` array of cluster ids (-1: noise, left out)."""
    ids = torch.as_tensor(labels).reshape(-1).long()
    return {
        f"cluster {int(c)}": torch.nonzero(ids == c)[:, 0]
        for c in torch.unique(ids).tolist()
        if c >= 0
    }


def _kept_image(batches: list[Batch], row: int) -> torch.Tensor:
    """Image ``row`` of the kept batches, as if they were concatenated."""
    for x, _ in batches:
        if row < x.shape[0]:
            return x[row]
        row -= x.shape[0]
    raise IndexError(f"kept image {row} is beyond the kept batches")


def _most_active(
    every: list[dict[str, tuple[torch.Tensor, torch.Tensor]] | None],
) -> dict[str, torch.Tensor]:
    """Per layer and neuron, the index of the image with the largest activation over every
    rank's ``{layer: (largest activation, its image's index)}``; of equal ones the smallest
    index, as one process, which keeps the first, finds it."""
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for part in every:
        for layer, (value, index) in (part or {}).items():
            if layer not in merged:
                merged[layer] = (value, index)
                continue
            old_value, old_index = merged[layer]
            better = (value > old_value) | ((value == old_value) & (index < old_index))
            merged[layer] = (
                torch.where(better, value, old_value),
                torch.where(better, index, old_index),
            )
    return {layer: index for layer, (_, index) in merged.items()}


#: Logits explained per probe image: all of them up to this many classes, else the probe's
#: highest ones (``[P, C, K]`` per layer would be 1,000 backward passes per probe at ImageNet's
#: 1,000 classes, and hundreds of MB per epoch in the ``.npz``).
PROBE_LOGITS = 10


class NeuronContribution(StagedCallback):
    """Which neurons carry each class's logit (activation x gradient), how few of them dominate,
    and what zeroing them does to each class's accuracy.

    At the end of every ``every_n_epochs``-th validation (and every test) epoch, using the first
    ``max_batches`` validation batches that Lightning fed to the model (kept on the CPU; no extra
    data loading), it computes for each layer:

    * the class x neuron contribution matrix: for each class, the mean contribution of each neuron
      to that class's logit over the images of that class (see
      :mod:`lightning_neurons.contribution`), its dominant neurons and their domination;
    * the ablation matrix of ``ablation_layers``: per-class accuracy drop when each class's dominant
      neurons are zeroed, and when each neuron cluster of an attached ``NeuronClustering`` callback
      is zeroed (all sets measured in one batched pass);
    * for ``max_probes`` validation images (the first image of each class), the contribution of
      every neuron to every logit (with more than :data:`PROBE_LOGITS` classes, to the probe's
      :data:`PROBE_LOGITS` highest logits: ``Probes.classes`` says which), and the top neurons
      behind the prediction with their preferred
      images: the ``FeatureVisualizer``'s rendering when one is attached and has rendered that
      neuron, else the validation image (of those kept) that activates the neuron most.

    Under DDP the work is shared: each rank keeps ``ceil(max_batches / world_size)`` batches of
    its own shard (DistributedSampler deals the unshuffled validation set out rank by rank, so
    together they are the first ``max_batches`` batches one process keeps when ``world_size``
    divides ``max_batches``; its repeated samples are left out), computes the contribution sums
    and the ablation counts on them, and the sums are added up over the ranks (float64 and integer
    counts): the results of one process, up to the order of float summation. The neuron clusters
    (NeuronClustering's results are on rank zero) are sent to every rank before the ablation; the
    probes are chosen from every rank's kept images as one process chooses them and each rank
    explains a share of them. Every rank holds :attr:`results`; only rank zero logs and writes. A
    failure on any rank is reported on every rank (no rank is left waiting) and follows
    ``on_error``. Sharded models (FSDP, DeepSpeed ZeRO stage 3) are refused at set-up.
    Indices of kept images (``top_example_index``, ``Probes.index``) count the kept images in one
    process's order: image ``p`` of rank ``r`` of ``W`` is ``p * W + r``.

    It reads an :class:`~lightning_neurons.ActivationTracker`'s layers, ``num_classes``, ``top_k``,
    ``dataloader_idx`` and batch reader (``input_fn``, ``label_fn``, ``output_fn``); one must be
    attached. The gradient work runs in eval mode inside
    :func:`~lightning_neurons.state.analysis_mode`, so training is not changed: modes,
    ``requires_grad``, gradients and random streams are restored and every hook is removed.

    It reads ``NeuronClustering``'s and ``FeatureVisualizer``'s results at the end of the stage,
    after they have analysed the same epoch, wherever they stand in the callback list (when they
    did not analyse this epoch, their latest results are used, and
    ``results[layer].ablation.clusters_epoch`` says which epoch the ablated clusters are from).

    Args:
        layers: Module names or glob patterns. Default: the tracker's layers.
        max_batches: Validation batches kept and analysed per epoch (under DDP, in all: each
            rank keeps ``ceil(max_batches / world_size)``).
        top_k: Dominant neurons per class. Default: the tracker's ``top_k``.
        ablation_layers: Layers whose neuron sets are ablated (they are analysed too). Default: the
            last analysed layer (ablating early layers costs about one forward pass of the kept
            images per neuron set). ``[]``: no ablation.
        max_ablation_classes: Ablate the dominant neurons of at most this many classes (the first).
        share_prefix: How ablations are batched, see
            :func:`~lightning_neurons.ablation.ablation_effects` (``"auto"`` checks the model).
        max_probes: Probe images: the first kept validation image of each class, for at most
            this many classes (the first); 0 for none.
        probe_top: Top contributing neurons shown per probe image.
        enable_logging: Log figures, images, text and scalars and write the numbers to files.
        every_n_epochs: Analyse every n-th epoch.
        on_error: ``"warn"`` (report a failed analysis and train on) or ``"raise"``.

    Raises:
        NeuronsError: For bad arguments; at setup, when no ActivationTracker is attached or a layer
            does not exist.

    Example:
        >>> contribution = NeuronContribution(max_batches=4)
        >>> trainer = Trainer(callbacks=[ActivationTracker(), contribution])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> contribution.results["backbone.features.conv3"].ablation.accuracy_drop  # doctest: +SKIP
    """

    reads = (ActivationTracker, NeuronClustering, FeatureVisualizer)

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        max_batches: int = 4,
        top_k: int | None = None,
        ablation_layers: list[str] | None = None,
        max_ablation_classes: int = 20,
        share_prefix: bool | Literal["auto"] = "auto",
        max_probes: int = 20,
        probe_top: int = 5,
        every_n_epochs: int = 1,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(
            layers, every_n_epochs=every_n_epochs, enable_logging=enable_logging, on_error=on_error
        )
        self.ablation_patterns = check_layers("ablation_layers", ablation_layers)
        self.max_batches = check_positive_int("max_batches", max_batches)
        self.top_k = check_optional_positive_int("top_k", top_k)
        self.max_ablation_classes = check_positive_int("max_ablation_classes", max_ablation_classes)
        self.share_prefix = check_choice("share_prefix", share_prefix, (True, False, "auto"))
        self.max_probes = check_int("max_probes", max_probes, minimum=0)
        self.probe_top = check_positive_int("probe_top", probe_top)
        self.ablation_layers: list[str] = []
        #: ``{layer: ContributionResult}`` of the latest analysed epoch.
        self.results: dict[str, ContributionResult] = {}
        self._tracker: ActivationTracker | None = None
        self._batches: list[Batch] = []
        self._collecting = False
        self._clusters_epoch: int | None = None
        self._ranks = (0, 1)  # (this rank, number of ranks) of the stage being analysed
        self._share = max_batches  # batches this rank keeps
        self._rows = LoaderRows()

    # ---- Lightning hooks -----------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_sharded(trainer, "NeuronContribution")
        self._tracker = find_callback(trainer, ActivationTracker, required=type(self).__name__)
        patterns = (
            self.layer_patterns if self.layer_patterns is not None else self._tracker.layer_patterns
        )
        layers = resolve_layers(pl_module, patterns)
        if self.ablation_patterns is None:
            ablate = layers[-1:]
        elif not self.ablation_patterns:
            ablate = []
        else:
            ablate = resolve_layers(pl_module, self.ablation_patterns)
        # Layer lists: a module run several times per pass gives one layer per call site.
        self.layers = resolve_layers(pl_module, [*layers, *ablate])
        self.ablation_layers = list(ablate)

    # Lightning's per-stage hooks arrive here (see StagedCallback): validation and test batches.
    def _stage_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage in ("validation", "test"):
            self._start(trainer, stage)

    def _stage_batch_end(
        self,
        stage: str,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if stage in ("validation", "test"):
            self._keep(batch, batch_idx, dataloader_idx)

    @override
    def _consume(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage in ("validation", "test"):
            self._finish(trainer, pl_module)

    def _release(self) -> None:
        self._reset()

    # ---- gathering -----------------------------------------------------------------------------

    def _reset(self) -> None:
        self._batches = []
        self._collecting = False

    def _start(self, trainer: Trainer, stage: str) -> None:
        self._reset()
        self._collecting = self._due(trainer)
        self._ranks = (trainer.global_rank, trainer.world_size)
        # Under DDP each rank keeps the first ceil(max_batches / ranks) batches of its shard:
        # DistributedSampler deals the (unshuffled) data out rank by rank, so together they are
        # the first max_batches batches that one process keeps (when the ranks divide it).
        self._share = math.ceil(self.max_batches / trainer.world_size)
        loader = self._tracker.dataloader_idx if self._tracker is not None else 0
        self._rows = analysed_rows(trainer, stage, loader)

    @property
    def _reader(self) -> BatchReader:
        return self._tracker.reader if self._tracker is not None else BatchReader()

    def _keep(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not self._collecting or len(self._batches) >= self._share:
            return
        if self._tracker is not None and dataloader_idx != self._tracker.dataloader_idx:
            return
        x = self._reader.inputs(batch)
        y = self._reader.labels(batch)
        rows = self._rows.rows(batch_idx, y.shape[0])  # DistributedSampler's repeats left out
        if not rows:
            return
        with torch.inference_mode(False):  # normal tensors, usable in autograd later
            self._batches.append(
                (x[:rows].detach().to("cpu").clone(), y[:rows].detach().to("cpu").clone())
            )

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tracker = find_callback(trainer, ActivationTracker, required=type(self).__name__)
        batches, collecting = self._batches, self._collecting
        self._reset()
        # under DDP every rank takes part (its share of the work, and the collectives), with or
        # without batches of its own
        if collecting and (batches or self._ranks[1] > 1):
            self._run_safely(
                "neuron contribution analysis",
                lambda: self._analyse(trainer, pl_module, tracker, batches),
            )

    # ---- analysis ------------------------------------------------------------------------------

    def _analyse(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        tracker: ActivationTracker,
        batches: list[Batch],
    ) -> None:
        """Every rank analyses its own kept batches and the sums are added up over the ranks
        (one process: its batches), so every rank gets the results of all ranks' batches. A
        failure on any rank raises on every rank (see :mod:`lightning_neurons.distributed`)."""
        num_classes = int(tracker.num_classes)
        top_k = self.top_k or tracker.top_k
        results: dict[str, ContributionResult] = {}
        with analysis_mode(pl_module):
            progress.phase("contributions of the kept images")
            shared = self._contributions(pl_module, batches, num_classes, top_k)
            if shared is None:  # no rank kept a batch
                return
            stats, top_example = shared
            for layer in stats:  # call sites of self.layers, in the order they ran
                results[layer] = ContributionResult(
                    layer=layer,
                    epoch=trainer.current_epoch,
                    stats=stats[layer],
                    top_example_index=top_example[layer],
                )
            for layer in [n for n in stats if selects(self.ablation_layers, n)]:
                results[layer].ablation = self._ablate(
                    trainer, pl_module, layer, stats[layer], batches
                )
            if self.max_probes:
                progress.phase("probe images")
                probes = self._probes(pl_module, batches, num_classes)
                rendered = {layer: self._rendered(trainer, layer) for layer in probes}
                wanted = {
                    int(top_example[layer][n])
                    for layer, probe in probes.items()
                    for n in probe.top_neurons.flatten().tolist()
                    if n not in rendered[layer]
                }
                examples = self._kept_images(batches, sorted(wanted))
                for layer, probe in probes.items():
                    probe.preferred, probe.preferred_source = self._preferred(
                        rendered[layer], probe.top_neurons, top_example[layer], examples
                    )
                    results[layer].probes = probe
        self.results = results
        if self.enable_logging:
            self._run_safely("logging neuron contribution", lambda: self._log(trainer))

    def _contributions(
        self, pl_module: LightningModule, batches: list[Batch], num_classes: int, top_k: int
    ) -> tuple[dict[str, ContributionStats], dict[str, torch.Tensor]] | None:
        """Class contributions of every rank's kept batches, and per neuron the index of the kept
        image that activates it most (the ``p``-th kept image of rank ``r`` of ``W`` is image
        ``p * W + r``: its index among one process's kept images); ``None`` if no rank kept a
        batch."""
        rank, world = self._ranks
        acc = ClassContributions(num_classes, top_k)
        best = attempt(lambda: self._local_contributions(pl_module, batches, acc), world)
        if world == 1:
            assert isinstance(best, dict)
            return acc.compute(release=True), {layer: index for layer, (_, index) in best.items()}
        mine = best if isinstance(best, Failed) or best is None else acc.sums()
        summed = sum_over_ranks(mine, world, pl_module.device, "neuron contribution")
        del mine  # this rank's sums go with load_sums: one set of [C, K] sums held, not two
        if summed is None:
            return None
        acc.load_sums(summed)
        del summed
        every = gather(
            None if best is None else {k: (v, i * world + rank) for k, (v, i) in best.items()},
            world,
            "neuron contribution",
        )
        return acc.compute(release=True), _most_active(every)

    def _local_contributions(
        self, pl_module: LightningModule, batches: list[Batch], acc: ClassContributions
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Streams this rank's kept batches into ``acc``; per layer, each neuron's largest
        activation and the index of the kept image it is on (``None`` without batches)."""
        if not batches:
            return None
        device = pl_module.device
        best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        offset = 0
        for x, y in batches:
            progress.advance("batch", len(batches))
            out = contribution_batch(
                pl_module, self.layers, x.to(device), y.to(device), output_fn=self._reader.output_fn
            )
            acc.update(out, y)
            for layer, act in out.activations.items():
                value, row = (t.cpu() for t in act.detach().float().max(dim=0))
                old_value, old_index = best.get(
                    layer, (torch.full_like(value, -torch.inf), torch.zeros_like(row))
                )
                better = value > old_value
                best[layer] = (
                    torch.where(better, value, old_value),
                    torch.where(better, row + offset, old_index),
                )
            offset += x.shape[0]
        return best

    def _probes(
        self, pl_module: LightningModule, batches: list[Batch], num_classes: int
    ) -> dict[str, Probes]:
        """Every layer's contribution to every logit for the first kept image of each class
        (of every rank's kept images, in one process's order). Each rank explains a contiguous
        share of the probes: ``max_probes`` images x up to :data:`PROBE_LOGITS` logits cost as
        much as a few kept batches, so they are not left to rank zero alone."""
        rank, world = self._ranks
        found = attempt(lambda: self._probe_candidates(batches, num_classes), world)
        first: dict[int, tuple[int, torch.Tensor]] = {}  # class: (index, image)
        for candidates in gather(found, world, "choosing the probe images"):
            for index, label, image in candidates:
                if label not in first or index < first[label][0]:
                    first[label] = (index, image)
        picked = sorted(first)[: self.max_probes]
        if not picked:
            return {}
        index = torch.tensor([first[c][0] for c in picked])
        images = torch.stack([first[c][1] for c in picked])
        part = share(len(picked), rank, world)
        mine = attempt(lambda: self._explain(pl_module, images[part], num_classes), world)
        parts = [p for p in gather(mine, world, "probe contributions") if p is not None]
        logits = torch.cat([p[0] for p in parts])
        classes = torch.cat([p[1] for p in parts])
        predictions = logits.argmax(dim=1)
        predicted_row = (classes == predictions.unsqueeze(1)).float().argmax(dim=1)
        results = {}
        for layer in parts[0][2]:
            c = torch.cat([p[2][layer] for p in parts])  # [P, L, K]
            behind = c[torch.arange(c.shape[0]), predicted_row]  # [P, K]: to the predicted logit
            top = behind.topk(min(self.probe_top, behind.shape[1]), dim=1)
            results[layer] = Probes(
                index=index,
                images=images,
                labels=torch.tensor(picked),
                predictions=predictions,
                contribution=c,
                classes=classes.clone(),
                top_neurons=top.indices,
                top_contribution=top.values,
            )
        return results

    def _probe_candidates(
        self, batches: list[Batch], num_classes: int
    ) -> list[tuple[int, int, torch.Tensor]]:
        """``(index, class, image)`` of this rank's first kept image of each class, for the first
        ``max_probes`` classes it has (those one process picks are among every rank's)."""
        rank, world = self._ranks
        if not batches:
            return []
        y = torch.cat([b[1] for b in batches])
        found = []
        for c in range(num_classes):
            hits = torch.nonzero(y == c)[:, 0]
            if hits.numel():
                row = int(hits[0])
                found.append((row * world + rank, c, _kept_image(batches, row)))
            if len(found) >= self.max_probes:
                break
        return found

    def _explain(
        self, pl_module: LightningModule, images: torch.Tensor, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None:
        """Logits, explained classes and ``{layer: [P, L, K]}`` contributions of ``images``."""
        if not len(images):
            return None
        with torch.no_grad():
            logits = self._reader.forward(pl_module, images).float().cpu()
        # all logits, or the highest PROBE_LOGITS (the predicted first): bounded at 1,000 classes
        if num_classes <= PROBE_LOGITS:
            classes = torch.arange(num_classes).expand(len(images), -1)
        else:
            classes = logits.topk(PROBE_LOGITS, dim=1).indices
        contribution = neuron_contributions(  # {layer: [P, L, K]}
            pl_module, self.layers, images, classes=classes, output_fn=self._reader.output_fn
        )
        return logits, classes, {layer: c.cpu() for layer, c in contribution.items()}

    def _kept_images(self, batches: list[Batch], indices: list[int]) -> dict[int, torch.Tensor]:
        """``{index: kept image}`` of every rank's kept images (index as in
        :meth:`_contributions`), on every rank."""
        rank, world = self._ranks
        mine = attempt(
            lambda: {i: _kept_image(batches, i // world) for i in indices if i % world == rank},
            world,
        )
        found: dict[int, torch.Tensor] = {}
        for part in gather(mine, world, "gathering the probes' top examples"):
            found.update(part)
        return found

    def _ablation_sets(
        self,
        trainer: Trainer,
        layer: str,
        stats: ContributionStats,
        clusters: dict[str, torch.Tensor],
        epoch: int | None,
    ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The sets to zero: each class's dominant neurons, then each neuron cluster (of the
        epoch ``epoch``); and the class of each set (-1 for clusters)."""
        names = class_names_of(trainer, stats.num_classes)
        sets: dict[str, torch.Tensor] = {}
        classes: list[int] = []
        for c in range(min(stats.num_classes, self.max_ablation_classes)):
            if stats.counts[c] > 0:
                sets[f"class {names[c]} top{stats.dominant.shape[1]}"] = stats.dominant[c]
                classes.append(c)
        if clusters and epoch is not None and epoch != trainer.current_epoch:
            rank_zero_warn(
                f"NeuronContribution: the neuron clusters of {layer!r} ablated in epoch "
                f"{trainer.current_epoch} are NeuronClustering's of epoch {epoch} (it did not "
                "analyse this epoch); `results[layer].ablation.clusters_epoch` records it."
            )
        for name, neurons in clusters.items():
            sets[name] = neurons
            classes.append(-1)
        self._clusters_epoch = epoch if clusters else None
        return sets, classes

    def _clusters(
        self, trainer: Trainer, layer: str, num_neurons: int
    ) -> tuple[dict[str, torch.Tensor], int | None]:
        """The neuron clusters of an attached NeuronClustering callback for ``layer`` (or none),
        and the epoch they are from."""
        clustering = find_callback(trainer, NeuronClustering)
        entry = clustering.results.get(layer) if clustering is not None else None
        if entry is None:
            return {}, None
        ids = torch.as_tensor(entry.labels).reshape(-1)
        if ids.numel() != num_neurons:
            rank_zero_warn(
                f"NeuronContribution: NeuronClustering's labels for {layer!r} are {ids.numel()} values "
                f"of type {ids.dtype}, but the layer has {num_neurons} neurons; its clusters are not "
                "ablated."
            )
            return {}, None
        return cluster_sets(ids), entry.epoch

    def _ablate(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        layer: str,
        stats: ContributionStats,
        batches: list[Batch],
    ) -> LayerAblation | None:
        """Each rank ablates on its own kept batches; the correct counts and logit sums (float64)
        are added up over the ranks. The neuron clusters exist on rank zero (NeuronClustering
        clusters there): they are sent to every rank first."""
        rank, world = self._ranks
        progress.phase(f"ablation of {layer}")
        clusters, epoch = broadcast_from_zero(
            lambda: self._clusters(trainer, layer, stats.num_neurons),
            rank,
            world,
            "reading NeuronClustering's clusters",
        )
        plan = attempt(
            lambda: self._ablation_plan(trainer, pl_module, layer, stats, clusters, epoch, batches),
            world,
        )
        summed = sum_over_ranks(
            plan if isinstance(plan, Failed) else plan[2],
            world,
            pl_module.device,
            f"ablation of {layer!r}",
        )
        assert not isinstance(plan, Failed)  # sum_over_ranks raised
        sets, classes, _ = plan
        if not sets or summed is None:
            return None
        effects = ablation_results(layer, sets, summed)
        names = list(effects)
        drop = torch.stack([effects[n].accuracy_drop for n in names])
        rows = [i for i, c in enumerate(classes) if c >= 0]
        return LayerAblation(
            effects=effects,
            sets=names,
            classes=classes,
            neurons=[effects[n].neurons for n in names],
            accuracy_drop=drop,
            logit_drop=torch.stack([effects[n].logit_drop for n in names]),
            baseline_accuracy=effects[names[0]].accuracy,
            clusters_epoch=self._clusters_epoch,
            selectivity=(
                ablation_selectivity(drop[rows], [classes[i] for i in rows])
                if rows and stats.num_classes >= 2
                else None
            ),
        )

    def _ablation_plan(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        layer: str,
        stats: ContributionStats,
        clusters: dict[str, torch.Tensor],
        epoch: int | None,
        batches: list[Batch],
    ) -> tuple[dict[str, torch.Tensor], list[int], dict[str, torch.Tensor] | None]:
        """The neuron sets, their classes, and this rank's ablation sums (``None``: no sets or
        no batches)."""
        sets, classes = self._ablation_sets(trainer, layer, stats, clusters, epoch)
        if not sets or not batches:
            return sets, classes, None
        sums = ablation_sums(
            pl_module,
            layer,
            sets,
            batches,
            sets_per_pass=8,
            share_prefix=self.share_prefix,
            output_fn=self._reader.output_fn,
        )
        return sets, classes, sums

    def _preferred(
        self,
        rendered: dict[int, torch.Tensor],
        top_neurons: torch.Tensor,
        top_example: torch.Tensor,
        examples: dict[int, torch.Tensor],
    ) -> tuple[list[list[torch.Tensor]], list[list[str]]]:
        """For each probe's top neurons: the FeatureVisualizer's rendering when there is one, else
        the kept validation image that activates the neuron most (``examples`` by index)."""
        images: list[list[torch.Tensor]] = []
        sources: list[list[str]] = []
        for row in top_neurons.tolist():
            images.append(
                [rendered[n] if n in rendered else examples[int(top_example[n])] for n in row]
            )
            sources.append(["rendered" if n in rendered else "top example" for n in row])
        return images, sources

    def _rendered(self, trainer: Trainer, layer: str) -> dict[int, torch.Tensor]:
        """``{channel: image}`` rendered by an attached FeatureVisualizer for ``layer`` (may be empty)."""
        visualizer = find_callback(trainer, FeatureVisualizer)
        entry = visualizer.results.get(layer) if visualizer is not None else None
        if entry is None:
            return {}
        return {int(c): entry.images[i] for i, c in enumerate(entry.channels.tolist())}

    # ---- logging -------------------------------------------------------------------------------

    def _log(self, trainer: Trainer) -> None:
        out = AnalysisLogger(trainer, "contribution", owner=self)
        if not out.is_writer:
            return
        progress.phase("figures and files")
        scalars: dict[str, float] = {}
        for layer, res in self.results.items():
            progress.advance("layer", len(self.results))
            names = class_names_of(trainer, res.stats.num_classes)
            scalars.update(self._scalars(out, layer, res, names))
            if out.experiment is not None:  # figures take time: draw them only to be shown
                self._figures(out, layer, res, names)
            arrays, meta = self._arrays(layer, res, names)
            out.save_arrays(layer, arrays, meta=meta)
        out.scalars(scalars)

    def _scalars(
        self, out: AnalysisLogger, layer: str, res: ContributionResult, names: list[str]
    ) -> dict[str, float]:
        """A few headline scalars per layer; the per-class series go to TensorBoard as one
        histogram each (a chart per class would bury train/ and val/ under dozens of charts) and,
        named, to the ``.npz`` file and the figures."""
        domination = res.domination
        scalars = {out.tag(layer, "mean_domination"): float(domination.mean())}
        out.histogram(out.tag(layer, "domination_per_class"), domination)
        ablation = res.ablation
        if ablation is not None:
            drop = ablation.accuracy_drop
            own = [float(drop[row, c]) for row, c in enumerate(ablation.classes) if c >= 0]
            out.histogram(out.tag(layer, "ablation_own_drop_per_class"), own)
            for key, value in (ablation.selectivity or {}).items():
                if key != "ratio":  # infinite when the other classes do not drop
                    scalars[out.tag(layer, "ablation_selectivity", key)] = value
        return scalars

    def _figures(
        self, out: AnalysisLogger, layer: str, res: ContributionResult, names: list[str]
    ) -> None:
        from lightning_neurons.plots.contribution import (
            ablation_figure,
            contribution_figure,
            probe_grid,
        )

        figure = contribution_figure(res.stats, names, epoch=res.epoch)
        out.figure(out.tag(layer, "class_contribution"), figure)
        if res.ablation is not None:
            baseline = float(res.ablation.baseline_accuracy.nanmean())
            title = (
                f"{layer}, epoch {res.epoch}: accuracy drop when zeroed (baseline {baseline:.2f})"
            )
            figure = ablation_figure(res.ablation.accuracy_drop, res.ablation.sets, names, title)
            out.figure(out.tag(layer, "ablation"), figure)
        if res.probes is not None:
            out.image(out.tag(layer, "probes"), probe_grid(res.probes.images, res.probes.preferred))
            out.text(out.tag(layer, "probes"), self._probe_table(res.probes, names))

    def _probe_table(self, probes: Probes, names: list[str]) -> str:
        """One row per probe (the rows of the probes image), short headers, one column per top
        neuron: ``n12 +0.41 r`` is neuron 12, its contribution to the predicted logit, and its
        image in the probes image (``r`` rendered, ``v`` the validation image it fires most on)."""
        top = probes.top_neurons.shape[1]
        lines = [
            "Top neurons of each probe: contribution to the predicted logit; image in the probes "
            "image: r = rendered, v = top validation image.",
            "",
            "| # | true | pred | " + " | ".join(f"top {i + 1}" for i in range(top)) + " |",
            "|---|---|---|" + "---|" * top,
        ]
        for p in range(probes.images.shape[0]):
            cells = [
                f"n{n} {value:+.2g} {source}"
                for n, value, source in zip(
                    probes.top_neurons[p].tolist(),
                    probes.top_contribution[p].tolist(),
                    [("v" if s == "top example" else "r") for s in probes.preferred_source[p]],
                    strict=True,
                )
            ]
            label, pred = int(probes.labels[p]), int(probes.predictions[p])
            lines.append(f"| {p} | {names[label]} | {names[pred]} | {' | '.join(cells)} |")
        return "\n".join(lines)

    def _arrays(
        self, layer: str, res: ContributionResult, names: list[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        arrays: dict[str, Any] = dict(res.stats.as_arrays())
        arrays["top_example_index"] = res.top_example_index
        meta: dict[str, Any] = {"layer": layer, "epoch": res.epoch, "class_names": names}
        ablation = res.ablation
        if ablation is not None:
            arrays["accuracy_drop"] = ablation.accuracy_drop
            arrays["logit_drop"] = ablation.logit_drop
            arrays["baseline_accuracy"] = ablation.baseline_accuracy
            for i, neurons in enumerate(ablation.neurons):
                arrays[f"ablated_neurons_{i}"] = neurons
            meta["ablation_sets"] = ablation.sets
            meta["ablation_classes"] = ablation.classes
            meta["ablation_selectivity"] = ablation.selectivity
            meta["clusters_epoch"] = ablation.clusters_epoch
        probes = res.probes
        if probes is not None:
            for key in ("index", "labels", "predictions", "contribution", "classes"):
                arrays[f"probe_{key}"] = getattr(probes, key)
            arrays["probe_top_neurons"] = probes.top_neurons
            arrays["probe_top_contribution"] = probes.top_contribution
        return arrays, meta
