"""FeatureVisualizer: what each channel and class prefers, and where the model looks, every epoch."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_neurons.bands import check_display_channels, display_channels_of, is_bands
from lightning_neurons.batch import BatchReader, InputTransform, to_display
from lightning_neurons.callbacks._anchors import AnchorImages
from lightning_neurons.callbacks._base import (
    OnError,
    StageBatch,
    StagedCallback,
    checked_options,
    find_callback,
)
from lightning_neurons.callbacks._memory import ContinuationMemory
from lightning_neurons.callbacks._plan import (
    VisualizerPlan,
    data_attr,
    is_channel_map,
    is_image_shape,
    is_indices,
    is_methods,
    later_normalization,
    make_plan,
    saliency_methods,
    usable_methods,
)
from lightning_neurons.callbacks._prior import PriorStream
from lightning_neurons.callbacks._render_options import RenderOptions
from lightning_neurons.callbacks._rendering import Renderer
from lightning_neurons.callbacks._val_images import ValidationImages
from lightning_neurons.callbacks._visualizer_figures import log_round
from lightning_neurons.callbacks._visualizer_results import (
    ClusterChoice,
    channel_activations,
    channel_rendering,
    choose_clusters,
    class_rendering,
    cluster_renderings,
    saliency_maps,
)
from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
from lightning_neurons.callbacks.tracker import ActivationTracker, tracker_results, tracker_spec
from lightning_neurons.checks import Constraints, Interval, Options, Satisfies
from lightning_neurons.data import Flatten, Normalize
from lightning_neurons.defaults import infer_num_classes
from lightning_neurons.distributed import broadcast_from_zero
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import resolve_layers, selects
from lightning_neurons.loaders import analysed_rows
from lightning_neurons.probes import shared_probes
from lightning_neurons.results import ClusterRendering, Rendering, SaliencyMaps, TrackerSpec
from lightning_neurons.stats import LayerStats
from lightning_neurons.strategies import refuse_sharded, require_forward
from lightning_neurons.visualize.objectives import Channel
from lightning_neurons.visualize.prior import DataPrior
from lightning_neurons.visualize.saliency import METHODS, Baseline, Method

__all__ = ["FeatureVisualizer", "RenderOptions"]


_POSITIVE = [Interval(int, 1, None)]


class FeatureVisualizer(StagedCallback):
    """Renders what channels and classes prefer, and saliency maps of probe images, every epoch.

    Every ``every_n_epochs`` (after validation; and at the end of ``trainer.validate`` and
    ``trainer.test``, on their images) the callback

    - renders, by batched gradient ascent (:func:`~lightning_neurons.visualize.render`), one image
      for each chosen channel of each chosen layer, and one for each class (its logit);
    - computes saliency maps (``saliency`` methods) for a fixed set of probe images taken from
      the validation batches Lightning already runs (by default the first image of each class;
      at most ``max_probes`` images are kept), shown over the image with the predicted and true
      label. The probes are kept as the loader yielded them; the predicted label is the model's
      on exactly that input, and maps are taken with respect to the display image
      (:func:`~lightning_neurons.batch.to_display`) when it can be inverted, else the input;
    - logs labelled image grids to TensorBoard under stable tags (``preference/<layer>``,
      ``preference/classes``, ``focus/<method>``), so TensorBoard's step slider shows the images
      evolving over the epochs, and writes the images to files
      (``<log_dir>/neurons/<stage>/preference/epoch=EEE/<layer>.npz``, ``classes.npz``, and
      ``<log_dir>/neurons/<stage>/focus/epoch=EEE/saliency.npz``);
    - measures how strong each rendered channel image is: the activation it reaches divided by
      the largest activation of that channel on the real validation data, as recorded by an
      attached :class:`ActivationTracker` (same layer, same ``reduction``). Without a tracker,
      or for a layer it does not track, ``strength`` is ``None`` (only the raw activation is
      kept): a maximum over a few probe images would overstate it. The scalars
      ``preference/<layer>/strength_median``, ``.../above_max_fraction`` (images above every
      validation image) and ``.../steps`` (see :attr:`RenderOptions.converge_tol`) are logged.

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

    After each round (other analyses read the results, e.g. NeuronContribution's probe images)
    ``results[layer]`` (and ``results["classes"]``) is a :class:`~lightning_neurons.results.Rendering`:
    the images, each one's channel (or class), its activation and strength;
    :attr:`saliency_results` a :class:`~lightning_neurons.results.SaliencyMaps` (``None`` before
    the first round); with a NeuronClustering (``clusters=True``), :attr:`cluster_results` a
    :class:`~lightning_neurons.results.ClusterRendering` per clustered layer: its largest clusters'
    preferred images, the class each prefers and the class the model (and the judge) sees in
    its image (``preference/clusters/<layer>``).

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
            ``floor(i * C / max_classes)``, ``i < max_classes``): the same ones every epoch, so
            TensorBoard's step slider follows them (at 1,000 classes 16 class images a round).
            ``None``: all classes.
        saliency: Saliency methods for the probe images, from ``"gradient"``, ``"smoothgrad"``,
            ``"integrated"`` (Integrated Gradients), ``"gradcam"`` and ``"rollout"`` (attention
            rollout, transformers; see :func:`~lightning_neurons.visualize.attention_rollout`).
        gradcam_layer: Grad-CAM's layer; default: the stage or block output where the model's
            last Conv2d with at least 3 x 3 positions on the images is (a ResNet's ``layer4``,
            ``layer3`` on 32 to 64 px images), or for a vision transformer one of its last
            blocks (see :func:`~lightning_neurons.visualize.cam_layers.cam_layer`).
        probes_per_class: Probe images kept per class (the first ones seen in validation).
        max_probes: At most this many probe images in all.
        image_shape: ``(C, H, W)`` of the rendered images; default: the data module's
            ``image_shape``, else the probe images' shape.
        input_transform: Display image (values in [0, 1]) -> model input, applied by
            :func:`~lightning_neurons.batch.to_model_input`; default: the data module's
            ``input_transform`` attribute, else none (the loaders yield display images; for
            ``uint8`` images, :class:`~lightning_neurons.data.ByteImages` when the model reads
            floats as 0-255). In YAML: a :class:`~lightning_neurons.data.Normalize` by
            ``class_path``, or a function's import path.
        display_channels: The channels every figure of images draws as red, green and blue
            (3 indices) or grey (1), e.g. ``[3, 2, 1]`` for Sentinel-2's natural colours;
            default: the data module's ``display_channels`` attribute, else the first three
            (see :mod:`lightning_neurons.bands`). Results and files keep every channel.
        render: How the images are rendered by gradient ascent: steps, continuation of the
            previous round's images, convergence, learning rate, parameterization, transforms,
            contrast, views, class restarts, diversity, penalties, seed and batch size (see
            :class:`RenderOptions`; in YAML a mapping under ``render:``).
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
            kept in ``results["classes"].judge_predicted`` (and ``cluster_results[layer]``'s),
            so a person sees which images transfer.
        smoothgrad_samples: Noisy copies per probe image for SmoothGrad; ``integrated_steps``:
            points on each probe's path for Integrated Gradients, from ``integrated_baseline``:
            ``"black"`` or ``"blur"`` (the probe blurred, so dark pixels can matter too).
        every_n_epochs: Visualize after every n-th epoch.
        within_epochs: Validations within an epoch too (``False``: its last only).
        enable_logging: Log figures and scalars and write files (``False``: ``results`` only).
        on_error: ``"warn"``: a failure is reported and training goes on; ``"raise"``. The
            renderings, the saliency maps, the class images (judged) and the cluster images
            fail apart: what the others made is kept and logged.

    Raises:
        NeuronsError: For bad arguments; at setup for unknown layers; at the first round for
            channel or class indices outside the layers' real widths.

    Example:
        >>> trainer = Trainer(callbacks=[ActivationTracker(), FeatureVisualizer(max_channels=16)])  # doctest: +SKIP
    """

    reads = (ActivationTracker, NeuronClustering)  # its clusters: cluster images
    _parameter_constraints: ClassVar[Constraints] = {
        **StagedCallback._parameter_constraints,
        "channels": [
            Satisfies(
                is_channel_map,
                "a mapping of layer names to lists of non-negative channel indices, e.g. "
                "{'features.conv2': [0, 5]}",
            ),
            None,
        ],
        "max_channels": [*_POSITIVE, None],
        "classes": [Satisfies(is_indices, "a list of non-negative integers"), None],
        "max_classes": [*_POSITIVE, None],
        "saliency": [
            Satisfies(is_methods, f"one of {', '.join(map(repr, METHODS))}, or a list of them")
        ],
        "gradcam_layer": [str, None],
        "probes_per_class": _POSITIVE,
        "max_probes": _POSITIVE,
        "image_shape": [Satisfies(is_image_shape, "[channels, height, width], each >= 1"), None],
        "display_channels": [Satisfies(is_bands, "3 channel indices (RGB) or 1 (grey)"), None],
        "render": [RenderOptions, None],
        "max_clusters": _POSITIVE,
        "prior": [DataPrior, None],
        "prior_images": _POSITIVE,
        "judge": [Satisfies(lambda v: isinstance(v, nn.Module), "an nn.Module"), None],
        "smoothgrad_samples": _POSITIVE,
        "integrated_steps": _POSITIVE,
        "integrated_baseline": [Options.of(Baseline)],
    }

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
        input_transform: Normalize | Flatten | InputTransform | None = None,
        display_channels: list[int] | None = None,
        render: RenderOptions = RenderOptions(),  # noqa: B008 - frozen: one shared default
        clusters: bool = True,
        max_clusters: int = 16,
        prior: DataPrior | None = None,
        prior_images: int = 512,
        judge: nn.Module | None = None,
        smoothgrad_samples: int = 16,
        integrated_steps: int = 32,
        integrated_baseline: Baseline = "black",
        every_n_epochs: int = 1,
        within_epochs: bool = True,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        super().__init__(**checked_options(self, locals()))
        self.channels = {str(k): list(dict.fromkeys(v)) for k, v in (channels or {}).items()}
        self.max_channels = max_channels
        self.classes = None if classes is None else list(dict.fromkeys(classes))
        self.max_classes = max_classes
        if isinstance(saliency, str):
            saliency = [saliency]  # type: ignore[list-item]
        self.saliency_methods = list(saliency)
        self._methods = self.saliency_methods  # this fit's (see `_saliency_methods`)
        self.gradcam_layer = gradcam_layer
        self.probes_per_class = probes_per_class
        self.max_probes = max_probes
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.input_transform = input_transform
        self.display_channels = None if display_channels is None else list(display_channels)
        self.render = render or RenderOptions()
        self.clusters = bool(clusters)
        self.max_clusters = max_clusters
        self.prior = prior
        self.prior_images = prior_images
        self.judge = judge
        self.smoothgrad_samples = smoothgrad_samples
        self.integrated_steps, self.integrated_baseline = integrated_steps, integrated_baseline
        #: ``{layer or "classes": Rendering}`` of the latest round (see :mod:`lightning_neurons.results`).
        self.results: dict[str, Rendering] = {}
        #: The probe images' saliency maps of the latest round (``None`` before the first).
        self.saliency_results: SaliencyMaps | None = None
        #: ``{layer: ClusterRendering}``: NeuronClustering's largest clusters' preferred images.
        self.cluster_results: dict[str, ClusterRendering] = {}
        self._prior = PriorStream(self.prior, self.prior_images, self.render.param == "maco")
        self._val_images = ValidationImages(self.probes_per_class, self.max_probes)
        self._seen_shape: tuple[int, ...] | None = None
        self._input_shape: tuple[int, ...] | None = None  # a first input that is not images
        self._plan: VisualizerPlan | None = None
        self._guess_later = False  # the normalisation is read from the first validation batch
        self._anchors: AnchorImages | None = None  # with the plan
        self._spec: TrackerSpec | None = None  # the tracker's, from setup on (None: no tracker)
        self._num_classes: int | None = None
        self._memory = ContinuationMemory(enabled=self.render.continue_steps is not None)

    # ---- identity and checkpointing ------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layer_patterns, param=self.render.param, seed=self.render.seed
        )

    def state_dict(self) -> dict[str, Any]:
        """The parameters of the last round's images (so a resumed run continues them) and the
        estimated data prior (``"maco"``: a resumed run renders with the same one)."""
        state: dict[str, Any] = {"params": self._memory.state_dict()}
        if (prior := self._prior.state_dict()) is not None:
            state["prior"] = prior
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._memory.load_state_dict(state_dict.get("params", {}))
        if (saved := state_dict.get("prior")) is not None:
            self._prior.load_state_dict(saved)

    @property
    def _reader(self) -> BatchReader:
        """How batches are read: the tracker's reader, or the default rules without a tracker."""
        return self._spec.reader if self._spec is not None else BatchReader()

    @property
    def _dataloader_idx(self) -> int:
        """The validation (or test) loader whose images feed the prior and the probes."""
        return self._spec.dataloader_idx if self._spec is not None else 0

    # ---- Lightning hooks -----------------------------------------------------------------------

    @override
    def _set_up(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super()._set_up(trainer, pl_module, stage)
        refuse_sharded(trainer, "FeatureVisualizer")
        require_forward(pl_module, "FeatureVisualizer")
        spec = self._spec = tracker_spec(trainer)
        if spec is None:
            self.layers = resolve_layers(pl_module, self.layer_patterns)
        elif self.layer_patterns is None:
            self.layers = list(spec.layers)
        else:
            self.layers = spec.resolve(pl_module, self.layer_patterns)
        unknown = [name for name in self.channels if not selects(self.layers, name)]
        if unknown:
            raise NeuronsError(
                f"FeatureVisualizer: `channels` names layers {unknown} that are not visualized; "
                f"the visualized layers are {self.layers} (set `layers=` to include them)"
            )
        self._methods = saliency_methods(pl_module, self.saliency_methods, self.gradcam_layer)
        self._prior.start(trainer.world_size)
        self._plan = None

    @override
    def _start_fit(self) -> None:
        self.results, self.saliency_results, self.cluster_results = {}, None, {}
        self._memory = ContinuationMemory(enabled=self.render.continue_steps is not None)
        self._prior.reset()  # estimated again from this fit's images (a given prior is kept)
        self._val_images.reset()
        self._seen_shape = self._input_shape = self._num_classes = None  # this fit's data's

    # Validation and test stages (``trainer.test``, and ``analyze`` with a tracker on the test
    # set): their batches feed the prior and the probes, and a round runs at their end.
    def _stage_start(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage in ("validation", "test") and not trainer.sanity_checking:
            self._val_images.rows = analysed_rows(trainer, stage, self._dataloader_idx)

    def _on_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, step: StageBatch
    ) -> None:
        self._first_batch(trainer, pl_module, step.batch, guess=step.stage != "train")
        if self._guess_later and step.stage != "train" and self._plan is not None:
            self._guess_later = False  # the first batch was a training batch: read this one
            with contextlib.suppress(NeuronsError):
                inputs = self._reader.inputs(step.batch)
                self._plan = later_normalization(self._plan, inputs, trainer.world_size)

    def _on_batch_end(self, trainer: Trainer, pl_module: LightningModule, step: StageBatch) -> None:
        if step.stage not in ("validation", "test") or trainer.sanity_checking:
            return
        if step.dataloader_idx != self._dataloader_idx:
            return
        self._update_prior(step.batch)
        saliency = bool(self._methods)
        if self._val_images.wanted(saliency, self._anchors):
            self._val_images.add(
                step.batch,
                step.batch_idx,
                self._reader,
                self._plan,
                self._anchors,
                saliency,
                ranks=(trainer.global_rank, trainer.world_size),
                num_classes=functools.partial(self._classes_count, trainer, pl_module),
            )

    @override
    def _consume(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if stage not in ("validation", "test") or not self._due(trainer):
            return
        stats = tracker_results(trainer)  # older with stage="train"
        reduction = self._spec.reduction if self._spec is not None else "mean"
        self._prepare(trainer, pl_module)  # configuration errors raise, on every rank
        self._prior.finish(trainer.world_size, trainer.strategy.root_device)  # every rank
        # every rank renders its share of the objectives; rank zero does the rest
        self._run_safely(
            "feature visualization", lambda: self._visualize(trainer, pl_module, stats, reduction)
        )

    # ---- the data prior ("maco") ---------------------------------------------------------------

    @property
    def estimated_prior(self) -> DataPrior | None:
        """The data prior estimated from the validation images (``param="maco"`` without a
        given ``prior``; kept in the ``state_dict``); ``None`` before it is estimated."""
        return self._prior.estimated

    @property
    def resolved_input_transform(self) -> InputTransform | None:
        """The input transform in use: the given one, else the one the first batch called for
        (``uint8``, normalised or channels-last images: see the docs' Inputs); the analyses
        that show images (:func:`~lightning_neurons.batch.input_transform_of`) use it too."""
        return self._plan.transform if self._plan is not None else self.input_transform

    def reset_prior(self) -> None:
        """Forget the estimated data prior: it is estimated again from the next validation epoch
        (a ``prior`` given by the user is kept)."""
        self._prior.reset()

    def _update_prior(self, batch: Any) -> None:
        """Add a validation batch, mapped back to display images, to the data prior's sums."""
        if self._prior.wants_images and self._plan is not None:
            with contextlib.suppress(NeuronsError):  # no input: nothing to add
                self._prior.add_inputs(self._reader.inputs(batch), self._plan.transform)

    def _classes_count(self, trainer: Trainer, pl_module: LightningModule) -> int | None:
        if self._num_classes is None:
            count = data_attr(trainer, "num_classes")
            self._num_classes = (
                count if isinstance(count, int) and count > 0 else infer_num_classes(pl_module)
            )
        return self._num_classes

    # ---- planning (first round) ----------------------------------------------------------------

    def _first_batch(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, guess: bool
    ) -> None:
        """On the first batch the model sees: note its image shape and check the set-up (a
        normalisation is guessed from it unless it is a training batch: see ``_plan``)."""
        if self._plan is not None:
            return
        try:
            images = self._reader.inputs(batch) if self._seen_shape is None else None
        except NeuronsError:
            images = None
        if isinstance(images, torch.Tensor) and images.dim() != 4 and len(images):
            transform = self.input_transform or data_attr(trainer, "input_transform")
            shown, exact = to_display(images[:1], transform)  # Flatten's images
            self._input_shape = tuple(images.shape)
            images = shown if exact else images
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            self._seen_shape = tuple(images.shape[1:])
        self._prepare(
            trainer, pl_module, images if isinstance(images, torch.Tensor) else None, guess
        )

    def _prepare(
        self, trainer: Trainer, pl_module: LightningModule, inputs: Any = None, guess: bool = True
    ) -> None:
        """Resolve and check the plan (:func:`~lightning_neurons.callbacks._plan.make_plan`; the
        first batch's ``inputs``: how uint8 or normalised images are read). Set-up mistakes raise
        (every rank). A model output whose logits cannot be read (see ``output_fn``) follows
        ``on_error``: with ``"warn"`` it is reported once and only the channels are rendered."""
        if self._plan is not None:
            return
        shape = self.image_shape or data_attr(trainer, "image_shape")
        if shape is None and self._seen_shape is None and self._input_shape is not None:
            raise NeuronsError(
                f"FeatureVisualizer renders images, but the model input is {list(self._input_shape)}"
                " a batch, not [B, C, H, W] images. Pass `image_shape=[C, H, W]` and an "
                "`input_transform` that makes the model input from display images (for a model "
                "on flattened images: `input_transform=lightning_neurons.data.Flatten([C, H, W])`, "
                "which gives both), or leave FeatureVisualizer out for this model."
            )
        shape = shape if shape is not None else self._seen_shape
        transform = self.input_transform or data_attr(trainer, "input_transform")
        self._plan = make_plan(
            trainer,
            pl_module,
            layers=self.layers,
            channels=self.channels,
            max_channels=self.max_channels,
            classes=self.classes,
            max_classes=self.max_classes,
            image_shape=shape,
            input_transform=transform,
            output_fn=self._reader.output_fn,
            inputs=inputs,
            guess=guess,
            read_logits=lambda fn: self._run_safely(
                "reading the model's logits (for class images and saliency)", fn
            ),
            gradcam="gradcam" in self._methods,
            gradcam_layer=self.gradcam_layer,
        )
        self._methods = usable_methods(pl_module, self._methods, self._plan)
        self.layers = self._plan.layers
        self._guess_later = not guess
        check_display_channels(display_channels_of(trainer), self._plan.shape[0])
        plan, ranks = self._plan, (trainer.global_rank, trainer.world_size)
        self._anchors = AnchorImages(self.render, plan.classes, plan.layers, *ranks)

    # ---- one round -----------------------------------------------------------------------------

    def _visualize(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stats: Mapping[str, LayerStats],
        reduction: str,
    ) -> None:
        plan = self._plan
        assert plan is not None
        epoch, n_images = trainer.current_epoch, self.render.n_images
        ranks = (trainer.global_rank, trainer.world_size)
        prior = self._prior.prior()
        renderer = Renderer(self.render, plan, self._reader, prior, self._memory, *ranks)
        # Every exchange between the ranks first (the clusters, the renderings, then the saliency
        # maps), the work of this rank alone after: a failure there (a rank out of memory, say)
        # leaves no other rank waiting at a collective it will never join. Each part is its own
        # `on_error` unit (a failure in one is reported on every rank that shares it): what the
        # others made is kept and logged.
        clusters = self._run_safely(
            "choosing the neuron clusters", lambda: self._chosen_clusters(trainer, pl_module)
        )
        classes = self._anchors.objectives(pl_module, plan.classes) if self._anchors else []
        rendered, clustered, class_images = renderer.round(
            pl_module,
            {layer: [Channel(layer, i) for i in plan.channels[layer]] for layer in plan.layers},
            clusters.members if clusters is not None else None,
            classes or None,
        )
        saliency = None  # this round's maps (the last round's without probes; none if failed)
        if self._methods and plan.saliency:  # every rank: each maps its share
            saliency = self._run_safely(
                "saliency maps", functools.partial(self._saliency, pl_module, renderer, epoch)
            )
            self.saliency_results = saliency or self.saliency_results
        activations = channel_activations(pl_module, plan, rendered, reduction)
        results = {
            layer: channel_rendering(plan, layer, r, activations[layer], n_images, stats, epoch)
            for layer, r in rendered.items()
        }
        if class_images is not None:
            judge = (pl_module, plan, self._reader, self.judge, class_images, epoch)
            judged = self._run_safely("class images", functools.partial(class_rendering, *judge))
            results.update({"classes": judged} if judged is not None else {})
        self.results, self.cluster_results = results, {}
        if clusters is not None and trainer.is_global_zero:  # NeuronClustering's are on rank zero
            made = (clusters, clustered, pl_module, renderer, self.judge, epoch)
            shown = self._run_safely("cluster images", lambda: cluster_renderings(*made))
            self.cluster_results = shown or {}
        if self.enable_logging:
            log_round(trainer, self, plan, results, self.cluster_results, saliency, self.render)

    def _saliency(
        self, pl_module: LightningModule, renderer: Renderer, epoch: int
    ) -> SaliencyMaps | None:
        """This round's saliency maps of the shared probes (every rank maps its share)."""
        probes = shared_probes(self._val_images.probes, "gathering the saliency probes")
        assert self._plan is not None
        options = (self._methods, self._plan.cam_layer, self.smoothgrad_samples, epoch)
        integrated = (self.integrated_steps, self.integrated_baseline)
        made = saliency_maps(pl_module, renderer, probes, *options, *integrated)
        return made or self.saliency_results

    def _chosen_clusters(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> ClusterChoice | None:
        """The neuron clusters this round renders (``None``: none asked for, or no
        NeuronClustering): chosen on rank zero, which holds NeuronClustering's results, their
        channels sent to every rank to share the rendering."""
        clustering = find_callback(trainer, NeuronClustering)
        if not self.clusters or clustering is None:
            return None
        plan, chosen = self._plan, ClusterChoice({})
        assert plan is not None

        def choose() -> dict[str, list[list[int]]]:
            nonlocal chosen
            chosen = choose_clusters(clustering.results, pl_module, plan, self.max_clusters)
            return chosen.members

        ranks = (trainer.global_rank, trainer.world_size)
        members = broadcast_from_zero(choose, *ranks, "reading NeuronClustering's clusters")
        return ClusterChoice(members, chosen.chosen)
