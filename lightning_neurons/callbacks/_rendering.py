"""FeatureVisualizer's renderer: shares the work between DDP ranks, continues the last round's
images, and runs a round's renderings together."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import BatchReader
from lightning_neurons.callbacks._memory import ContinuationMemory, Signature
from lightning_neurons.callbacks._plan import VisualizerPlan
from lightning_neurons.callbacks._render_options import RenderOptions
from lightning_neurons.distributed import concat, gather_all, share
from lightning_neurons.visualize.continuation import choose_candidates
from lightning_neurons.visualize.objectives import ChannelGroup, Objective
from lightning_neurons.visualize.prior import DataPrior
from lightning_neurons.visualize.render import (
    RenderJob,
    RenderResult,
    prepare_render,
    run_renders,
    view_transforms,
)

__all__ = ["Renderer", "RenderOptions", "RoundImages"]


@dataclass(frozen=True)
class Part:
    """Objectives rendered in one batch with others: the parameters they continue (``None``:
    from noise) and each objective's first noise row (``render(first_row=)``)."""

    objectives: list[Objective]
    init: torch.Tensor | None
    firsts: list[int]


class RoundImages(NamedTuple):
    """A round's images and the steps each ran: ``{layer: (images, steps)}`` of its channels and
    of its clusters, and ``(images, steps)`` of its classes (``None``: none asked for)."""

    channels: dict[str, tuple[torch.Tensor, torch.Tensor]]
    clusters: dict[str, tuple[torch.Tensor, torch.Tensor]]
    classes: tuple[torch.Tensor, torch.Tensor] | None = None


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
        progress.phase(f"rendering {key} ({len(objectives)} objectives)")
        rendering, keep = self._keyed(model, key, objectives, classes)
        images, params, steps = self.run(model, [rendering])[0]
        keep(params)
        return images, steps

    def _keyed(
        self, model: nn.Module, key: str, objectives: list[Objective], classes: bool
    ) -> tuple[Shared, Callable[[torch.Tensor], None]]:
        """The rendering of :meth:`images`, and what keeps its parameters for the next round."""
        o = self.options
        alive = classes and o.class_restarts > 1 and o.class_continue == "all"
        kept = ("candidates", o.class_restarts) if alive else ()
        signature = self.signature(tuple(repr(obj) for obj in objectives), *kept)
        init = self.memory.start(key, signature)
        restarts = o.class_restarts if classes and init is None and not alive else 1
        # parameters kept per objective: its candidates, its kept candidate, or its images
        per_objective = o.class_restarts if alive else 1 if classes else o.n_images

        def job(part: slice) -> RenderJob:
            block = (
                None
                if init is None
                else init[part.start * per_objective : part.stop * per_objective]
            )
            if alive:
                return self.candidates(model, objectives[part], block, part.start * per_objective)
            first_row = part.start * per_objective * restarts
            return self.job(model, objectives[part], block, first_row, classes, restarts)

        finish = self._best_candidates(model, objectives) if alive else _plain

        def keep(params: torch.Tensor) -> None:
            self.memory.keep(key, signature, params)

        return Shared(len(objectives), job, finish), keep

    def round(
        self,
        model: nn.Module,
        objectives: dict[str, list[Objective]],
        members: Mapping[str, list[list[int]]] | None = None,
        classes: list[Objective] | None = None,
    ) -> RoundImages:
        """A round's channel images (``{layer: objectives}``), cluster images (``{layer:
        channel lists}``, the same on every rank) and class images (``classes``, as
        :meth:`images` renders them), and the steps each ran, on every rank.

        Each image is the one a rendering of its layer's objectives alone gives (each row from
        its own layer's noise; a layer's clusters each from the noise of its place among the
        round's new clusters), continued from the last round's parameters when they were
        rendered for the same objectives. Clusters change between analyses (their ids are
        arbitrary, a few neurons move), so each cluster continues the image of the last round's
        cluster of its layer it shares most neurons with
        (:meth:`ContinuationMemory.match_clusters`); the others start from noise.

        Everything continued is one rendering, everything from noise another, the classes a
        third, and the renderings take their steps together (:meth:`run`): on an accelerator a
        rendering of 16 images costs about what one of a few hundred does, so one batch a step
        instead of one per layer and kind."""
        members = members or {}
        keys = {layer: self.signature(tuple(map(repr, o))) for layer, o in objectives.items()}
        parts = self._round_parts(objectives, members, keys)
        total, layers = sum(map(len, objectives.values())), len(objectives)
        what = []
        if objectives:
            what.append(f"channels ({total} objectives of {layers} layers)")
        if members:
            what.append(f"clusters ({len(parts) - layers} clusters of {len(members)} layers)")
        if classes:
            what.append(f"classes ({len(classes)} objectives)")
        listed = ", ".join(what[:-1]) + " and " + what[-1] if len(what) > 1 else "".join(what)
        progress.phase(f"rendering {listed}")
        renderings, place = self._parts(model, list(parts.values()))
        keep = None
        if classes:
            rendering, keep = self._keyed(model, "classes", classes, True)
            renderings.append(rendering)
        done = self.run(model, renderings)
        class_images = None
        if keep is not None:
            images, params, steps = done.pop()
            keep(params)
            class_images = images, steps
        found = dict(zip(parts, place(done), strict=True))
        return self._kept(objectives, members, keys, found, class_images)

    def _kept(
        self,
        objectives: dict[str, list[Objective]],
        members: Mapping[str, list[list[int]]],
        keys: dict[str, Signature],
        found: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        class_images: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> RoundImages:
        """The round's images by layer, their parameters kept for the next round."""
        channels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in objectives:
            images, params, steps = found[(layer, -1)]
            self.memory.keep(layer, keys[layer], params.clone())
            channels[layer] = images, steps
        clusters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, groups in members.items():
            images, params, steps = concat([found[(layer, i)] for i in range(len(groups))])
            self.memory.keep(f"clusters/{layer}", self.signature(), params, groups)
            clusters[layer] = images, steps
        return RoundImages(channels, clusters, class_images)

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

    def _parts(
        self, model: nn.Module, parts: Sequence[Part]
    ) -> tuple[list[Shared], Callable[[list[Rendered3]], list[Rendered3]]]:
        """The renderings of ``parts`` (the continued parts in one, those from noise in
        another), and what cuts the renderings' rows back into the parts."""
        n = self.options.n_images
        renderings: list[Shared] = []
        chosen_by: list[list[int]] = []
        for continued in (True, False):
            chosen = [j for j, part in enumerate(parts) if (part.init is not None) == continued]
            if not chosen:
                continue
            objectives = [o for j in chosen for o in parts[j].objectives]
            firsts = [first for j in chosen for first in parts[j].firsts]
            inits = [init for j in chosen if (init := parts[j].init) is not None]
            renderings.append(
                self.shared(model, objectives, torch.cat(inits) if inits else None, firsts)
            )
            chosen_by.append(chosen)

        def place(done: list[Rendered3]) -> list[Rendered3]:
            found: dict[int, Rendered3] = {}
            for chosen, (images, params, steps) in zip(chosen_by, done, strict=True):
                at = 0
                for j in chosen:
                    rows = slice(at, at + len(parts[j].objectives) * n)
                    found[j] = images[rows], params[rows], steps[rows]
                    at = rows.stop
            return [found[j] for j in range(len(parts))]

        return renderings, place

    def shared(
        self,
        model: nn.Module,
        objectives: list[Objective],
        init: torch.Tensor | None,
        firsts: list[int],
    ) -> Shared:
        """The rendering of the channel ``objectives``, objective ``j`` from the noise of row
        ``firsts[j]``: each rank renders its share (:meth:`run`)."""
        n = self.options.n_images

        def job(part: slice) -> RenderJob:
            block = None if init is None else init[part.start * n : part.stop * n]
            return self.job(model, objectives[part], block, firsts[part], False, 1)

        return Shared(len(objectives), job)

    def run(self, model: nn.Module, renderings: Sequence[Shared]) -> list[Rendered3]:
        """Each rendering's images (CPU), parameters and steps, on every rank: this rank
        prepares its share of each and runs them together (:func:`run_renders`: on an
        accelerator one batch a step for all), then the shares are gathered rendering by
        rendering. A failure on any rank raises on every rank, at the first gathering."""
        parts = [share(r.n, self.rank, self.world) for r in renderings]
        local: list[Rendered3 | None] = []

        def mine(j: int) -> Rendered3 | None:
            if not local:  # the first gathering runs this rank's share of every rendering
                local.extend(self._local(model, renderings, parts))
            return local[j]

        done = []
        for j in range(len(renderings)):
            gathered = gather_all(functools.partial(mine, j), self.world, "rendering")
            done.append(concat([found for found in gathered if found is not None]))
        return done

    @staticmethod
    def _local(
        model: nn.Module, renderings: Sequence[Shared], parts: Sequence[slice]
    ) -> list[Rendered3 | None]:
        """This rank's share ``parts[j]`` of each rendering (``None`` where it has none)."""
        chosen = [j for j, part in enumerate(parts) if part.stop > part.start]
        results = run_renders(model, [renderings[j].job(parts[j]) for j in chosen])
        found: list[Rendered3 | None] = [None] * len(renderings)
        for j, result in zip(chosen, results, strict=True):
            found[j] = renderings[j].finish(result, parts[j])
        return found

    def candidates(
        self, model: nn.Module, objectives: list[Objective], init: torch.Tensor | None, first: int
    ) -> RenderJob:
        """The rendering of the class images of ``objectives`` on this rank, every candidate
        kept (``class_continue="all"``): ``class_restarts`` rows per class, from noise with
        ``class_views`` views each (the first round, as ``render(restarts=)``), or continued
        with ``class_views // class_restarts`` (at least 1); see :meth:`_best_candidates`."""
        o = self.options
        count = o.class_restarts
        rows = [objective for objective in objectives for _ in range(count)]
        views = None if init is None else max(1, o.class_views // count)
        return self.job(model, rows, init, first, True, 1, views)

    def _best_candidates(
        self, model: nn.Module, objectives: list[Objective]
    ) -> Callable[[RenderResult, slice], Rendered3]:
        """What keeps the best candidate of each class of a rendering of :meth:`candidates` on
        this model (``class_select_by``) and its steps, and the parameters of every candidate:
        a candidate that was not the best in an early epoch can be in a later one."""
        o = self.options
        count = o.class_restarts

        def finish(result: RenderResult, part: slice) -> Rendered3:
            rows = [objective for objective in objectives[part] for _ in range(count)]
            images = result.images.cpu()
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
            return images[best], result.params, result.steps[best]

        return finish

    def job(
        self,
        model: nn.Module,
        objectives: list[Objective],
        init: torch.Tensor | None,
        first_row: int | Sequence[int],
        classes: bool,
        restarts: int,
        views: int | None = None,
    ) -> RenderJob:
        """The rendering of ``objectives`` on this rank (``views``: instead of ``views`` or
        ``class_views``), prepared for :func:`run_renders`."""
        o = self.options
        return prepare_render(
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


#: A rendering's images (CPU), parameters and steps.
Rendered3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _plain(result: RenderResult, part: slice) -> Rendered3:
    """A rendering's images (on the CPU), parameters and steps, as they are."""
    return result.images.cpu(), result.params, result.steps


@dataclass(frozen=True)
class Shared:
    """A rendering shared among the ranks (see :meth:`Renderer.run`): of ``n`` objectives,
    ``job(part)`` prepares this rank's share ``part``, ``finish(result, part)`` makes its
    images (CPU), parameters and steps."""

    n: int
    job: Callable[[slice], RenderJob]
    finish: Callable[[RenderResult, slice], Rendered3] = _plain
