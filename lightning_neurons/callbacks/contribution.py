"""NeuronContribution: which neurons carry each class's logit, and what zeroing them does."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_neurons import progress
from lightning_neurons.batch import BatchReader
from lightning_neurons.callbacks._base import (
    OnError,
    StageBatch,
    StagedCallback,
    as_patterns,
    checked_options,
    find_callback,
)
from lightning_neurons.callbacks._contribution_ablation import ablate_layer
from lightning_neurons.callbacks._contribution_log import log_contribution
from lightning_neurons.callbacks._contribution_probes import Batch, add_preferred, explain_probes
from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
from lightning_neurons.callbacks.tracker import ActivationTracker, tracker_spec
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.checks import Constraints, Interval, Options, StrList
from lightning_neurons.class_contribution import ClassContributions, ContributionStats
from lightning_neurons.contribution import contribution_batch
from lightning_neurons.distributed import (
    Failed,
    attempt,
    gather,
    sum_over_ranks,
)
from lightning_neurons.gradients import GIVE_GRAPH, NO_GRAPH
from lightning_neurons.hooks import exact_call_site, resolve_layers, selects
from lightning_neurons.loaders import LoaderRows, analysed_rows
from lightning_neurons.probes import ProbeCollector, shared_probes
from lightning_neurons.results import ContributionResult, Probes, TrackerSpec
from lightning_neurons.state import analysis_mode
from lightning_neurons.strategies import refuse_sharded, require_forward


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
#: Image-logit pairs explained at once on a rank that kept no batch (else a kept batch's size).
PROBE_ROWS = 64


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
      behind the prediction with their preferred images: the ``FeatureVisualizer``'s rendering
      when one is attached and has rendered that neuron, else the validation image (of those
      kept) that activates the neuron most.

    Under DDP the work is shared: each rank keeps ``ceil(max_batches / world_size)`` batches of
    its own shard (DistributedSampler deals the unshuffled validation set out rank by rank, so
    together they are the first ``max_batches`` batches one process keeps when ``world_size``
    divides ``max_batches``; its repeated samples are left out), computes the contribution sums
    and the ablation counts on them, and the sums are added up over the ranks (float64 and integer
    counts): the results of one process, up to the order of float summation. The neuron clusters
    (NeuronClustering's results are on rank zero) are sent to every rank before the ablation; the
    probes are chosen from every rank's kept images as one process chooses them and each rank
    explains a share of them. Every rank holds :attr:`results` (the last analysed epoch's: they
    are dropped when the next analysis starts, and stay empty if it fails); only rank zero logs
    and writes. A failure on any rank is reported on every rank (no rank is left waiting) and
    follows ``on_error``. Sharded models (FSDP, DeepSpeed ZeRO stage 3) are refused at set-up.
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
    ``results[layer].ablation.clusters_epoch`` and ``clusters_step`` say which epoch and step
    the ablated clusters are from).

    Args:
        layers: Module names or glob patterns. Default: the tracker's layers.
        max_batches: Validation batches kept and analysed per epoch (under DDP, in all: each
            rank keeps ``ceil(max_batches / world_size)``).
        top_k: Dominant neurons per class. Default: the tracker's ``top_k``.
        ablation_layers: Layers whose neuron sets are ablated (they are analysed too). Default: the
            last analysed layer (ablating early layers costs about one forward pass of the kept
            images per neuron set). ``[]``: no ablation.
        max_ablation_classes: Ablate the dominant neurons of the classes 0 to
            ``max_ablation_classes - 1`` (those with images).
        share_prefix: How ablations are batched, see
            :func:`~lightning_neurons.ablation.ablation_effects` (``"auto"`` checks the model).
        max_probes: Probe images: the first kept validation image of each class, in class
            order (chosen by :mod:`lightning_neurons.probes`; with more classes than this, the
            classes whose first image comes first in the validation order); 0 for none.
        probe_top: Top contributing neurons shown per probe image.
        enable_logging: Log figures, images, text and scalars and write the numbers to files.
        every_n_epochs: Analyse every n-th epoch.
        within_epochs: Validations within an epoch too (``False``: its last only).
        on_error: ``"warn"`` (report a failed analysis and train on) or ``"raise"``.

    Raises:
        NeuronsError: For bad arguments; at setup, when no ActivationTracker is attached or a layer
            does not exist.

    Example:
        >>> contribution = NeuronContribution(max_batches=4)
        >>> trainer = Trainer(callbacks=[ActivationTracker(), contribution])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> contribution.results["backbone.features.relu3"].ablation.accuracy_drop  # doctest: +SKIP
    """

    reads = (ActivationTracker, NeuronClustering, FeatureVisualizer)
    _parameter_constraints: ClassVar[Constraints] = {
        **StagedCallback._parameter_constraints,
        "max_batches": [Interval(int, 1, None)],
        "top_k": [Interval(int, 1, None), None],
        "ablation_layers": [StrList(), None],
        "max_ablation_classes": [Interval(int, 1, None)],
        "share_prefix": [Options(object, (True, False, "auto"))],
        "max_probes": [Interval(int, 0, None)],
        "probe_top": [Interval(int, 1, None)],
    }

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
        within_epochs: bool = True,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(**checked_options(self, locals()))
        self.ablation_patterns = as_patterns(ablation_layers)
        self.max_batches = max_batches
        self.top_k = top_k
        self.max_ablation_classes = max_ablation_classes
        self.share_prefix = share_prefix
        self.max_probes = max_probes
        self.probe_top = probe_top
        self.ablation_layers: list[str] = []
        #: ``{layer: ContributionResult}`` of the latest analysed epoch.
        self.results: dict[str, ContributionResult] = {}
        self._spec: TrackerSpec | None = None
        self._batches: list[Batch] = []
        self._collecting = False
        self._ranks = (0, 1)  # (this rank, number of ranks) of the stage being analysed
        self._share = max_batches  # batches this rank keeps
        self._rows = LoaderRows()
        # the first kept image of each class: the probe candidates of this rank
        self._probe_candidates = ProbeCollector(per_class=1, limit=max_probes)
        self._without_gradient: list[str] = []  # call sites left out: no gradient reaches them
        self._warned: list[str] = []

    # ---- Lightning hooks -----------------------------------------------------------------------

    @override
    def _set_up(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super()._set_up(trainer, pl_module, stage)
        refuse_sharded(trainer, "NeuronContribution")
        require_forward(pl_module, "NeuronContribution")
        spec = self._spec = tracker_spec(trainer, required=type(self).__name__)
        layers = (
            list(spec.layers)
            if self.layer_patterns is None
            else spec.resolve(pl_module, self.layer_patterns)
        )
        if self.ablation_patterns is None:
            ablate = layers[-1:]
        elif not self.ablation_patterns:
            ablate = []
        else:
            ablate = resolve_layers(pl_module, self.ablation_patterns)
        # Layer lists: a module run several times per pass gives one layer per call site.
        self.layers = resolve_layers(pl_module, [*layers, *ablate])
        self.ablation_layers = list(ablate)

    @override
    def _start_fit(self) -> None:
        self.results = {}

    # Lightning's per-stage hooks arrive here (see StagedCallback): validation and test batches.
    def _stage_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage in ("validation", "test"):
            self._start(trainer, stage)

    def _on_batch_end(self, trainer: Trainer, pl_module: LightningModule, step: StageBatch) -> None:
        if step.stage in ("validation", "test"):
            self._keep(step.batch, step.batch_idx, step.dataloader_idx)

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
        loader = self._spec.dataloader_idx if self._spec is not None else 0
        self._rows = analysed_rows(trainer, stage, loader)
        self._probe_candidates.reset(trainer.global_rank, trainer.world_size)

    @property
    def _reader(self) -> BatchReader:
        return self._spec.reader if self._spec is not None else BatchReader()

    def _keep(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not self._collecting or len(self._batches) >= self._share:
            return
        if self._spec is not None and dataloader_idx != self._spec.dataloader_idx:
            return
        x = self._reader.inputs(batch)
        y = self._reader.labels(batch)
        rows = self._rows.rows(batch_idx, y.shape[0])  # DistributedSampler's repeats left out
        if not rows:
            return
        with torch.inference_mode(False):  # normal tensors, usable in autograd later
            kept = (x[:rows].detach().to("cpu", copy=True), y[:rows].detach().to("cpu", copy=True))
        self._batches.append(kept)
        num_classes = self._spec.num_classes if self._spec is not None else None
        self._probe_candidates.update(*kept, num_classes=num_classes)

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        spec = self._spec or tracker_spec(trainer, required=type(self).__name__)
        batches, collecting = self._batches, self._collecting
        self._reset()
        # under DDP every rank takes part (its share of the work, and the collectives), with or
        # without batches of its own
        if collecting and (batches or self._ranks[1] > 1):
            self._run_safely(
                "neuron contribution analysis",
                lambda: self._analyse(trainer, pl_module, spec, batches),
            )

    # ---- analysis ------------------------------------------------------------------------------

    def _analyse(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        spec: TrackerSpec,
        batches: list[Batch],
    ) -> None:
        """Every rank analyses its own kept batches and the sums are added up over the ranks
        (one process: its batches), so every rank gets the results of all ranks' batches. A
        failure on any rank raises on every rank (see :mod:`lightning_neurons.distributed`)."""
        num_classes = spec.num_classes
        top_k = self.top_k or spec.top_k
        # the last epoch's results go before this one's are made: three [C, K] float32 tables a
        # layer (194 MB for ResNet-50's 17 layers at 1,000 classes), host memory on a GPU too
        self.results = {}
        results: dict[str, ContributionResult] = {}
        with analysis_mode(pl_module):
            progress.phase("contributions of the kept images")
            shared = self._contributions(pl_module, batches, num_classes, top_k)
            if shared is None:  # no rank kept a batch
                return
            stats, top_example = shared
            self._warn_without_gradient()
            for layer in stats:  # call sites of self.layers, in the order they ran
                results[layer] = ContributionResult(
                    layer=layer,
                    epoch=trainer.current_epoch,
                    stats=stats[layer],
                    top_example_index=top_example[layer],
                )
            for layer in [n for n in stats if selects(self.ablation_layers, n)]:
                results[layer].ablation = ablate_layer(
                    trainer,
                    pl_module,
                    layer,
                    stats[layer],
                    batches,
                    max_classes=self.max_ablation_classes,
                    share_prefix=self.share_prefix,
                    output_fn=self._reader.output_fn,
                )
            if self.max_probes and stats:  # (no layer: none is reached by a gradient)
                # the call sites a gradient reaches ("relu" would select every call of relu)
                reached = [exact_call_site(n) for n in stats] if self._without_gradient else None
                layers = reached or self.layers
                probes = self._explain_probes(trainer, pl_module, layers, batches, top_example)
                for layer, probe in probes.items():
                    results[layer].probes = probe
        self.results = results
        if self.enable_logging:
            self._run_safely(
                "logging neuron contribution",
                lambda: log_contribution(trainer, self.results, owner=self),
            )

    def _contributions(
        self, pl_module: LightningModule, batches: list[Batch], num_classes: int, top_k: int
    ) -> tuple[dict[str, ContributionStats], dict[str, torch.Tensor]] | None:
        """Class contributions of every rank's kept batches, and per neuron the index of the kept
        image that activates it most (the ``p``-th kept image of rank ``r`` of ``W`` is image
        ``p * W + r``: its index among one process's kept images); ``None`` if no rank kept a
        batch."""
        rank, world = self._ranks
        acc = ClassContributions(num_classes, top_k)
        progress.phase("contributions of the kept images")
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
            out = contribution_batch(  # the labels are checked on the host, then moved
                pl_module,
                self.layers,
                x.to(device),
                y,
                output_fn=self._reader.output_fn,
                without_gradient="skip",  # warned about once (every rank skips the same)
            )
            self._without_gradient += [
                n for n in out.without_gradient if n not in self._without_gradient
            ]
            acc.update(out, y)
            for layer, act in out.activations.items():
                value, row = act.detach().float().max(dim=0)  # kept where it is: read back once
                old_value, old_index = best.get(
                    layer, (torch.full_like(value, -torch.inf), torch.zeros_like(row))
                )
                better = value > old_value
                best[layer] = (
                    torch.where(better, value, old_value),
                    torch.where(better, row + offset, old_index),
                )
            offset += x.shape[0]
        return {layer: (value.cpu(), index.cpu()) for layer, (value, index) in best.items()}

    def _warn_without_gradient(self) -> None:
        """One warning for the layers whose outputs carry no gradient, when first met."""
        new = [n for n in self._without_gradient if n not in self._warned]
        if new:
            new.sort(key=lambda n: [selects([spec], n) for spec in self.layers].index(True))
            self._warned += new
            rank_zero_warn(
                f"NeuronContribution: no gradient reaches layers {new} from the logits (the "
                f"model computes them, or the layers after them, {NO_GRAPH}): no contributions "
                f"of their neurons. To have them, {GIVE_GRAPH}."
            )

    def _explain_probes(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        layers: list[str],
        batches: list[Batch],
        top_example: dict[str, torch.Tensor],
    ) -> dict[str, Probes]:
        """The probes (the first kept image of each class, by class, of every rank's kept
        images), explained, with their top neurons' preferred images: the FeatureVisualizer's
        renderings when one is attached, else the kept images that activate them most."""
        rank, world = self._ranks
        spec = self._spec
        assert spec is not None
        progress.phase("probe images")
        chosen = shared_probes(self._probe_candidates, "choosing the probe images", by_class=True)
        probes = explain_probes(
            pl_module,
            layers,
            self._reader,
            chosen,
            spec.num_classes,
            top=self.probe_top,
            max_logits=PROBE_LOGITS,
            rows=max((len(x) for x, _ in batches), default=PROBE_ROWS),
            rank=rank,
            world=world,
        )
        visualizer = find_callback(trainer, FeatureVisualizer)
        renderings = visualizer.results if visualizer is not None else {}
        add_preferred(probes, renderings, top_example, batches, rank, world)
        return probes
