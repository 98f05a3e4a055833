"""What one rendering step asks of a GPU, counted on the CPU: its operations, part by part.

A rendering step of ResNet-50 at 32 px on a GPU costs what the host spends queuing its kernels
(``operations.py`` counts them per analysis phase). This script renders FeatureVisualizer's
kinds of objectives (``together``: a round's channels and clusters in one rendering, as it
renders them) on ``torchvision.models.<model>(weights=None)`` at its default layers, in one
chunk as on an accelerator, for ``--steps`` and twice as many steps (convergence checks off),
and prints the difference per step, split into the parts of a step: the image from its
parameters, the random views, the model's forward pass, the objectives' scoring in the forward
hooks, the backward pass and Adam's update. Views and other metadata-only operations are not
counted. The counts are deterministic.

    python benchmarks/render_step_operations.py                  # channels, clusters, classes
    python benchmarks/render_step_operations.py --kinds together # channels and clusters at once
    python benchmarks/render_step_operations.py --kinds channels --model resnet18

(It runs on earlier commits too: copy it, with ``operations.py``, into their ``benchmarks/``.)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this worktree's library
import operations  # noqa: E402


def objectives_of(
    kind: str, model, layers: list[str], size: int, classes: int
) -> tuple[list, dict]:
    """The rendering's objectives and its ``render`` options, as FeatureVisualizer makes them."""
    import torch

    from lightning_neurons.visualize import check_objectives
    from lightning_neurons.visualize.anchors import ClassAnchor
    from lightning_neurons.visualize.objectives import Channel, ChannelGroup, ClassLogit

    width = 16

    if kind == "channels":  # max_channels=16 of every layer
        return [Channel(n, c) for n in layers for c in range(width)], {}
    if kind == "clusters":  # two clusters a layer
        return [ChannelGroup(n, list(range(k, 64, 3))) for n in layers for k in range(2)], {}
    if kind == "together":  # both, layer by layer, in one rendering (as a round renders them)
        return [
            o
            for n in layers
            for o in [Channel(n, c) for c in range(width)]
            + [ChannelGroup(n, list(range(k, 64, 3))) for k in range(2)]
        ], {}
    last, anchors = layers[-1], []
    shape = check_objectives(model, [Channel(last, 0)], (3, size, size))[last]
    for c in range(min(16, classes)):  # the anchored class images, 4 candidates of 2 views
        target, scale = torch.rand(shape), torch.ones(shape[0])
        anchors.append(ClassLogit(c) - 10 * ClassAnchor(last, c, target, scale))
    return anchors, {"views": 2, "restarts": 4}


class Parts:
    """Counts the operations dispatched in each part of a rendering step."""

    def __init__(self) -> None:
        self.current = "image"
        self.counts: dict[str, Counter[str]] = {}

    def label(self, owner: object, name: str, part: str) -> None:
        """Count what ``owner.name(...)`` dispatches as ``part``."""
        inner: Callable = getattr(owner, name)

        def counted(*args, **kwargs):
            before, self.current = self.current, part
            try:
                return inner(*args, **kwargs)
            finally:
                self.current = before

        setattr(owner, name, counted)

    def add(self, name: str) -> None:
        self.counts.setdefault(self.current, Counter())[name] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--kinds", nargs="+", default=["channels", "clusters", "classes"])
    args = parser.parse_args()

    import torch
    import torchvision
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_neurons.defaults import default_layers
    from lightning_neurons.visualize import DataPrior, render, scoring
    from lightning_neurons.visualize import optimise as steps

    operations.as_on_an_accelerator(512)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=args.classes)
    model.eval()
    layers = default_layers(model)
    prior = DataPrior.from_images(torch.rand(64, 3, args.size, args.size))
    parts = Parts()
    parts.label(steps, "apply_transforms", "views")
    parts.label(scoring.Scoring, "forward", "forward")
    parts.label(scoring.Scoring, "add", "scoring")
    parts.label(torch.Tensor, "backward", "backward")
    parts.label(torch.optim.Adam, "step", "Adam")

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in operations.METADATA:
                parts.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    print(f"{args.model}, {len(layers)} layers, {args.size} px, one chunk as on an accelerator")
    for kind in args.kinds:
        objectives, options = objectives_of(kind, model, layers, args.size, args.classes)
        counted = []
        for n in (args.steps, 2 * args.steps):
            parts.counts = {}
            with Count():
                render(model, objectives, image_shape=(3, args.size, args.size), prior=prior,
                       steps=n, converge_tol=0.0, **options)  # fmt: skip
            counted.append(parts.counts)
        per_step = {
            part: Counter(
                {
                    op: (k - counted[0].get(part, Counter())[op]) / args.steps
                    for op, k in ops.items()
                }
            )  # fmt: skip
            for part, ops in counted[1].items()
        }
        total = sum(sum(ops.values()) for ops in per_step.values())
        print(f"{kind} ({len(objectives)} objectives): {total:.1f} operations a step")
        for part, ops in per_step.items():
            common = ", ".join(f"{op} {k:g}" for op, k in ops.most_common(8) if k)
            print(f"  {part:9s} {sum(ops.values()):7.1f}  {common}")


if __name__ == "__main__":
    main()
