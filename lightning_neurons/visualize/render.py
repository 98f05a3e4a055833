"""The render loop: gradient ascent on the pixels, one image per objective, all in one batch.

Rendering 64 channels one after the other costs 64 forward/backward passes of batch 1 per
step; stacking them into one batch of 64, where row ``i`` is scored by objective ``i``, costs one
pass of batch 64, which on any hardware is far cheaper. The rows stay independent because the
loss is the sum of the rows' values, the model runs in eval mode (BatchNorm uses its running
statistics, so no row sees another) and Adam updates every parameter element on its own.

The forward pass stops as soon as every layer the objectives read has run (unless a class
logit is asked for), so rendering an early layer's channels does not pay for the rest of the
model. On CPU the batch is cut into chunks that fit the caches (:func:`auto_batch_size`), which
gives the same images faster than one huge batch.

With ``converge_tol`` an image stops once its objective has converged: every
``converge_window`` steps each objective is scored on its untransformed image (one forward pass,
no backward, so the random views' noise does not enter), and an image whose value rose by less
than ``converge_tol`` (relative) at :data:`PATIENCE` checks in a row is frozen and leaves the
batch. The decision is per image, so an image's steps do not depend on the other objectives,
the chunking or the DDP split.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal, overload

import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import (
    BatchFn,
    InputTransform,
    as_model_input,
    read_logits,
    to_model_input,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import get_module, hooked
from lightning_neurons.state import analysis_mode, model_device
from lightning_neurons.visualize.objectives import (
    IMAGE,
    LOGITS,
    BatchScorer,
    Objective,
    as_objectives,
    l2_penalty,
    total_variation,
)
from lightning_neurons.visualize.param import PARAMS, Param, parametrize, row_seed
from lightning_neurons.visualize.prior import DataPrior
from lightning_neurons.visualize.transforms import (
    TransformsArg,
    apply_transforms,
    resolve_transforms,
)


class _StopForward(Exception):
    """Raised from a forward hook once every needed layer has run."""


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list, torch.Size)) else None
    if (
        shape is None
        or len(shape) != 3
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape)
    ):
        raise NeuronsError(
            f"`image_shape` must be (channels, height, width), e.g. (1, 32, 32) or (3, 224, 224); "
            f"got {image_shape!r}"
        )
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _check_positive(name: str, value: object, integer: bool) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:  # type: ignore[operator]
        what = "a positive integer" if integer else "a positive number"
        raise NeuronsError(f"`{name}` must be {what}, got {value!r}")


class _Scoring:
    """Forward hooks that score each needed layer as it runs, stopping the pass when done.

    Scoring inside the hook (rather than after the forward) reads each layer's output before a
    later in-place operation (``ReLU(inplace=True)``) could change it.
    """

    def __init__(
        self,
        scorer: BatchScorer,
        allow_stop: bool = True,
        output_fn: BatchFn | None = None,
        gram_layers: Sequence[str] = (),
    ) -> None:
        self.scorer = scorer
        self.output_fn = output_fn
        self.stop = allow_stop and not scorer.needs_logits
        self.total: torch.Tensor | None = None
        self.seen: set[str] = set()
        #: Layers whose Gram matrices the diversity term compares (filled during the forward).
        self.gram_layers = frozenset(gram_layers)
        self.grams: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.total = None
        self.seen = set()
        self.grams = {}

    def add(self, layer: str, output: torch.Tensor) -> None:
        part = self.scorer.score(layer, output)
        self.total = part if self.total is None else self.total + part

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        if layer in self.seen or layer not in self.scorer.groups:
            return  # a module called twice in one forward counts once; others' layers not at all
        self.seen.add(layer)
        self.add(layer, output)
        if layer in self.gram_layers:
            # computed now: a later in-place op (ReLU(inplace=True)) may change ``output``
            self.grams[layer] = gram_matrices(output)
        if self.stop and len(self.seen) == len(self.scorer.layers):
            raise _StopForward

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """The forward hooks, registered inside the block only."""
        with hooked(model, list(self.scorer.layers), self):
            yield

    def forward(self, model: nn.Module, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Run the model on ``x`` (in the model's dtype) and return every row's score ``[R]``."""
        self.reset()
        if self.scorer.needs_image:
            self.add(IMAGE, image)
        try:
            output = model(as_model_input(x, model))
        except _StopForward:
            output = None
        missing = [n for n in self.scorer.layers if n not in self.seen]
        if missing:
            raise NeuronsError(
                f"layers {missing} did not run in {type(model).__name__}'s forward pass, so "
                "their objectives cannot be scored; choose layers the forward pass uses"
            )
        if self.scorer.needs_logits:
            assert output is not None
            self.add(LOGITS, read_logits(output, self.output_fn))
        assert self.total is not None
        return self.total


def _resolve(model: nn.Module, objectives: Sequence[Objective]) -> list[str]:
    layers: list[str] = []
    for objective in objectives:
        for name in objective.layers:
            if name not in layers:
                get_module(model, name)  # raises with the available names
                layers.append(name)
    return layers


def _largest_output(model: nn.Module) -> tuple[list, list[int]]:
    """Forward hooks on every leaf module recording the largest output size and the sum of all
    output sizes (in elements)."""
    largest = [0, 0]

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())
            largest[1] += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    return handles, largest


