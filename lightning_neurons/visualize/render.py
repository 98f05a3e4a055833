"""The public entry of the render loop: :func:`render`, :func:`evaluate`, :func:`check_objectives`.

Rendering 64 channels one after the other costs 64 forward/backward passes of batch 1 per
step; stacking them into one batch of 64, where row ``i`` is scored by objective ``i``, costs one
pass of batch 64, which on any hardware is far cheaper. How the rows are scored
(:mod:`~lightning_neurons.visualize.scoring`), cut into chunks
(:mod:`~lightning_neurons.visualize.sizing`), penalised and stopped
(:mod:`~lightning_neurons.visualize.penalties`), optimised
(:mod:`~lightning_neurons.visualize.optimise`) and continued
(:mod:`~lightning_neurons.visualize.continuation`) lives in modules of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from lightning_neurons.batch import BatchFn, InputTransform, to_model_input
from lightning_neurons.checks import (
    check_choice,
    check_display_shape,
    check_instance,
    check_int,
    check_non_negative,
    check_positive,
    check_render_counts,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.state import analysis_mode, model_device
from lightning_neurons.visualize.continuation import (
    SELECT_BY,
    Rendered,
    SelectBy,
    best_candidates,
    continue_from,
    continue_kept,
)
from lightning_neurons.visualize.objectives import Objective, as_objectives
from lightning_neurons.visualize.optimise import (
    Ascent,
    Chunk,
    ChunkSettings,
    chunks_of,
    optimise,
    optimise_together,
)
from lightning_neurons.visualize.param import PARAMS, Param
from lightning_neurons.visualize.penalties import Convergence, Penalties
from lightning_neurons.visualize.prior import DataPrior
from lightning_neurons.visualize.recipe import AUTO, Recipe, recipe_for
from lightning_neurons.visualize.scoring import Scoring
from lightning_neurons.visualize.sizing import chunk_rows, gram_elements, probe
from lightning_neurons.visualize.transforms import Transform, TransformsArg, resolve_transforms


@dataclass(frozen=True)
class RenderResult:
    """What :func:`render` found.

    Attributes:
        images: ``[N * n_images, C, H, W]`` display images in [0, 1] (detached, on the model's
            device); rows ``j * n_images`` to ``(j + 1) * n_images - 1`` belong to objective
            ``j``.
        steps: ``[N * n_images]`` Adam steps each image was optimised for (int64, CPU; with
            ``restarts``, the kept candidate's): ``steps`` for every image unless
            ``converge_tol`` stopped it early.
        params: The final parameters of every image (with ``restarts``, of the kept
            candidates; detached, on the CPU), to pass as ``render(init=)`` later (with
            ``restarts=1``: a kept candidate is continued alone).
        masks: With ``render(mask=True)``, MaCo's transparency masks ``[N * n_images, 1, H, W]``:
            the absolute gradient of the loss with respect to each pixel, summed over the steps
            and scaled to [0, 1] per image (where the image mattered to its objective); else
            ``None``.
    """

    images: torch.Tensor
    steps: torch.Tensor
    params: torch.Tensor
    masks: torch.Tensor | None = None


def render(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    *,
    image_shape: Sequence[int],
    prior: DataPrior | None = None,
    steps: int | None = None,
    lr: float | None = None,
    param: Param | Literal["auto"] = "auto",
    transforms: TransformsArg | Literal["auto"] = "auto",
    input_transform: InputTransform | None = None,
    output_fn: BatchFn | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    l2: float = 0.0,
    tv: float = 0.0,
    decorrelate: bool = True,
    contrast: float | None = None,
    views: int | None = None,
    n_images: int = 1,
    diversity: float | None = None,
    diversity_on: Literal["features", "pixels"] = "features",
    restarts: int | None = None,
    init: torch.Tensor | None = None,
    first_row: int | Sequence[int] = 0,
    select_after: int | None = None,
    select_by: SelectBy | Literal["auto"] = "auto",
    converge_tol: float | None = None,
    converge_window: int = 4,
    mask: bool = False,
) -> RenderResult:
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

    **Defaults.** The settings left at ``None`` or ``"auto"`` come from a recipe
    (:mod:`~lightning_neurons.visualize.recipe`). Without a ``prior``: Lucid's (256 steps, lr
    0.05, ``"fft"``, ``"standard"`` transforms, one view, no convergence test). With one, the
    images :class:`~lightning_neurons.FeatureVisualizer` renders at its defaults: 64 steps, lr
    0.1, ``"maco"``, ``"robust"`` transforms, ``converge_tol=0.005``, diversity 1.0 and contrast
    2.0; for class images (every objective reads the logits) contrast 1.0, 2 views and the best of
    4 restarts (1 with ``n_images > 1``) by ``select_by="agreement"``. FeatureVisualizer's class
    objectives are anchored (:meth:`~lightning_neurons.visualize.anchors.ClassAnchors.objective`):
    render those to get its class images.

    Args:
        model: Any ``nn.Module`` (a ``LightningModule`` too) mapping images to logits.
        objectives: One :class:`Objective` or a list; ``n_images`` images are rendered per
            objective.
        image_shape: ``(C, H, W)`` of the display images.
        prior: The data's statistics (:class:`~lightning_neurons.visualize.DataPrior`): needed
            by ``param="maco"``, and it chooses the defaults (see above).
        steps: Adam steps (``None``: the recipe's).
        lr: Adam's learning rate (``None``: the recipe's).
        param: ``"auto"`` (the recipe's), ``"fft"`` (Fourier with ``1/f`` scaling; smoother images), ``"pixel"``, or
            ``"maco"`` (only the spectrum's phase is optimised; amplitudes and pixel statistics
            come from ``prior``: images other models recognise more often; see
            :func:`~lightning_neurons.visualize.param.maco_image`).
        transforms: ``"auto"`` (the recipe's), ``"standard"`` (random shift, scale and rotation in one warp, sized to the
            image; see :func:`~lightning_neurons.visualize.transforms.standard_transforms`),
            ``"robust"`` (stronger; :func:`~lightning_neurons.visualize.transforms.robust_transforms`),
            ``"none"``/``None``, or a list of callables ``(images, generator) -> images``. With
            a ``prior``, the named sets fill the border with the data's mean border value.
        input_transform: Display image -> model input (e.g. the data's normalisation); applied
            after the transforms. The model runs in its own floating-point type (bfloat16 too);
            the images are optimised in float32.
        output_fn: Reads the logits from the model's output (class objectives).
        seed: Seed of the initial images and of the transforms' random parameters.
        batch_size: Render at most this many objectives at once. Default: on an accelerator,
            chunks bounded by memory (the device's free memory included) and at most 512 rows;
            on CPU, chunks sized to the CPU caches, each of rows that read the same layers (see
            :func:`~lightning_neurons.visualize.sizing.auto_batch_size`), which gives the same
            images faster.
        l2: Weight of an L2 penalty (:class:`~lightning_neurons.visualize.L2`) on every image.
        tv: Weight of a total-variation penalty on every image.
        decorrelate: Mix RGB channels with the colour-decorrelation matrix (``"pixel"`` and
            ``"fft"``).
        contrast: ``"maco"`` only: the pattern's scale relative to the data's spread (> 1 lets
            channel images drive their channels harder, at some cost in plausibility; ``None``:
            the recipe's).
        views: Randomly transformed copies of every image scored at each step (their mean is
            the image's value): an ensemble of augmentations, ``views`` times the work per step
            (``None``: the recipe's).
        n_images: Images per objective (rows ``j * n_images`` to ``(j + 1) * n_images - 1``
            belong to objective ``j``).
        diversity: Weight of the diversity term (Olah et al., 2017) among the ``n_images`` of
            an objective: each image's mean cosine similarity to the others is subtracted from
            its value, so a polysemantic channel shows several faces (``None``: the recipe's).
        diversity_on: What the similarity compares. ``"features"`` (Olah et al.): the Gram
            matrices of the objective's layer (which channels fire together, wherever they
            fire), so the images must differ in what they make the layer see, not by a shift
            or a new texture of the same thing; objectives on the logits, the image or a layer
            without channels fall back to ``"pixels"``: the centred pixels.
        restarts: Render this many candidates per image (from different seeds) and keep the
            one the model scores best over 16 randomly transformed views (``select_by``; only
            the rendered model decides): ``restarts`` times the work. Not with ``n_images > 1``
            (``None``: the recipe's).
        init: Continue from these parameters instead of each row's seeded noise: the
            ``params`` of an earlier result, for the same objectives and settings
            (``[N * n_images * restarts, ...]``; pass ``restarts=1`` to continue the images that
            an earlier call with ``restarts`` kept). A preferred image changes little between
            two epochs of training, so a few steps from the previous image reach what many steps
            from noise reach, and TensorBoard's step slider shows one image evolving.
        first_row: Index of the first row in a larger rendering: row ``i`` starts from the noise
            of row ``first_row + i``. Rendering objectives ``a`` to ``b`` of a list with
            ``first_row = a * n_images * restarts`` gives their images of the whole list's
            rendering (how :class:`~lightning_neurons.FeatureVisualizer` shares a rendering
            between DDP ranks). A list gives each objective's first row: renderings of several
            lists in one batch (how it renders every layer's channels at once), each with the
            noise of its own rendering.
        select_after: With ``restarts``, keep the best candidate after this many steps and spend
            the remaining steps on it alone (``restarts x select_after + steps - select_after``
            image-steps instead of ``restarts x steps``). ``None``: select after all ``steps``.
        select_by: How ``restarts`` candidates are compared over the 16 random views:
            ``"value"`` (the highest mean value of the objective) or ``"agreement"`` (for
            objectives that ask for a class, a :class:`ClassLogit` alone or minus penalties such
            as a :class:`~lightning_neurons.visualize.anchors.ClassAnchor`: the most views on
            which the model's top class is the objective's class, ties broken by the class's
            mean log-probability; other objectives by their value). ``"auto"``: the recipe's
            (``"agreement"`` for class images with a prior, else ``"value"``).
        converge_tol: Stop an image early once its objective has converged, ``steps`` being
            the most: every ``converge_window`` steps each objective is scored on its image
            without transforms (one forward pass of the images still running), and an image
            whose value rose by less than ``converge_tol`` times its absolute value from one
            check to the next (a fall counts as no rise), at two checks in a row
            (:data:`~lightning_neurons.visualize.penalties.PATIENCE`: one calm window is often a
            pause), is frozen and leaves the batch, which saves its forward and backward passes.
            The images of one objective with ``diversity`` (its ``n_images``) are decided
            together; the candidates of ``restarts`` each alone, before and after
            ``select_after``. The decision is per image, so an image's steps and result do not
            depend on the other objectives, the chunking or ``first_row`` (up to a check that
            batched float32 kernels could tip when a rise equals the tolerance to ~1e-7).
            ``0``: every image runs ``steps``; ``None``: the recipe's.
        converge_window: Steps between two convergence checks (the first is before the first
            step; no image stops before ``PATIENCE x converge_window`` steps).
        mask: Also accumulate MaCo's transparency masks (:attr:`RenderResult.masks`); not with
            ``select_after``.

    Returns:
        A :class:`RenderResult`: the images, the steps each ran, their parameters and, with
        ``mask``, the masks.

    Raises:
        NeuronsError: For bad arguments, ``param="maco"`` without a prior, an unknown layer, or
            an index outside a layer's real output (checked with one forward pass of one image
            before rendering).

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> from lightning_neurons.visualize import Channel, evaluate, render
        >>> _ = torch.manual_seed(0)
        >>> model = SmallCNN(widths=(8, 16, 32)).eval()  # 1 x 16 x 16 images; train it first
        >>> channels = [Channel("features.conv2", i) for i in range(16)]
        >>> result = render(model, channels, image_shape=(1, 16, 16), steps=64)
        >>> result.images.shape, result.steps.shape  # an image per objective, the steps each ran
        (torch.Size([16, 1, 16, 16]), torch.Size([16]))
        >>> noise = torch.rand(16, 1, 16, 16)
        >>> bool((evaluate(model, channels, result.images) > evaluate(model, channels, noise)).all())
        True
    """
    job = prepare_render(**locals())
    return run_renders(model, [job])[0]


def prepare_render(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    *,
    image_shape: Sequence[int],
    prior: DataPrior | None = None,
    steps: int | None = None,
    lr: float | None = None,
    param: Param | Literal["auto"] = "auto",
    transforms: TransformsArg | Literal["auto"] = "auto",
    input_transform: InputTransform | None = None,
    output_fn: BatchFn | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    l2: float = 0.0,
    tv: float = 0.0,
    decorrelate: bool = True,
    contrast: float | None = None,
    views: int | None = None,
    n_images: int = 1,
    diversity: float | None = None,
    diversity_on: Literal["features", "pixels"] = "features",
    restarts: int | None = None,
    init: torch.Tensor | None = None,
    first_row: int | Sequence[int] = 0,
    select_after: int | None = None,
    select_by: SelectBy | Literal["auto"] = "auto",
    converge_tol: float | None = None,
    converge_window: int = 4,
    mask: bool = False,
) -> RenderJob:
    """A rendering checked, probed (one forward pass of one image) and sized, for
    :func:`run_renders`: :func:`render`'s arguments, and its errors."""
    objectives = as_objectives(objectives)
    image_shape = check_display_shape(image_shape)
    check_instance("prior", prior, DataPrior, "a DataPrior")
    chosen = recipe_for(prior, objectives, n_images)
    chosen = chosen.given(param=param, steps=steps, lr=lr, converge_tol=converge_tol)
    chosen = chosen.given(contrast=contrast, views=views, restarts=restarts, diversity=diversity)
    chosen = chosen.given(select_by=select_by)
    counts = {"steps": chosen.steps, "views": chosen.views, "n_images": n_images}
    check_render_counts(counts, chosen.restarts, select_after, mask)
    starts = [first_row] if isinstance(first_row, int) else list(first_row)
    for start in starts:
        check_int("first_row", start, minimum=0)
    if not isinstance(first_row, int) and len(starts) != len(objectives):
        raise NeuronsError(
            f"`first_row` lists {len(starts)} first rows for {len(objectives)} objectives: "
            "give one per objective, or one integer"
        )
    check_positive("converge_window", converge_window, integer=True)
    if batch_size is not None:
        check_positive("batch_size", batch_size, integer=True)
    check_non_negative("converge_tol", chosen.converge_tol, " (0: no convergence test)")
    check_positive("lr", chosen.lr)
    check_choice("param", chosen.param, PARAMS)
    check_choice("select_by", chosen.select_by, SELECT_BY)
    spread = check_non_negative("diversity", chosen.diversity)
    penalties = Penalties(
        l2=check_non_negative("l2", l2),
        tv=check_non_negative("tv", tv),
        diversity=spread if chosen.restarts == 1 else 0.0,  # candidates need not differ
    )
    chain = view_transforms(
        chosen.transforms if isinstance(transforms, str) and transforms == AUTO else transforms,
        image_shape,
        prior,
    )
    check_choice("diversity_on", diversity_on, ("features", "pixels"))
    found = probe(model, objectives, image_shape, input_transform, output_fn)
    group = n_images * chosen.restarts  # rows per objective: its images, or its candidates
    rows = [objective for objective in objectives for _ in range(group)]
    device = model_device(model)
    settings = ChunkSettings(
        param=chosen.param, image_shape=image_shape, seed=seed, decorrelate=decorrelate,
        device=device, prior=prior, contrast=chosen.contrast, views=chosen.views,
        n_images=group, output_fn=output_fn, spatial=found.spatial(),
        diversity_on=diversity_on if penalties.diversity and group > 1 else None,
    )  # fmt: skip
    # images kept apart by the diversity term converge together; others alone
    unit = n_images if penalties.diversity and n_images > 1 else 1
    tol, window = chosen.converge_tol, converge_window
    convergence = Convergence(float(tol), window, unit) if tol else None
    ascent = Ascent(chosen.lr, chain, input_transform, seed, penalties, convergence, mask)
    gram = gram_elements(found, objectives, group) if settings.diversity_on == "features" else 0
    # rows a chunk may hold, however many there are (what renderings run together may hold);
    # these rows' chunks hold as many, or all of them (a multiple of ``group``: whole objectives)
    bound = chunk_rows(found, 1 << 30, group, chosen.views, device, batch_size, gram)
    size = min(len(rows), bound)
    seeds = first_row if isinstance(first_row, int) else row_seeds(starts, group)
    return RenderJob(rows, chosen, settings, ascent, size, bound, seeds, init, select_after)


def run_renders(
    model: nn.Module, jobs: Sequence[RenderJob], *, together: bool | None = None
) -> list[RenderResult]:
    """Run prepared renderings (:func:`prepare_render`); each gives what :func:`render` gives
    alone. Renderings of one chunk each that fit in one (:func:`can_run_together`) take their
    steps in one batch (:func:`~lightning_neurons.visualize.optimise.optimise_together`): on
    an accelerator, where a step of a few hundred rows costs what its kernel launches cost,
    several renderings then cost about what one does. ``together``: ``None``, on an
    accelerator only (on the CPU a step costs its arithmetic, and a chunk of one layer's rows
    stops its forward pass at that layer); ``True``, wherever they can; ``False``, never.
    Together, the results are those of the renderings alone up to the floating-point
    differences of batched kernels."""
    jobs = list(jobs)
    with analysis_mode(model):
        for job in jobs:
            job.make_chunks()
        if together is None:
            together = model_device(model).type != "cpu"
        if together and can_run_together(jobs):
            optimise_together(model, [(j.chunks[0], j.ascent, j.first_steps) for j in jobs])
        else:
            for job in jobs:
                optimise(model, job.chunks, job.first_steps, job.ascent)
        return [job.finish(model) for job in jobs]


def can_run_together(jobs: Sequence[RenderJob]) -> bool:
    """Whether ``jobs`` (their chunks made) can take their steps in one batch: two or more, of
    one chunk each, without masks or Gram matrices (a chunk's own scoring keeps those), of
    images of one shape read by one ``output_fn``, and no more rows (views counted) than the
    smallest chunk bound among them allows."""
    if len(jobs) < 2 or any(len(job.chunks) != 1 for job in jobs):
        return False
    first = jobs[0].settings
    for job in jobs:
        settings = job.settings
        if job.ascent.track_mask or job.chunks[0].scoring.gram_rows:
            return False
        if settings.image_shape != first.image_shape or settings.output_fn != first.output_fn:
            return False
    rows = sum(len(job.rows) * job.settings.views for job in jobs)
    return rows <= min(job.bound * job.settings.views for job in jobs)


def row_seeds(starts: Sequence[int], group: int) -> list[int]:
    """The noise index of every row when objective ``j``'s ``group`` rows start at
    ``starts[j]``."""
    return [start + k for start in starts for k in range(group)]


def view_transforms(
    transforms: TransformsArg, image_shape: Sequence[int], prior: DataPrior | None
) -> list[Transform]:
    """The random transforms of a rendering: ``transforms`` resolved for ``image_shape``, with
    the prior's border value (mid-grey without a prior) where content comes from outside."""
    fill = 0.5 if prior is None else prior.border_value()
    return resolve_transforms(transforms, image_shape, fill)


@dataclass
class RenderJob:
    """A rendering checked, probed and sized by :func:`prepare_render`, run by
    :func:`run_renders`: its rows (one objective each), settings and, once made, chunks."""

    rows: list[Objective]
    chosen: Recipe
    settings: ChunkSettings
    ascent: Ascent
    #: Rows a chunk of these rows holds.
    size: int
    #: Rows a chunk may hold, of any number of rows (what renderings run together may hold).
    bound: int
    #: Each row's noise: the first row's index, or every row's.
    seeds: int | list[int]
    init: torch.Tensor | None
    select_after: int | None
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def first_steps(self) -> int:
        """The steps before the candidates of ``restarts`` are compared (all without them)."""
        steps = self.chosen.steps
        return min(self.select_after or steps, steps) if self.chosen.restarts > 1 else steps

    def make_chunks(self) -> None:
        """The chunks, from each row's noise or from ``init``."""
        self.chunks = chunks_of(self.rows, self.size, self.settings, self.seeds)
        if self.init is not None:
            continue_from(self.chunks, self.init, len(self.rows), self.chosen.param)

    def finish(self, model: nn.Module) -> RenderResult:
        """The result once the chunks ran :attr:`first_steps`: with ``restarts`` candidates per
        objective, the best of each, optimised alone for the steps left after
        ``select_after``."""
        rendered = Rendered.of(self.chunks)
        ascent, chunks = self.ascent, self.chunks
        masks = torch.cat([c.normalised_mask() for c in chunks]) if ascent.track_mask else None
        restarts, settings = self.chosen.restarts, self.settings
        if restarts == 1:
            return RenderResult(rendered.images, rendered.steps, rendered.params, masks)
        rows, size = self.rows, self.size
        best = best_candidates(
            model, rows, rendered.images, restarts, ascent, size, settings.output_fn,
            self.chosen.select_by,
        )  # fmt: skip
        kept = rendered.pick(best)
        masks = None if masks is None else masks[best]
        if self.first_steps < self.chosen.steps:
            more = continue_kept(
                model,
                [rows[int(i)] for i in best],
                kept.params,
                replace(settings, n_images=1),
                size=max(1, size // restarts),
                steps=self.chosen.steps - self.first_steps,
                ascent=replace(ascent, track_mask=False),
            )
            kept = Rendered(more.images, more.params, kept.steps + more.steps)
        return RenderResult(kept.images, kept.steps, kept.params, masks)


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
        Output shape (without the batch dimension) of every layer read, and of
        :data:`~lightning_neurons.visualize.objectives.LOGITS`.

    Raises:
        NeuronsError: For an unknown layer, a channel, position or class index outside the
            layer's real output, or a model that does not accept the images.

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> from lightning_neurons.visualize import Channel
        >>> check_objectives(SmallCNN(), [Channel("features.conv2", 0)], (1, 32, 32))
        {'features.conv2': (64, 16, 16), '<logits>': (10,)}
        >>> check_objectives(SmallCNN(), [Channel("features.conv2", 64)], (1, 32, 32))
        Traceback (most recent call last):
        ...
        lightning_neurons.errors.NeuronsError: ...
    """
    objectives = as_objectives(objectives)
    shape = check_display_shape(image_shape)
    return probe(model, objectives, shape, input_transform, output_fn).shapes


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

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> from lightning_neurons.visualize import Channel
        >>> evaluate(SmallCNN().eval(), Channel("features.conv2", 0), torch.rand(3, 1, 32, 32)).shape
        torch.Size([3])
    """
    if isinstance(objectives, Objective):
        objectives = [objectives] * len(images)
    objectives = as_objectives(objectives)
    if len(objectives) != len(images):
        raise NeuronsError(
            f"need one objective per image: {len(objectives)} objectives, {len(images)} images"
        )
    if batch_size is not None:
        check_positive("batch_size", batch_size, integer=True)
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
            scoring = Scoring(objectives[start : start + size], output_fn=output_fn)
            image = images[start : start + size].to(device)
            x = to_model_input(image, input_transform)
            with scoring.attached(model):
                values.append(scoring.forward(model, x, image).float().cpu())
    return torch.cat(values)
