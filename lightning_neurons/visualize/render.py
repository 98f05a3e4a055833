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
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_neurons.batch import (
    BatchFn,
    InputTransform,
    as_model_input,
    read_logits,
    to_model_input,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import get_module, hooked
from lightning_neurons.state import analysis_mode
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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class _Scoring:
    """Forward hooks that score each needed layer as it runs, stopping the pass when done.

    Scoring inside the hook (rather than after the forward) reads each layer's output before a
    later in-place operation (``ReLU(inplace=True)``) could change it.
    """

    def __init__(
        self, scorer: BatchScorer, allow_stop: bool = True, output_fn: BatchFn | None = None
    ) -> None:
        self.scorer = scorer
        self.output_fn = output_fn
        self.stop = allow_stop and not scorer.needs_logits
        self.total: torch.Tensor | None = None
        self.seen: set[str] = set()

    def reset(self) -> None:
        self.total = None
        self.seen = set()

    def add(self, layer: str, output: torch.Tensor) -> None:
        part = self.scorer.score(layer, output)
        self.total = part if self.total is None else self.total + part

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        if layer in self.seen or layer not in self.scorer.groups:
            return  # a module called twice in one forward counts once; others' layers not at all
        self.seen.add(layer)
        self.add(layer, output)
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
    """Forward hooks on every leaf module recording the largest output size (in elements)."""
    largest = [0]

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    return handles, largest


def _probe(
    model: nn.Module,
    objectives: Sequence[Objective],
    image_shape: tuple[int, int, int],
    input_transform: InputTransform | None,
    output_fn: BatchFn | None = None,
) -> tuple[dict[str, tuple[int, ...]], int]:
    """One forward pass of one grey image: checks the objectives; returns the read layers' output
    shapes and the largest output (elements per image) of any leaf module."""
    layers = _resolve(model, objectives)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, output: torch.Tensor) -> None:
        shapes.setdefault(name, tuple(output.shape[1:]))

    handles, largest = _largest_output(model)
    try:
        with analysis_mode(model), torch.no_grad(), hooked(model, layers, record):
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
    return shapes, largest[0]


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
    shapes, _ = _probe(
        model, objectives, _check_image_shape(image_shape), input_transform, output_fn
    )
    return shapes


#: On CPU, rows per chunk are chosen so that the largest layer output of a chunk is about this
#: many bytes: batches far beyond the CPU caches are slower per image (measured on the demo model,
#: 2 cores: chunks of 16 rows rendered 64 channels 15-35% faster than one batch of 64).
CPU_CHUNK_BYTES = 2 * 2**20


