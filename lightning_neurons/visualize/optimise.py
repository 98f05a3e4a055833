"""The optimisation loop: Adam steps on the images of every chunk of a rendering.

A rendering's rows (one per image) are cut into chunks (:class:`Chunk`); at each step the chunks
run one after another, so only one chunk's activations are alive, and share one optimiser step.
The rows stay independent: the loss is the sum of the rows' values, the model runs in eval mode
(BatchNorm uses its running statistics) and Adam updates every parameter element on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import BatchFn, InputTransform, to_model_input
from lightning_neurons.device_copies import DeviceCopies
from lightning_neurons.hooks import hooked
from lightning_neurons.visualize.objectives import Objective
from lightning_neurons.visualize.param import Param, parametrize, row_seed
from lightning_neurons.visualize.penalties import (
    Convergence,
    Penalties,
    diversity_layer,
    similarity_to_others,
)
from lightning_neurons.visualize.prior import DataPrior
from lightning_neurons.visualize.scoring import Dispatch, Scoring
from lightning_neurons.visualize.transforms import apply_transforms


@dataclass(frozen=True)
class ChunkSettings:
    """How every chunk of one rendering is parametrised and scored."""

    param: Param
    image_shape: tuple[int, int, int]
    seed: int
    decorrelate: bool
    device: torch.device
    prior: DataPrior | None
    contrast: float
    views: int
    #: Consecutive rows of one objective (its images, or its candidates).
    n_images: int
    output_fn: BatchFn | None = None
    #: What the diversity term compares: ``"features"`` (Gram matrices), ``"pixels"``, or
    #: ``None`` when no term compares the images (no Gram matrix is taken).
    diversity_on: str | None = "features"
    #: Layers whose outputs have positions (``[B, C, ...]`` with C > 1 and positions >= 1).
    spatial: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Ascent:
    """How the images climb: the optimiser, the random views and what is subtracted."""

    lr: float
    transforms: Sequence[Callable]
    input_transform: InputTransform | None
    seed: int
    penalties: Penalties
    convergence: Convergence | None = None
    #: Accumulate ``|d loss / d image|`` per pixel (MaCo's transparency mask).
    track_mask: bool = False


class Chunk:
    """Rows ``indices`` of a rendering: their scoring hooks, parametrization, steps and mask."""

    def __init__(
        self, objectives: Sequence[Objective], indices: Sequence[int], settings: ChunkSettings
    ) -> None:
        self.views = settings.views
        self.n_images = settings.n_images
        self.output_fn = settings.output_fn
        self.objectives = list(objectives)
        #: Each row's layer for the diversity term (``None``: its pixels).
        self._diversity_layers = [
            diversity_layer(o, settings.spatial) if settings.diversity_on == "features" else None
            for o in objectives
        ]
        self.params, self.image_fn = parametrize(
            settings.param,
            (len(indices), *settings.image_shape),
            [row_seed(settings.seed, i) for i in indices],
            decorrelate=settings.decorrelate,
            device=settings.device,
            prior=settings.prior,
            contrast=settings.contrast,
        )
        self.mask: torch.Tensor | None = None
        #: Adam steps each row has run.
        self.steps = torch.zeros(len(indices), dtype=torch.int64)
        #: Rows still optimised (``None``: all); the others are frozen (see :meth:`freeze`).
        self.active: torch.Tensor | None = None
        # the running and the frozen rows' indices on the images' device, copied at each freeze
        # rather than at every step (a copy to a GPU waits for it)
        self._active = self._frozen = DeviceCopies(torch.zeros(0, dtype=torch.int64))
        self._frozen_params: torch.Tensor | None = None
        self._check_scoring: Scoring | None = None  # the running rows' (until a freeze)
        self.checked_objectives: list[Objective] = []  # the objectives it scores
        self._checked: torch.Tensor | None = None  # the running rows' values at the last check
        self._calm = torch.zeros(0, dtype=torch.int64)  # checks in a row each rose < tol
        self._score_rows(range(len(indices)))

    def _score_rows(self, rows: Sequence[int]) -> None:
        """Score the rows ``rows`` (every view of their images is a batch row of its own); the
        Gram matrices of the diversity term only where an objective has several images (one
        row's, at 2,048 channels, is 16 MB)."""
        self.diversity_layers = layers = [self._diversity_layers[i] for i in rows]
        # the rows each layer's Gram matrices (None: the pixels) compare, on the device once
        picked: dict[str | None, list[int]] = {}
        for i, layer in enumerate(layers):
            picked.setdefault(layer, []).append(i)
        self._compared: dict[str | None, DeviceCopies] = {
            layer: DeviceCopies(torch.tensor(found)) for layer, found in picked.items()
        }
        grams: dict[str, list[int]] = {}
        if self.n_images > 1:  # every view of each row that compares the layer, view by view
            for view in range(self.views):
                for i, layer in enumerate(layers):
                    if layer is not None:
                        grams.setdefault(layer, []).append(view * len(layers) + i)
        #: The objective of every batch row: each running row's, view after view.
        self.scored = [self.objectives[i] for i in rows] * self.views
        self.scoring = Scoring(self.scored, output_fn=self.output_fn, gram_layers=grams)

    @property
    def running(self) -> bool:
        """Whether any row of the chunk is still optimised."""
        return self.active is None or len(self.active) > 0

    def rows_image(self) -> torch.Tensor:
        """The images of the running rows (all rows' parameters go through ``image_fn``: the
        parametrisation is cheap next to the model)."""
        image = self.image_fn()
        return image if self.active is None else image[self._active.on(image.device)]

    def check(
        self,
        model: nn.Module,
        dispatch: Dispatch,
        input_transform: InputTransform | None,
        convergence: Convergence,
    ) -> None:
        """Score the running rows without transforms; freeze those that have converged."""
        if not self.running:
            return
        scoring = self.check_scoring()
        with torch.no_grad():
            image = self.rows_image()
            dispatch.current = scoring
            value = scoring.forward(model, to_model_input(image, input_transform), image)
        self.record(value.detach().float().cpu(), convergence)

    def check_scoring(self) -> Scoring:
        """The scoring of the running rows without views (:attr:`checked_objectives`), kept
        until a freeze: its indices go to the device once."""
        if self._check_scoring is None:
            rows = range(len(self.objectives)) if self.active is None else self.active.tolist()
            self.checked_objectives = [self.objectives[i] for i in rows]
            self._check_scoring = Scoring(self.checked_objectives, output_fn=self.output_fn)
        return self._check_scoring

    def record(self, value: torch.Tensor, convergence: Convergence) -> None:
        """Freeze the running rows whose objective has converged, given their values now
        (``[running rows]``, CPU; the first check only records them)."""
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
        self._active = DeviceCopies(self.active)
        self._check_scoring = None
        frozen = torch.ones(len(self.steps), dtype=torch.bool)
        frozen[self.active] = False
        self._frozen = DeviceCopies(frozen.nonzero().flatten())
        self._frozen_params = self.params[0].detach().clone()
        self._score_rows(self.active.tolist())

    def restore_frozen(self) -> None:
        """Put the frozen rows' parameters back after an optimiser step."""
        if self.active is None or self._frozen_params is None:
            return
        with torch.no_grad():
            p = self.params[0]
            index = self._frozen.on(p.device)  # indices, not a mask: a mask's count would wait
            p[index] = self._frozen_params[index]

    def similarity(self, image: torch.Tensor) -> torch.Tensor:
        """Each row's mean cosine similarity to the other images of its objective: on the Gram
        matrix of its diversity layer (averaged over the views), or on its centred pixels."""
        if not self.scoring.grams:
            return similarity_to_others(image, self.n_images)
        similarity = torch.zeros(len(self.diversity_layers), device=image.device)
        for layer, rows in self._compared.items():
            index = rows.on(image.device)  # a Python list as an index is a copy at every step
            if layer is None:
                values = similarity_to_others(image, self.n_images).index_select(0, index)
            elif (grams := self.scoring.grams.get(layer)) is not None:
                grams = grams.view(self.views, len(rows.tensor), -1)
                # an objective's images are consecutive rows of one layer: groups stay whole
                values = similarity_to_others(grams.mean(dim=0), self.n_images, centre=False)
            else:
                continue
            similarity = similarity.index_copy(0, index, values)
        return similarity

    def add_to_mask(self, image: torch.Tensor) -> None:
        """Accumulate ``|d loss / d image|`` (summed over the channels) after a backward pass."""
        if image.grad is None:
            return
        grad = image.grad.detach().abs().sum(dim=1, keepdim=True)
        if self.active is not None:  # only the running rows are in the batch
            full = grad.new_zeros((len(self.steps), *grad.shape[1:]))
            grad = full.index_copy(0, self._active.on(grad.device), grad)
        self.mask = grad if self.mask is None else self.mask + grad

    def normalised_mask(self) -> torch.Tensor:
        """The accumulated mask scaled to [0, 1] per image (zeros if nothing was accumulated)."""
        if self.mask is None:
            with torch.no_grad():
                return torch.zeros_like(self.image_fn()[:, :1])
        peak = self.mask.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return self.mask / peak


def chunks_of(
    rows: Sequence[Objective],
    size: int,
    settings: ChunkSettings,
    first_row: int | Sequence[int] = 0,
) -> list[Chunk]:
    """``rows`` (one objective per image) in chunks of at most ``size``; row ``i`` is row
    ``first_row + i`` of the rendering, or row ``first_row[i]`` (its seed).

    On CPU a chunk holds only consecutive rows that read the same layers: its forward pass stops
    after the deepest layer its rows read, so a shallow layer's rows do not pay for a deeper
    one's. On an accelerator, where a small batch costs what its kernel launches cost, rows of
    every layer share a chunk."""
    seeds = range(first_row, first_row + len(rows)) if isinstance(first_row, int) else first_row
    if len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} row seeds for {len(rows)} rows")
    bounds = _same_layers(rows) if settings.device.type == "cpu" else [(0, len(rows))]
    return [
        Chunk(rows[i : min(i + size, stop)], seeds[i : min(i + size, stop)], settings)
        for start, stop in bounds
        for i in range(start, stop, size)
    ]


