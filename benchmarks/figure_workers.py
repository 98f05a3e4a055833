"""Figures drawn beside training: how much the figure workers slow the training loop.

Trains the demo model (SmallCNN 32/64/128 with batch norm, batches of 64 one-channel 32x32
images, AdamW) for ``--epochs`` epochs of ``--steps`` steps (the demo: 10 of 23), interleaved
``--repeats`` times, four ways: alone; while the figure workers
(:class:`~lightning_neurons.figure_worker.BackgroundFigures`, 2 workers) draw ``--figures``
class-profile heatmaps (the tracker's figure, 10 classes x 128 neurons) asked for at the end of
every epoch, as the library runs them; the same with the workers at ``--niceness`` (a lower
priority); and the figures drawn on the training thread (``BackgroundFigures(enabled=False)``).
Each run ends when the last figure is logged, as a fit waits for its figures. Prints each run's
seconds and, per setup, the median over training alone. Run it alone on the machine: a second
process with two torch threads on two cores slows both many times over.

Run: ``python benchmarks/figure_workers.py [--epochs 10] [--steps 23] [--figures 3]
[--repeats 3] [--niceness 19]`` (the demo's tracker asks for 3 figures per epoch; with every
analysis the demo asks for about 140 in its 10 epochs).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_neurons import figure_worker
from lightning_neurons.figure_worker import BackgroundFigures
from lightning_neurons.models import SmallCNN
from lightning_neurons.plots.activation import class_profile_heatmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import _layer_stats, _profile  # noqa: E402  (the synthetic statistics)

LIBRARY_INIT = figure_worker._init_worker


def niced_init(niceness: int) -> None:
    """The library's worker set-up, then ``os.nice(niceness)``."""
    LIBRARY_INIT()
    os.nice(niceness)


def run(setup: str, args: argparse.Namespace) -> float:
    """Seconds until the last epoch is trained and the last figure logged."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, widths=[32, 64, 128], batch_norm=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    niced = functools.partial(niced_init, args.niceness)
    figure_worker._init_worker = LIBRARY_INIT if setup == "figures" else niced  # type: ignore[assignment]
    workers, owner = BackgroundFigures(enabled=setup != "inline", workers=2), object()
    stats = _layer_stats(_profile(10, 128))
    start = time.perf_counter()
    for _ in range(args.epochs):
        for _ in range(args.steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for _ in range(args.figures if setup != "alone" else 0):
            workers.submit(owner, lambda _: None, class_profile_heatmap, (stats,))
    errors = workers.wait(owner)
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--figures", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--niceness", type=int, default=19)
    args = parser.parse_args()
    if not BackgroundFigures.available():
        sys.exit("the figure workers need fork (Linux): figures are drawn on the spot here")
    setups = ("alone", "figures", f"niceness {args.niceness}", "inline")
    run("alone", args)  # warm-up
    times: dict[str, list[float]] = {s: [] for s in setups}
    for repeat in range(args.repeats):
        for setup in setups:
            times[setup].append(run(setup, args))
            print(f"repeat {repeat}: {setup:12s} {times[setup][-1]:6.2f} s", flush=True)
    alone = statistics.median(times["alone"])
    print(
        f"\n{args.epochs} epochs of {args.steps} steps, {args.figures} figures per epoch, "
        f"medians of {args.repeats}:"
    )
    for setup in setups:
        seconds = statistics.median(times[setup])
        print(f"  {setup:12s} {seconds:6.2f} s  {seconds / alone:.3f}x training alone")


if __name__ == "__main__":
    main()
