"""NeuronContribution's probes: each probe image's contribution to its logits, its top neurons
and their preferred images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch import LightningModule

from lightning_neurons.batch import BatchReader
from lightning_neurons.contribution import neuron_contributions
from lightning_neurons.distributed import concat, gather_all, map_shares
from lightning_neurons.probes import ProbeCandidate
from lightning_neurons.results import Probes, Rendering

#: A kept batch: its images and labels, on the CPU.
Batch = tuple[torch.Tensor, torch.Tensor]


def kept_image(batches: Sequence[Batch], row: int) -> torch.Tensor:
    """Image ``row`` of the kept batches, as if they were concatenated."""
    for x, _ in batches:
        if row < x.shape[0]:
            return x[row]
        row -= x.shape[0]
    raise IndexError(f"kept image {row} is beyond the kept batches")


def kept_images(
    batches: Sequence[Batch], indices: Sequence[int], rank: int, world: int
) -> dict[int, torch.Tensor]:
    """``{index: kept image}`` of every rank's kept images, on every rank: image ``p`` of rank
    ``r`` of ``W`` has the index ``p * W + r``."""
    found: dict[int, torch.Tensor] = {}
    for part in gather_all(
        lambda: {i: kept_image(batches, i // world) for i in indices if i % world == rank},
        world,
        "gathering the probes' top examples",
    ):
        found.update(part)
    return found


def explain(
    pl_module: LightningModule,
    layers: list[str],
    reader: BatchReader,
    images: torch.Tensor,
    num_classes: int,
    max_logits: int,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, explained classes and ``{layer: [P, L, K]}`` contributions of ``images``: all
    logits up to ``max_logits`` classes, else each image's ``max_logits`` highest; at most
    ``rows`` image-logit pairs go through the model at once."""
    with torch.no_grad():
        logits = reader.forward(pl_module, images).float().cpu()
    if num_classes <= max_logits:
        classes = torch.arange(num_classes).expand(len(images), -1)
    else:
        classes = logits.topk(max_logits, dim=1).indices
    contribution = neuron_contributions(  # {layer: [P, L, K]}
        pl_module, layers, images, classes=classes, chunk_size=rows, output_fn=reader.output_fn
    )
    return logits, classes, {layer: c.cpu() for layer, c in contribution.items()}


def explain_probes(
    pl_module: LightningModule,
    layers: list[str],
    reader: BatchReader,
    probes: Sequence[ProbeCandidate],
    num_classes: int,
    *,
    top: int,
    max_logits: int,
    rows: int,
    rank: int,
    world: int,
) -> dict[str, Probes]:
    """Every layer's contribution to the logits of the probe images and their ``top`` neurons
    behind the prediction, ``rows`` image-logit pairs at a time (a validation batch's size: no
    more memory than explaining a kept batch). Each rank explains a contiguous share of the
    probes: probes x logits cost as much as a few kept batches, so they are not left to rank
    zero alone."""
    if not probes:
        return {}
    images = torch.stack([p.image for p in probes])
    parts = map_shares(
        lambda part: explain(
            pl_module, layers, reader, images[part], num_classes, max_logits, rows
        ),
        len(probes),
        rank,
        world,
        "probe contributions",
    )
    logits, classes, contributions = concat(parts)
    predictions = logits.argmax(dim=1)
    predicted_row = (classes == predictions.unsqueeze(1)).float().argmax(dim=1)
    results = {}
    for layer, c in contributions.items():  # c: [P, L, K]
        behind = c[torch.arange(c.shape[0]), predicted_row]  # [P, K]: to the predicted logit
        best = behind.topk(min(top, behind.shape[1]), dim=1)
        results[layer] = Probes(
            index=torch.tensor([p.order for p in probes]),
            images=images,
            labels=torch.tensor([p.label for p in probes]),
            predictions=predictions,
            contribution=c,
            classes=classes.clone(),
            top_neurons=best.indices,
            top_contribution=best.values,
        )
    return results


def rendered_images(rendering: Rendering | None) -> dict[int, torch.Tensor]:
    """``{channel: image}`` of a FeatureVisualizer's rendering of a layer (empty for none)."""
    if rendering is None:
        return {}
    return {int(c): rendering.images[i] for i, c in enumerate(rendering.channels.tolist())}


def add_preferred(
    probes: Mapping[str, Probes],
    renderings: Mapping[str, Rendering],
    top_example: Mapping[str, torch.Tensor],
    batches: Sequence[Batch],
    rank: int,
    world: int,
) -> None:
    """Give each probe's top neurons their preferred images: the FeatureVisualizer's rendering
    when there is one, else the kept validation image that activates the neuron most (gathered
    from the rank that kept it)."""
    rendered = {layer: rendered_images(renderings.get(layer)) for layer in probes}
    top = {layer: top_example[layer].tolist() for layer in probes}  # not a read a neuron
    wanted = {
        top[layer][n]
        for layer, probe in probes.items()
        for n in probe.top_neurons.flatten().tolist()
        if n not in rendered[layer]
    }
    examples = kept_images(batches, sorted(wanted), rank, world)
    for layer, probe in probes.items():
        images: list[list[torch.Tensor]] = []
        sources: list[list[str]] = []
        for row in probe.top_neurons.tolist():
            images.append(
                [
                    rendered[layer][n] if n in rendered[layer] else examples[top[layer][n]]
                    for n in row
                ]
            )
            sources.append(["rendered" if n in rendered[layer] else "top example" for n in row])
        probe.preferred, probe.preferred_source = images, sources