def _same_layers(rows: Sequence[Objective]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive rows that read the same layers."""
    keys = [(row.layers, row.needs_logits) for row in rows]
    starts = [i for i in range(len(rows)) if i == 0 or keys[i] != keys[i - 1]]
    return list(zip(starts, [*starts[1:], len(rows)], strict=True))


def optimise(model: nn.Module, chunks: Sequence[Chunk], steps: int, ascent: Ascent) -> None:
    """Adam steps on every chunk's parameters; at each step the chunks run one after another
    and share one optimiser step. With ``ascent.convergence``, rows that have converged leave
    their chunk's batch; the loop ends when none is left."""
    optimizer = torch.optim.Adam([p for chunk in chunks for p in chunk.params], lr=ascent.lr)
    # One stream for the transforms: every chunk gets the same draw at a step (rows share it;
    # the draw does not depend on how many rows a chunk runs).
    generator = torch.Generator().manual_seed(int(ascent.seed))
    layers = list(dict.fromkeys(n for chunk in chunks for n in chunk.scoring.scorer.layers))
    convergence = ascent.convergence
    dispatch = Dispatch()
    with hooked(model, layers, dispatch):
        for step in range(steps):
            if convergence is not None and step % convergence.window == 0:
                for chunk in chunks:
                    chunk.check(model, dispatch, ascent.input_transform, convergence)
                if not any(chunk.running for chunk in chunks):
                    break
            optimizer.zero_grad(set_to_none=True)
            state = generator.get_state()
            for chunk in chunks:
                progress.update("step", step + 1, steps)
                if chunk.running:  # a frozen chunk has no gradient: Adam leaves it alone
                    generator.set_state(state)
                    dispatch.current = chunk.scoring
                    _step(model, chunk, ascent, generator)
            optimizer.step()
            for chunk in chunks:
                chunk.restore_frozen()


#: A rendering run with others by :func:`optimise_together`: its one chunk, how it climbs, and
#: its steps.
Together = tuple[Chunk, Ascent, int]


def optimise_together(model: nn.Module, renderings: Sequence[Together]) -> None:
    """:func:`optimise` for several renderings of one chunk each, in one batch: at each step the
    views of every running chunk (each rendering's own random draws) go through the model in one
    forward and one backward pass. Each rendering keeps its learning rate, random stream,
    penalties, convergence test and steps, so each image is the one its rendering alone gives
    (up to the floating-point differences of batched kernels): Adam updates every element on
    its own, and a row's value depends on its own image only (the model in eval mode)."""
    optimizer = torch.optim.Adam([{"params": c.params, "lr": a.lr} for c, a, _ in renderings])
    generators = [torch.Generator().manual_seed(int(a.seed)) for _, a, _ in renderings]
    layers = list(dict.fromkeys(n for c, _, _ in renderings for n in c.scoring.scorer.layers))
    most = max(steps for _, _, steps in renderings)
    dispatch, scoring, checks = Dispatch(), _JointScoring(), _JointScoring()
    with hooked(model, layers, dispatch):
        for step in range(most):
            due = [
                (chunk, ascent)
                for chunk, ascent, steps in renderings
                if step < steps
                and chunk.running
                and ascent.convergence is not None
                and step % ascent.convergence.window == 0
            ]
            if due:
                _check_together(model, due, dispatch, checks)
            live = [j for j, (c, _, steps) in enumerate(renderings) if step < steps and c.running]
            if not live:
                break
            progress.update("step", step + 1, most)
            optimizer.zero_grad(set_to_none=True)
            joint = [(*renderings[j][:2], generators[j]) for j in live]
            _joint_step(model, joint, dispatch, scoring)
            optimizer.step()
            for chunk, _, _ in renderings:
                chunk.restore_frozen()


class _JointScoring:
    """The scoring of several scorings' batch rows, one's after another's: made again when the
    scorings change (a freeze gives a chunk new ones)."""

    def __init__(self) -> None:
        self._of: tuple[Scoring, ...] = ()
        self._scoring: Scoring | None = None

    def of(
        self, parts: Sequence[tuple[Scoring, list[Objective]]], output_fn: BatchFn | None
    ) -> Scoring:
        """The scoring of every part's rows (``(scoring, its batch rows' objectives)``)."""
        key = tuple(scoring for scoring, _ in parts)
        same = len(key) == len(self._of) and all(a is b for a, b in zip(key, self._of, strict=True))
        if self._scoring is None or not same:
            rows = [objective for _, objectives in parts for objective in objectives]
            self._scoring = Scoring(rows, output_fn=output_fn)
            self._of = key
        return self._scoring


def _check_together(
    model: nn.Module,
    due: Sequence[tuple[Chunk, Ascent]],
    dispatch: Dispatch,
    checks: _JointScoring,
) -> None:
    """The convergence checks of several chunks in one forward pass (and one copy of the values
    to the host): each chunk's running rows without transforms, as :meth:`Chunk.check`."""
    parts = [(chunk.check_scoring(), chunk.checked_objectives) for chunk, _ in due]
    scoring = checks.of(parts, due[0][0].output_fn)
    with torch.no_grad():
        images = [chunk.rows_image() for chunk, _ in due]
        x = torch.cat(
            [to_model_input(i, a.input_transform) for i, (_, a) in zip(images, due, strict=True)]
        )
        dispatch.current = scoring
        shown = torch.cat(images) if scoring.scorer.needs_image else None
        values = scoring.forward(model, x, shown).detach().float().cpu()
    start = 0
    for image, (chunk, ascent) in zip(images, due, strict=True):
        assert ascent.convergence is not None
        chunk.record(values[start : start + len(image)], ascent.convergence)
        start += len(image)


def _joint_step(
    model: nn.Module,
    joint: Sequence[tuple[Chunk, Ascent, torch.Generator]],
    dispatch: Dispatch,
    scorings: _JointScoring,
) -> None:
    """The gradient of the running rows of several chunks, in one forward and backward pass."""
    images = [chunk.rows_image() for chunk, _, _ in joint]
    inputs = []
    for image, (chunk, ascent, generator) in zip(images, joint, strict=True):
        views = [apply_transforms(image, ascent.transforms, generator) for _ in range(chunk.views)]
        x = torch.cat(views) if chunk.views > 1 else views[0]
        inputs.append(to_model_input(x, ascent.input_transform))
    scoring = scorings.of([(c.scoring, c.scored) for c, _, _ in joint], joint[0][0].output_fn)
    shown = None
    if scoring.scorer.needs_image:  # the pixels of every view's row
        counts = [chunk.views for chunk, _, _ in joint]
        shown = torch.cat([i.repeat(n, 1, 1, 1) for i, n in zip(images, counts, strict=True)])
    dispatch.current = scoring
    values = scoring.forward(model, torch.cat(inputs), shown)
    loss, start = None, 0
    for image, (chunk, ascent, _) in zip(images, joint, strict=True):
        stop = start + len(image) * chunk.views
        value = values[start:stop].view(chunk.views, -1).mean(dim=0)
        value = -ascent.penalties.apply(value, image, chunk).sum()
        loss = value if loss is None else loss + value
        chunk.steps[slice(None) if chunk.active is None else chunk.active] += 1
        start = stop
    assert loss is not None
    loss.backward()


def _step(model: nn.Module, chunk: Chunk, ascent: Ascent, generator: torch.Generator) -> None:
    """The gradient of the chunk's running rows (their negative penalised values)."""
    image = chunk.rows_image()
    if ascent.track_mask:
        image.retain_grad()
    value = views_value(model, chunk, image, ascent, generator)
    value = ascent.penalties.apply(value, image, chunk)
    (-value.sum()).backward()
    if ascent.track_mask:
        chunk.add_to_mask(image)
    chunk.steps[slice(None) if chunk.active is None else chunk.active] += 1


def views_value(
    model: nn.Module,
    chunk: Chunk,
    image: torch.Tensor,
    ascent: Ascent,
    generator: torch.Generator,
) -> torch.Tensor:
    """Every row's value, averaged over ``chunk.views`` random views of its image: ``[R]``."""
    views = [apply_transforms(image, ascent.transforms, generator) for _ in range(chunk.views)]
    x = to_model_input(torch.cat(views) if chunk.views > 1 else views[0], ascent.input_transform)
    repeated = image.repeat(chunk.views, 1, 1, 1) if chunk.views > 1 else image
    value = chunk.scoring.forward(model, x, repeated)
    return value.view(chunk.views, -1).mean(dim=0)
