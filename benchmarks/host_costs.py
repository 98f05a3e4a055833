"""What the analyses' host-only work costs the training thread: seconds of wall clock and of the
thread's own CPU per analysed epoch, at ImageNet's class count.

Each callback's logging (figures' payloads, histograms, scalars, ``.npz`` arrays) works on CPU
tensors, and NeuronClustering clusters each layer's neurons with scikit-learn and HDBSCAN on the
CPU: on a GPU machine too, this is host time, part of the analyses' seconds per epoch (issue
20's goal: <= 20 s with every analysis, ResNet-50 at 1,000 classes). This script fits
``ImageClassifier(torchvision <model>, weights=None)`` on random images (``operations.py``'s fit)
with every callback attached and times each callback's logging call (``ActivationTracker``,
``FeatureVisualizer``, ``CategoryClustering`` and ``NeuronClustering``'s ``_log``,
``NeuronContribution``'s ``log_contribution``) and NeuronClustering's clustering
(``_analyse``, its logging included). The figures are drawn in the workers meanwhile, as in any
fit; on a 2-core machine they compete with the training thread for the cores, so its wall clock
runs above its CPU seconds.

    python benchmarks/host_costs.py                         # ResNet-50, 1,000 classes, 2 epochs
    python benchmarks/host_costs.py --device cuda --threads 8      # a GPU machine's host

(It runs on earlier commits too: copy it and ``operations.py`` into their ``benchmarks/``.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the library of the worktree this script lies in (copied into an older one, that one's)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from operations import add_fit_arguments, fit_with  # noqa: E402

#: ``{callback: [(wall s, thread CPU s), ...]}``, one pair per logging call.
TIMES: dict[str, list[tuple[float, float]]] = defaultdict(list)


def timed(name: str, fn):
    def call(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append((time.perf_counter() - wall, time.thread_time() - cpu))

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_fit_arguments(parser)
    parser.add_argument("--device", default="cpu", help="Lightning's accelerator (e.g. cuda)")
    args = parser.parse_args()

    import lightning.pytorch as pl
    import torch

    import lightning_neurons.callbacks.contribution as contribution
    from lightning_neurons import (
        ActivationTracker,
        CategoryClustering,
        FeatureVisualizer,
        NeuronClustering,
        NeuronContribution,
    )

    for cls in (ActivationTracker, FeatureVisualizer, CategoryClustering, NeuronClustering):
        cls._log = timed(cls.__name__, cls._log)
    contribution.log_contribution = timed("NeuronContribution", contribution.log_contribution)
    NeuronClustering._analyse = timed("NeuronClustering (all)", NeuronClustering._analyse)
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    callbacks = [
        ActivationTracker(),
        FeatureVisualizer(),
        CategoryClustering(),
        NeuronClustering(),
        NeuronContribution(),
    ]
    _, fit = fit_with(args, callbacks, "host-costs-", accelerator=args.device)
    start = time.perf_counter()
    fit()
    print(
        f"{args.model}, {args.classes} classes, {args.size} px, {args.val_images} validation "
        f"images, {args.epochs} epoch(s), {args.threads} thread(s); fit "
        f"{time.perf_counter() - start:.1f} s on {args.device}"
    )
    print("the training thread in each callback's logging (and NeuronClustering's whole")
    print("clustering), per analysed epoch (s):")
    print(f"  {'callback':<22} {'wall':>22} {'thread CPU':>22}  median wall / CPU")
    for name, pairs in TIMES.items():
        walls = " ".join(f"{w:.3f}" for w, _ in pairs)
        cpus = " ".join(f"{c:.3f}" for _, c in pairs)
        wall = statistics.median(w for w, _ in pairs)
        cpu = statistics.median(c for _, c in pairs)
        print(f"  {name:<22} {walls:>22} {cpus:>22}  {wall:.3f} / {cpu:.3f}")


if __name__ == "__main__":
    main()
