"""FeatureVisualizer's rendering options: how it renders its images by gradient ascent."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from lightning_neurons.checks import (
    check_choice,
    check_int,
    check_number,
    check_optional_positive_int,
    check_positive_int,
)
from lightning_neurons.errors import NeuronsError


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
