"""FeatureVisualizer's rendering: the options of its gradient ascent, and the renderer that
shares the work between DDP ranks and continues the last round's images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import BatchReader
from lightning_neurons.callbacks._memory import ContinuationMemory, Signature
from lightning_neurons.callbacks._plan import VisualizerPlan
from lightning_neurons.checks import (
    check_choice,
    check_int,
    check_number,
    check_optional_positive_int,
    check_positive_int,
)
from lightning_neurons.distributed import concat, map_shares
from lightning_neurons.errors import NeuronsError
from lightning_neurons.visualize.continuation import choose_candidates
from lightning_neurons.visualize.objectives import ChannelGroup, Objective
from lightning_neurons.visualize.prior import DataPrior
from lightning_neurons.visualize.render import render, view_transforms


@dataclass(frozen=True)
class RenderOptions:
    """How FeatureVisualizer renders its images by gradient ascent
    (:func:`~lightning_neurons.visualize.render`); in YAML, the mapping under ``render:``.

    Args:
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
            ``preference/<layer>/steps`` (their mean). ``None`` or ``0``: always the full count.
        converge_window: Steps between two convergence checks (so at least twice this many
            per round).
        lr: Adam's learning rate.
        param: ``"maco"`` (default: only the spectrum's phase is optimised; amplitudes and pixel
            statistics are the validation data's, estimated from the first ``prior_images``
            validation images and cached; see ``FeatureVisualizer.reset_prior``), ``"fft"`` or
            ``"pixel"``. ``"maco"`` needs display images: with an input transform other than
            :class:`~lightning_neurons.data.Normalize` (which is inverted), pass ``prior=``, or
            the callback warns and renders with ``"fft"``.
        transforms: ``"robust"`` (default) or ``"standard"`` random jitter, scale and rotation,
            or ``"none"``.
        contrast: ``"maco"``: scale of channel images' patterns relative to the data's spread.
        class_contrast: ``"maco"``: the same for class images (1.0: the data's own spread).
        views: Randomly transformed copies of every channel image scored at each step.
        class_views: The same for class images (an ensemble of augmentations: class images
            that other models recognise more often, at ``class_views`` times the cost).
        class_restarts: Class image candidates rendered from different seeds in the first
            round (``class_restarts`` times its cost); the model of that epoch picks the best
            over random views (``class_select_by``).
        class_continue: What the later rounds continue: ``"best"`` (default), the first round's
            best candidate of each class, alone with every view; ``"all"``, every candidate,
            each with ``class_views // class_restarts`` views (at least 1), and each round shows
            the best on its model, so a candidate that lost on an early epoch's model can win on
            a later one. On the demo ``"best"`` is recognised by other models as often or more,
            at half the work of a later round (``docs/benchmarks.md``).
        class_select_by: How the candidates are compared over 16 random views:
            ``"agreement"`` (the most views on which the model's top class is the image's class,
            ties broken by the class's mean log-probability) or ``"value"`` (the highest mean
            logit); see ``render(select_by=)``.
        class_select_after: Keep the best candidate after this many steps of the first round
            and spend the other steps on it alone (see ``render(select_after=)``), as
            ``class_continue="best"`` does. ``None``: after all of them.
        class_anchor: Weight of each class image's anchor (:mod:`~lightning_neurons.visualize.anchors`):
            the image maximises ``ClassLogit(c) - class_anchor * ClassAnchor(c)``, the
            standardised squared distance of ``class_anchor_layer``'s output from its mean over
            the first ``class_anchor_images`` validation images of class ``c`` on the epoch's
            model. It pulls the image towards how the model sees real members of the class, so
            that other models recognise it too (on the demo: every judge, every render seed
            measured, at the same cost; ``docs/benchmarks.md``). ``0``: the logit alone.
        class_anchor_images: Validation images kept per rendered class for the anchors (the
            first ones in the validation order, the same on every DDP rank;
            ``class_anchor_images x`` the rendered classes in all, kept where the batches are,
            without making a batch wait for the GPU).
        class_anchor_layer: The anchored layer; default: the deepest visualized layer whose
            output has positions (a feature map, or tokens).
        n_images: Images per channel, made different by a diversity term (Olah et al., 2017);
            TensorBoard shows one row per channel.
        diversity: Weight of the diversity term when ``n_images > 1``.
        diversity_on: ``"features"`` (Olah et al.: the images of a channel must differ in the
            Gram matrix of the channel's layer, i.e. in what the layer sees) or ``"pixels"``.
        l2: Weight of an L2 penalty on the rendered images.
        tv: Weight of a total-variation penalty on the rendered images.
        seed: Seed of the rendering (same seed: same starting images every epoch).
        batch_size: Render at most this many images at once (default: a layer at once).

    Raises:
        NeuronsError: For a value out of its range.

    Example:
        >>> RenderOptions(steps=128, lr=0.05).continue_steps
        16
    """

    steps: int = 64
    continue_steps: int | None = 16
    converge_tol: float | None = 0.005
    converge_window: int = 4
    lr: float = 0.1
    param: Literal["maco", "fft", "pixel"] = "maco"
    transforms: Literal["robust", "standard", "none"] = "robust"
    contrast: float = 2.0
    class_contrast: float = 1.0
    views: int = 1
    class_views: int = 2
    class_restarts: int = 4
    class_continue: Literal["best", "all"] = "best"
    class_select_after: int | None = None
    class_select_by: Literal["agreement", "value"] = "agreement"
    class_anchor: float = 10.0
    class_anchor_images: int = 8
    class_anchor_layer: str | None = None
    n_images: int = 1
    diversity: float = 1.0
    diversity_on: Literal["features", "pixels"] = "features"
    l2: float = 0.0
    tv: float = 0.0
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        checked = {
            "steps": check_positive_int("steps", self.steps),
            "continue_steps": check_optional_positive_int("continue_steps", self.continue_steps),
            "converge_tol": None
            if self.converge_tol is None
            else check_number("converge_tol", self.converge_tol) or None,
            "converge_window": check_positive_int("converge_window", self.converge_window),
            "lr": check_number("lr", self.lr, strict=True),
            "param": check_choice("param", self.param, ("fft", "pixel", "maco")),
            "transforms": check_choice(
                "transforms", self.transforms, ("standard", "none", "robust")
            ),
            "contrast": check_number("contrast", self.contrast, strict=True),
            "class_contrast": check_number("class_contrast", self.class_contrast, strict=True),
            "views": check_positive_int("views", self.views),
            "class_views": check_positive_int("class_views", self.class_views),
            "class_restarts": check_positive_int("class_restarts", self.class_restarts),
            "class_continue": check_choice("class_continue", self.class_continue, ("best", "all")),
            "class_select_after": self._select_after(),
            "class_select_by": check_choice(
                "class_select_by", self.class_select_by, ("agreement", "value")
            ),
            "class_anchor": check_number("class_anchor", self.class_anchor),
            "class_anchor_images": check_positive_int(
                "class_anchor_images", self.class_anchor_images
            ),
            "class_anchor_layer": self._anchor_layer(),
            "n_images": check_positive_int("n_images", self.n_images),
            "diversity": check_number("diversity", self.diversity),
            "diversity_on": check_choice("diversity_on", self.diversity_on, ("features", "pixels")),
            "l2": check_number("l2", self.l2),
            "tv": check_number("tv", self.tv),
            "seed": check_int("seed", self.seed),
            "batch_size": check_optional_positive_int("batch_size", self.batch_size),
        }
        assert set(checked) == {f.name for f in fields(self)}
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def _select_after(self) -> int | None:
        after = check_optional_positive_int("class_select_after", self.class_select_after)
        if after is not None and self.class_continue == "all":
            raise NeuronsError(
                f"`class_select_after={after}` keeps one candidate per class in the first round, "
                "but `class_continue='all'` continues every candidate: leave `class_select_after` "
                "unset, or use `class_continue='best'`"
            )
        return after

    def _anchor_layer(self) -> str | None:
        layer = self.class_anchor_layer
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise NeuronsError(f"`class_anchor_layer` must be a layer name or None, got {layer!r}")
        return layer


@dataclass(frozen=True)
class Part:
    """Objectives rendered in one batch with others: the parameters they continue (``None``:
    from noise) and each objective's first noise row (``render(first_row=)``)."""

    objectives: list[Objective]
    init: torch.Tensor | None
    firsts: list[int]


class RoundImages(NamedTuple):
    """A round's images and the steps each ran: ``{layer: (images, steps)}`` of its channels and
    of its clusters."""

    channels: dict[str, tuple[torch.Tensor, torch.Tensor]]
    clusters: dict[str, tuple[torch.Tensor, torch.Tensor]]


class Renderer:
    """Renders a round's images for a FeatureVisualizer.

    Under DDP each rank renders a contiguous share of the objectives, each row from the noise it
    has in the whole rendering (``first_row``), and every rank gets every image: the images of
    one process. Every rendering continues the last round's parameters of the same key and
    signature (:class:`~lightning_neurons.callbacks._memory.ContinuationMemory`).

    Args:
        options: The render options.
        plan: What the round renders (image shape, input transform).
        reader: Reads the model's logits from its output.
        prior: The data prior for ``param="maco"`` (``None``: rendered with ``"fft"``).
        memory: The continuation memory (read and updated).
        rank: This rank.
        world: The number of ranks.
    """

    def __init__(
        self,
        options: RenderOptions,
        plan: VisualizerPlan,
        reader: BatchReader,
        prior: DataPrior | None,
        memory: ContinuationMemory,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.options, self.plan, self.reader = options, plan, reader
        self.prior, self.memory = prior, memory
        self.rank, self.world = rank, world
        maco = options.param == "maco"
        self.param = options.param if prior is not None or not maco else "fft"

    def signature(self, *parts: object) -> Signature:
        """What a rendering's parameters are made for (see :class:`ContinuationMemory`)."""
        return (
            self.param,
            tuple(self.plan.shape),
            *parts,
            self.options.n_images,
            self.options.seed,
        )

    def images(
        self, model: nn.Module, key: str, objectives: list[Objective], classes: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of ``objectives`` (continued from the last round's parameters of ``key``
        when they were rendered for the same objectives) and the steps each ran, on every rank.

        Class images continue the first round's best candidate of each class alone, or, with
        ``class_continue="all"``, keep every candidate (``class_restarts``) from round to round
        and show the best of each class on the round's model (see :meth:`candidates`)."""
        o = self.options
        alive = classes and o.class_restarts > 1 and o.class_continue == "all"
        kept = ("candidates", o.class_restarts) if alive else ()
        signature = self.signature(tuple(repr(obj) for obj in objectives), *kept)
        progress.phase(f"rendering {key} ({len(objectives)} objectives)")
        init = self.memory.start(key, signature)
        restarts = o.class_restarts if classes and init is None and not alive else 1
        # parameters kept per objective: its candidates, its kept candidate, or its images
        per_objective = o.class_restarts if alive else 1 if classes else o.n_images

        def rows(part: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            block = (
                None
                if init is None
                else init[part.start * per_objective : part.stop * per_objective]
            )
            if alive:
                first = part.start * per_objective
                return self.candidates(model, objectives[part], block, first)
            first_row = part.start * per_objective * restarts
            return self.rows(model, objectives[part], block, first_row, classes, restarts)

        done = map_shares(rows, len(objectives), self.rank, self.world, "rendering")
        images, params, steps = concat(done)
        self.memory.keep(key, signature, params)
        return images.cpu(), steps

    def round(
        self,
        model: nn.Module,
        objectives: dict[str, list[Objective]],
        members: Mapping[str, list[list[int]]] | None = None,
    ) -> RoundImages:
        """A round's channel images (``{layer: objectives}``) and cluster images (``{layer:
        channel lists}``, the same on every rank), and the steps each ran, on every rank.

        Each image is the one a rendering of its layer's objectives alone gives (each row from
        its own layer's noise; a layer's clusters each from the noise of its place among the
        round's new clusters), continued from the last round's parameters when they were
        rendered for the same objectives. Clusters change between analyses (their ids are
        arbitrary, a few neurons move), so each cluster continues the image of the last round's
        cluster of its layer it shares most neurons with
        (:meth:`ContinuationMemory.match_clusters`); the others start from noise.

        Everything continued is rendered in one rendering, everything from noise in another
        (:meth:`parts`): on an accelerator a rendering of 16 images costs about what one of a
        few hundred does, so one rendering instead of one per layer and kind."""
        members = members or {}
        keys = {layer: self.signature(tuple(map(repr, o))) for layer, o in objectives.items()}
        parts = self._round_parts(objectives, members, keys)
        total, layers = sum(map(len, objectives.values())), len(objectives)
        what = []
        if objectives:
            what.append(f"channels ({total} objectives of {layers} layers)")
        if members:
            what.append(f"clusters ({len(parts) - layers} clusters of {len(members)} layers)")
        progress.phase(f"rendering {' and '.join(what)}")
        done = dict(zip(parts, self.parts(model, list(parts.values())), strict=True))
        channels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in objectives:
            images, params, steps = done[(layer, -1)]
            self.memory.keep(layer, keys[layer], params.clone())
            channels[layer] = images, steps
        clusters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, groups in members.items():
            images, params, steps = concat([done[(layer, i)] for i in range(len(groups))])
            self.memory.keep(f"clusters/{layer}", self.signature(), params, groups)
            clusters[layer] = images, steps
        return RoundImages(channels, clusters)

    def _round_parts(
        self,
        objectives: dict[str, list[Objective]],
        members: Mapping[str, list[list[int]]],
        keys: dict[str, Signature],
    ) -> dict[tuple[str, int], Part]:
        """The parts of a round, layer by layer: ``(layer, -1)`` its channels, ``(layer, i)`` its
        ``i``-th cluster (the ``k``-th cluster from noise starts from the noise of row
        ``k x n_images``, as in a rendering of the new clusters alone)."""
        n = self.options.n_images
        counted = {True: 0, False: 0}  # clusters continued and from noise so far
        parts: dict[tuple[str, int], Part] = {}
        for layer in dict.fromkeys([*objectives, *members]):
            if layer in objectives:
                firsts = [j * n for j in range(len(objectives[layer]))]
                init = self.memory.start(layer, keys[layer])
                parts[(layer, -1)] = Part(objectives[layer], init, firsts)
            groups = members.get(layer, [])
            matched = self.memory.match_clusters(f"clusters/{layer}", self.signature(), groups, n)
            for i, (group, init) in enumerate(zip(groups, matched, strict=True)):
                k = counted[init is not None]
                counted[init is not None] += 1
                parts[(layer, i)] = Part([ChannelGroup(layer, group)], init, [k * n])
        return parts

    def parts(
        self, model: nn.Module, parts: Sequence[Part]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each part's images, parameters and steps: the continued parts in one rendering
        (:meth:`shared`), those from noise in another."""
        n = self.options.n_images
        found: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for continued in (True, False):
            chosen = [j for j, part in enumerate(parts) if (part.init is not None) == continued]
            if not chosen:
                continue
            objectives = [o for j in chosen for o in parts[j].objectives]
            firsts = [first for j in chosen for first in parts[j].firsts]
            inits = [init for j in chosen if (init := parts[j].init) is not None]
            images, params, steps = self.shared(
                model, objectives, torch.cat(inits) if inits else None, firsts
            )
            at = 0
            for j in chosen:
                rows = slice(at, at + len(parts[j].objectives) * n)
                found[j] = images[rows], params[rows], steps[rows]
                at = rows.stop
        return [found[j] for j in range(len(parts))]

    def shared(
        self,
        model: nn.Module,
        objectives: list[Objective],
        init: torch.Tensor | None,
        firsts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, parameters and steps of the channel ``objectives``, objective ``j`` from the
        noise of row ``firsts[j]``: each rank renders its share, every rank gets all."""
        n = self.options.n_images

        def share(part: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            block = None if init is None else init[part.start * n : part.stop * n]
            return self.rows(model, objectives[part], block, firsts[part], False, 1)

        return concat(map_shares(share, len(objectives), self.rank, self.world, "rendering"))

    def candidates(
        self, model: nn.Module, objectives: list[Objective], init: torch.Tensor | None, first: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class images of ``objectives`` on this rank, every candidate kept
        (``class_continue="all"``): ``class_restarts`` rows per class, from noise with
        ``class_views`` views each (the first round, as ``render(restarts=)``), or continued
        with ``class_views // class_restarts`` (at least 1). Returns the best candidate of each
        class on this model (``class_select_by``) and its steps, and the parameters of every
        candidate: a candidate that was not the best in an early epoch can be in a later one."""
        o = self.options
        count = o.class_restarts
        rows = [objective for objective in objectives for _ in range(count)]
        views = None if init is None else max(1, o.class_views // count)
        images, params, steps = self.rows(model, rows, init, first, True, 1, views)
        best = choose_candidates(
            model,
            rows,
            images,
            count,
            transforms=view_transforms(o.transforms, self.plan.shape, self.prior),
            input_transform=self.plan.transform,
            seed=o.seed,
            size=o.batch_size or 64,
            output_fn=self.reader.output_fn,
            select_by=o.class_select_by,
        )
        return images[best], params, steps[best]

    def rows(
        self,
        model: nn.Module,
        objectives: list[Objective],
        init: torch.Tensor | None,
        first_row: int | Sequence[int],
        classes: bool,
        restarts: int,
        views: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (CPU), parameters and steps run of ``objectives``, rendered on this rank
        (``views``: instead of ``views`` or ``class_views``)."""
        o = self.options
        result = render(
            model,
            objectives,
            image_shape=self.plan.shape,
            steps=o.steps if init is None else o.continue_steps,
            init=init,
            first_row=first_row,
            converge_tol=o.converge_tol or 0.0,
            converge_window=o.converge_window,
            lr=o.lr,
            param=self.param,  # type: ignore[arg-type]
            transforms=o.transforms,
            input_transform=self.plan.transform,
            output_fn=self.reader.output_fn,
            seed=o.seed,
            batch_size=o.batch_size,
            l2=o.l2,
            tv=o.tv,
            prior=self.prior,
            contrast=o.class_contrast if classes else o.contrast,
            views=views or (o.class_views if classes else o.views),
            n_images=1 if classes else o.n_images,
            diversity=o.diversity,
            diversity_on=o.diversity_on,
            restarts=restarts,
            select_after=o.class_select_after if restarts > 1 else None,
            select_by=o.class_select_by if classes else "value",
        )
        return result.images.cpu(), result.params, result.steps
