"""The settings that go together: :func:`~lightning_neurons.visualize.render`'s defaults.

Without a data prior, :func:`render` follows Lucid's recipe (:data:`PLAIN`: Fourier images,
standard transforms). Given one, it renders as :class:`~lightning_neurons.FeatureVisualizer`
does at its defaults: the phase-only ``"maco"`` images with robust transforms and the
convergence test (:data:`DATA_CHANNELS`), and for class images (objectives that all read the
logits) the data's own contrast, two views and the best of four candidates, chosen by how often
the model's top class is theirs over random views (:data:`DATA_CLASSES`).
Every setting given to :func:`render` overrides its recipe's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from lightning_neurons.visualize.continuation import SelectBy
from lightning_neurons.visualize.objectives import Objective
from lightning_neurons.visualize.param import Param
from lightning_neurons.visualize.prior import DataPrior

#: What ``render(param=)`` and ``render(transforms=)`` take for "the recipe's".
AUTO = "auto"


@dataclass(frozen=True)
class Recipe:
    """Render settings that go together (see :func:`~lightning_neurons.visualize.render`).

    Attributes:
        param: The parametrization.
        transforms: The named transform set.
        steps: Adam steps.
        lr: Adam's learning rate.
        converge_tol: The convergence test's tolerance (0: every image runs ``steps``).
        contrast: ``"maco"``'s pattern scale.
        views: Random views per image and step.
        restarts: Candidates per image (the best one is kept).
        diversity: Weight of the diversity term among the images of one objective.
        select_by: How the candidates of ``restarts`` are compared (``"value"`` or
            ``"agreement"``; see :func:`~lightning_neurons.visualize.continuation.best_candidates`).
    """

    param: Param
    transforms: Literal["standard", "robust"]
    steps: int
    lr: float
    converge_tol: float
    contrast: float
    views: int
    restarts: int
    diversity: float
    select_by: SelectBy = "value"

    def given(self, **settings: object) -> Recipe:
        """This recipe with the ``settings`` that are given (not ``None`` or ``"auto"``)."""
        chosen = {k: v for k, v in settings.items() if v is not None and v != AUTO}
        return replace(self, **chosen)  # type: ignore[arg-type]


#: Without a data prior: Lucid's recipe.
PLAIN = Recipe("fft", "standard", steps=256, lr=0.05, converge_tol=0.0, contrast=1.0, views=1,
               restarts=1, diversity=0.0)  # fmt: skip

#: With a data prior, channel and neuron images: FeatureVisualizer's defaults.
DATA_CHANNELS = Recipe("maco", "robust", steps=64, lr=0.1, converge_tol=0.005, contrast=2.0,
                       views=1, restarts=1, diversity=1.0)  # fmt: skip

#: With a data prior, class images: FeatureVisualizer's defaults for its class images.
DATA_CLASSES = replace(DATA_CHANNELS, contrast=1.0, views=2, restarts=4, select_by="agreement")


def recipe_for(
    prior: DataPrior | None, objectives: Sequence[Objective], n_images: int = 1
) -> Recipe:
    """The recipe :func:`~lightning_neurons.visualize.render` starts from: :data:`PLAIN` without
    a prior; with one, :data:`DATA_CLASSES` when every objective reads the logits (one candidate
    per image when several images per objective are asked for), else :data:`DATA_CHANNELS`."""
    if prior is None:
        return PLAIN
    if not all(objective.needs_logits for objective in objectives):
        return DATA_CHANNELS
    return DATA_CLASSES if n_images == 1 else replace(DATA_CLASSES, restarts=1)
