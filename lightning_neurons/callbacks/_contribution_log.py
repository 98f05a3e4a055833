"""NeuronContribution's figures, scalars, probe table and files."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from lightning_neurons import progress
from lightning_neurons.bands import display_channels_of, shown_channels
from lightning_neurons.batch import InputTransform, input_transform_of, to_display
from lightning_neurons.callbacks._base import class_names_of
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.results import ContributionResult, Probes


def log_contribution(
    trainer: Trainer, results: Mapping[str, ContributionResult], owner: Callback
) -> None:
    """Figures, scalars, the probes' image and table, and one ``.npz`` file per layer, in the
    progress phase "figures and files", counted by layer (each count also lends the analysis's
    threads to the figure workers that its figures keep busy: :mod:`lightning_neurons.cores`)."""
    out = AnalysisLogger(trainer, "contribution", owner=owner)
    if not out.is_writer:
        return
    progress.phase("figures and files")
    transform, bands = input_transform_of(trainer), display_channels_of(trainer)
    scalars: dict[str, float] = {}
    for layer, res in results.items():
        progress.advance("layer", len(results))
        names = class_names_of(trainer, res.stats.num_classes)
        scalars.update(_scalars(out, layer, res, names))
        if out.experiment is not None:  # figures take time: draw them only to be shown
            _figures(out, layer, res, names, transform, bands)
        arrays, meta = _arrays(layer, res, names)
        out.save_arrays(layer, arrays, meta=meta)
    out.scalars(scalars)


def _scalars(
    out: AnalysisLogger, layer: str, res: ContributionResult, names: list[str]
) -> dict[str, float]:
    """A few headline scalars per layer; the per-class series go to TensorBoard as one
    histogram each (a chart per class would bury train/ and val/ under dozens of charts) and,
    named, to the ``.npz`` file and the figures."""
    domination = res.domination
    scalars = {out.tag(layer, "mean_domination"): float(domination.mean())}
    out.histogram(out.tag(layer, "domination_per_class"), domination)
    ablation = res.ablation
    if ablation is not None:
        drop = ablation.accuracy_drop
        own = [float(drop[row, c]) for row, c in enumerate(ablation.classes) if c >= 0]
        out.histogram(out.tag(layer, "ablation_own_drop_per_class"), own)
        for key, value in (ablation.selectivity or {}).items():
            if key != "ratio":  # infinite when the other classes do not drop
                scalars[out.tag(layer, "ablation_selectivity", key)] = value
    return scalars


def _figures(
    out: AnalysisLogger,
    layer: str,
    res: ContributionResult,
    names: list[str],
    transform: InputTransform | None,
    bands: tuple[int, ...] | None = None,
) -> None:
    from lightning_neurons.plots.contribution import (
        ablation_figure,
        contribution_figure,
        contribution_view,
        probe_grid,
        probe_tiles,
    )

    # the workers get what they draw (a few MB a layer at 1,000 classes), not the statistics
    # and full-size images: the payloads wait in this process until a worker is free
    view = contribution_view(res.stats)
    out.figure(
        out.tag(layer, "class_contribution"), contribution_figure, view, names, epoch=res.epoch
    )
    if res.ablation is not None:
        baseline = float(res.ablation.baseline_accuracy.nanmean())
        title = f"{layer}, epoch {res.epoch}: accuracy drop when zeroed (baseline {baseline:.2f})"
        drop, sets = res.ablation.accuracy_drop, res.ablation.sets
        out.figure(out.tag(layer, "ablation"), ablation_figure, drop, sets, names, title)
    if res.probes is not None:
        probes = res.probes  # the grid is built and encoded off the training thread too
        shown, preferred = _display(probes, transform)
        if shown.dim() == 4:  # inputs that are not images get the table alone
            shown = shown_channels(shown, bands)  # the channels `display_channels` names
            preferred = [[shown_channels(p[None], bands)[0] for p in row] for row in preferred]
            out.figure(out.tag(layer, "probes"), probe_grid, *probe_tiles(shown, preferred))
        out.text(out.tag(layer, "probes"), _probe_table(res.probes, names))


def _display(
    probes: Probes, transform: InputTransform | None
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The probes and their top examples (model inputs) as display images, through the data's
    input transform (:func:`~lightning_neurons.batch.to_display`); rendered images are display
    images already."""
    shown, _ = to_display(probes.images, transform)
    preferred = [
        [
            image if source == "rendered" else to_display(image.unsqueeze(0), transform)[0][0]
            for image, source in zip(row, sources, strict=True)
        ]
        for row, sources in zip(probes.preferred, probes.preferred_source, strict=True)
    ]
    return shown, preferred


def _probe_table(probes: Probes, names: list[str]) -> str:
    """One row per probe (the rows of the probes image), short headers, one column per top
    neuron: ``n12 +0.41 r`` is neuron 12, its contribution to the predicted logit, and its
    image in the probes image (``r`` rendered, ``v`` the validation image it fires most on)."""
    top = probes.top_neurons.shape[1]
    lines = [
        "Top neurons of each probe: contribution to the predicted logit; image in the probes "
        "image: r = rendered, v = top validation image.",
        "",
        "| # | true | pred | " + " | ".join(f"top {i + 1}" for i in range(top)) + " |",
        "|---|---|---|" + "---|" * top,
    ]
    labels, predictions = probes.labels.tolist(), probes.predictions.tolist()
    for p in range(probes.images.shape[0]):
        cells = [
            f"n{n} {value:+.2g} {source}"
            for n, value, source in zip(
                probes.top_neurons[p].tolist(),
                probes.top_contribution[p].tolist(),
                [("v" if s == "top example" else "r") for s in probes.preferred_source[p]],
                strict=True,
            )
        ]
        label, pred = names[labels[p]], names[predictions[p]]
        lines.append(f"| {p} | {label} | {pred} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _arrays(
    layer: str, res: ContributionResult, names: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays: dict[str, Any] = dict(res.stats.as_arrays())
    arrays["top_example_index"] = res.top_example_index
    meta: dict[str, Any] = {"layer": layer, "epoch": res.epoch, "class_names": names}
    ablation = res.ablation
    if ablation is not None:
        arrays["accuracy_drop"] = ablation.accuracy_drop
        arrays["logit_drop"] = ablation.logit_drop
        arrays["baseline_accuracy"] = ablation.baseline_accuracy
        arrays.update(ablation.effect_arrays())
        for i, neurons in enumerate(ablation.neurons):
            arrays[f"ablated_neurons_{i}"] = neurons
        meta["ablation_sets"] = ablation.sets
        meta["ablation_classes"] = ablation.classes
        meta["ablation_selectivity"] = ablation.selectivity
        meta["clusters_epoch"] = ablation.clusters_epoch
        meta["clusters_step"] = ablation.clusters_step
    probes = res.probes
    if probes is not None:
        for key in ("index", "labels", "predictions", "contribution", "classes"):
            arrays[f"probe_{key}"] = getattr(probes, key)
        arrays["probe_top_neurons"] = probes.top_neurons
        arrays["probe_top_contribution"] = probes.top_contribution
        arrays["probe_images"] = probes.images
        for p, row in enumerate(probes.preferred):
            arrays.update({f"probe_preferred_{p}_{j}": image for j, image in enumerate(row)})
        meta["probe_preferred_source"] = probes.preferred_source
    return arrays, meta
