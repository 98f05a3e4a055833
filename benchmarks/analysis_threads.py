"""An analysis beside busy figure workers: on all its torch threads, or lending them to the workers.

Runs ``--batches`` contribution batches of the demo model (SmallCNN 32/64/128 with batch norm, 64
one-channel 32x32 images each, one forward and one backward: what NeuronContribution does at an
epoch's end) three ways, interleaved ``--repeats`` times: alone; while the figure workers
(:class:`~lightning_neurons.figure_worker.BackgroundFigures`, 2 workers) draw ``--figures``
class-profile heatmaps asked for just before, with the analysis on all the threads it started
with (outside :func:`lightning_neurons.progress.reporting`); and the same inside it, as the
callbacks run their analyses, where each batch's progress report lends the threads to the busy
workers and takes them back once they are done (:mod:`lightning_neurons.cores`). Prints each run's
seconds until the analysis ends and until the last figure is drawn, and the medians side by side.
Run it alone on the machine.

Run: ``python benchmarks/analysis_threads.py [--batches 40] [--figures 8] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from lightning_neurons import ActivationTracker, progress
from lightning_neurons.contribution import contribution_batch
from lightning_neurons.figure_worker import BackgroundFigures, background_figures
from lightning_neurons.models import SmallCNN
from lightning_neurons.plots.activation import class_profile_heatmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import _layer_stats, _profile  # noqa: E402  (the synthetic statistics)

LAYERS = ["features.relu1", "features.relu2", "features.relu3"]
TRAINER = SimpleNamespace(
    is_global_zero=True, progress_bar_callback=None, current_epoch=0, state="fit"
)


def run(setup: str, args: argparse.Namespace) -> tuple[float, float]:
    """Seconds until the analysis ends, and until the last figure is drawn."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, widths=[32, 64, 128], batch_norm=True).eval()
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    stats, owner = _layer_stats(_profile(10, 128)), object()
    start = time.perf_counter()
    for _ in range(args.figures if setup != "alone" else 0):
        background_figures.submit(owner, lambda _: None, class_profile_heatmap, (stats,))
    lending = setup == "lending threads"
    with (
        progress.reporting(TRAINER, ActivationTracker(), "validation") if lending else nullcontext()
    ):
        for _ in range(args.batches):
            progress.advance("batch", args.batches)
            contribution_batch(model, LAYERS, x, y)
    analysed = time.perf_counter() - start
    errors = background_figures.wait(owner)
    if errors:
        raise errors[0]
    return analysed, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--figures", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not BackgroundFigures.available():
        sys.exit("the figure workers need fork (Linux): figures are drawn on the spot here")
    setups = ("alone", "all threads", "lending threads")
    run("all threads", args)  # warm-up: the workers' first figures
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in setups}
    for repeat in range(args.repeats):
        for setup in setups:
            times[setup].append(run(setup, args))
            analysed, done = times[setup][-1]
            print(f"repeat {repeat}: {setup:16s} analysis {analysed:6.2f} s, all {done:6.2f} s")
    alone = statistics.median(a for a, _ in times["alone"])
    print(
        f"\n{args.batches} contribution batches, {args.figures} figures, "
        f"{torch.get_num_threads()} torch threads, medians of {args.repeats}:"
    )
    for setup in setups:
        analysed = statistics.median(a for a, _ in times[setup])
        done = statistics.median(d for _, d in times[setup])
        print(
            f"  {setup:16s} analysis {analysed:6.2f} s ({analysed / alone:.3f}x alone), "
            f"figures too {done:6.2f} s"
        )


if __name__ == "__main__":
    main()
