"""The tracker's statistics of a ``torch.compile``d model against the eager model's, per mode.

Validates a small CNN with random weights on the digits with an ActivationTracker, eagerly and
then compiled with each mode given (on a GPU, ``reduce-overhead`` runs the graph as a CUDA graph,
whose outputs the next run rewrites: the values the tracker keeps from one batch must survive
the next ones), and prints, per mode, the counts' agreement, the largest relative difference of
the class means and maxima, and the seconds of the compiled validation (compilation included).
Exits with status 1 when a mode's statistics differ (counts unequal, or a difference over
``--tolerance``).

    python benchmarks/compiled_statistics.py [--device cuda] [--modes default reduce-overhead]
        [--fullgraph] [--batches 12]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

import lightning.pytorch as pl
import torch

from lightning_neurons import ActivationTracker
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.models import ImageClassifier, SmallCNN
from lightning_neurons.stats import LayerStats


def _validate(
    backbone: torch.nn.Module, device: str, batches: int
) -> tuple[dict[str, LayerStats], float]:
    tracker = ActivationTracker(enable_logging=False, on_error="raise")
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        logger=False,
        callbacks=[tracker],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=batches,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ImageClassifier(backbone, 10)
        trainer.validate(model, datamodule=DigitsDataModule(batch_size=32), verbose=False)
    results = {name.replace("._orig_mod", ""): s for name, s in tracker.results.items()}
    return results, time.perf_counter() - started


def _worst(got: torch.Tensor, want: torch.Tensor) -> float:
    both = want.isfinite() & got.isfinite()
    scale = want[both].abs().clamp_min(1e-3)
    return float(((got[both] - want[both]).abs() / scale).max()) if both.any() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"])
    parser.add_argument("--fullgraph", action="store_true")
    parser.add_argument("--batches", type=int, default=12, help="validation batches of 32")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no Trainer banners
    torch.manual_seed(0)
    net = SmallCNN()
    eager, seconds = _validate(net, args.device, args.batches)
    print(f"eager: {len(eager)} layers, {seconds:.1f} s")
    failed = False
    for mode in args.modes:
        torch._dynamo.reset()
        compiled = torch.compile(net, mode=mode, fullgraph=args.fullgraph)
        got, seconds = _validate(compiled, args.device, args.batches)
        same_layers = list(got) == list(eager)
        counts = same_layers and all(torch.equal(got[k].counts, s.counts) for k, s in eager.items())
        means = max(
            (_worst(got[k].class_means, s.class_means) for k, s in eager.items()), default=0
        )
        peaks = max((_worst(got[k].class_max, s.class_max) for k, s in eager.items()), default=0)
        ok = counts and means <= args.tolerance and peaks <= args.tolerance
        failed |= not ok
        print(
            f"{mode}{' fullgraph' if args.fullgraph else ''}: layers {'same' if same_layers else 'DIFFER'}, "
            f"counts {'equal' if counts else 'DIFFER'}, worst relative difference of class means "
            f"{means:.2e}, of class maxima {peaks:.2e}, {seconds:.1f} s: {'ok' if ok else 'FAILED'}",
            flush=True,
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
