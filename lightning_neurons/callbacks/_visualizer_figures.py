"""FeatureVisualizer's figures, labels, scalars and files."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from lightning_neurons.bands import Bands, display_channels_of, shown_channels
from lightning_neurons.callbacks._plan import VisualizerPlan
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.results import ClusterRendering, Rendering, SaliencyMaps

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from lightning_neurons.callbacks._render_options import RenderOptions


def strength_label(channel: int, strength: float, activation: float, reference: float) -> str:
    """``"12: 3.1x"``; where the validation maximum is not positive (no ratio): ``"12: > max"``.

    Example:
        >>> strength_label(12, 3.14, 6.28, 2.0), strength_label(3, math.nan, 0.5, 0.0)
        ('12: 3.1x', '3: > max')
    """
    if math.isfinite(strength):
        return f"{channel}: {strength:.1f}x"
    return f"{channel}: {'>' if activation > reference else '<='} max"


def grid_labels(key: str, res: Rendering, plan: VisualizerPlan) -> tuple[list[str], str]:
    """Per-image labels and a title for one rendering (a layer's, or ``"classes"``)."""
    channels = res.channels.tolist()
    epoch = res.epoch
    if key == "classes":
        assert res.probability is not None
        probability = res.probability.tolist()
        labels = [
            f"{plan.class_name(c)}: p={p:.2f}" for c, p in zip(channels, probability, strict=True)
        ]
        title = f"classes, epoch {epoch}: class: softmax probability of the image"
        if res.judge_predicted is not None:
            verdicts = res.judge_predicted.tolist()
            labels = [
                f"{label}\njudge: {plan.class_name(v)} {'ok' if v == c else 'no'}"
                for label, v, c in zip(labels, verdicts, channels, strict=True)
            ]
            title += "; the judge model's verdict"
        return labels, title
    if res.strength is None or res.reference is None:
        return [f"ch {c}" for c in channels], f"{key}, epoch {epoch}: preferred images"
    values = zip(
        channels,
        res.strength.tolist(),
        res.activation.tolist(),
        res.reference.tolist(),
        strict=True,
    )
    labels = [strength_label(*v) for v in values]
    return labels, f"{key}, epoch {epoch}: channel: activation / its max on the validation data"


def log_preference(
    out: AnalysisLogger,
    results: Mapping[str, Rendering],
    plan: VisualizerPlan,
    n_images: int,
    steps: int,
    bands: Bands | None = None,
) -> None:
    """One grid per rendering (``preference/<layer>``, ``preference/classes``; the channels
    ``bands``), its scalars (strength, judge, steps) and its ``.npz`` file."""
    from lightning_neurons.plots.images import image_grid

    scalars: dict[str, float] = {}
    for key, res in results.items():
        labels, title = grid_labels(key, res, plan)
        ncols = n_images if key != "classes" and n_images > 1 else None
        shown = shown_channels(res.images, bands)
        out.figure(out.tag(key), image_grid, shown, labels, ncols=ncols, title=title)
        if res.judge_predicted is not None:
            agree = (res.judge_predicted == res.channels).double().mean()
            scalars[out.tag(key, "judge_recognised")] = float(agree)
        if res.strength is not None and res.reference is not None:
            above = (res.activation > res.reference).double().mean()
            scalars[out.tag(key, "above_max_fraction")] = float(above)
            finite = res.strength[torch.isfinite(res.strength)]
            if finite.numel():
                scalars[out.tag(key, "strength_median")] = float(finite.median())
                out.histogram(out.tag(key, "strength"), finite)
        if res.steps is not None:
            scalars[out.tag(key, "steps")] = float(res.steps.double().mean())
        meta = {"layer": key, "epoch": res.epoch, "steps": steps}
        out.save_arrays(key, res.as_arrays(), meta=meta)
    out.scalars(scalars)


def _cluster_labels(res: ClusterRendering, plan: VisualizerPlan) -> list[str]:
    labels = []
    rows = zip(res.clusters.tolist(), res.sizes.tolist(), res.preferred_class.tolist(), strict=True)
    for i, (k, size, c) in enumerate(rows):
        seen = int(res.predicted[i])
        text = f"c{k} ({size}): {plan.class_name(c)}\nmodel {plan.class_name(seen)}"
        if res.judge_predicted is not None:
            verdict = int(res.judge_predicted[i])
            text += f" judge {plan.class_name(verdict)} {'ok' if verdict == c else 'no'}"
        labels.append(text)
    return labels


def log_clusters(
    out: AnalysisLogger,
    results: Mapping[str, ClusterRendering],
    plan: VisualizerPlan,
    bands: Bands | None = None,
) -> None:
    """One grid per layer: ``c<id> (<size>): <preferred class>`` and, under it, what the model
    (and the judge) classify the image as, ``ok`` where it is the cluster's class."""
    from lightning_neurons.plots.images import image_grid

    scalars: dict[str, float] = {}
    for layer, res in results.items():
        title = (
            f"{layer} clusters (of epoch {res.clusters_epoch}), epoch {res.epoch}: "
            "cluster (neurons): its class; what the model (judge) sees"
        )
        labels = _cluster_labels(res, plan)
        shown = shown_channels(res.images, bands)
        out.figure(out.tag("clusters", layer), image_grid, shown, labels, title=title)
        agree = (res.predicted == res.preferred_class).double().mean()
        scalars[out.tag("clusters", layer, "model_agrees")] = float(agree)
        if res.judge_predicted is not None:
            agree = (res.judge_predicted == res.preferred_class).double().mean()
            scalars[out.tag("clusters", layer, "judge_agrees")] = float(agree)
        if res.steps is not None:
            scalars[out.tag("clusters", layer, "steps")] = float(res.steps.double().mean())
        meta = {"layer": layer, "epoch": res.epoch, "clusters_epoch": res.clusters_epoch}
        out.save_arrays(f"clusters_{layer}", res.as_arrays(), meta=meta)
    out.scalars(scalars)


def log_focus(
    out: AnalysisLogger, res: SaliencyMaps, plan: VisualizerPlan, bands: Bands | None = None
) -> None:
    """One grid per saliency method (``focus/<method>``) and the maps' ``.npz`` file."""
    from lightning_neurons.plots.images import saliency_grid

    shown = shown_channels(res.images, bands)
    for method, maps in res.maps.items():
        at = f" at {res.gradcam_layer}" if method == "gradcam" and res.gradcam_layer else ""
        out.figure(
            out.tag(method),
            saliency_grid,
            shown,
            maps,
            res.predicted,
            res.labels,
            class_names=plan.class_names,
            title=f"{method} saliency{at}, epoch {res.epoch}",
        )
    meta = {"methods": list(res.maps), "epoch": res.epoch, "gradcam_layer": res.gradcam_layer}
    out.save_arrays("saliency", res.as_arrays(), meta=meta)


def log_round(
    trainer: Trainer,
    owner: Any,
    plan: VisualizerPlan,
    results: Mapping[str, Rendering],
    clusters: Mapping[str, ClusterRendering],
    saliency: SaliencyMaps | None,
    render: RenderOptions,
) -> None:
    """Log a FeatureVisualizer round (``owner``): the preferred images of the channels and
    classes, of the clusters, and the saliency maps (rank zero only), in the channels
    :func:`~lightning_neurons.bands.display_channels_of` names."""
    out = AnalysisLogger(trainer, "preference", owner=owner)
    if not out.is_writer:
        return
    bands = display_channels_of(trainer)
    log_preference(out, results, plan, render.n_images, render.steps, bands)
    if clusters:
        log_clusters(out, clusters, plan, bands)
    if saliency is not None:
        log_focus(AnalysisLogger(trainer, "focus", owner=owner), saliency, plan, bands)
