"""FeatureVisualizer's results: what the model (and a judge) see in the rendered images, and the
probes' saliency maps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import BatchReader, as_model_input, to_display, to_model_input
from lightning_neurons.callbacks._plan import VisualizerPlan, layer_widths
from lightning_neurons.callbacks._rendering import Renderer
from lightning_neurons.distributed import concat, map_shares
from lightning_neurons.hooks import hooked
from lightning_neurons.layouts import reduce_activation
from lightning_neurons.probes import ProbeCandidate
from lightning_neurons.results import ClusterRendering, Rendering, SaliencyMaps
from lightning_neurons.state import analysis_mode, model_device
from lightning_neurons.stats import LayerStats
from lightning_neurons.visualize.objectives import Channel
from lightning_neurons.visualize.saliency import Baseline, saliency
from lightning_neurons.visualize.sizing import auto_batch_size, probe


def logits(
    model: nn.Module,
    images: torch.Tensor,
    plan: VisualizerPlan,
    reader: BatchReader,
    rows: int | None = None,
) -> torch.Tensor:
    """``model``'s logits for display images (eval mode, left as found), on the CPU, read from
    its output by ``reader``; ``rows`` images a forward pass (``None``: all at once)."""
    device, size = model_device(model), rows or max(1, len(images))
    with analysis_mode(model, grad=False):
        found = [
            reader.forward(model, to_model_input(part.to(device), plan.transform)).float().cpu()
            for part in images.split(size)
        ]
    return torch.cat(found)


def rows_at_once(model: nn.Module, plan: VisualizerPlan, count: int) -> int:
    """How many of ``count`` images go through the model at once, memory bounded:
    :func:`~lightning_neurons.visualize.sizing.auto_batch_size` for the outputs of the plan's
    layers (one forward pass of one image measures them)."""
    channels = [Channel(layer, 0) for layer in plan.layers]
    found = probe(model, channels, plan.shape, plan.transform)
    return auto_batch_size(count, found.largest, model_device(model), found.total)


def _judged(
    judge: nn.Module | None,
    images: torch.Tensor,
    plan: VisualizerPlan,
    wanted: torch.Tensor,
    rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """The judge's verdict on ``images`` and its probability of each image's ``wanted`` class
    (nothing without a judge; its outputs are read as their first tensor; ``rows`` images a
    pass)."""
    if judge is None:
        return {}
    verdict = logits(judge, images, plan, BatchReader(), rows)
    rows = torch.arange(len(images))
    return {
        "judge_predicted": verdict.argmax(dim=1),
        "judge_probability": verdict.softmax(dim=1)[rows, wanted],
    }


def channel_activations(
    model: nn.Module,
    plan: VisualizerPlan,
    rendered: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    reduction: str,
    together: bool | None = None,
) -> dict[str, torch.Tensor]:
    """``{layer: [rows, channels]}``: each layer's output on its own channel images, reduced like
    the tracker's statistics. On the CPU, where a forward costs its arithmetic, one forward per
    layer; on an accelerator, where 17 forwards of 16 images cost what their kernel launches
    cost, the layers' images go through the model together, as many at once as
    :func:`~lightning_neurons.visualize.sizing.auto_batch_size` gives for the model's outputs
    (``together``: either way, whatever the device)."""
    layers = list(rendered)
    if not layers:  # (every layer left out: none is reached by a gradient)
        return {}
    images = torch.cat([rendered[layer][0] for layer in layers])
    ends = np.cumsum([len(rendered[layer][0]) for layer in layers]).tolist()
    starts = [0, *ends[:-1]]
    device = model_device(model)
    with analysis_mode(model, grad=False):
        if not (device.type != "cpu" if together is None else together):
            bounds = list(zip(starts, ends, strict=True))
        else:
            channels = [Channel(layer, 0) for layer in layers]
            found = probe(model, channels, tuple(images.shape[1:]), plan.transform)
            size = auto_batch_size(len(images), found.largest, device, found.total)
            bounds = [(a, min(a + size, len(images))) for a in range(0, len(images), size)]
        parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        for a, b in bounds:  # the rows [a, b) of the layers' images, in layer order
            rows = {
                layer: slice(max(s, a) - a, min(e, b) - a)
                for layer, s, e in zip(layers, starts, ends, strict=True)
                if s < b and e > a
            }
            x = as_model_input(to_model_input(images[a:b], plan.transform), model)
            for layer, reduced in _reduced_outputs(model, x, rows, reduction).items():
                parts[layer].append(reduced)
    return {layer: torch.cat(parts[layer]) for layer in layers}


def _reduced_outputs(
    model: nn.Module, x: torch.Tensor, rows: Mapping[str, slice], reduction: str
) -> dict[str, torch.Tensor]:
    """``{layer: reduced output}`` of one forward of ``x``, each layer's on its rows only."""
    found: dict[str, torch.Tensor] = {}

    def keep(name: str, output: torch.Tensor) -> None:
        # a shared module's hook names each of its calls, the ones not asked for too
        if name in rows and name not in found:
            found[name] = reduce_activation(output[rows[name]].detach(), reduction, name)

    with hooked(model, list(rows), keep):
        model(x)
    return {layer: found[layer].float().cpu() for layer in rows}


