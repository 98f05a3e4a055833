"""What our callbacks make TorchDynamo compile when the model is ``torch.compile``'d.

Fits the demo's SmallCNN, compiled (backend ``"eager"``: the graph capture, not the code
generation, is what hooks change), on the digits for a few epochs: with no callback, with the
ActivationTracker alone and with all five callbacks, each in a fresh process. Prints, side by
side, the frames TorchDynamo compiled (``counters["frames"]``), the graphs, and the
``recompile_limit`` messages of its log (a frame recompiled until TorchDynamo gave up on it).
A count that grows with the epochs would be a recompilation each validation. With
``--backend inductor`` the code is generated too; the validation steps' seconds (the last
epoch's, from each batch's start to its end, every callback's work included) are printed with
their ratio to the bare fit's, and the median batch. ``--fullgraph`` compiles with
``fullgraph=True``, which allows no graph break: a fit that stops is printed as failed.

    python benchmarks/compiled_frames.py [--epochs 1 3] [--val-batches 12] [--backend eager]
        [--fullgraph]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time

import lightning.pytorch as pl

SETUPS = ("none", "tracker", "all")


class ValidationTimer(pl.Callback):
    """The last epoch's validation steps: seconds from each batch's start (before any other
    callback's) to its end (after every other callback's: the timer is first in the list,
    :attr:`end` last)."""

    def __init__(self) -> None:
        self.seconds, self._start, self._epoch = 0.0, 0.0, -1
        self.batches: list[float] = []
        self.end = _BatchEnd(self)

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.current_epoch != self._epoch:
            self.seconds, self._epoch, self.batches = 0.0, trainer.current_epoch, []
        self._start = time.perf_counter()


class _BatchEnd(pl.Callback):
    def __init__(self, timer: ValidationTimer) -> None:
        self.timer = timer

    def on_validation_batch_end(self, *args: object) -> None:
        took = time.perf_counter() - self.timer._start
        self.timer.seconds += took
        self.timer.batches.append(took)


def _fit(
    setup: str, epochs: int, val_batches: int, backend: str, fullgraph: bool
) -> dict[str, float]:
    import torch
    from torch._dynamo.utils import counters

    from lightning_neurons import (
        ActivationTracker,
        CategoryClustering,
        FeatureVisualizer,
        NeuronClustering,
        NeuronContribution,
        RenderOptions,
    )
    from lightning_neurons.data import DigitsDataModule
    from lightning_neurons.models import ImageClassifier, SmallCNN

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("torch._dynamo").addHandler(handler)
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(
        torch.compile(SmallCNN(), backend=backend, fullgraph=fullgraph), num_classes=10
    )
    quiet = dict(on_error="raise", enable_logging=False)
    callbacks = {
        "none": [],
        "tracker": [ActivationTracker(**quiet)],
        "all": [
            ActivationTracker(**quiet),
            FeatureVisualizer(max_channels=2, render=RenderOptions(steps=4), **quiet),
            CategoryClustering(**quiet),
            NeuronClustering(method="kmeans", n_clusters=3, **quiet),
            NeuronContribution(max_batches=2, **quiet),
        ],
    }[setup]
    timer = ValidationTimer()
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=5,
        limit_val_batches=val_batches,
        callbacks=[timer, *callbacks, timer.end],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    return {
        "frames": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "recompile_limit": sum("recompile_limit" in m for m in said),
        "validation_s": timer.seconds,
        "median_ms": 1000 * statistics.median(timer.batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--val-batches", type=int, default=12)
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setup, epochs = args.child[0], int(args.child[1])
        print(json.dumps(_fit(setup, epochs, args.val_batches, args.backend, args.fullgraph)))
        return
    print(f"backend {args.backend}{', fullgraph' if args.fullgraph else ''}")
    print(
        f"{'callbacks':<10} {'epochs':>6} {'frames':>7} {'graphs':>7} {'recompile_limit':>16} "
        f"{'validation s':>13} {'x bare':>7} {'median batch ms':>16}"
    )
    for epochs in args.epochs:
        bare = None
        for setup in SETUPS:
            command = [sys.executable, __file__, "--child", setup, str(epochs)]
            command += ["--val-batches", str(args.val_batches), "--backend", args.backend]
            command += ["--fullgraph"] if args.fullgraph else []
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:  # e.g. a graph break under fullgraph: the fit stopped
                print(f"{setup:<10} {epochs:>6} failed: {_last_error(run.stderr)}", flush=True)
                continue
            got = json.loads(run.stdout.strip().splitlines()[-1])
            bare = got["validation_s"] if bare is None else bare
            print(
                f"{setup:<10} {epochs:>6} {got['frames']:>7} {got['graphs']:>7} "
                f"{got['recompile_limit']:>16} {got['validation_s']:>13.3f} "
                f"{got['validation_s'] / bare:>7.2f} {got['median_ms']:>16.2f}",
                flush=True,
            )


def _last_error(stderr: str) -> str:
    """The last line of a traceback that names an exception."""
    lines = [line for line in stderr.splitlines() if "Error" in line or "Unsupported" in line]
    return lines[-1].strip() if lines else stderr.strip().splitlines()[-1]


if __name__ == "__main__":
    main()
