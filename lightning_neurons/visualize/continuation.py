"""Where a rendering starts and how its candidates are chosen and continued.

- :func:`continue_from`: rows start from given parameters (an earlier rendering's) instead of
  their seeded noise, so a few steps reach what many steps from noise reach.
- :func:`best_candidates`: of every ``restarts`` consecutive candidates, the one the model scores
  best over :data:`SELECTION_VIEWS` random views (``select_by``); :func:`choose_candidates`, the
  same for candidates rendered as rows of their own (and kept: FeatureVisualizer's class images).
- :func:`continue_kept`: the kept candidates optimised alone for the remaining steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
from lightning_neurons.state import analysis_mode, model_device
from lightning_neurons.visualize import sizing
from lightning_neurons.visualize.objectives import ClassLogit, ClassLogProb, Objective
from lightning_neurons.visualize.optimise import Ascent, Chunk, ChunkSettings, chunks_of, optimise
from lightning_neurons.visualize.penalties import Penalties
from lightning_neurons.visualize.scoring import Scoring
from lightning_neurons.visualize.transforms import Transform, apply_transforms

#: Random views on which the candidates of ``restarts`` are compared.
SELECTION_VIEWS = 16
#: Layer outputs of the largest size that a forward pass without gradients keeps alive at once,
#: about (a residual block's input, its branch and their sum): what sizes the views of the
#: candidates compared in one pass.
NO_GRAD_OUTPUTS = 4

#: How the candidates of ``restarts`` are compared (see :func:`best_candidates`).
SelectBy = Literal["value", "agreement"]
SELECT_BY: tuple[str, ...] = ("value", "agreement")


@dataclass(frozen=True)
class Rendered:
    """Images (on the model's device), parameters (CPU) and steps run (CPU) of some rows."""

    images: torch.Tensor
    params: torch.Tensor
    steps: torch.Tensor

    @classmethod
    def of(cls, chunks: Sequence[Chunk]) -> Rendered:
        """The rows of ``chunks``, in order."""
        with torch.no_grad():
            images = torch.cat([chunk.image_fn().detach() for chunk in chunks])
            params = torch.cat([chunk.params[0].detach().cpu() for chunk in chunks])
        return cls(images, params, torch.cat([chunk.steps for chunk in chunks]))

    def pick(self, index: torch.Tensor) -> Rendered:
        """The rows ``index``."""
        return Rendered(self.images[index], self.params[index.cpu()], self.steps[index.cpu()])


def continue_from(chunks: Sequence[Chunk], init: torch.Tensor, rows: int, param: str) -> None:
    """Copy ``init`` (the parameters of every row) into the chunks' parameters.

    Raises:
        NeuronsError: If ``init`` is not a tensor of the rows' parameter shape.
    """
    expected = (rows, *chunks[0].params[0].shape[1:])
    if not isinstance(init, torch.Tensor) or tuple(init.shape) != expected:
        got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise NeuronsError(
            f"`init` must be the parameters of every row, shape {expected} for param={param!r} "
            f"(the `params` of render()'s result for the same objectives and settings); "
            f"got {got}"
        )
    start = 0
    with torch.no_grad():
        for chunk in chunks:
            p = chunk.params[0]
            p.copy_(init[start : start + len(p)].to(p.device, p.dtype))
            start += len(p)


def continue_kept(
    model: nn.Module,
    kept: Sequence[Objective],
    start: torch.Tensor,
    settings: ChunkSettings,
    *,
    size: int,
    steps: int,
    ascent: Ascent,
) -> Rendered:
    """Optimise the kept candidates (starting from their parameters ``start``) alone for
    ``steps`` more steps, ``size`` rows at once."""
    chunks = chunks_of(kept, size, settings)
    continue_from(chunks, start, len(kept), settings.param)
    optimise(model, chunks, steps, ascent)
    return Rendered.of(chunks)


def best_candidates(
    model: nn.Module,
    rows: Sequence[Objective],
    images: torch.Tensor,
    restarts: int,
    ascent: Ascent,
    size: int,
    output_fn: BatchFn | None = None,
    select_by: SelectBy = "value",
) -> torch.Tensor:
    """Index of the best of every ``restarts`` consecutive candidates over
    :data:`SELECTION_VIEWS` random views of ``ascent.transforms`` (drawn from ``ascent.seed + 1``;
    one view without transforms when there are none), ``size`` rows at once; on an accelerator,
    where a forward pass of a few rows costs what its kernel launches cost, several views of
    them in one pass, as many as memory allows (:func:`_views_a_pass`).

    ``select_by="value"``: the highest mean value of the row's objective. ``"agreement"``, when
    every row asks for a class (:func:`asked_class`: a :class:`ClassLogit` or
    :class:`ClassLogProb`, penalties such as a class anchor subtracted or not): the most views on
    which the model's top class is the row's class, ties broken by the mean log-probability of
    that class (else as ``"value"``)."""
    total = candidate_scores(model, rows, images, ascent, size, output_fn, select_by)
    scores = total.view(-1, restarts, 2)
    most = scores[..., 0].amax(dim=1, keepdim=True)
    winners = scores[..., 1].masked_fill(scores[..., 0] < most, -torch.inf).argmax(dim=1)
    return winners + torch.arange(len(winners)) * restarts


def candidate_scores(
    model: nn.Module,
    rows: Sequence[Objective],
    images: torch.Tensor,
    ascent: Ascent,
    size: int,
    output_fn: BatchFn | None = None,
    select_by: SelectBy = "value",
) -> torch.Tensor:
    """``[R, 2]`` float64: per row, the views on which the model's top class is the row's class
    and the summed log-probability of that class (``"agreement"``, every row asking for a
    class), or 0 and the summed value of its objective; over the views of
    :func:`best_candidates`."""
    asked = [asked_class(o) for o in rows]
    by_class = select_by == "agreement" and None not in asked
    draws = SELECTION_VIEWS if ascent.transforms else 1
    total = torch.zeros(len(rows), 2, dtype=torch.float64)
    with torch.no_grad():
        one = to_model_input(images[:1], ascent.input_transform)
        together = _views_a_pass(model, one, min(size, len(rows)), draws, model_device(model))
        for start in range(0, len(rows), size):
            part = slice(start, start + size)
            # every chunk sees the same draws, in the same order
            generator = torch.Generator().manual_seed(int(ascent.seed) + 1)
            for first in range(0, draws, together):
                progress.update("comparing the candidates on view", first + 1, draws)
                count = min(together, draws - first)
                views = [
                    apply_transforms(images[part], ascent.transforms, generator)
                    for _ in range(count)
                ]
                x = to_model_input(torch.cat(views), ascent.input_transform)
                if by_class:
                    scores = _class_scores(model, asked[part] * count, x, output_fn)
                else:
                    scores = _values(model, list(rows[part]) * count, x, images[part], output_fn)
                for view in scores.view(count, -1, 2):  # added in the draws' order
                    total[part] += view
    return total


def _views_a_pass(
    model: nn.Module, x: torch.Tensor, rows: int, draws: int, device: torch.device
) -> int:
    """Views of ``rows`` candidates compared in one forward pass: one on the CPU (where a pass
    costs its arithmetic); elsewhere as many as
    :func:`~lightning_neurons.visualize.sizing.auto_batch_size` allows when a pass without
    gradients keeps :data:`NO_GRAD_OUTPUTS` of the model's largest layer output alive (measured
    with one forward pass of ``x``, one model input), at most ``draws``."""
    if device.type == "cpu" or len(x) == 0:
        return 1
    sizes = sizing.leaf_output_sizes(model, lambda: model(as_model_input(x, model)))
    largest = sizes.largest
    allowed = sizing.auto_batch_size(rows * draws, largest, device, NO_GRAD_OUTPUTS * largest)
    return max(1, min(draws, allowed // max(1, rows)))


def _values(
    model: nn.Module,
    rows: Sequence[Objective],
    x: torch.Tensor,
    image: torch.Tensor,
    output_fn: BatchFn | None,
) -> torch.Tensor:
    """``[R, 2]``: 0, and each row's objective on ``x`` (views of ``image``, in that order),
    float64 on the CPU."""
    scoring = Scoring(rows, output_fn=output_fn)
    with scoring.attached(model):
        value = scoring.forward(model, x, image.repeat(len(rows) // len(image), 1, 1, 1))
    return torch.stack([torch.zeros_like(value), value], dim=1).double().cpu()


def choose_candidates(
    model: nn.Module,
    rows: Sequence[Objective],
    images: torch.Tensor,
    restarts: int,
    *,
    transforms: Sequence[Transform],
    input_transform: InputTransform | None = None,
    seed: int = 0,
    size: int = 64,
    output_fn: BatchFn | None = None,
    select_by: SelectBy = "value",
) -> torch.Tensor:
    """:func:`best_candidates` of rows rendered as rows of their own (each objective repeated
    ``restarts`` times in a row, ``render(restarts=1)``), compared as ``render(restarts=)``
    compares its candidates: the same random views of ``transforms`` (drawn from ``seed + 1``),
    ``size`` rows at once, the model in eval mode and left as it was.

    Returns:
        ``[len(rows) // restarts]`` indices into ``rows``: the best row of every objective.
    """
    ascent = Ascent(0.0, transforms, input_transform, seed, Penalties(0.0, 0.0, 0.0))
    with analysis_mode(model):
        return best_candidates(model, rows, images, restarts, ascent, size, output_fn, select_by)


def asked_class(objective: Objective) -> int | None:
    """The class ``objective`` asks for: the index of its one positively weighted term when that
    is a :class:`ClassLogit` (or :class:`ClassLogProb`) and every other term is subtracted
    (``ClassLogit(3) - 10 * anchors[3]``); ``None`` otherwise.

    Example:
        >>> asked_class(ClassLogit(3)), asked_class(ClassLogit(3) + ClassLogit(4))
        (3, None)
    """
    raised = [term for weight, term in objective.terms() if weight > 0]
    if len(raised) == 1 and isinstance(raised[0], (ClassLogit, ClassLogProb)):
        return raised[0].index
    return None


def _class_scores(
    model: nn.Module, classes: Sequence[int | None], x: torch.Tensor, output_fn: BatchFn | None
) -> torch.Tensor:
    """``[R, 2]``: whether the model's top class on ``x`` is each row's class, and the row
    class's log-probability (float64, CPU)."""
    logits = read_logits(model(as_model_input(x, model)), output_fn).float()
    index = torch.tensor(classes, device=logits.device)
    top = logits.argmax(dim=1) == index
    log_prob = logits.log_softmax(dim=1).gather(1, index[:, None])[:, 0]
    return torch.stack([top.double(), log_prob.double()], dim=1).cpu()
