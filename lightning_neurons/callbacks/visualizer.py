"""FeatureVisualizer: what each channel and class prefers, and where the model looks, every epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_neurons import progress
from lightning_neurons.batch import (
    BatchReader,
    InputTransform,
    LoaderRows,
    analysed_rows,
    as_model_input,
    to_display,
    to_model_input,
)
from lightning_neurons.callbacks._base import OnError, StagedCallback, find_callback
from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
from lightning_neurons.callbacks.tracker import ActivationTracker, infer_num_classes
from lightning_neurons.checks import (
    check_channels,
    check_choice,
    check_image_shape,
    check_indices,
    check_instance,
    check_int,
    check_number,
    check_optional_positive_int,
    check_positive_int,
)
from lightning_neurons.distributed import attempt, gather, share
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import (
    get_module,
    hooked,
    reduce_activation,
    resolve_layers,
    selects,
    split_call,
)
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.results import ClusterRendering, Rendering, SaliencyMaps
from lightning_neurons.state import analysis_mode, model_device
from lightning_neurons.stats import LayerStats
from lightning_neurons.strategies import refuse_sharded
from lightning_neurons.visualize.objectives import LOGITS, Channel, ChannelGroup, ClassLogit
from lightning_neurons.visualize.prior import DataPrior, DataPriorEstimate
from lightning_neurons.visualize.render import check_objectives, render
from lightning_neurons.visualize.saliency import METHODS, Method, saliency


def _strength_label(channel: int, strength: float, activation: float, reference: float) -> str:
    """``"12: 3.1x"``; where the validation maximum is not positive (no ratio): ``"12: > max"``."""
    if math.isfinite(strength):
        return f"{channel}: {strength:.1f}x"
    return f"{channel}: {'>' if activation > reference else '<='} max"


def _first_per_class(
    labels: Sequence[int], kept: Sequence[int], per_class: int, limit: int
) -> list[int]:
    """Indices of ``labels`` to keep, in order: each label until ``per_class`` of it are kept
    (``kept`` are the labels kept before), at most ``limit`` kept in all.

    Example:
        >>> _first_per_class([3, 3, 1, 3, 2], kept=[2], per_class=1, limit=3)
        [0, 2]
    """
    counts: dict[int, int] = {}
    for label in kept:
        counts[label] = counts.get(label, 0) + 1
    picked: list[int] = []
    for i, label in enumerate(labels):
        if len(kept) + len(picked) >= limit:
            break
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            picked.append(i)
    return picked


#: A cluster continues the image of the last round's cluster it shares at least this share of
#: neurons with (Jaccard index); else its image starts from noise.
CLUSTER_MATCH = 0.5


def default_classes(num_classes: int, max_classes: int | None) -> list[int]:
    """All classes, or ``max_classes`` of them spread evenly: ``floor(i * C / max_classes)``.

    Example:
        >>> default_classes(1000, 4)
        [0, 250, 500, 750]
    """
    if max_classes is None or num_classes <= max_classes:
        return list(range(num_classes))
    return [i * num_classes // max_classes for i in range(max_classes)]


class FeatureVisualizer(StagedCallback):
    """Renders what channels and classes prefer, and saliency maps of probe images, every epoch.

    Every ``every_n_epochs`` (after validation) the callback

    - renders, by batched gradient ascent (:func:`~lightning_neurons.visualize.render`), one image
      for each chosen channel of each chosen layer, and one for each class (its logit);
    - computes saliency maps (``saliency`` methods) for a fixed set of probe images taken from
      the validation batches Lightning already runs (by default the first image of each class;
      at most ``max_probes`` images are kept), shown over the image with the predicted and true
      label. The probes are kept as the loader yielded them (model inputs); the predicted label
      is the model's prediction on exactly that input, and the image shown is the display image
      (:func:`~lightning_neurons.batch.to_display`; maps are taken with respect to it when the
      ``input_transform`` can be inverted, else with respect to the model input);
    - logs labelled image grids to TensorBoard under stable tags (``preference/<layer>``,
      ``preference/classes``, ``focus/<method>``), so TensorBoard's step slider shows the images
      evolving over the epochs, and writes the images to files
      (``<log_dir>/neurons/preference/epoch=EEE/<layer>.npz``, ``classes.npz``, and
      ``focus/epoch=EEE/saliency.npz``);
    - measures how strong each rendered channel image is: the activation it reaches divided by
      the largest activation of that channel on the real validation data, as recorded by an
      attached :class:`ActivationTracker` (same layer, same ``reduction``). Without a tracker,
      or for a layer it does not track, ``strength`` is ``None`` (only the raw activation is
      kept): a maximum over a few probe images would overstate it. The scalars
      ``preference/<layer>/strength_median`` and ``preference/<layer>/above_max_fraction`` (share of
      images driving their channel above every validation image) are logged, and
      ``preference/<layer>/steps``: the mean steps the images ran (see ``converge_tol``).

    Under DDP every rank renders a contiguous share of each layer's channels and of the classes
    (row ``i`` of a rendering always starts from the noise seeded by ``(seed, i)``), and the
    images are gathered on every rank: the images of one process, in a ``1 / world_size`` of the
    time. The saliency probes are chosen from every rank's validation images as one process
    chooses them (the first of each class in the validation order), every rank maps a contiguous
    share of them (SmoothGrad's noise is drawn per probe, from ``(seed, probe index)``) and the
    maps are gathered on every rank: one process's maps. A failure on any rank is reported on
    every rank (no rank is left waiting) and follows ``on_error``. The cluster images (from
    NeuronClustering's results, which exist on rank zero) are rendered on rank zero, and only rank
    zero logs and writes. Sharded models (FSDP, DeepSpeed ZeRO stage 3) are refused at set-up:
    they need every rank in every forward pass.

    The model is left exactly as found (training mode, gradients, ``requires_grad``, hooks, RNG
    states), so a seeded run gives the same weights with or without this callback.

    After each round the results are in :attr:`results` (other analyses, e.g. NeuronContribution's
    probe images, read them):

    ``results[layer]`` (one entry per layer, and ``results["classes"]`` for the class images) is a
    :class:`~lightning_neurons.results.Rendering`: the images, each one's channel (or class), the
    activation it reaches, and its strength relative to the channel's largest activation on the
    tracker's data; :attr:`saliency_results` is a :class:`~lightning_neurons.results.SaliencyMaps`
    (``None`` before the first round); with a NeuronClustering attached (``clusters=True``),
    :attr:`cluster_results` holds a :class:`~lightning_neurons.results.ClusterRendering` per
    clustered layer: its largest clusters' preferred images, the class each cluster prefers and
    the class the model (and the judge) sees in its image, logged under
    ``preference/clusters/<layer>``.

    Batches and model outputs are read through the attached tracker's
    :attr:`~lightning_neurons.ActivationTracker.reader` (its ``input_fn``, ``label_fn`` and
    ``output_fn``), probes only from its ``dataloader_idx``. The set-up (image shape, input
    transform, layers, channels and classes) is checked with one forward pass on the first batch
    the model sees, sanity check included (failures follow ``on_error``). Rendering and saliency
    run in the model's floating-point type (``precision="bf16-true"`` works).

    Args:
        layers: Layers whose channels are rendered (names or glob patterns). Default: the
            attached tracker's layers, else the default layers (activations and block outputs).
        channels: Per layer, the channel indices to render (``{"features.conv2": [0, 5, 9]}``);
            layers not listed get their first ``max_channels`` channels.
        max_channels: Render the first ``max_channels`` channels of each layer (``None``: all).
        classes: Classes to render (default: all, or ``max_classes`` of them; ``[]``: none).
        max_classes: With ``classes`` left at its default and a model of more classes than
            this, render ``max_classes`` classes spread evenly over the class indices (class
            ``floor(i * C / max_classes)`` for ``i < max_classes``): the same classes every
            epoch, so TensorBoard's step slider follows them; at 1,000 classes a round renders
            16 class images, not 1,000 (each with ``class_views x class_restarts`` rows).
            ``None``: all classes.
        saliency: Saliency methods for the probe images, from ``"gradient"``, ``"smoothgrad"``
            and ``"gradcam"`` (``[]``: none).
        gradcam_layer: Grad-CAM's layer; default: the model's last Conv2d.
        probes_per_class: Probe images kept per class (the first ones seen in validation).
        max_probes: At most this many probe images in all.
        image_shape: ``(C, H, W)`` of the rendered images; default: the data module's
            ``image_shape``, else the probe images' shape.
        input_transform: Display image (values in [0, 1]) -> model input, applied by
            :func:`~lightning_neurons.batch.to_model_input`; default: the data module's
            ``input_transform`` attribute, else none (the loaders yield display images).
        steps: Gradient-ascent steps per image from noise (the first round, and every round
            with ``continue_steps=None``).
        continue_steps: Steps of the later rounds, which continue every image from its
            parameters of the previous round instead of starting from noise (kept in the
            callback's ``state_dict``, so a resumed run continues too). A channel's preferred
            image changes slowly from epoch to epoch: a few steps follow it, and the step slider
            shows one image evolving rather than a new random one per epoch. A round whose
            objectives or settings changed starts from noise with ``steps``. ``None``: always
            from noise.
        converge_tol: Stop an image before ``steps`` (or ``continue_steps``) once its objective
            has converged: every ``converge_window`` steps each image is scored without
            transforms, and one whose value rose by less than ``converge_tol`` times its value
            from one check to the next, twice in a row, stops (``render(converge_tol=)``).
            Decided per image, so the images do not depend on the DDP split or the chunking.
            The steps each image ran are in ``results[...].steps`` and logged as
            ``preference/<layer>/steps`` (their mean). On the digits demo (``steps: 128``) the
            first round ran the channel images 55 to 85 steps on average per layer and the class
            candidates 76 (18.4 s instead of 28.3 s), later rounds 11.5 to 16 of
            ``continue_steps=16``; >= 94% of every layer's channel images stayed above their
            channel's validation maximum in every round. ``None`` or ``0``: always the full
            count.
        converge_window: Steps between two convergence checks (so at least twice this many
            per round).
        lr: Adam's learning rate.
        param: ``"maco"`` (default: only the spectrum's phase is optimised; amplitudes and pixel
            statistics are the validation data's, estimated from the first ``prior_images``
            validation images and cached; see :meth:`reset_prior`), ``"fft"`` or ``"pixel"``.
            ``"maco"`` needs display images: with an input transform other than
            :class:`~lightning_neurons.data.Normalize` (which is inverted), pass ``prior=``, or
            the callback warns and renders with ``"fft"``.
        transforms: ``"robust"`` (default) or ``"standard"`` random jitter, scale and rotation,
            or ``"none"``.
        contrast: ``"maco"``: scale of channel images' patterns relative to the data's spread.
        class_contrast: ``"maco"``: the same for class images (0.8: a little less than the
            data's own spread; on the digits demo other models recognised these best).
        views: Randomly transformed copies of every channel image scored at each step.
        class_views: The same for class images (an ensemble of augmentations: class images
            that other models recognise more often, at ``class_views`` times the cost).
        class_restarts: Class image candidates rendered from different seeds; the one the
            model scores highest over random views is kept (``class_restarts`` times the cost).
        class_select_after: Keep the best candidate after this many steps of the first round
            and spend the other steps on it alone (see ``render(select_after=)``): about half
            the cost of the first round's class images at ``steps // 2``; ``None``: after all
            steps (on the digits, ``steps=128``: 64 kept the twin and LeNet transfer goals, 32
            did not; see ``benchmarks/visualization.py --select-after``).
        n_images: Images per channel, made different by a diversity term (Olah et al., 2017);
            TensorBoard shows one row per channel.
        diversity: Weight of the diversity term when ``n_images > 1``.
        diversity_on: ``"features"`` (Olah et al.: the images of a channel must differ in the
            Gram matrix of the channel's layer, i.e. in what the layer sees) or ``"pixels"``.
        clusters: With a :class:`~lightning_neurons.NeuronClustering` attached, also render the
            preferred image of each neuron cluster of the visualized layers (the mean of its
            channels, :class:`~lightning_neurons.visualize.ChannelGroup`), labelled with the
            class the cluster prefers and the class the model (and the ``judge``) sees in it.
        max_clusters: At most this many clusters per layer (the largest).
        prior: The data's statistics for ``"maco"`` (default: estimated from validation batches).
        prior_images: Validation images the prior is estimated from (the first ones; under DDP
            each rank takes its share, so the prior is that of one process). The estimated prior
            is kept in the callback's ``state_dict`` (a resumed run renders with the same one).
        judge: A second model (e.g. the same architecture trained from another seed) that
            classifies the class and cluster images: its verdict is shown under each image and
            kept in ``results["classes"].judge_predicted`` (and
            ``cluster_results[layer].judge_predicted``), so a person sees which images
            transfer.
        l2: Weight of an L2 penalty on the rendered images.
        tv: Weight of a total-variation penalty on the rendered images.
        seed: Seed of the rendering (same seed: same starting images every epoch).
        batch_size: Render at most this many images at once (default: a layer at once).
        smoothgrad_samples: Noisy copies per probe image for SmoothGrad.
        every_n_epochs: Visualize after every n-th epoch.
        enable_logging: Log figures and scalars and write files (``False``: only fill
            :attr:`results`).
        on_error: ``"warn"``: a failing round is reported and training goes on; ``"raise"``.

    Raises:
        NeuronsError: For bad arguments; at setup for unknown layers; at the first round for
            channel or class indices outside the layers' real widths.

    Example:
        >>> trainer = Trainer(callbacks=[ActivationTracker(), FeatureVisualizer(max_channels=16)])  # doctest: +SKIP
    """

    reads = (ActivationTracker, NeuronClustering)  # its clusters: cluster images

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        channels: dict[str, list[int]] | None = None,
        max_channels: int | None = 16,
        classes: list[int] | None = None,
        max_classes: int | None = 16,
        saliency: Sequence[Method] = ("gradient", "smoothgrad", "gradcam"),
        gradcam_layer: str | None = None,
        probes_per_class: int = 1,
        max_probes: int = 16,
        image_shape: list[int] | None = None,
        input_transform: InputTransform | None = None,
        steps: int = 64,
        continue_steps: int | None = 16,
        converge_tol: float | None = 0.005,
        converge_window: int = 4,
        lr: float = 0.1,
        param: Literal["maco", "fft", "pixel"] = "maco",
        transforms: Literal["robust", "standard", "none"] = "robust",
        contrast: float = 2.0,
        class_contrast: float = 0.8,
        views: int = 1,
        class_views: int = 4,
        class_restarts: int = 4,
        class_select_after: int | None = None,
        n_images: int = 1,
        diversity: float = 1.0,
        diversity_on: Literal["features", "pixels"] = "features",
        clusters: bool = True,
        max_clusters: int = 16,
        prior: DataPrior | None = None,
        prior_images: int = 512,
        judge: nn.Module | None = None,
        l2: float = 0.0,
        tv: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        smoothgrad_samples: int = 16,
        every_n_epochs: int = 1,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(
            layers, every_n_epochs=every_n_epochs, enable_logging=enable_logging, on_error=on_error
        )
        self.channels = check_channels(channels)
        self.max_channels = check_optional_positive_int("max_channels", max_channels)
        self.classes = None if classes is None else check_indices("classes", classes)
        self.max_classes = check_optional_positive_int("max_classes", max_classes)
        if isinstance(saliency, str):
            saliency = [saliency]  # type: ignore[list-item]
        self.saliency_methods = [check_choice("saliency", m, METHODS) for m in saliency]
        self.gradcam_layer = gradcam_layer
        self.probes_per_class = check_positive_int("probes_per_class", probes_per_class)
        self.max_probes = check_positive_int("max_probes", max_probes)
        self.image_shape = None if image_shape is None else check_image_shape(image_shape)
        self.input_transform = input_transform
        self.steps = check_positive_int("steps", steps)
        self.continue_steps = check_optional_positive_int("continue_steps", continue_steps)
        self.converge_tol = (
            None if converge_tol is None else check_number("converge_tol", converge_tol) or None
        )
        self.converge_window = check_positive_int("converge_window", converge_window)
        self.lr = check_number("lr", lr, strict=True)
        self.param = check_choice("param", param, ("fft", "pixel", "maco"))
        self.transforms = check_choice("transforms", transforms, ("standard", "none", "robust"))
        self.contrast = check_number("contrast", contrast, strict=True)
        self.class_contrast = check_number("class_contrast", class_contrast, strict=True)
        self.views = check_positive_int("views", views)
        self.class_views = check_positive_int("class_views", class_views)
        self.class_restarts = check_positive_int("class_restarts", class_restarts)
        self.class_select_after = check_optional_positive_int(
            "class_select_after", class_select_after
        )
        self.n_images = check_positive_int("n_images", n_images)
        self.diversity = check_number("diversity", diversity)
        self.diversity_on = check_choice("diversity_on", diversity_on, ("features", "pixels"))
        self.clusters = bool(clusters)
        self.max_clusters = check_positive_int("max_clusters", max_clusters)
        self.prior = check_instance("prior", prior, DataPrior, "a DataPrior")
        self.prior_images = check_positive_int("prior_images", prior_images)
        self._estimate = DataPriorEstimate(self.prior_images)
        self._prior_warned = False
        self.judge = check_instance("judge", judge, nn.Module, "an nn.Module")
        self.l2 = check_number("l2", l2)
        self.tv = check_number("tv", tv)
        self.seed = check_int("seed", seed)
        self.batch_size = check_optional_positive_int("batch_size", batch_size)
        self.smoothgrad_samples = check_positive_int("smoothgrad_samples", smoothgrad_samples)
        #: ``{layer or "classes": Rendering}`` of the latest round (see :mod:`lightning_neurons.results`).
        self.results: dict[str, Rendering] = {}
        #: The probe images' saliency maps of the latest round (``None`` before the first).
        self.saliency_results: SaliencyMaps | None = None
        #: ``{layer: ClusterRendering}``: NeuronClustering's largest clusters' preferred images.
        self.cluster_results: dict[str, ClusterRendering] = {}
        #: Seconds the last round took (rendering, saliency and logging).
        self.last_seconds: float | None = None
        # this rank's probe candidates, with their place in the validation order (see
        # _collect_probes); the probes of a round are chosen from every rank's (_shared_probes)
        self._probe_images: list[torch.Tensor] = []
        self._probe_labels: list[int] = []
        self._probe_order: list[int] = []
        self._probe_seen = 0  # validation images this rank has looked at for probes
        self._val_rows = LoaderRows()
        self._probes_full = False
        self._seen_shape: tuple[int, ...] | None = None
        self._no_labels_warned = False
        self._plan: dict[str, Any] | None = None
        self._reader = BatchReader()
        self._dataloader_idx = 0
        self._num_classes: int | None = None
        self._estimated_prior: DataPrior | None = None
        # per results key: the render's parameters and what they were rendered for
        self._params: dict[str, dict[str, Any]] = {}
        self._ranks = (0, 1)  # (this rank, number of ranks) of the round being run

    # ---- identity and checkpointing ------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layer_patterns, param=self.param, seed=self.seed
        )

    def state_dict(self) -> dict[str, Any]:
        """The parameters of the last round's images (so a resumed run continues them) and the
        estimated data prior (``"maco"``: a resumed run renders with the same one)."""
        state: dict[str, Any] = {
            "params": {
                key: {**entry, "params": entry["params"].clone()}
                for key, entry in self._params.items()
            }
        }
        prior = self._estimated_prior
        if prior is not None:
            fields = {"magnitude": prior.magnitude, "mean": prior.mean, "std": prior.std}
            state["prior"] = {**fields, "count": prior.count}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._params = {
            key: {**entry, "signature": tuple(entry["signature"])}
            for key, entry in state_dict.get("params", {}).items()
        }
        saved = state_dict.get("prior")
        if saved is not None:
            self._estimated_prior = DataPrior(
                magnitude=saved["magnitude"],
                mean=saved["mean"],
                std=saved["std"],
                count=int(saved["count"]),
            )

    # ---- Lightning hooks -----------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_sharded(trainer, "FeatureVisualizer")
        tracker = find_callback(trainer, ActivationTracker)
        self._reader = tracker.reader if tracker is not None else BatchReader()
        self._dataloader_idx = tracker.dataloader_idx if tracker is not None else 0
        patterns = self.layer_patterns
        if patterns is None and tracker is not None:
            patterns = tracker.layer_patterns
        self.layers = resolve_layers(pl_module, patterns)
        unknown = [name for name in self.channels if not selects(self.layers, name)]
        if unknown:
            raise NeuronsError(
                f"FeatureVisualizer: `channels` names layers {unknown} that are not visualized; "
                f"the visualized layers are {self.layers} (set `layers=` to include them)"
            )
        if "gradcam" in self.saliency_methods and self.gradcam_layer is not None:
            get_module(pl_module, self.gradcam_layer)
        if self._estimate.count == 0 and self._estimated_prior is None:
            # under DDP each rank streams the first ceil(n / ranks) images of its shard: the
            # shards interleave the validation set, so together they are its first n images
            share = math.ceil(self.prior_images / max(1, trainer.world_size))
            self._estimate = DataPriorEstimate(share)
        self._plan = None

    # Lightning's per-stage hooks arrive here (see StagedCallback). The set-up is checked on the
    # first batch the model sees (sanity check included); validation batches feed the prior and
    # the probes.
    def _stage_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage == "validation" and not trainer.sanity_checking:
            self._val_rows = analysed_rows(trainer, stage, self._dataloader_idx)

    def _stage_batch_start(
        self,
        stage: str,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._first_batch(trainer, pl_module, batch)

    def _stage_batch_end(
        self,
        stage: str,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if stage != "validation" or trainer.sanity_checking:
            return
        if dataloader_idx != self._dataloader_idx:
            return
        self._update_prior(batch)
        if self._probes_full or not self.saliency_methods:
            return
        self._collect_probes(trainer, pl_module, batch, batch_idx)

    @override
    def _consume(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage != "validation" or not self._due(trainer):
            return
        tracker = find_callback(trainer, ActivationTracker)
        stats = tracker.results if tracker is not None else {}  # older with stage="train"
        reduction = tracker.reduction if tracker is not None else "mean"
        self._prepare(trainer, pl_module)  # configuration errors raise, on every rank
        self._finish_prior(trainer)  # every rank (DDP sum)
        # every rank renders its share of the objectives (see _render); rank zero does the rest
        self._ranks = (trainer.global_rank, trainer.world_size)
        self._run_safely(
            "feature visualization", lambda: self._visualize(trainer, pl_module, stats, reduction)
        )

    # ---- the data prior ("maco") ---------------------------------------------------------------

    def reset_prior(self) -> None:
        """Forget the estimated data prior: it is estimated again from the next validation epoch
        (a ``prior`` given by the user is kept)."""
        self._estimate.reset()
        self._estimated_prior = None

    def _update_prior(self, batch: Any) -> None:
        """Add a validation batch, mapped back to display images, to the data prior's sums."""
        if self.param != "maco" or self.prior is not None or self._estimated_prior is not None:
            return
        if self._estimate.full or self._plan is None:
            return
        try:
            inputs = self._reader.inputs(batch)
        except NeuronsError:
            return
        images, exact = to_display(inputs, self._plan["transform"])
        if not exact:  # an input transform without an inverse: no faithful display images
            return
        with torch.inference_mode(False), torch.no_grad():
            self._estimate.update(images)

    def _finish_prior(self, trainer: Trainer) -> None:
        """Turn the streamed sums into the cached prior, summed over every rank."""
        if self.param != "maco" or self.prior is not None or self._estimated_prior is not None:
            return
        seen = torch.tensor(float(self._estimate.count), device=trainer.strategy.root_device)
        if float(trainer.strategy.reduce(seen, reduce_op="sum")) == 0:
            return
        self._estimated_prior = self._estimate.compute(
            reduce=lambda t: trainer.strategy.reduce(
                t.to(trainer.strategy.root_device), reduce_op="sum"
            ).cpu()
        )

    def _render_prior(self) -> DataPrior | None:
        prior = self.prior or self._estimated_prior
        if self.param == "maco" and prior is None and not self._prior_warned:
            self._prior_warned = True
            rank_zero_warn(
                "FeatureVisualizer: param='maco' needs the data's statistics, but no display "
                "images were seen (no validation images, or an input transform that cannot be "
                "inverted); rendering with param='fft'. Pass `prior=DataPrior.from_images(...)`."
            )
        return prior

    # ---- probes --------------------------------------------------------------------------------

    def _collect_probes(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Keep the first ``probes_per_class`` images of each class this rank sees (at most
        ``max_probes``), each with its place in the validation order: the ``p``-th image of rank
        ``r`` of ``W`` is image ``p * W + r`` (DistributedSampler deals the validation set out
        rank by rank), so the probes chosen from every rank's candidates are one process's."""
        try:
            images = self._reader.inputs(batch)
            labels = self._reader.labels(batch)
        except NeuronsError as err:
            images = labels = None
            if not self._no_labels_warned:
                self._no_labels_warned = True
                rank_zero_warn(
                    f"FeatureVisualizer: the validation batches cannot be read ({err}); saliency "
                    "probes are skipped."
                )
        if images is None or labels is None or images.dim() != 4:
            self._probes_full = True
            return
        rows = self._val_rows.rows(batch_idx, labels.shape[0])  # DistributedSampler's repeats out
        first, self._probe_seen = self._probe_seen, self._probe_seen + labels.shape[0]
        picked = _first_per_class(
            labels[:rows].tolist(), self._probe_labels, self.probes_per_class, self.max_probes
        )
        for i in picked:
            with torch.inference_mode(False):
                self._probe_images.append(images[i].detach().to("cpu", torch.float32).clone())
            self._probe_labels.append(int(labels[i]))
            self._probe_order.append((first + i) * trainer.world_size + trainer.global_rank)
        num_classes = self._classes_count(trainer, pl_module)
        enough = (
            num_classes is not None
            and len(self._probe_labels) >= num_classes * self.probes_per_class
        )
        self._probes_full = len(self._probe_labels) >= self.max_probes or enough

    def _shared_probes(self) -> tuple[list[torch.Tensor], list[int]]:
        """The probes of this round, the same on every rank: every rank's candidates, in the
        validation order, picked as one process picks them (first of each class)."""
        world = self._ranks[1]
        if world == 1:
            return self._probe_images, self._probe_labels
        mine = (self._probe_order, self._probe_labels, self._probe_images)
        every = gather(mine, world, "gathering the saliency probes")
        candidates = sorted(
            (
                (order, label, image)
                for orders, labels, images in every
                for order, label, image in zip(orders, labels, images, strict=True)
            ),
            key=lambda candidate: candidate[0],
        )
        labels = [label for _, label, _ in candidates]
        picked = _first_per_class(labels, [], self.probes_per_class, self.max_probes)
        return [candidates[i][2] for i in picked], [labels[i] for i in picked]

    def _classes_count(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        if self._num_classes is None:
            dm = getattr(trainer, "datamodule", None)
            count = getattr(dm, "num_classes", None)
            self._num_classes = (
                count if isinstance(count, int) and count > 0 else infer_num_classes(pl_module)
            )
        return self._num_classes

    # ---- planning (first round) ----------------------------------------------------------------

    def _data_attr(self, trainer: Trainer, name: str) -> Any:
        return getattr(getattr(trainer, "datamodule", None), name, None)

    def _first_batch(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """On the first batch the model sees: note its image shape and check the set-up."""
        if self._plan is not None:
            return
        if self._seen_shape is None:
            try:
                images = self._reader.inputs(batch)
            except NeuronsError:
                images = None
            if isinstance(images, torch.Tensor) and images.dim() == 4:
                self._seen_shape = tuple(images.shape[1:])
        self._prepare(trainer, pl_module)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve image shape, input transform, channels and classes; check them with one probe.

        Mistakes in the set-up raise (every rank). A model output whose logits cannot be read
        (see ``output_fn``) follows ``on_error``: with ``"warn"`` it is reported once and only
        the channels are rendered (no class images, no saliency)."""
        if self._plan is not None:
            return
        shape = self.image_shape or self._data_attr(trainer, "image_shape")
        if shape is None:
            shape = self._seen_shape
        if shape is None:
            raise NeuronsError(
                "FeatureVisualizer cannot tell the image size: the data module has no `image_shape` "
                "and no validation images were seen. Pass `image_shape=[C, H, W]`."
            )
        shape = check_image_shape(list(shape))
        transform = self.input_transform or self._data_attr(trainer, "input_transform")
        output_fn = self._reader.output_fn
        probe = [Channel(layer, i) for layer in self.layers for i in self.channels.get(layer, [])]
        probe += [Channel(split_call(layer)[0], 0) for layer in self.layers]
        shapes = check_objectives(  # a wrong image shape, layer or channel raises here
            pl_module, probe, shape, input_transform=transform, output_fn=output_fn
        )
        # The layer list becomes the call sites it selects (one per call of a shared module).
        self.layers = [n for n in shapes if n != LOGITS and selects(self.layers, n)]
        logits = self._run_safely(
            "reading the model's logits (for class images and saliency)",
            lambda: check_objectives(
                pl_module, [ClassLogit(0)], shape, input_transform=transform, output_fn=output_fn
            )[LOGITS],
        )
        logits_ok = logits is not None
        if logits_ok and self.classes:  # a class outside the logits raises here
            check_objectives(
                pl_module,
                [ClassLogit(c) for c in self.classes],
                shape,
                input_transform=transform,
                output_fn=output_fn,
            )
        channels = {
            layer: self.channels.get(layer)
            or list(range(min(shapes[layer][0], self.max_channels or shapes[layer][0])))
            for layer in self.layers
        }
        if logits is None:
            classes = []
        elif self.classes is not None:
            classes = self.classes
        else:
            classes = default_classes(logits[0], self.max_classes)
        names = self._data_attr(trainer, "class_names")
        self._plan = {
            "shape": shape,
            "transform": transform,
            "channels": channels,
            "classes": classes,
            "class_names": list(names) if names else None,
            "gradcam_layer": self.gradcam_layer,
            "saliency": logits_ok,
        }

    # ---- one round -----------------------------------------------------------------------------

    def _render(
        self,
        model: nn.Module,
        key: str,
        objectives: list,
        classes: bool = False,
        local: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of ``objectives`` (continued from the last round's parameters of ``key``
        when they were rendered for the same objectives) and the steps each ran. Under DDP the
        objectives are split between the ranks and the images gathered on every rank;
        ``local``: this rank renders them all (called on rank zero only)."""
        plan = self._plan
        assert plan is not None
        progress.phase(f"rendering {key} ({len(objectives)} objectives)")
        prior = self._render_prior()
        param = self.param if prior is not None or self.param != "maco" else "fft"
        # what the saved parameters (one per kept image) must have been rendered for
        signature = (
            param,
            tuple(plan["shape"]),
            tuple(repr(o) for o in objectives),
            self.n_images,
            self.seed,
        )
        saved = self._params.get(key)
        init = None
        if self.continue_steps is not None and saved and tuple(saved["signature"]) == signature:
            init = saved["params"]
        # Under DDP each rank renders a contiguous block of the objectives, each row from the
        # noise it has in the whole rendering (first_row): the images of one process.
        # The kept candidate of a class image (class_restarts) is continued alone.
        rank, world = (0, 1) if local else self._ranks
        restarts = self.class_restarts if classes and init is None else 1
        per_objective = 1 if classes else self.n_images  # images kept per objective
        part = share(len(objectives), rank, world)
        start, stop = part.start, part.stop
        block = None if init is None else init[start * per_objective : stop * per_objective]
        first_row = start * per_objective * restarts
        mine = attempt(
            lambda: (
                self._render_rows(model, objectives[part], block, first_row, classes, restarts)
                if stop > start
                else None
            ),
            world,
        )
        done = [b for b in gather(mine, world, "rendering") if b is not None]
        images, params, steps = (torch.cat(parts) for parts in zip(*done, strict=True))
        if self.continue_steps is not None:
            self._params[key] = {"signature": signature, "params": params}
        return images.cpu(), steps

    def _render_rows(
        self,
        model: nn.Module,
        objectives: list,
        init: torch.Tensor | None,
        first_row: int,
        classes: bool,
        restarts: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (CPU), parameters and steps run of ``objectives``, rendered on this rank."""
        plan = self._plan
        assert plan is not None
        prior = self._render_prior()
        param = self.param if prior is not None or self.param != "maco" else "fft"
        images, params, steps = render(
            model,
            objectives,
            image_shape=plan["shape"],
            steps=self.steps if init is None else self.continue_steps,
            init=init,
            first_row=first_row,
            converge_tol=self.converge_tol,
            converge_window=self.converge_window,
            return_params=True,
            return_steps=True,
            lr=self.lr,
            param=param,  # type: ignore[arg-type]
            transforms=self.transforms,  # type: ignore[arg-type]
            input_transform=plan["transform"],
            output_fn=self._reader.output_fn,
            seed=self.seed,
            batch_size=self.batch_size,
            l2=self.l2,
            tv=self.tv,
            prior=prior,
            contrast=self.class_contrast if classes else self.contrast,
            views=self.class_views if classes else self.views,
            n_images=1 if classes else self.n_images,
            diversity=self.diversity,
            diversity_on=self.diversity_on,  # type: ignore[arg-type]
            restarts=restarts,
            select_after=self.class_select_after if restarts > 1 else None,
        )
        return images.cpu(), params, steps

    def _layer_activation(
        self,
        model: nn.Module,
        layer: str,
        images: torch.Tensor,
        channels: list[int],
        reduction: str,
    ) -> torch.Tensor:
        """Each image's activation of its channel, reduced like the tracker's statistics."""
        assert self._plan is not None
        found: dict[str, torch.Tensor] = {}

        def keep(name: str, output: torch.Tensor) -> None:
            found.setdefault(
                name, reduce_activation(output.detach(), reduction, name).float().cpu()
            )

        transform = self._plan["transform"]
        with analysis_mode(model, grad=False), hooked(model, [layer], keep):
            model(as_model_input(to_model_input(images, transform), model))
        values = found[layer]
        return values[torch.arange(len(channels)), torch.tensor(channels)]

    def _visualize(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stats: Mapping[str, LayerStats],
        reduction: str,
    ) -> None:
        start = time.perf_counter()
        plan = self._plan
        assert plan is not None
        epoch = trainer.current_epoch
        # Every exchange between the ranks first (the renderings, then the saliency maps), the
        # work of this rank alone after: a failure there (a rank out of memory, say) leaves no
        # other rank waiting at a collective it will never join.
        rendered = {
            layer: self._render(
                pl_module, layer, [Channel(layer, i) for i in plan["channels"][layer]]
            )
            for layer in self.layers
        }
        classes = [ClassLogit(c) for c in plan["classes"]]
        class_images = (
            self._render(pl_module, "classes", classes, classes=True) if classes else None
        )
        if self.saliency_methods and plan["saliency"]:  # every rank: each maps its share
            self.saliency_results = self._saliency(pl_module, epoch) or self.saliency_results
        results: dict[str, Rendering] = {}
        for layer, (images, steps) in rendered.items():
            # with n_images > 1, each channel's images are consecutive rows
            channels = [c for c in plan["channels"][layer] for _ in range(self.n_images)]
            activation = self._layer_activation(pl_module, layer, images, channels, reduction)
            strength = reference = reference_epoch = None
            if layer in stats and stats[layer].num_neurons > max(channels):
                reference = stats[layer].max_activation[channels].float()
                reference_epoch = stats[layer].epoch  # older when the tracker's stage is "train"
                nan = torch.full_like(activation, math.nan)
                strength = torch.where(reference > 0, activation / reference, nan)
            results[layer] = Rendering(
                channels=torch.tensor(channels),
                images=images,
                activation=activation,
                reference=reference,
                strength=strength,
                reference_epoch=reference_epoch,
                epoch=epoch,
                steps=steps,
            )
        if class_images is not None:
            results["classes"] = self._classes(pl_module, plan["classes"], epoch, *class_images)
        self.results = results
        # NeuronClustering's results are on rank zero only: so are the cluster images (rendered
        # by this rank alone)
        self.cluster_results = (
            self._clusters(trainer, pl_module, epoch)
            if self.clusters and trainer.is_global_zero
            else {}
        )
        if self.enable_logging:
            self._log(trainer)
        self.last_seconds = time.perf_counter() - start

    def _classes(
        self,
        model: nn.Module,
        classes: list[int],
        epoch: int,
        images: torch.Tensor,
        steps: torch.Tensor,
    ) -> Rendering:
        """The class images' rendering, with what the model (and the judge) see in them."""
        logits = self._logits(model, images)
        index = torch.tensor(classes)
        rows = torch.arange(len(classes))
        judged = {}
        if self.judge is not None:
            verdict = self._logits(self.judge, images, BatchReader())
            judged = {
                "judge_predicted": verdict.argmax(dim=1),
                "judge_probability": verdict.softmax(dim=1)[rows, index],
            }
        return Rendering(
            **judged,
            channels=index,
            images=images,
            activation=logits[rows, index],
            probability=logits.softmax(dim=1)[rows, index],
            predicted=logits.argmax(dim=1),
            epoch=epoch,
            steps=steps,
        )

    def _clusters(
        self, trainer: Trainer, model: nn.Module, epoch: int
    ) -> dict[str, ClusterRendering]:
        """Preferred images of the largest neuron clusters of every visualized layer that an
        attached NeuronClustering has clustered (its latest analysis), with the class each
        cluster prefers and what the model and the judge see in its image."""
        clustering = find_callback(trainer, NeuronClustering)
        if clustering is None:
            return {}
        found: dict[str, ClusterRendering] = {}
        for layer, result in clustering.results.items():
            if layer not in self.layers:
                continue
            labels = torch.as_tensor(np.asarray(result.labels))
            width = self._layer_width(model, layer)
            if width != len(labels):  # neurons are not the layer's channels (e.g. positions)
                continue
            ids, sizes = labels[labels >= 0].unique(return_counts=True)
            if not len(ids):
                continue
            order = sizes.argsort(descending=True, stable=True)[: self.max_clusters]
            ids, sizes = ids[order], sizes[order]
            members = [torch.nonzero(labels == k).flatten().tolist() for k in ids.tolist()]
            images, steps = self._render_clusters(model, layer, members)
            images, steps = images[:: self.n_images], steps[:: self.n_images]
            profiles = torch.as_tensor(np.asarray(result.cluster_profiles))
            preferred = profiles[ids].argmax(dim=1)
            if result.classes is not None and len(result.classes) == profiles.shape[1]:
                preferred = torch.as_tensor(np.asarray(result.classes))[preferred]
            logits = self._logits(model, images)
            rows = torch.arange(len(ids))
            entry = ClusterRendering(
                clusters=ids,
                sizes=sizes,
                images=images,
                preferred_class=preferred,
                predicted=logits.argmax(dim=1),
                clusters_epoch=int(result.epoch),
                epoch=epoch,
                steps=steps,
            )
            if self.judge is not None:
                verdict = self._logits(self.judge, images, BatchReader())
                entry.judge_predicted = verdict.argmax(dim=1)
                entry.judge_probability = verdict.softmax(dim=1)[rows, preferred]
            found[layer] = entry
        return found

    def _render_clusters(
        self, model: nn.Module, layer: str, members: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of the clusters ``members`` (channel lists) of ``layer``, on this rank alone,
        and the steps each ran.

        Clusters change between analyses (their ids are arbitrary, a few neurons move), so each
        cluster continues the image of the last round's cluster it shares most neurons with
        (Jaccard index >= :data:`CLUSTER_MATCH`) for ``continue_steps`` steps; the others start
        from noise."""
        plan = self._plan
        assert plan is not None
        key, n = f"clusters/{layer}", self.n_images
        signature = (self.param, tuple(plan["shape"]), n, self.seed)
        saved = self._params.get(key)
        match: list[int | None] = [None] * len(members)
        if (
            self.continue_steps is not None
            and saved
            and tuple(saved["signature"]) == signature
            and saved.get("members")
        ):
            before = [set(m) for m in saved["members"]]
            for i, m in enumerate(members):
                overlap = [len(set(m) & b) / len(set(m) | b) for b in before]
                best = max(range(len(before)), key=overlap.__getitem__)
                match[i] = best if overlap[best] >= CLUSTER_MATCH else None
        images: list[torch.Tensor | None] = [None] * len(members)
        params: list[torch.Tensor | None] = [None] * len(members)
        ran: list[torch.Tensor | None] = [None] * len(members)
        for rows in ([i for i in range(len(members)) if match[i] is not None],
                     [i for i in range(len(members)) if match[i] is None]):  # fmt: skip
            if not rows:
                continue
            init = None
            if match[rows[0]] is not None:
                assert saved is not None
                init = torch.cat([saved["params"][match[i] * n : (match[i] + 1) * n] for i in rows])
            objectives = [ChannelGroup(layer, members[i]) for i in rows]
            progress.phase(f"rendering clusters of {layer} ({len(rows)} clusters)")
            done, state, steps = self._render_rows(model, objectives, init, 0, False, 1)
            for j, i in enumerate(rows):
                images[i] = done[j * n : (j + 1) * n].cpu()
                params[i] = state[j * n : (j + 1) * n]
                ran[i] = steps[j * n : (j + 1) * n]
        if self.continue_steps is not None:
            self._params[key] = {
                "signature": signature,
                "members": [list(m) for m in members],
                "params": torch.cat(params),  # type: ignore[arg-type]
            }
        return torch.cat(images), torch.cat(ran)  # type: ignore[arg-type]

    def _layer_width(self, model: nn.Module, layer: str) -> int:
        """The layer's channel count (its output's second dimension), from one forward pass."""
        assert self._plan is not None
        shapes = check_objectives(
            model, [Channel(layer, 0)], self._plan["shape"], input_transform=self._plan["transform"]
        )
        return shapes[layer][0]

    def _logits(
        self, model: nn.Module, images: torch.Tensor, reader: BatchReader | None = None
    ) -> torch.Tensor:
        """``model``'s logits for display images (eval mode, left as found), on the CPU.

        ``reader`` reads the logits from the output (default: the analysed model's reader; the
        judge's outputs are read with a plain :class:`BatchReader`: its first tensor)."""
        assert self._plan is not None
        reader = reader or self._reader
        with analysis_mode(model, grad=False):
            x = to_model_input(images.to(model_device(model)), self._plan["transform"])
            return reader.forward(model, x).float().cpu()

    def _saliency(self, model: nn.Module, epoch: int) -> SaliencyMaps | None:
        """The probes' saliency maps (``None`` without probes). Under DDP each rank maps a
        contiguous share of the probes (SmoothGrad's noise is drawn per probe index, so the maps
        are one process's) and the maps are gathered on every rank."""
        probes, probe_labels = self._shared_probes()
        if not probes:
            return None
        inputs = torch.stack(probes)  # as the loader yielded them
        labels = torch.tensor(probe_labels)
        rank, world = self._ranks
        part = share(len(inputs), rank, world)
        progress.phase(f"saliency ({len(inputs)} images)")
        mine = attempt(lambda: self._saliency_part(model, inputs, part), world)
        parts = [p for p in gather(mine, world, "saliency") if p is not None]
        predicted = torch.cat([p[0] for p in parts])
        maps = {m: torch.cat([p[1][m] for p in parts]) for m in self.saliency_methods}
        images, _ = to_display(inputs, self._plan["transform"] if self._plan else None)
        return SaliencyMaps(
            images=images, inputs=inputs, labels=labels, predicted=predicted, maps=maps, epoch=epoch
        )

    def _saliency_part(
        self, model: nn.Module, inputs: torch.Tensor, part: slice
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The predictions and maps of the probes ``inputs[part]`` (``None`` for no probes)."""
        plan = self._plan
        assert plan is not None
        if part.start == part.stop:
            return None
        inputs = inputs[part]
        transform = plan["transform"]
        with analysis_mode(model, grad=False):
            predicted = self._reader.forward(model, inputs).argmax(dim=1).cpu()
        images, exact = to_display(inputs, transform)
        # Maps are taken with respect to what a person sees when the transform can be inverted.
        source, source_transform = (images, transform) if exact else (inputs, None)
        maps = {
            method: saliency(
                model,
                source,
                method,  # type: ignore[arg-type]
                target=predicted,
                layer=plan["gradcam_layer"],
                input_transform=source_transform,
                output_fn=self._reader.output_fn,
                samples=self.smoothgrad_samples,
                seed=self.seed,
                first_index=part.start,
            )
            for method in self.saliency_methods
        }
        return predicted, maps

    # ---- logging -------------------------------------------------------------------------------

    def _log(self, trainer: Trainer) -> None:
        out = AnalysisLogger(trainer, "preference", owner=self)
        if not out.is_writer:
            return
        progress.phase("figures and files")
        self._log_preference(out)
        if self.cluster_results:
            self._log_clusters(out)
        if self.saliency_results is not None:
            self._log_focus(AnalysisLogger(trainer, "focus", owner=self))

    def _grid_labels(self, key: str, res: Rendering) -> tuple[list[str], str]:
        """Per-image labels and a title for one entry of :attr:`results`."""
        assert self._plan is not None
        names = self._plan["class_names"]
        channels = res.channels.tolist()
        epoch = res.epoch
        if key == "classes":
            assert res.probability is not None
            probability = res.probability.tolist()
            labels = [
                f"{names[c] if names and c < len(names) else c}: p={p:.2f}"
                for c, p in zip(channels, probability, strict=True)
            ]
            title = f"classes, epoch {epoch}: class: softmax probability of the image"
            if res.judge_predicted is not None:
                verdicts = res.judge_predicted.tolist()
                labels = [
                    f"{label}\njudge: {names[v] if names and v < len(names) else v} "
                    f"{'ok' if v == c else 'no'}"
                    for label, v, c in zip(labels, verdicts, channels, strict=True)
                ]
                title += "; the judge model's verdict"
            return labels, title
        if res.strength is None or res.reference is None:
            return [f"ch {c}" for c in channels], f"{key}, epoch {epoch}: preferred images"
        values = zip(
            channels,
            res.strength.tolist(),
            res.activation.tolist(),
            res.reference.tolist(),
            strict=True,
        )
        labels = [_strength_label(*v) for v in values]
        return labels, f"{key}, epoch {epoch}: channel: activation / its max on the validation data"

    def _log_preference(self, out: AnalysisLogger) -> None:
        from lightning_neurons.plots.images import image_grid

        scalars: dict[str, float] = {}
        for key, res in self.results.items():
            labels, title = self._grid_labels(key, res)
            ncols = self.n_images if key != "classes" and self.n_images > 1 else None
            out.figure(out.tag(key), image_grid(res.images, labels, ncols=ncols, title=title))
            if res.judge_predicted is not None:
                agree = (res.judge_predicted == res.channels).double().mean()
                scalars[out.tag(key, "judge_recognised")] = float(agree)
            if res.strength is not None and res.reference is not None:
                above = (res.activation > res.reference).double().mean()
                scalars[out.tag(key, "above_max_fraction")] = float(above)
                finite = res.strength[torch.isfinite(res.strength)]
                if finite.numel():
                    scalars[out.tag(key, "strength_median")] = float(finite.median())
                    out.histogram(out.tag(key, "strength"), finite)
            if res.steps is not None:
                scalars[out.tag(key, "steps")] = float(res.steps.double().mean())
            meta = {"layer": key, "epoch": res.epoch, "steps": self.steps}
            out.save_arrays(key, res.as_arrays(), meta=meta)
        out.scalars(scalars)

    def _class_name(self, c: int) -> str:
        names = self._plan["class_names"] if self._plan else None
        return str(names[c]) if names and c < len(names) else str(c)

    def _log_clusters(self, out: AnalysisLogger) -> None:
        """One grid per layer: ``c<id> (<size>): <preferred class>`` and, under it, what the model
        (and the judge) classify the image as, ``ok`` where it is the cluster's class."""
        from lightning_neurons.plots.images import image_grid

        scalars: dict[str, float] = {}
        for layer, res in self.cluster_results.items():
            labels = []
            for i, (k, size, c) in enumerate(
                zip(
                    res.clusters.tolist(),
                    res.sizes.tolist(),
                    res.preferred_class.tolist(),
                    strict=True,
                )
            ):
                seen = int(res.predicted[i])
                text = f"c{k} ({size}): {self._class_name(c)}\nmodel {self._class_name(seen)}"
                if res.judge_predicted is not None:
                    verdict = int(res.judge_predicted[i])
                    text += f" judge {self._class_name(verdict)} {'ok' if verdict == c else 'no'}"
                labels.append(text)
            title = (
                f"{layer} clusters (of epoch {res.clusters_epoch}), epoch {res.epoch}: "
                "cluster (neurons): its class; what the model (judge) sees"
            )
            out.figure(out.tag("clusters", layer), image_grid(res.images, labels, title=title))
            agree = (res.predicted == res.preferred_class).double().mean()
            scalars[out.tag("clusters", layer, "model_agrees")] = float(agree)
            if res.judge_predicted is not None:
                agree = (res.judge_predicted == res.preferred_class).double().mean()
                scalars[out.tag("clusters", layer, "judge_agrees")] = float(agree)
            if res.steps is not None:
                scalars[out.tag("clusters", layer, "steps")] = float(res.steps.double().mean())
            meta = {"layer": layer, "epoch": res.epoch, "clusters_epoch": res.clusters_epoch}
            out.save_arrays(f"clusters_{layer}", res.as_arrays(), meta=meta)
        out.scalars(scalars)

    def _log_focus(self, out: AnalysisLogger) -> None:
        from lightning_neurons.plots.images import saliency_grid

        assert self._plan is not None
        res = self.saliency_results
        assert res is not None
        for method, maps in res.maps.items():
            fig = saliency_grid(
                res.images,
                maps,
                res.predicted,
                res.labels,
                class_names=self._plan["class_names"],
                title=f"{method} saliency, epoch {res.epoch}",
            )
            out.figure(out.tag(method), fig)
        meta = {"methods": list(res.maps), "epoch": res.epoch}
        out.save_arrays("saliency", res.as_arrays(), meta=meta)