def channel_rendering(
    plan: VisualizerPlan,
    layer: str,
    rendered: tuple[torch.Tensor, torch.Tensor],
    activations: torch.Tensor,
    n_images: int,
    stats: Mapping[str, LayerStats],
    epoch: int,
) -> Rendering:
    """A layer's channel images with the activation each reaches (``activations``: the layer's
    reduced outputs on its images, :func:`channel_activations`) and its strength: that activation
    over the channel's largest on the tracker's data (``None`` where the tracker does not track
    the layer)."""
    images, steps = rendered
    # with n_images > 1, each channel's images are consecutive rows
    channels = [c for c in plan.channels[layer] for _ in range(n_images)]
    activation = activations[torch.arange(len(channels)), torch.tensor(channels)]
    strength = reference = reference_epoch = None
    if layer in stats and stats[layer].num_neurons > max(channels):
        reference = stats[layer].max_activation[channels].float()
        reference_epoch = stats[layer].epoch  # older when the tracker's stage is "train"
        nan = torch.full_like(activation, math.nan)
        strength = torch.where(reference > 0, activation / reference, nan)
    return Rendering(
        channels=torch.tensor(channels),
        images=images,
        activation=activation,
        reference=reference,
        strength=strength,
        reference_epoch=reference_epoch,
        epoch=epoch,
        steps=steps,
    )


def class_rendering(
    model: nn.Module,
    plan: VisualizerPlan,
    reader: BatchReader,
    judge: nn.Module | None,
    rendered: tuple[torch.Tensor, torch.Tensor],
    epoch: int,
) -> Rendering:
    """The class images' rendering, with what the model (and the judge) see in them."""
    images, steps = rendered
    scores = logits(model, images, plan, reader)
    index = torch.tensor(plan.classes)
    rows = torch.arange(len(plan.classes))
    return Rendering(
        **_judged(judge, images, plan, index),
        channels=index,
        images=images,
        activation=scores[rows, index],
        probability=scores.softmax(dim=1)[rows, index],
        predicted=scores.argmax(dim=1),
        epoch=epoch,
        steps=steps,
    )


@dataclass
class ClusterChoice:
    """The neuron clusters a round renders: each layer's channel lists (on every rank) and, on
    rank zero, ``{layer: (NeuronClustering's result, cluster ids, sizes)}``."""

    members: dict[str, list[list[int]]]
    chosen: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def choose_clusters(
    clustering: Mapping[str, Any], model: nn.Module, plan: VisualizerPlan, max_clusters: int
) -> ClusterChoice:
    """The largest ``max_clusters`` neuron clusters of every visualized layer in ``clustering``
    (NeuronClustering's results) whose neurons are the layer's channels."""
    progress.phase("choosing the neuron clusters to render")
    choice = ClusterChoice({})
    widths = layer_widths(model, plan, [layer for layer in clustering if layer in plan.layers])
    for layer, result in clustering.items():
        if layer not in widths:
            continue
        labels = torch.as_tensor(np.asarray(result.labels))
        if widths[layer] != len(labels):  # neurons are not channels
            continue
        ids, sizes = labels[labels >= 0].unique(return_counts=True)
        if not len(ids):
            continue
        order = sizes.argsort(descending=True, stable=True)[:max_clusters]
        choice.chosen[layer] = (result, ids[order], sizes[order])
        choice.members[layer] = [
            torch.nonzero(labels == k).flatten().tolist() for k in ids[order].tolist()
        ]
    return choice


