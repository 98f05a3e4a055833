"""Figures drawn beside training: how much the figure workers slow the training loop.

Trains the demo model (SmallCNN 32/64/128 with batch norm, batches of 64 one-channel 32x32
images, AdamW) for ``--steps`` steps, interleaved ``--repeats`` times, three ways: alone; while
the figure workers (:class:`~lightning_neurons.figure_worker.BackgroundFigures`, 2 workers) draw
``--figures`` class-profile heatmaps (the tracker's figure, 10 classes x 128 neurons) asked for
at the start, as the library runs them; and the same with the workers at ``--niceness`` (a
lower priority: tried, not kept, see docs/benchmarks.md). Prints each run's training time and,
per setup, the median training time over training alone and when the last figure was logged
(seconds after the start).

Run: ``python benchmarks/figure_workers.py [--steps 150] [--figures 60] [--repeats 3]
[--niceness 19]``
(the demo's tracker asks for 33 figures per fit, every analysis for about 140).
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


def train(steps: int) -> float:
    """Seconds for ``steps`` training steps of the demo model on a fixed random batch."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, widths=[32, 64, 128], batch_norm=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def run(setup: str, steps: int, figures: int, niceness: int) -> tuple[float, float]:
    """Training seconds and the seconds until the last figure was logged (0 without figures)."""
    if setup == "alone":
        return train(steps), 0.0
    niced = functools.partial(niced_init, niceness)
    figure_worker._init_worker = LIBRARY_INIT if setup == "figures" else niced  # type: ignore[assignment]
    workers = BackgroundFigures(workers=2)
    stats = _layer_stats(_profile(10, 128))
    owner, logged = object(), []
    start = time.perf_counter()

    def note(_pixels: object) -> None:
        logged.append(time.perf_counter())

    for _ in range(figures):
        workers.submit(owner, note, class_profile_heatmap, (stats,))
    seconds = train(steps)
    errors = workers.wait(owner)
    if errors:
        raise errors[0]
    return seconds, max(logged) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--figures", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--niceness", type=int, default=19)
    args = parser.parse_args()
    if not BackgroundFigures.available():
        sys.exit("the figure workers need fork (Linux): figures are drawn on the spot here")
    setups = ("alone", "figures", f"niceness {args.niceness}")
    train(20)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in setups}
    for repeat in range(args.repeats):
        for setup in setups:
            seconds, last = run(setup, args.steps, args.figures, args.niceness)
            times[setup].append((seconds, last))
            print(
                f"repeat {repeat}: {setup:12s} training {seconds:6.2f} s, last figure {last:6.2f} s",
                flush=True,
            )
    alone = statistics.median(t for t, _ in times["alone"])
    print(f"\n{args.steps} training steps, {args.figures} figures, medians of {args.repeats}:")
    for setup in setups:
        seconds = statistics.median(t for t, _ in times[setup])
        last = statistics.median(f for _, f in times[setup])
        extra = "" if setup == "alone" else f", last figure logged at {last:.2f} s"
        print(f"  {setup:12s} {seconds:6.2f} s  {seconds / alone:.3f}x training alone{extra}")


if __name__ == "__main__":
    main()
