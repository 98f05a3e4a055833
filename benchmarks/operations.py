"""What the analyses would ask of a GPU, counted on the CPU: the torch operations each phase runs.

At ImageNet's shape on a GPU (ResNet-50, 32 px) an analysis costs what its kernel launches and
its waits for the device cost, not its arithmetic: the host that queues the kernels is the
bound. This script fits ``ImageClassifier(torchvision <model>, weights=None)`` on random images
with every callback attached, counts the operations dispatched in each analysis phase (the
phases the analyses announce, as ``scale.py --phases`` times them; metadata-only operations such
as views and ``detach`` are not counted), and prints them beside the CPU seconds. Renderings are
chunked as on an accelerator (all layers' rows in one chunk, up to ``--max-rows``), so the counts
are those of the accelerator's code paths; the CPU seconds are not what a GPU would take.

It is a proxy, for sessions without a GPU: it finds operations run one at a time where one for
many would do, and a phase's share of the launches. The GPU figures themselves come from
``scale.py --device cuda`` (``gpu_goals.sh``).

    python benchmarks/operations.py                                 # ResNet-50, 2 epochs
    python benchmarks/operations.py --max-rows 64          # the chunks before 68be840

(It runs on earlier commits too: copy it into their ``benchmarks/``; it counts the library of
the worktree it lies in.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, defaultdict
from functools import partial
from inspect import signature
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the library of the worktree this script lies in (copied into an older one, that one's)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scale  # noqa: E402

#: Operations that only make a new view or alias of a tensor: no kernel on a GPU.
METADATA = {
    "alias", "as_strided", "detach", "empty", "empty_strided", "expand", "lift_fresh", "permute",
    "reshape", "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose",
    "unbind", "unsqueeze", "view", "_unsafe_view",
}  # fmt: skip


def as_on_an_accelerator(max_rows: int) -> None:
    """Chunk renderings and saliency maps as on an accelerator, with plenty of free memory."""
    import importlib

    import torch

    from lightning_neurons.visualize import optimise, sizing

    # the module: ``lightning_neurons.visualize.saliency`` is also the package's function (before
    # 2026-12-06 the patch below went to the function, and SmoothGrad ran in CPU-sized chunks)
    saliency = importlib.import_module("lightning_neurons.visualize.saliency")

    sizing.DEVICE_CHUNK_ROWS = max_rows
    cpu_sizes = sizing.auto_batch_size

    free = {"free_bytes": 10**12} if "free_bytes" in signature(cpu_sizes).parameters else {}

    def device_sizes(count, largest, device, total=None, free_bytes=None):
        return cpu_sizes(count, largest, torch.device("cuda"), total, **free)

    sizing.auto_batch_size = saliency.auto_batch_size = device_sizes
    optimise._same_layers = lambda rows: [(0, len(rows))]
    from lightning_neurons.callbacks import _visualizer_results as results
    from lightning_neurons.callbacks import visualizer
    from lightning_neurons.visualize import continuation

    if hasattr(continuation, "_views_a_pass"):  # since 2026-12-06: the candidates' views together
        views = continuation._views_a_pass
        continuation._views_a_pass = lambda model, x, rows, draws, _: views(
            model, x, rows, draws, torch.device("cuda")
        )
    from lightning_neurons.callbacks import _rendering

    if hasattr(_rendering, "run_renders"):  # since 2026-12-06: a round's renderings together
        _rendering.run_renders = partial(_rendering.run_renders, together=True)
    if hasattr(results, "channel_activations"):  # since a6aa1be: the layers' images together
        results.auto_batch_size = device_sizes
        visualizer.channel_activations = partial(results.channel_activations, together=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fit_arguments(parser)
    parser.add_argument("--max-rows", type=int, default=None, help="rows a chunk (the library's)")
    parser.add_argument("--top", type=int, default=20, help="phases printed (default 20)")
    args = parser.parse_args()

    import lightning.pytorch as pl
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_neurons.visualize import sizing

    as_on_an_accelerator(args.max_rows or sizing.DEVICE_CHUNK_ROWS)
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    phases = scale.PhaseClock()
    counts: dict[str, Counter[str]] = defaultdict(Counter)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in METADATA:
                counts[phases.current()][name] += 1
            return func(*args, **(kwargs or {}))

    callbacks = scale.make_callbacks("all", hdbscan_ok=False)  # k-means: the same every run
    _, fit = fit_with(args, callbacks, "ln-operations-")
    start = time.perf_counter()
    with Count():
        fit()
    report(counts, phases.seconds, args, time.perf_counter() - start)


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The fit's shape: a torchvision model (``weights=None``), classes, images, epochs."""
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--val-images", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)


def fit_with(args: argparse.Namespace, callbacks: list, prefix: str, accelerator: str = "cpu"):
    """``(trainer, fit)``: ``fit()`` fits ``ImageClassifier(torchvision <model>)`` on random
    images with ``callbacks``, logging to a new folder."""
    import lightning.pytorch as pl
    import torch
    import torchvision
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_neurons.models import ImageClassifier

    g = torch.Generator().manual_seed(0)

    def data(n: int) -> TensorDataset:
        x = torch.rand(n, 3, args.size, args.size, generator=g)
        return TensorDataset(x, torch.arange(n) % args.classes)

    backbone = getattr(torchvision.models, args.model)(weights=None, num_classes=args.classes)
    model = ImageClassifier(backbone, num_classes=args.classes, lr=1e-3)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=accelerator,
        devices=1,
        logger=TensorBoardLogger(tempfile.mkdtemp(prefix=prefix)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )

    def fit() -> None:
        trainer.fit(
            model,
            DataLoader(data(args.train_images), batch_size=64, shuffle=True),
            DataLoader(data(args.val_images), batch_size=64),
        )

    return trainer, fit


def report(counts: dict, seconds: dict, args: argparse.Namespace, fit: float) -> None:
    totals = {phase: sum(c.values()) for phase, c in counts.items()}
    analyses = sum(n for phase, n in totals.items() if phase != "no analysis")
    rows = args.max_rows or "the library's"
    print(
        f"{args.model}, {args.classes} classes, {args.size} px, {args.val_images} validation "
        f"images, {args.epochs} epoch(s), rendering chunks as on an accelerator (at most {rows} "
        f"rows); fit {fit:.1f} s on the CPU"
    )
    steps = totals.get("no analysis", 0)
    print(f"operations in the analyses: {analyses:,d} (the model's own steps: {steps:,d})")
    print("  operations    CPU s  phase (the most common operations)")
    for phase, n in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        if phase == "no analysis":
            continue
        common = ", ".join(f"{op} {k:,d}" for op, k in counts[phase].most_common(3))
        print(f"  {n:>10,d} {seconds.get(phase, 0.0):8.2f}  {phase} ({common})")


if __name__ == "__main__":
    main()