def cluster_renderings(
    choice: ClusterChoice,
    rendered: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    model: nn.Module,
    renderer: Renderer,
    judge: nn.Module | None,
    epoch: int,
) -> dict[str, ClusterRendering]:
    """The chosen clusters' preferred images (``rendered``: ``{layer: (images, steps)}``), with
    the class each cluster prefers and what the model and the judge see in its image."""
    plan, n = renderer.plan, renderer.options.n_images
    if not choice.chosen:
        return {}
    shown = {layer: [t[::n] for t in rendered[layer]] for layer in choice.chosen}  # one a cluster
    preferred = {
        layer: _preferred(result, ids) for layer, (result, ids, _) in choice.chosen.items()
    }
    # every layer's images together, as many a pass of the model (and the judge) as fit
    images = torch.cat([images for images, _ in shown.values()])
    rows = rows_at_once(model, plan, len(images))
    predicted = logits(model, images, plan, renderer.reader, rows).argmax(dim=1)
    judged = _judged(judge, images, plan, torch.cat(list(preferred.values())), rows)
    found: dict[str, ClusterRendering] = {}
    at = 0
    for layer, (result, ids, sizes) in choice.chosen.items():
        rows = slice(at, at + len(ids))
        at = rows.stop
        found[layer] = ClusterRendering(
            **{key: verdict[rows] for key, verdict in judged.items()},
            clusters=ids,
            sizes=sizes,
            images=shown[layer][0],
            preferred_class=preferred[layer],
            predicted=predicted[rows],
            clusters_epoch=int(result.epoch),
            epoch=epoch,
            steps=shown[layer][1],
        )
    return found


def _preferred(result: Any, ids: torch.Tensor) -> torch.Tensor:
    """The class each of NeuronClustering's clusters ``ids`` responds to most (its profile's
    largest value), named by the result's classes when it lists them."""
    profiles = torch.as_tensor(np.asarray(result.cluster_profiles))
    preferred = profiles[ids].argmax(dim=1)
    if result.classes is not None and len(result.classes) == profiles.shape[1]:
        preferred = torch.as_tensor(np.asarray(result.classes))[preferred]
    return preferred


def saliency_maps(
    model: nn.Module,
    renderer: Renderer,
    probes: Sequence[ProbeCandidate],
    methods: Sequence[str],
    gradcam_layer: str | None,
    samples: int,
    epoch: int,
    steps: int = 32,
    baseline: Baseline = "black",
) -> SaliencyMaps | None:
    """The probes' saliency maps (``None`` without probes). Under DDP each rank maps a
    contiguous share of the probes (SmoothGrad's noise is drawn per probe index, so the maps are
    one process's) and the maps are gathered on every rank."""
    if not probes:
        return None
    plan, reader = renderer.plan, renderer.reader
    inputs = torch.stack([p.image for p in probes])  # as the loader yielded them
    progress.phase(f"saliency ({len(inputs)} images)")

    def part_maps(part: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = inputs[part]
        with analysis_mode(model, grad=False):
            predicted = reader.forward(model, x).argmax(dim=1).cpu()
        images, exact = to_display(x, plan.transform)
        # Maps are taken with respect to what a person sees when the transform can be inverted.
        source, transform = (images, plan.transform) if exact else (x, None)
        maps = {
            method: saliency(
                model,
                source,
                method,  # type: ignore[arg-type]
                target=predicted,
                layer=gradcam_layer,
                input_transform=transform,
                output_fn=reader.output_fn,
                samples=samples,
                steps=steps,
                baseline=baseline,
                seed=renderer.options.seed,
                first_index=part.start,
            )
            for method in methods
        }
        return predicted, maps

    parts = map_shares(part_maps, len(inputs), renderer.rank, renderer.world, "saliency")
    predicted, maps = concat(parts)
    images, _ = to_display(inputs, plan.transform)
    return SaliencyMaps(
        images=images,
        inputs=inputs,
        labels=torch.tensor([p.label for p in probes]),
        predicted=predicted,
        maps=maps,
        epoch=epoch,
        gradcam_layer=gradcam_layer if "gradcam" in maps else None,
    )