def auto_batch_size(count: int, largest_output: int, device: torch.device) -> int:
    """Rows rendered at once when ``batch_size`` is None: all on a GPU; on CPU, enough rows for
    their largest layer output (``largest_output`` elements per image, float32) to fill about
    :data:`CPU_CHUNK_BYTES`, at least 4."""
    if device.type != "cpu":
        return count
    rows = CPU_CHUNK_BYTES // max(1, 4 * largest_output)
    return int(min(count, max(4, rows)))


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
) -> torch.Tensor:
    """Render one image per objective by gradient ascent, all objectives in one batch.

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
        objectives: One :class:`Objective` or a list; one image is rendered per objective.
        image_shape: ``(C, H, W)`` of the display images.
        steps: Adam steps.
        lr: Adam's learning rate.
        param: ``"fft"`` (Fourier with ``1/f`` scaling; smoother images) or ``"pixel"``.
        transforms: ``"standard"`` (random shift, scale and rotation in one warp, sized to the
            image; see :func:`~lightning_neurons.visualize.standard_transforms`),
            ``"none"``/``None``, or a list of callables ``(images, generator) -> images``.
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
        decorrelate: Mix RGB channels with the colour-decorrelation matrix.

    Returns:
        ``[N, C, H, W]`` display images in [0, 1] (detached, on the model's device).

    Raises:
        NeuronsError: For bad arguments, an unknown layer, or an index outside a layer's real
            output (checked with one forward pass of one image before rendering).

    Example:
        >>> from lightning_neurons.visualize import Channel, render
        >>> images = render(model, [Channel("features.conv2", i) for i in range(64)],
        ...                 image_shape=(1, 32, 32), steps=128)  # doctest: +SKIP
        >>> images.shape  # doctest: +SKIP
        torch.Size([64, 1, 32, 32])
    """
    objectives = as_objectives(objectives)
    image_shape = _check_image_shape(image_shape)
    _check_positive("steps", steps, integer=True)
    _check_positive("lr", lr, integer=False)
    if batch_size is not None:
        _check_positive("batch_size", batch_size, integer=True)
    if param not in PARAMS:
        raise NeuronsError(f"`param` must be one of {', '.join(map(repr, PARAMS))}; got {param!r}")
    for name, weight in (("l2", l2), ("tv", tv)):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight < 0:
            raise NeuronsError(f"`{name}` must be a number >= 0, got {weight!r}")
    chain = resolve_transforms(transforms, image_shape)
    _, largest = _probe(model, objectives, image_shape, input_transform, output_fn)
    device = model_device(model)
    size = batch_size or auto_batch_size(len(objectives), largest, device)
    with analysis_mode(model):
        chunks = [
            _Chunk(
                objectives[start : start + size],
                range(start, min(start + size, len(objectives))),
                param=param,
                image_shape=image_shape,
                seed=seed,
                decorrelate=decorrelate,
                device=device,
                output_fn=output_fn,
            )
            for start in range(0, len(objectives), size)
        ]
        _optimise(
            model,
            chunks,
            steps=steps,
            lr=lr,
            transforms=chain,
            input_transform=input_transform,
            seed=seed,
            l2=float(l2),
            tv=float(tv),
        )
        with torch.no_grad():
            return torch.cat([chunk.image_fn().detach() for chunk in chunks])


class _Chunk:
    """Rows ``indices`` of a rendering: their scoring hooks and their parametrization."""

    def __init__(
        self,
        objectives: Sequence[Objective],
        indices: range,
        *,
        param: Param,
        image_shape: tuple[int, int, int],
        seed: int,
        decorrelate: bool,
        device: torch.device,
        output_fn: BatchFn | None = None,
    ) -> None:
        self.scoring = _Scoring(BatchScorer(objectives), output_fn=output_fn)
        seeds = [row_seed(seed, i) for i in indices]
        self.params, self.image_fn = parametrize(
            param, (len(indices), *image_shape), seeds, decorrelate=decorrelate, device=device
        )


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
    l2: float,
    tv: float,
) -> None:
    """Adam steps on every chunk's parameters; at each step the chunks run one after another
    (so only one chunk's activations are alive) and share one optimiser step."""
    optimizer = torch.optim.Adam([p for chunk in chunks for p in chunk.params], lr=lr)
    # One stream for the transforms: every chunk gets the same draw at a step (rows share it).
    generator = torch.Generator().manual_seed(int(seed))
    layers = list(dict.fromkeys(n for chunk in chunks for n in chunk.scoring.scorer.layers))
    dispatch = _Dispatch()
    with hooked(model, layers, dispatch):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            state = generator.get_state()
            for chunk in chunks:
                generator.set_state(state)
                dispatch.current = chunk.scoring
                image = chunk.image_fn()
                x = to_model_input(apply_transforms(image, transforms, generator), input_transform)
                value = chunk.scoring.forward(model, x, image)
                if l2:
                    value = value - l2 * l2_penalty(image)
                if tv:
                    value = value - tv * total_variation(image)
                (-value.sum()).backward()
            optimizer.step()


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
    with analysis_mode(model), torch.no_grad():
        for start in range(0, len(objectives), size):
            scoring = _Scoring(BatchScorer(objectives[start : start + size]), output_fn=output_fn)
            image = images[start : start + size].to(device)
            x = to_model_input(image, input_transform)
            with scoring.attached(model):
                values.append(scoring.forward(model, x, image).float().cpu())
    return torch.cat(values)
