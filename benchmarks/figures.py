"""What each figure costs: pixel size and time to render, at the digits demo's size and at 1,000 classes.

Every figure of ``lightning_neurons.plots`` is built from synthetic statistics shaped like a real
run's (non-negative class profiles with neurons tuned to groups of classes) and rendered to pixels,
as :meth:`AnalysisLogger.figure` does before writing it to TensorBoard. Prints, per figure and
size, the image's width x height in pixels and the median wall time of ``--repeats`` renders.

Sizes: ``demo`` (10 classes, 32 neurons, 16 rendered channels, 8 probes) and ``large``
(``--classes`` classes x ``--neurons`` neurons, default 1,000 x 2,000; one rendered image and one
probe per class).

Run: ``OMP_NUM_THREADS=1 python benchmarks/figures.py [--classes 1000] [--neurons 2000]
[--repeats 3] [--save DIR]`` (``--save`` writes every image as a PNG to look at).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from lightning_neurons.class_contribution import ContributionStats
from lightning_neurons.evolution import NeuronEvolution
from lightning_neurons.stats import LayerStats, dominant_neurons, selectivity_index


def _pixels(figure: Any) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of what a plot function returned (an image, or a Figure)."""
    if isinstance(figure, tuple):  # dendrogram_figure: (image, leaf order)
        figure = figure[0]
    if isinstance(figure, torch.Tensor):  # [3, H, W] in [0, 1]
        return (figure.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    if isinstance(figure, np.ndarray):
        return figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # a Figure (the old API)

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)  # as AnalysisLogger.figure did
    return pixels


def _profile(classes: int, neurons: int, seed: int = 0) -> torch.Tensor:
    """Non-negative ``[classes, neurons]`` profile, neurons tuned to one of 20 class groups."""
    g = torch.Generator().manual_seed(seed)
    group_of_class = torch.arange(classes) * 20 // classes  # classes in cluster order
    tuned = torch.randint(0, 20, (neurons,), generator=g)
    base = torch.rand(classes, neurons, generator=g, dtype=torch.float64) * 0.3
    gain = 1.0 + torch.rand(neurons, generator=g, dtype=torch.float64)
    return base + (group_of_class[:, None] == tuned[None, :]).double() * gain


def _layer_stats(profile: torch.Tensor) -> LayerStats:
    c, k = profile.shape
    dominant, domination = dominant_neurons(profile, 5)
    return LayerStats(
        layer="layer4.1.relu",
        epoch=9,
        reduction="mean",
        counts=torch.full((c,), 50.0, dtype=torch.float64),
        class_means=profile,
        class_std=profile * 0.1,
        class_max=profile * 2,
        firing_rate=(profile > 0.2).double(),
        nan_counts=torch.zeros(k, dtype=torch.float64),
        selectivity=selectivity_index(profile),
        dead=torch.zeros(k, dtype=torch.bool),
        dominant=dominant,
        domination=domination,
        preferred_class=profile.argmax(dim=0),
    )


def _contribution_stats(profile: torch.Tensor) -> ContributionStats:
    c, k = profile.shape
    contribution = profile - profile.mean()
    dominant, domination = dominant_neurons(contribution.clamp_min(0), 5)
    return ContributionStats(
        layer="layer4.1.relu",
        counts=torch.full((c,), 50.0, dtype=torch.float64),
        class_contribution=contribution,
        class_std=contribution.abs() * 0.1,
        positive_rate=(contribution > 0).double(),
        class_logit=contribution.sum(dim=1),
        dominant=dominant,
        domination=domination,
    )


