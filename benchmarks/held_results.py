"""The host memory the analyses' results hold, phase by phase: on a GPU as on the CPU.

The statistics an analysis gathers live where the model runs (the tracker's sums, the
contribution sums: CUDA memory on a GPU), but the results the callbacks publish are CPU tensors
(``LayerStats``, ``ContributionResult``, ``NeuronClusteringResult``, ...) kept for the whole fit,
and at ImageNet's shape they are hundreds of MB of host memory. This script fits
``ImageClassifier(torchvision <model>, weights=None)`` on random images with every callback at
its defaults and, whenever an analysis announces a phase, adds up the bytes of the CPU tensors in
the results: the published ones (``callback.results``) and those being made (result objects in
the analyses' frames), and once more when the fit ends. It prints the largest sum, when it was
reached, and what each callback's results hold at the end.

    python benchmarks/held_results.py                    # ResNet-50, 1,000 classes, 2 epochs

(It runs on earlier commits too: copy it into their ``benchmarks/``; it counts the library of
the worktree it lies in.)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the library of the worktree this script lies in (copied into an older one, that one's)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import operations  # noqa: E402
import scale  # noqa: E402

#: Modules whose dataclasses are results (found in the analyses' frames too).
RESULT_MODULES = ("lightning_neurons.results", "lightning_neurons.stats", "lightning_neurons.contribution", "lightning_neurons.class_contribution")  # fmt: skip


def cpu_tensors(obj: Any, seen: dict, results_only: bool = False, visited: set | None = None):
    """Add the CPU tensors in ``obj`` (dataclasses, dicts, lists, tuples) to ``seen`` by storage;
    with ``results_only``, only those inside result dataclasses."""
    import torch

    visited = set() if visited is None else visited
    if id(obj) in visited:
        return
    visited.add(id(obj))
    if results_only and dataclasses.is_dataclass(obj) and type(obj).__module__ in RESULT_MODULES:
        results_only = False
    if isinstance(obj, torch.Tensor):
        if not results_only and obj.device.type == "cpu":
            seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        values = list(obj.values())
    elif isinstance(obj, list | tuple):
        values = list(obj)
    else:
        return
    for value in values:
        cpu_tensors(value, seen, results_only, visited)


def held_mb(callbacks: list, frame: Any) -> float:
    """MB of CPU tensors in the callbacks' results and in result objects of the library's
    frames from ``frame`` outwards."""
    seen: dict[int, int] = {}
    for callback in callbacks:
        cpu_tensors(getattr(callback, "results", None), seen)
    while frame is not None:
        if "lightning_neurons" in frame.f_code.co_filename:
            for value in list(frame.f_locals.values()):
                cpu_tensors(value, seen, results_only=True)
        frame = frame.f_back
    return sum(seen.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    operations.add_fit_arguments(parser)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import lightning.pytorch as pl
    import torch

    from lightning_neurons import progress

    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    callbacks = scale.make_callbacks("all", hdbscan_ok=False)  # k-means: the same every run
    trainer, fit = operations.fit_with(args, callbacks, "ln-held-", accelerator=args.device)
    peak = {"mb": 0.0, "at": ""}
    phase = progress.Reporter.phase

    def counted(reporter, what, done=None, total=None):
        mb = held_mb(callbacks, sys._getframe(1))
        if mb > peak["mb"]:
            peak.update(
                mb=mb,
                at=f"the start of {reporter.status.name}: {what} (epoch {trainer.current_epoch})",
            )
        return phase(reporter, what, done, total)

    progress.Reporter.phase = counted
    fit()
    end = held_mb(callbacks, None)  # the last analyses' results, made after their last phase
    if end > peak["mb"]:
        peak.update(mb=end, at=f"the fit's end (epoch {trainer.current_epoch - 1})")
    print(
        f"{args.model}, {args.classes} classes, {args.size} px, {args.epochs} epoch(s), "
        f"{args.device}: the results held at most {peak['mb']:,.1f} MB, at {peak['at']}"
    )
    for callback in callbacks:
        print(f"  {type(callback).__name__:20s} {held_mb([callback], None):8,.1f} MB at the end")


if __name__ == "__main__":
    main()
