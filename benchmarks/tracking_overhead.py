"""How much the ActivationTracker slows training, and whether its memory grows with batches.

Runs the digits fit (SmallCNN, the demo's settings, no other callbacks, no logger) without the
tracker and with it (all default layers, ``stage="train"`` and ``stage="validation"``),
alternating the variants in one process, and prints the median time ratios. Then measures the
peak memory of tracking 20 and 200 batches (10x), each in a fresh process.

    python benchmarks/tracking_overhead.py [--repeats 5] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_neurons import ActivationTracker
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.models import ImageClassifier, SmallCNN


def fit_seconds(callbacks: list, epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), num_classes=10, lr=5e-3)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    data = DigitsDataModule()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return time.perf_counter() - start


class SyntheticImages(Dataset):
    """Images made from their index on demand, so the data set's memory is the same for any length."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.rand(1, 32, 32, generator=g), i % 10


def memory_child(batches: int, with_tracker: bool) -> None:
    """Validate ``batches`` batches in this (fresh) process and print the peak RSS growth."""
    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(), num_classes=10)
    loader = DataLoader(SyntheticImages(batches * 64), batch_size=64)
    tracker = ActivationTracker(enable_logging=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[tracker] if with_tracker else [],
    )
    trainer.validate(
        model, dataloaders=DataLoader(SyntheticImages(64), batch_size=64), verbose=False
    )
    before = rss_kib()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    trainer.validate(model, dataloaders=loader, verbose=False)
    stop.set()
    sampler.join()
    state = sum(
        t.numel() * t.element_size()
        for m in tracker._metrics.values()
        for t in m.metric_state.values()
    )
    print(
        json.dumps({"peak_growth_kib": peak[0] - before, "peak_kib": peak[0], "state_bytes": state})
    )


def rss_kib() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def measure_memory(batches: int, with_tracker: bool) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            str(batches),
            "--tracker",
            str(int(with_tracker)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tracker", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, bool(args.tracker))
        return
    torch.set_num_threads(2)
    variants = {
        "baseline": lambda: [],
        "tracker stage=train": lambda: [ActivationTracker(stage="train", enable_logging=False)],
        "tracker stage=validation": lambda: [
            ActivationTracker(stage="validation", enable_logging=False)
        ],
    }
    fit_seconds([], 1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, make in variants.items():
            times[name].append(fit_seconds(make(), args.epochs))
    base = statistics.median(times["baseline"])
    print(
        f"digits fit, {args.epochs} epochs, {args.repeats} alternating repeats, "
        f"{torch.get_num_threads()} threads"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:26s} median {median:7.3f} s   ratio {median / base:6.3f}x   "
            f"(runs: {', '.join(f'{v:.2f}' for v in values)})"
        )
    print(
        "peak resident memory during a validation pass, each in a fresh process (RSS sampled every 2 ms):"
    )
    for batches, tracked in ((20, True), (200, True), (200, False)):
        m = measure_memory(batches, tracked)
        label = f"{batches:4d} batches, {'tracker' if tracked else 'no tracker'}"
        print(
            f"  {label:28s} peak {m['peak_kib'] / 1024:8.1f} MiB, growth during the pass "
            f"{m['peak_growth_kib'] / 1024:6.1f} MiB, tracker state {m['state_bytes'] / 1024:.1f} KiB"
        )


if __name__ == "__main__":
    main()