def _probe(
    model: nn.Module,
    objectives: Sequence[Objective],
    image_shape: tuple[int, int, int],
    input_transform: InputTransform | None,
    output_fn: BatchFn | None = None,
) -> tuple[dict[str, tuple[int, ...]], int, int]:
    """One forward pass of one grey image: checks the objectives; returns the read layers' output
    shapes, the largest output (elements per image) of any leaf module and the sum of all leaf
    modules' outputs (what a backward pass keeps, roughly)."""
    layers = _resolve(model, objectives)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, output: torch.Tensor) -> None:
        shapes.setdefault(name, tuple(output.shape[1:]))

    handles, largest = _largest_output(model)
    try:
        with analysis_mode(model, grad=False), hooked(model, layers, record):
            x = torch.full((1, *image_shape), 0.5, device=model_device(model))
            try:
                output = model(as_model_input(to_model_input(x, input_transform), model))
            except RuntimeError as err:
                raise NeuronsError(
                    f"{type(model).__name__} failed on a {tuple(x.shape)} image batch ({err}); "
                    "check `image_shape` and `input_transform`"
                ) from err
    finally:
        for handle in handles:
            handle.remove()
    needs_logits = any(t.layer == LOGITS for o in objectives for _, t in o.terms())
    try:
        shapes[LOGITS] = tuple(read_logits(output, output_fn).shape[1:])
    except NeuronsError:
        if needs_logits:
            raise  # objectives on layers only do not need to read the model's output
    for objective in objectives:
        for _, term in objective.terms():
            if term.layer == IMAGE:
                continue
            if term.layer not in shapes:
                raise NeuronsError(
                    f"{term!r}: layer {term.layer!r} did not run in {type(model).__name__}'s "
                    "forward pass; choose a layer the forward pass uses"
                )
            term.check(shapes[term.layer])
    return shapes, largest[0], largest[1]


def check_objectives(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    image_shape: Sequence[int],
    *,
    input_transform: InputTransform | None = None,
    output_fn: BatchFn | None = None,
) -> dict[str, tuple[int, ...]]:
    """Check objectives against the model with one forward pass of one grey image.

    Args:
        model: The model.
        objectives: The objectives.
        image_shape: ``(C, H, W)`` of the display images.
        input_transform: Display image -> model input.
        output_fn: Reads the logits from the model's output (see
            :func:`~lightning_neurons.batch.read_logits`).

    Returns:
        Output shape (without the batch dimension) of every layer read, and of :data:`LOGITS`.

    Raises:
        NeuronsError: For an unknown layer, a channel, position or class index outside the
            layer's real output, or a model that does not accept the images.
    """
    objectives = as_objectives(objectives)
    shapes, _, _ = _probe(
        model, objectives, _check_image_shape(image_shape), input_transform, output_fn
    )
    return shapes


#: On CPU, rows per chunk are chosen so that the largest layer output of a chunk is about this
#: many bytes: batches far beyond the CPU caches are slower per image (measured on the demo model,
#: 2 cores: chunks of 16 rows rendered 64 channels 15-35% faster than one batch of 64).
CPU_CHUNK_BYTES = 2 * 2**20


#: On an accelerator, rows per chunk are chosen so that all the layer outputs of a chunk (what
#: its backward pass keeps, float32) take about this many bytes: 1,000 class images x 4 views x
#: 4 restarts in one batch would need tens of GB at ImageNet's resolution.
DEVICE_CHUNK_BYTES = 4 * 2**30


def auto_batch_size(
    count: int, largest_output: int, device: torch.device, total_output: int | None = None
) -> int:
    """Rows rendered at once when ``batch_size`` is None, at least 4 (or ``count``).

    On CPU, enough rows for their largest layer output (``largest_output`` elements per image,
    float32) to fill about :data:`CPU_CHUNK_BYTES`; on an accelerator, enough for all their layer
    outputs (``total_output`` elements per image, default ``largest_output``) to fill about
    :data:`DEVICE_CHUNK_BYTES`: memory bounded whatever the number of objectives."""
    if device.type == "cpu":
        rows = CPU_CHUNK_BYTES // max(1, 4 * largest_output)
    else:
        rows = DEVICE_CHUNK_BYTES // max(1, 4 * (total_output or largest_output))
    return int(min(count, max(4, rows)))