def figure_makers(classes: int, neurons: int, images: int, probes: int) -> dict[str, Callable]:
    """Name -> a function that returns the figure, for one problem size."""
    from lightning_neurons.plots.activation import class_profile_heatmap
    from lightning_neurons.plots.clustering import (
        cluster_profiles_figure,
        dendrogram_figure,
        distance_confusion_figure,
    )
    from lightning_neurons.plots.contribution import (
        ablation_figure,
        contribution_figure,
        probe_grid,
    )
    from lightning_neurons.plots.evolution import neuron_evolution_figure, neuron_evolution_image
    from lightning_neurons.plots.images import image_grid, saliency_grid

    profile = _profile(classes, neurons)
    names = [f"class {c}" for c in range(classes)]
    corr = np.corrcoef(profile.numpy())
    distances = np.clip(1.0 - corr, 0.0, None)
    np.fill_diagonal(distances, 0.0)
    tree = linkage(squareform(distances, checks=False), method="average")
    rng = np.random.default_rng(0)
    confusion = rng.poisson(1.0, (classes, classes)) + np.diag(np.full(classes, 40))
    clusters = min(40, max(2, classes // 3))
    cluster_profiles = rng.standard_normal((clusters, classes))
    sizes = rng.integers(5, 60, clusters)
    sets = [f"class {c} top5" for c in range(min(classes, 10))] + [f"cluster {i}" for i in range(5)]
    drop = torch.as_tensor(rng.uniform(-0.1, 0.8, (len(sets), classes)))
    rendered = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    saliency_images = rendered[:probes]
    maps = torch.rand(probes, 32, 32, generator=torch.Generator().manual_seed(2))
    predicted = torch.randint(0, classes, (probes,), generator=torch.Generator().manual_seed(3))
    preferred = [[rendered[(p + j) % images] for j in range(5)] for p in range(probes)]
    title = "layer4.1.relu: epoch 9, 12 clusters, silhouette 0.31"
    layer_stats, contribution_stats = _layer_stats(profile), _contribution_stats(profile)
    evolution = NeuronEvolution(
        layer="layer4.1.relu",
        epochs=np.arange(10),
        preferred_class=rng.integers(0, classes, (10, neurons)),
        selectivity=rng.random((10, neurons)),
    )
    # the epoch keyword is new; without it, this script also measures the figures before it
    epoch = {"epoch": 9} if "epoch" in inspect.signature(contribution_figure).parameters else {}
    return {
        "class_profile_heatmap": lambda: class_profile_heatmap(layer_stats, names),
        "dendrogram": lambda: dendrogram_figure(tree, names, 12, title),
        "distance_vs_confusion": lambda: distance_confusion_figure(
            distances, confusion, names, agreement=0.42, title=title
        ),
        "cluster_profiles": lambda: cluster_profiles_figure(
            cluster_profiles,
            sizes,
            names,
            noise=17,
            title="layer4.1.relu: neuron clusters, epoch 9",
        ),
        "class_contribution": lambda: contribution_figure(contribution_stats, names, **epoch),
        "ablation": lambda: ablation_figure(
            drop, sets, names, "layer4.1.relu: accuracy drop when zeroed (baseline 0.71)"
        ),
        "probe_grid": lambda: probe_grid(saliency_images, preferred),
        "neuron_evolution": lambda: neuron_evolution_figure(evolution, names),
        # the same as pixels on a cached frame (drawn at the first of the repeats)
        "neuron_evolution_image": lambda: neuron_evolution_image(evolution, names),
        "image_grid": lambda: image_grid(
            rendered,
            [f"{c}: {2.5:.1f}x" for c in range(images)],
            title="layer4.1.relu, epoch 9: channel: activation / its max on the validation data",
        ),
        "saliency_grid": lambda: saliency_grid(
            saliency_images,
            maps,
            predicted,
            predicted.flip(0),
            class_names=names,
            title="smoothgrad saliency, epoch 9",
        ),
    }


def measure(maker: Callable, repeats: int) -> tuple[np.ndarray, float]:
    """The image and the median seconds of ``repeats`` renders."""
    times, pixels = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        pixels = _pixels(maker())
        times.append(time.perf_counter() - start)
    return pixels, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--neurons", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", type=Path, default=None, help="write each image as a PNG here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {
        "demo": (10, 32, 16, 8),
        "large": (args.classes, args.neurons, args.classes, args.classes),
    }
    print(f"{'figure':24s} {'size':6s} {'pixels (W x H)':>15s} {'seconds':>8s}")
    for size, shape in sizes.items():
        for name, maker in figure_makers(*shape).items():
            pixels, seconds = measure(maker, args.repeats)
            h, w = pixels.shape[:2]
            print(f"{name:24s} {size:6s} {f'{w} x {h}':>15s} {seconds:8.3f}", flush=True)
            if args.save is not None:
                from PIL import Image

                args.save.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(args.save / f"{size}_{name}.png")


if __name__ == "__main__":
    main()