@overload
def render(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    *,
    image_shape: Sequence[int],
    steps: int = ...,
    lr: float = ...,
    param: Param = ...,
    transforms: TransformsArg = ...,
    input_transform: InputTransform | None = ...,
    seed: int = ...,
    batch_size: int | None = ...,
    l2: float = ...,
    tv: float = ...,
    decorrelate: bool = ...,
    prior: DataPrior | None = ...,
    contrast: float = ...,
    views: int = ...,
    n_images: int = ...,
    diversity: float = ...,
    diversity_on: Literal["features", "pixels"] = ...,
    restarts: int = ...,
    output_fn: BatchFn | None = ...,
    init: torch.Tensor | None = ...,
    first_row: int = ...,
    select_after: int | None = ...,
    converge_tol: float | None = ...,
    converge_window: int = ...,
    return_mask: Literal[False] = ...,
    return_params: Literal[False] = ...,
    return_steps: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def render(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    *,
    image_shape: Sequence[int],
    steps: int = ...,
    lr: float = ...,
    param: Param = ...,
    transforms: TransformsArg = ...,
    input_transform: InputTransform | None = ...,
    seed: int = ...,
    batch_size: int | None = ...,
    l2: float = ...,
    tv: float = ...,
    decorrelate: bool = ...,
    prior: DataPrior | None = ...,
    contrast: float = ...,
    views: int = ...,
    n_images: int = ...,
    diversity: float = ...,
    diversity_on: Literal["features", "pixels"] = ...,
    restarts: int = ...,
    output_fn: BatchFn | None = ...,
    init: torch.Tensor | None = ...,
    first_row: int = ...,
    select_after: int | None = ...,
    converge_tol: float | None = ...,
    converge_window: int = ...,
    return_mask: Literal[True],
    return_params: Literal[False] = ...,
    return_steps: Literal[False] = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def render(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    *,
    image_shape: Sequence[int],
    steps: int = ...,
    lr: float = ...,
    param: Param = ...,
    transforms: TransformsArg = ...,
    input_transform: InputTransform | None = ...,
    seed: int = ...,
    batch_size: int | None = ...,
    l2: float = ...,
    tv: float = ...,
    decorrelate: bool = ...,
    prior: DataPrior | None = ...,
    contrast: float = ...,
    views: int = ...,
    n_images: int = ...,
    diversity: float = ...,
    diversity_on: Literal["features", "pixels"] = ...,
    restarts: int = ...,
    output_fn: BatchFn | None = ...,
    init: torch.Tensor | None = ...,
    first_row: int = ...,
    select_after: int | None = ...,
    converge_tol: float | None = ...,
    converge_window: int = ...,
    return_mask: Literal[False] = ...,
    return_params: Literal[True],
    return_steps: Literal[False] = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def render(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    *,
    image_shape: Sequence[int],
    steps: int = ...,
    lr: float = ...,
    param: Param = ...,
    transforms: TransformsArg = ...,
    input_transform: InputTransform | None = ...,
    seed: int = ...,
    batch_size: int | None = ...,
    l2: float = ...,
    tv: float = ...,
    decorrelate: bool = ...,
    prior: DataPrior | None = ...,
    contrast: float = ...,
    views: int = ...,
    n_images: int = ...,
    diversity: float = ...,
    diversity_on: Literal["features", "pixels"] = ...,
    restarts: int = ...,
    output_fn: BatchFn | None = ...,
    init: torch.Tensor | None = ...,
    first_row: int = ...,
    select_after: int | None = ...,
    converge_tol: float | None = ...,
    converge_window: int = ...,
    return_mask: bool = ...,
    return_params: bool = ...,
    return_steps: Literal[True],
) -> tuple[torch.Tensor, ...]: ...


def render(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    *,
    image_shape: Sequence[int],
    steps: int = 256,
    lr: float = 0.05,
    param: Param = "fft",
    transforms: TransformsArg = "standard",
    input_transform: InputTransform | None = None,
    output_fn: BatchFn | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    l2: float = 0.0,
    tv: float = 0.0,
    decorrelate: bool = True,
    prior: DataPrior | None = None,
    contrast: float = 1.0,
    views: int = 1,
    n_images: int = 1,
    diversity: float = 0.0,
    diversity_on: Literal["features", "pixels"] = "features",
    restarts: int = 1,
    init: torch.Tensor | None = None,
    first_row: int = 0,
    select_after: int | None = None,
    converge_tol: float | None = None,
    converge_window: int = 4,
    return_mask: bool = False,
    return_params: bool = False,
    return_steps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Render images for every objective by gradient ascent, all objectives in one batch.

    Row ``i`` of the batch is optimised for ``objectives[i]``; the loss is the negative sum of
    the rows' values (minus the optional penalties), so every image gets its own gradient. With
    ``batch_size`` smaller than the number of objectives they are rendered in chunks, which gives
    the same images as one batch (each image's initial values come from ``(seed, i)``, and the
    random transforms of a step are shared by all rows; tiny floating-point differences of
    batched kernels aside).

    The model is left as found: training mode, ``requires_grad`` and ``.grad`` of parameters,
    buffers and the RNG states are restored, and the hooks removed, also when an error is
    raised. It runs in eval mode while rendering (see :func:`analysis_mode`); the forward pass
    stops after the last layer the objectives read. Nothing is printed.

    Args:
        model: Any ``nn.Module`` (a ``LightningModule`` too) mapping images to logits.
        objectives: One :class:`Objective` or a list; ``n_images`` images are rendered per
            objective.
        image_shape: ``(C, H, W)`` of the display images.
        steps: Adam steps.
        lr: Adam's learning rate.
        param: ``"fft"`` (Fourier with ``1/f`` scaling; smoother images), ``"pixel"``, or
            ``"maco"`` (only the spectrum's phase is optimised; amplitudes and pixel statistics
            come from ``prior``: images other models recognise more often; see
            :func:`~lightning_neurons.visualize.maco_image`).
        transforms: ``"standard"`` (random shift, scale and rotation in one warp, sized to the
            image; see :func:`~lightning_neurons.visualize.standard_transforms`), ``"robust"``
            (stronger; :func:`~lightning_neurons.visualize.robust_transforms`),
            ``"none"``/``None``, or a list of callables ``(images, generator) -> images``. With
            a ``prior``, the named sets fill the border with the data's mean border value.
        input_transform: Display image -> model input (e.g. the data's normalisation); applied
            after the transforms. The model runs in its own floating-point type (bfloat16 too);
            the images are optimised in float32.
        output_fn: Reads the logits from the model's output (class objectives).
        seed: Seed of the initial images and of the transforms' random parameters.
        batch_size: Render at most this many objectives at once. Default: all on a GPU; on CPU,
            chunks sized to the CPU caches (see :func:`auto_batch_size`), which gives the same
            images faster.
        l2: Weight of an L2 penalty (:class:`~lightning_neurons.visualize.L2`) on every image.
        tv: Weight of a total-variation penalty on every image.
        decorrelate: Mix RGB channels with the colour-decorrelation matrix (``"pixel"`` and
            ``"fft"``).
        prior: The data's statistics (:class:`~lightning_neurons.visualize.DataPrior`); needed
            by ``param="maco"``.
        contrast: ``"maco"`` only: the pattern's scale relative to the data's spread (> 1 lets
            channel images drive their channels harder, at some cost in plausibility).
        views: Randomly transformed copies of every image scored at each step (their mean is
            the image's value): an ensemble of augmentations, ``views`` times the work per step.
        n_images: Images per objective (rows ``j * n_images`` to ``(j + 1) * n_images - 1``
            belong to objective ``j``).
        diversity: Weight of the diversity term (Olah et al., 2017) among the ``n_images`` of
            an objective: each image's mean cosine similarity to the others is subtracted from
            its value, so a polysemantic channel shows several faces.
        diversity_on: What the similarity compares. ``"features"`` (Olah et al.): the Gram
            matrices of the objective's layer (which channels fire together, wherever they
            fire), so the images must differ in what they make the layer see, not by a shift
            or a new texture of the same thing; objectives on the logits, the image or a layer
            without channels fall back to ``"pixels"``: the centred pixels.
        restarts: Render this many candidates per image (from different seeds) and keep the
            one whose mean value over 16 randomly transformed views is highest (only the
            rendered model decides): ``restarts`` times the work. Not with ``n_images > 1``.
        init: Continue from these parameters instead of each row's seeded noise: what an
            earlier call with ``return_params=True`` returned, for the same objectives and
            settings (``[N * n_images * restarts, ...]``; pass ``restarts=1`` to continue the
            images that an earlier call with ``restarts`` kept). A preferred image changes little
            between two epochs of training, so a few steps from the previous image reach what
            many steps from noise reach, and TensorBoard's step slider shows one image evolving.
        first_row: Index of the first row in a larger rendering: row ``i`` starts from the noise
            of row ``first_row + i``. Rendering objectives ``a`` to ``b`` of a list with
            ``first_row = a * n_images * restarts`` gives their images of the whole list's
            rendering (how :class:`~lightning_neurons.FeatureVisualizer` shares a rendering
            between DDP ranks).
        select_after: With ``restarts``, keep the best candidate after this many steps and spend
            the remaining steps on it alone (``restarts x select_after + steps - select_after``
            image-steps instead of ``restarts x steps``). ``None``: select after all ``steps``.
        converge_tol: Stop an image early once its objective has converged, ``steps`` being
            the most: every ``converge_window`` steps each objective is scored on its image
            without transforms (one forward pass of the images still running), and an image
            whose value rose by less than ``converge_tol`` times its absolute value from one
            check to the next (a fall counts as no rise), at two checks in a row
            (:data:`PATIENCE`: one calm window is often a pause), is frozen and leaves the
            batch, which saves its forward and backward passes. The images of one objective with
            ``diversity`` (its ``n_images``) are decided together; the candidates of
            ``restarts`` each alone, before and after ``select_after``. The decision is per
            image, so an image's steps and result do not depend on the other objectives, the
            chunking or ``first_row`` (up to a check that batched float32 kernels could tip when
            a rise equals the tolerance to ~1e-7). ``None`` or ``0``: every image runs ``steps``.
            On the digits benchmark's trained SmallCNN (``benchmarks/visualization.py``'s maco
            settings, 128 steps), 0.005 ran the channel images of relu1/2/3 60/80/81 steps on
            average and the class candidates 96 and 79, and kept the quality: 100/94/97% of
            the channel images above their channel's validation maximum (100/100/99% with every
            step; at 0.005 with one calm check instead of two, 100/88/91%), the class images
            recognised as before by the model itself and a twin (10 of 10 for both seeds).
        converge_window: Steps between two convergence checks (the first is before the first
            step; no image stops before ``PATIENCE x converge_window`` steps).
        return_mask: Also return MaCo's transparency mask: the absolute gradient of the loss
            with respect to each pixel, summed over the steps and scaled to [0, 1] per image
            (where the image mattered to its objective).
        return_params: Also return the final parameters of every returned image (with
            ``restarts``, of the kept candidates; detached, on the CPU), to pass as ``init``
            later (with ``restarts=1``: a kept candidate is continued alone).
        return_steps: Also return, last, the Adam steps each returned image was optimised for
            (``[N * n_images]`` int64, CPU; with ``restarts``, the kept candidate's): ``steps``
            for every image unless ``converge_tol`` stopped it early.

    Returns:
        ``[N * n_images, C, H, W]`` display images in [0, 1] (detached, on the model's device);
        with ``return_mask``, also the ``[N * n_images, 1, H, W]`` masks; with
        ``return_params``, also the parameters; with ``return_steps``, last, the steps.

    Raises:
        NeuronsError: For bad arguments, ``param="maco"`` without a prior, an unknown layer, or
            an index outside a layer's real output (checked with one forward pass of one image
            before rendering).

    Example:
        >>> from lightning_neurons.visualize import Channel, render
        >>> images = render(model, [Channel("features.conv2", i) for i in range(64)],
        ...                 image_shape=(1, 32, 32), steps=128)  # doctest: +SKIP
        >>> images.shape  # doctest: +SKIP
        torch.Size([64, 1, 32, 32])
        >>> images, steps = render(model, [Channel("features.conv2", i) for i in range(64)],
        ...                        image_shape=(1, 32, 32), steps=128, converge_tol=0.005,
        ...                        return_steps=True)  # doctest: +SKIP
        >>> steps.float().mean()  # doctest: +SKIP
        tensor(57.)
    """
    objectives = as_objectives(objectives)
    image_shape = _check_image_shape(image_shape)
    counts = (("steps", steps), ("views", views), ("n_images", n_images), ("restarts", restarts))
    for name, value in counts:
        _check_positive(name, value, integer=True)
    if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0:
        raise NeuronsError(f"`first_row` must be an integer >= 0, got {first_row!r}")
    if select_after is not None:
        _check_positive("select_after", select_after, integer=True)
        if return_mask:
            raise NeuronsError("`select_after` cannot be combined with `return_mask`")
    if return_mask and return_params:
        raise NeuronsError("`return_mask` and `return_params` cannot both be set")
    _check_positive("converge_window", converge_window, integer=True)
    if converge_tol is not None and (
        isinstance(converge_tol, bool)
        or not isinstance(converge_tol, numbers.Real)
        or converge_tol < 0
    ):
        raise NeuronsError(
            f"`converge_tol` must be a number >= 0 (0 or None: no convergence test), "
            f"got {converge_tol!r}"
        )
    if restarts > 1 and n_images > 1:
        raise NeuronsError(
            f"`restarts` ({restarts}) keeps the best of several images of an objective; it "
            f"cannot be combined with n_images={n_images} (several images that differ)"
        )
    _check_positive("lr", lr, integer=False)
    if batch_size is not None:
        _check_positive("batch_size", batch_size, integer=True)
    if param not in PARAMS:
        raise NeuronsError(f"`param` must be one of {', '.join(map(repr, PARAMS))}; got {param!r}")
    for name, weight in (("l2", l2), ("tv", tv), ("diversity", diversity)):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight < 0:
            raise NeuronsError(f"`{name}` must be a number >= 0, got {weight!r}")
    if prior is not None and not isinstance(prior, DataPrior):
        raise NeuronsError(f"`prior` must be a DataPrior or None, got {type(prior).__name__}")
    fill = 0.5 if prior is None else border_value(prior)
    chain = resolve_transforms(transforms, image_shape, fill)
    if diversity_on not in ("features", "pixels"):
        raise NeuronsError(f"`diversity_on` must be 'features' or 'pixels'; got {diversity_on!r}")
    shapes, largest, total = _probe(model, objectives, image_shape, input_transform, output_fn)
    spatial = frozenset(
        n for n, shape in shapes.items() if n not in (LOGITS, IMAGE) and len(shape) >= 2
    )
    group = n_images * restarts  # rows per objective: its images, or its candidates
    rows = [objective for objective in objectives for _ in range(group)]
    device = model_device(model)
    size = (
        batch_size * group
        if batch_size
        else auto_batch_size(len(rows), largest * views, device, total * views)
    )
    size = max(group, size - size % group)  # an objective's rows share a chunk
    settings = _Settings(
        param=param,
        image_shape=image_shape,
        seed=seed,
        decorrelate=decorrelate,
        device=device,
        prior=prior,
        contrast=contrast,
        views=views,
        n_images=group,
        output_fn=output_fn,
        diversity_on=diversity_on,
        spatial=spatial,
    )
    with analysis_mode(model):
        chunks = [
            _Chunk(
                rows[start : start + size],
                range(first_row + start, first_row + min(start + size, len(rows))),
                settings,
            )
            for start in range(0, len(rows), size)
        ]
        if init is not None:
            _continue_from(chunks, init, len(rows), param)
        spread = float(diversity) if restarts == 1 else 0.0  # candidates need not differ
        penalties = _Penalties(l2=float(l2), tv=float(tv), diversity=spread)
        # images kept apart by the diversity term move together; others alone
        convergence = (
            _Convergence(
                tol=float(converge_tol),
                window=converge_window,
                unit=n_images if spread and n_images > 1 else 1,
            )
            if converge_tol
            else None
        )
        early = restarts > 1 and select_after is not None and select_after < steps
        _optimise(
            model,
            chunks,
            steps=select_after if early else steps,
            lr=lr,
            transforms=chain,
            input_transform=input_transform,
            seed=seed,
            penalties=penalties,
            track_mask=return_mask,
            convergence=convergence,
        )
        with torch.no_grad():
            images = torch.cat([chunk.image_fn().detach() for chunk in chunks])
            params = (
                torch.cat([chunk.params[0].detach().cpu() for chunk in chunks])
                if return_params
                else None
            )
        ran = torch.cat([chunk.steps for chunk in chunks])
        masks = torch.cat([chunk.normalised_mask() for chunk in chunks]) if return_mask else None
        if restarts > 1:
            best = _best_candidates(
                model,
                rows,
                images,
                restarts,
                chain,
                input_transform,
                seed=seed,
                size=size,
                output_fn=output_fn,
            )
            images = images[best]
            masks = None if masks is None else masks[best]
            params = None if params is None else params[best.cpu()]
            ran = ran[best.cpu()]
            if early:
                assert select_after is not None
                kept = [rows[int(i)] for i in best]
                images, params, more = _continue_kept(
                    model,
                    kept,
                    [chunk.params[0].detach() for chunk in chunks],
                    best,
                    replace(settings, n_images=1),
                    size=max(1, size // group),
                    steps=steps - select_after,
                    lr=lr,
                    transforms=chain,
                    input_transform=input_transform,
                    seed=seed,
                    penalties=penalties,
                    return_params=return_params,
                    convergence=convergence,
                )
                ran = ran + more
    found = [images]
    if masks is not None:
        found.append(masks)
    if params is not None:
        found.append(params)
    if return_steps:
        found.append(ran)
    return found[0] if len(found) == 1 else tuple(found)


def _continue_kept(
    model: nn.Module,
    kept: Sequence[Objective],
    candidate_params: Sequence[torch.Tensor],
    best: torch.Tensor,
    settings: _Settings,
    *,
    size: int,
    steps: int,
    lr: float,
    transforms: Sequence[Callable],
    input_transform: InputTransform | None,
    seed: int,
    penalties: _Penalties,
    return_params: bool,
    convergence: _Convergence | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Optimise the kept candidates alone for ``steps`` more steps (``render(select_after=)``);
    returns their images, parameters (if asked for) and the steps each ran."""
    start_params = torch.cat([p.cpu() for p in candidate_params])[best.cpu()]
    chunks = [
        _Chunk(kept[i : i + size], range(i, min(i + size, len(kept))), settings)
        for i in range(0, len(kept), size)
    ]
    _continue_from(chunks, start_params, len(kept), settings.param)
    _optimise(
        model,
        chunks,
        steps=steps,
        lr=lr,
        transforms=transforms,
        input_transform=input_transform,
        seed=seed,
        penalties=penalties,
        track_mask=False,
        convergence=convergence,
    )
    with torch.no_grad():
        images = torch.cat([chunk.image_fn().detach() for chunk in chunks])
        params = torch.cat([c.params[0].detach().cpu() for c in chunks]) if return_params else None
    return images, params, torch.cat([chunk.steps for chunk in chunks])


def _continue_from(chunks: Sequence[_Chunk], init: torch.Tensor, rows: int, param: str) -> None:
    """Copy ``init`` (the parameters of every row) into the chunks' parameters."""
    expected = (rows, *chunks[0].params[0].shape[1:])
    if not isinstance(init, torch.Tensor) or tuple(init.shape) != expected:
        got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise NeuronsError(
            f"`init` must be the parameters of every row, shape {expected} for param={param!r} "
            f"(what render(..., return_params=True) returned for the same objectives and "
            f"settings); got {got}"
        )
    start = 0
    with torch.no_grad():
        for chunk in chunks:
            p = chunk.params[0]
            p.copy_(init[start : start + len(p)].to(p.device, p.dtype))
            start += len(p)


#: Random views on which the candidates of ``restarts`` are compared.
SELECTION_VIEWS = 16


def _best_candidates(
    model: nn.Module,
    rows: Sequence[Objective],
    images: torch.Tensor,
    restarts: int,
    transforms: Sequence[Callable],
    input_transform: InputTransform | None,
    *,
    seed: int,
    size: int,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """Index of the best of every ``restarts`` consecutive candidates: the highest mean value of
    its objective over :data:`SELECTION_VIEWS` random views (one without transforms)."""
    draws = SELECTION_VIEWS if transforms else 1
    generator = torch.Generator().manual_seed(int(seed) + 1)
    total = torch.zeros(len(rows), dtype=torch.float64)
    with torch.no_grad():
        for _ in range(draws):
            progress.advance("comparing the candidates on view", draws)
            state = generator.get_state()
            for start in range(0, len(rows), size):
                generator.set_state(state)  # every chunk sees the same draw
                scoring = _Scoring(BatchScorer(rows[start : start + size]), output_fn=output_fn)
                image = images[start : start + size]
                x = to_model_input(apply_transforms(image, transforms, generator), input_transform)
                with scoring.attached(model):
                    value = scoring.forward(model, x, image)
                total[start : start + size] += value.double().cpu()
    winners = total.view(-1, restarts).argmax(dim=1)
    return winners + torch.arange(len(winners)) * restarts


def border_value(prior: DataPrior) -> float:
    """The data's mean value on the one-pixel frame of the image (what lies beyond its border)."""
    mean = prior.mean
    frame = torch.cat([mean[:, 0], mean[:, -1], mean[:, :, 0], mean[:, :, -1]], dim=1)
    return float(frame.mean())


@dataclass(frozen=True)
class _Settings:
    """How every chunk of one rendering is parametrised."""

    param: Param
    image_shape: tuple[int, int, int]
    seed: int
    decorrelate: bool
    device: torch.device
    prior: DataPrior | None
    contrast: float
    views: int
    n_images: int
    output_fn: BatchFn | None = None
    diversity_on: str = "features"
    #: Layers whose outputs have positions (``[B, C, ...]`` with C > 1 and positions >= 1).
    spatial: frozenset[str] = frozenset()


def _diversity_layer(objective: Objective, spatial: frozenset[str]) -> str | None:
    """The layer whose Gram matrix measures how alike an objective's images are: its first
    term's layer when that has channels and positions; else ``None`` (the pixels)."""
    _, term = objective.terms()[0]
    return term.layer if term.layer in spatial else None


@dataclass(frozen=True)
class _Penalties:
    """Weights of the terms subtracted from every image's value."""

    l2: float
    tv: float
    diversity: float

    def apply(self, value: torch.Tensor, image: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
        if self.l2:
            value = value - self.l2 * l2_penalty(image)
        if self.tv:
            value = value - self.tv * total_variation(image)
        if self.diversity and chunk.n_images > 1:
            value = value - self.diversity * chunk.similarity(image)
        return value


#: Checks in a row at which an image's value must have risen by less than ``converge_tol``
#: before it stops (a single calm window is often a pause: on the digits benchmark, stopping at
#: the first left 88% of a layer's images above their validation maximum instead of 94%).
PATIENCE = 2


@dataclass(frozen=True)
class _Convergence:
    """When an image stops (``render(converge_tol=, converge_window=)``).

    Every ``window`` steps each running image is scored without transforms; an image whose
    value rose by less than ``tol`` times its absolute value since the previous check is calm,
    and one calm at ``patience`` checks in a row has converged. ``unit`` consecutive rows (the
    images one diversity term keeps apart) are calm together, when all of them are.
    """

    tol: float
    window: int
    unit: int = 1
    patience: int = PATIENCE

    def calm(self, value: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Which rows rose by less than ``tol`` (``[R]`` bool) from a check to the next."""
        # relative to the earlier value; a value still at exactly zero (a dead channel) has
        # converged, one rising from a tiny value has not
        rise = (value - previous) / previous.abs().clamp_min(torch.finfo(torch.float32).tiny)
        done = (rise < self.tol).view(-1, self.unit).all(dim=1)
        return done.repeat_interleave(self.unit)


def gram_matrices(output: torch.Tensor) -> torch.Tensor:
    """Each row's Gram matrix of its channels over the positions, flattened: ``[R, C * C]``.

    ``[R, C, H, W]`` (or ``[R, C, L]``) -> ``G[r, c, d] = mean_p a[r, c, p] * a[r, d, p]``: which
    channels fire together, wherever they fire (the style of the image, Gatys et al.), in
    float32 whatever the model's type.
    """
    flat = output.float().flatten(2)
    return (flat @ flat.transpose(1, 2) / flat.shape[2]).flatten(1)


def similarity_to_others(images: torch.Tensor, group: int, centre: bool = True) -> torch.Tensor:
    """Each image's mean cosine similarity to the other images of its group.

    Rows ``k * group`` to ``(k + 1) * group - 1`` form group ``k``; ``[R, ...] -> [R]``. With
    ``centre`` each row's mean is subtracted first (for pixels: brightness does not count).

    Example:
        >>> similarity_to_others(torch.rand(4, 1, 8, 8), group=2).shape
        torch.Size([4])
    """
    flat = images.flatten(1)
    if centre:
        flat = flat - flat.mean(dim=1, keepdim=True)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    unit = unit.view(-1, group, unit.shape[1])
    cosine = unit @ unit.transpose(1, 2)  # [groups, group, group]
    others = cosine.sum(dim=2) - cosine.diagonal(dim1=1, dim2=2)
    return (others / (group - 1)).reshape(-1)


class _Chunk:
    """Rows ``indices`` of a rendering: their scoring hooks, parametrization and mask."""

    def __init__(
        self, objectives: Sequence[Objective], indices: range, settings: _Settings
    ) -> None:
        # Every view of the chunk's images is a row of its own, scored by the row's objective.
        self.views = settings.views
        self.n_images = settings.n_images
        #: Each row's layer for the diversity term (``None``: its pixels), see :func:`render`.
        self.diversity_layers = [
            _diversity_layer(o, settings.spatial) if settings.diversity_on == "features" else None
            for o in objectives
        ]
        self.scoring = _Scoring(
            BatchScorer(list(objectives) * settings.views),
            output_fn=settings.output_fn,
            gram_layers=[n for n in self.diversity_layers if n is not None],
        )
        seeds = [row_seed(settings.seed, i) for i in indices]
        self.params, self.image_fn = parametrize(
            settings.param,
            (len(indices), *settings.image_shape),
            seeds,
            decorrelate=settings.decorrelate,
            device=settings.device,
            prior=settings.prior,
            contrast=settings.contrast,
        )
        self.mask: torch.Tensor | None = None
        self.objectives = list(objectives)
        self._diversity_layers = list(self.diversity_layers)  # of every row
        self.output_fn = settings.output_fn
        self.diversity_on = settings.diversity_on
        self.spatial = settings.spatial
        #: Adam steps each row has run.
        self.steps = torch.zeros(len(indices), dtype=torch.int64)
        #: Rows still optimised (``None``: all); the others are frozen (see :meth:`freeze`).
        self.active: torch.Tensor | None = None
        self._frozen_params: torch.Tensor | None = None
        self._checked: torch.Tensor | None = None  # the running rows' values at the last check
        self._calm = torch.zeros(0, dtype=torch.int64)  # checks in a row each rose < tol

    @property
    def running(self) -> bool:
        """Whether any row of the chunk is still optimised."""
        return self.active is None or len(self.active) > 0

    def rows_image(self) -> torch.Tensor:
        """The images of the running rows (all rows' parameters go through ``image_fn``: the
        parametrisation is cheap next to the model)."""
        image = self.image_fn()
        return image if self.active is None else image[self.active.to(image.device)]

    def check(
        self,
        model: nn.Module,
        dispatch: _Dispatch,
        input_transform: InputTransform | None,
        convergence: _Convergence,
    ) -> None:
        """Score the running rows without transforms; freeze those that have converged."""
        if not self.running:
            return
        rows = self.objectives if self.active is None else [self.objectives[i] for i in self.active]
        scoring = _Scoring(BatchScorer(rows), output_fn=self.output_fn)
        with torch.no_grad():
            image = self.rows_image()
            dispatch.current = scoring
            value = scoring.forward(model, to_model_input(image, input_transform), image)
        value = value.detach().float().cpu()
        if self._checked is None:
            self._checked = value
            self._calm = torch.zeros(len(value), dtype=torch.int64)
            return
        calm = convergence.calm(value, self._checked)
        self._calm = torch.where(calm, self._calm + 1, 0)
        done = self._calm >= convergence.patience
        self._checked, self._calm = value[~done], self._calm[~done]
        if done.any():
            self.freeze(done)

    def freeze(self, done: torch.Tensor) -> None:
        """Stop optimising the running rows where ``done`` (``[running rows]`` bool): they leave
        the batch, and their parameters are put back after every optimiser step (Adam's
        momentum would move them even with a zero gradient)."""
        active = torch.arange(len(self.steps)) if self.active is None else self.active
        self.active = active[~done]
        self._frozen_params = self.params[0].detach().clone()
        self.diversity_layers = [self._diversity_layers[i] for i in self.active]
        self.scoring = _Scoring(
            BatchScorer([self.objectives[i] for i in self.active] * self.views),
            output_fn=self.output_fn,
            gram_layers=[n for n in self.diversity_layers if n is not None],
        )

    def restore_frozen(self) -> None:
        """Put the frozen rows' parameters back after an optimiser step."""
        if self.active is None or self._frozen_params is None:
            return
        frozen = torch.ones(len(self.steps), dtype=torch.bool)
        frozen[self.active] = False
        with torch.no_grad():
            p = self.params[0]
            index = frozen.to(p.device)
            p[index] = self._frozen_params[index]

    def similarity(self, image: torch.Tensor) -> torch.Tensor:
        """Each row's mean cosine similarity to the other images of its objective: on the Gram
        matrix of its diversity layer (averaged over the views), or on its centred pixels."""
        if not self.scoring.grams:
            return similarity_to_others(image, self.n_images)
        rows = len(self.diversity_layers)
        similarity = torch.zeros(rows, device=image.device)
        pixels = [i for i, n in enumerate(self.diversity_layers) if n is None]
        if pixels:
            similarity[pixels] = similarity_to_others(image, self.n_images)[pixels]
        for layer, grams in self.scoring.grams.items():
            grams = grams.view(self.views, rows, -1).mean(dim=0)
            picked = [i for i, n in enumerate(self.diversity_layers) if n == layer]
            similarity[picked] = similarity_to_others(grams, self.n_images, centre=False)[picked]
        return similarity

    def add_to_mask(self, image: torch.Tensor) -> None:
        """Accumulate ``|d loss / d image|`` (summed over the channels) after a backward pass."""
        if image.grad is None:
            return
        grad = image.grad.detach().abs().sum(dim=1, keepdim=True)
        if self.active is not None:  # only the running rows are in the batch
            full = grad.new_zeros((len(self.steps), *grad.shape[1:]))
            grad = full.index_copy(0, self.active.to(grad.device), grad)
        self.mask = grad if self.mask is None else self.mask + grad

    def normalised_mask(self) -> torch.Tensor:
        """The accumulated mask scaled to [0, 1] per image (zeros if nothing was accumulated)."""
        if self.mask is None:
            with torch.no_grad():
                return torch.zeros_like(self.image_fn()[:, :1])
        peak = self.mask.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return self.mask / peak


class _Dispatch:
    """One forward hook for all chunks, passing outputs to the chunk being run."""

    def __init__(self) -> None:
        self.current: _Scoring | None = None

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        assert self.current is not None
        self.current(layer, output)


def _optimise(
    model: nn.Module,
    chunks: Sequence[_Chunk],
    *,
    steps: int,
    lr: float,
    transforms: Sequence[Callable],
    input_transform: InputTransform | None,
    seed: int,
    penalties: _Penalties,
    track_mask: bool,
    convergence: _Convergence | None = None,
) -> None:
    """Adam steps on every chunk's parameters; at each step the chunks run one after another
    (so only one chunk's activations are alive) and share one optimiser step. With
    ``convergence``, rows that have converged leave their chunk's batch; the loop ends when
    none is left."""
    optimizer = torch.optim.Adam([p for chunk in chunks for p in chunk.params], lr=lr)
    # One stream for the transforms: every chunk gets the same draw at a step (rows share it;
    # the draw does not depend on how many rows a chunk runs).
    generator = torch.Generator().manual_seed(int(seed))
    layers = list(dict.fromkeys(n for chunk in chunks for n in chunk.scoring.scorer.layers))
    dispatch = _Dispatch()
    with hooked(model, layers, dispatch):
        for step in range(steps):
            if convergence is not None and step % convergence.window == 0:
                for chunk in chunks:
                    chunk.check(model, dispatch, input_transform, convergence)
                if not any(chunk.running for chunk in chunks):
                    break
            optimizer.zero_grad(set_to_none=True)
            state = generator.get_state()
            for chunk in chunks:
                progress.update("step", step + 1, steps)
                if not chunk.running:
                    continue  # no gradient: Adam leaves its parameters alone
                generator.set_state(state)
                dispatch.current = chunk.scoring
                image = chunk.rows_image()
                if track_mask:
                    image.retain_grad()
                value = _views_value(model, chunk, image, transforms, input_transform, generator)
                value = penalties.apply(value, image, chunk)
                (-value.sum()).backward()
                if track_mask:
                    chunk.add_to_mask(image)
                chunk.steps[slice(None) if chunk.active is None else chunk.active] += 1
            optimizer.step()
            for chunk in chunks:
                chunk.restore_frozen()


def _views_value(
    model: nn.Module,
    chunk: _Chunk,
    image: torch.Tensor,
    transforms: Sequence[Callable],
    input_transform: InputTransform | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Every row's value, averaged over ``chunk.views`` random views of its image: ``[R]``."""
    views = [apply_transforms(image, transforms, generator) for _ in range(chunk.views)]
    x = to_model_input(torch.cat(views) if chunk.views > 1 else views[0], input_transform)
    repeated = image.repeat(chunk.views, 1, 1, 1) if chunk.views > 1 else image
    value = chunk.scoring.forward(model, x, repeated)
    return value.view(chunk.views, -1).mean(dim=0)


def evaluate(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    images: torch.Tensor,
    *,
    input_transform: InputTransform | None = None,
    batch_size: int | None = None,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """The value of ``objectives[i]`` on ``images[i]`` (no random transforms).

    Use it to ask how strongly rendered images drive their objectives, e.g. compared with the
    largest activation on real data. With a single objective, it is scored on every image.

    Args:
        model: The model.
        objectives: One objective per image, or one objective for all.
        images: ``[N, C, H, W]`` display images.
        input_transform: Display image -> model input.
        batch_size: Evaluate at most this many images at once.
        output_fn: Reads the logits from the model's output.

    Returns:
        ``[N]`` values (float32, CPU).

    Raises:
        NeuronsError: If the counts differ, or for an unknown layer or index.
    """
    if isinstance(objectives, Objective):
        objectives = [objectives] * len(images)
    objectives = as_objectives(objectives)
    if len(objectives) != len(images):
        raise NeuronsError(
            f"need one objective per image: {len(objectives)} objectives, {len(images)} images"
        )
    if batch_size is not None:
        _check_positive("batch_size", batch_size, integer=True)
    check_objectives(
        model,
        objectives,
        tuple(images.shape[1:]),
        input_transform=input_transform,
        output_fn=output_fn,
    )
    device = model_device(model)
    size = batch_size or len(objectives)
    values = []
    with analysis_mode(model, grad=False):
        for start in range(0, len(objectives), size):
            scoring = _Scoring(BatchScorer(objectives[start : start + size]), output_fn=output_fn)
            image = images[start : start + size].to(device)
            x = to_model_input(image, input_transform)
            with scoring.attached(model):
                values.append(scoring.forward(model, x, image).float().cpu())
    return torch.cat(values)
