"""What the analyses cost at ImageNet's shape: 1,000 classes, a torchvision ResNet, random data.

Fits ``ImageClassifier(torchvision resnet18|resnet50, weights=None)`` on random images at a small
resolution, once without callbacks and once per chosen set of callbacks (each fit in a fresh
process, so that each peak memory is its own), and prints for each:

* the fit time and its ratio to the bare fit measured in the same run;
* the model's training and validation steps (``SimpleProfiler``): their sum over the epoch and
  their median, against the bare fit's; the tracker's hooks run inside the steps of its stage
  (validation by default), so that ratio is its per-batch overhead, without the one-time costs
  of the epoch's end (its analysis, the first drawing of each figure);
* per callback, the seconds its hooks took per analysed epoch (Lightning's ``SimpleProfiler``:
  every ``[Callback]...`` hook, summed; an analysis that waits for the callbacks it reads runs in
  the last one's stage-end hook, and is counted for its own callback);
* the peak resident memory of the process, the peak host memory of the process and its figure
  workers together (:class:`TreeMemory`), and the peak CUDA memory on ``--device cuda``;
* the largest image logged to TensorBoard (width x height pixels) and the artifact bytes written
  per epoch (the TensorBoard event files and the ``.npz``/``.json`` files);
* a line against the goals (:data:`GOALS`, set for ResNet-50 on a GPU): every analysis per
  analysed epoch, the tracker's per-batch overhead (the validation steps summed; and whether
  the epoch had the 20,000 validation images it is measured on), the peak host memory.

Needs torch, torchvision, lightning, torchmetrics, tensorboard, scikit-learn, SciPy and
matplotlib; not jsonargparse. Without ``hdbscan`` installed, NeuronClustering runs with
``method="kmeans"`` (said in the output).

    python benchmarks/scale.py                                   # resnet18, 1,000 classes, CPU
    python benchmarks/scale.py --model resnet50 --device cuda
    python benchmarks/scale.py --callbacks tracker --val-images 500   # smaller, while iterating
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

VARIANTS = ("none", "tracker", "all")
#: The goals at this shape (issue 20; for ``--model resnet50 --device cuda``): every analysis at
#: most 20 s per analysed epoch, the tracker's per-batch overhead at most 5% of the steps it
#: tracks on epochs of at least 20,000 images, peak host memory at most 4 GB.
GOALS = {"analyses_s": 20.0, "tracker_overhead": 0.05, "epoch_images": 20_000, "rss_mb": 4096}


def make_callbacks(which: str, hdbscan_ok: bool) -> list:
    from lightning_neurons import (
        ActivationTracker,
        CategoryClustering,
        FeatureVisualizer,
        NeuronClustering,
        NeuronContribution,
    )

    if which == "none":
        return []
    if which == "tracker":
        return [ActivationTracker()]
    return [
        ActivationTracker(),
        FeatureVisualizer(),
        CategoryClustering(),
        NeuronClustering() if hdbscan_ok else NeuronClustering(method="kmeans"),
        NeuronContribution(),
    ]


class TreeMemory:
    """The peak host memory of this process and its children (the figure workers), sampled
    every ``interval`` seconds on a thread: the sum of their proportional set sizes (``Pss`` in
    ``/proc/<pid>/smaps_rollup``, so that the pages a forked worker shares with this process
    count once), or of their resident sizes where the kernel gives no ``smaps_rollup``."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self.processes = 0
        self.field = "Pss"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-memory")

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        pids = _tree(os.getpid())
        total = sum(self._kb(pid) for pid in pids) / 1024
        if total > self.peak_mb:
            self.peak_mb, self.processes = total, len(pids)

    def _kb(self, pid: int) -> float:
        for path, field in (
            (f"/proc/{pid}/smaps_rollup", "Pss:"),
            (f"/proc/{pid}/status", "VmRSS:"),
        ):
            try:
                for line in Path(path).read_text().splitlines():
                    if line.startswith(field):
                        if field == "VmRSS:":
                            self.field = "RSS"
                        return float(line.split()[1])
            except OSError:
                continue
        return 0.0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/<pid>/task/<tid>/children``)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in children.read_text().split())
            except OSError:
                continue
    return found


class ImageSizes:
    """Records the ``(width, height)`` of every image logged to TensorBoard (a callback that wraps
    the writer's ``add_image`` at the start of the fit)."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int, str]] = []

    def attach(self, logger) -> None:
        writer = logger.experiment
        add_image = writer.add_image

        def recording(tag, img_tensor, *args, dataformats="CHW", **kwargs):
            shape = tuple(getattr(img_tensor, "shape", ()))
            if len(shape) == 3:
                h, w = (shape[0], shape[1]) if dataformats == "HWC" else (shape[1], shape[2])
                self.sizes.append((int(w), int(h), tag))
            return add_image(tag, img_tensor, *args, dataformats=dataformats, **kwargs)

        writer.add_image = recording


def child(args: argparse.Namespace, which: str) -> dict:
    """One fit in this (fresh) process; returns its measurements."""
    import lightning.pytorch as pl
    import torch
    import torchvision
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.profilers import SimpleProfiler
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_neurons.models import ImageClassifier

    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    hdbscan_ok = importlib.util.find_spec("hdbscan") is not None
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> TensorDataset:
        x = torch.rand(n, 3, args.size, args.size, generator=g)
        y = torch.arange(n) % args.classes
        return TensorDataset(x, y)

    train, val = data(args.train_images), data(args.val_images)
    backbone = getattr(torchvision.models, args.model)(weights=None, num_classes=args.classes)
    model = ImageClassifier(backbone, num_classes=args.classes, lr=1e-3)
    callbacks = make_callbacks(which, hdbscan_ok)
    sizes = ImageSizes()
    workdir = Path(tempfile.mkdtemp(prefix="ln-scale-"))
    logger = TensorBoardLogger(str(workdir), name="scale")
    sizes.attach(logger)
    profiler = SimpleProfiler(dirpath=str(workdir), filename="profile")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.device,
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        profiler=profiler,
        callbacks=callbacks,
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with TreeMemory() as tree:
        trainer.fit(
            model,
            DataLoader(train, batch_size=args.batch_size, shuffle=True),
            DataLoader(val, batch_size=args.batch_size),
        )
        seconds = time.perf_counter() - start
    per_callback: dict[str, float] = defaultdict(float)
    for key, durations in profiler.recorded_durations.items():
        if key.startswith("[Callback]"):
            name = key[len("[Callback]") :].split("{")[0].split(".")[0]
            per_callback[name] += sum(durations)
    for cb in callbacks:  # an analysis that waits for its peers runs in the last one's hook
        name = type(cb).__name__
        per_callback[name] += getattr(cb, "_seconds_elsewhere", 0.0)
        per_callback[name] -= getattr(cb, "_hosted_seconds", 0.0)
    analysed = {
        type(cb).__name__: sum(
            1 for e in range(args.epochs) if (e + 1) % getattr(cb, "every_n_epochs", 1) == 0
        )
        for cb in callbacks
    }
    steps = {}  # the model's steps (the tracker's hooks run inside them): total and median
    for stage in ("training_step", "validation_step"):
        durations = profiler.recorded_durations.get(f"[Strategy]SingleDeviceStrategy.{stage}", [])
        if durations:
            steps[stage] = [sum(durations), statistics.median(durations), len(durations)]
    artifact_bytes = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
    largest = max(sizes.sizes, key=lambda s: s[0] * s[1]) if sizes.sizes else (0, 0, "")
    failures = [f for cb in callbacks for f in getattr(cb, "failures", [])]
    return {
        "variant": which,
        "seconds": seconds,
        "per_callback": {n: per_callback.get(n, 0.0) / max(1, analysed[n]) for n in analysed},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_tree_mb": tree.peak_mb,
        "tree": [tree.processes, tree.field],
        "peak_cuda_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
        ),
        "largest_image": list(largest),
        "images_logged": len(sizes.sizes),
        "artifact_bytes_per_epoch": artifact_bytes / args.epochs,
        "failures": failures,
        "hdbscan": hdbscan_ok,
        "steps": steps,
    }


def run_child(args: argparse.Namespace, which: str) -> dict:
    command = [sys.executable, __file__, "--child", which, *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {which!r} fit failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet18")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument(
        "--callbacks",
        nargs="+",
        choices=VARIANTS[1:],
        default=list(VARIANTS[1:]),
        help="the sets of callbacks to measure, each against a bare fit (default: tracker all)",
    )
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args, args.child)))
        return
    print(
        f"{args.model} (weights None), {args.classes} classes, {args.size} px, "
        f"{args.train_images} training and {args.val_images} validation images, batch "
        f"{args.batch_size}, {args.epochs} epoch(s), {args.device}, {args.threads} thread(s); "
        "each fit in a fresh process",
        flush=True,
    )
    base = run_child(args, "none")
    report(base, base)
    for which in args.callbacks:
        result = run_child(args, which)
        report(result, base)
        print(against_goals(result, base, args), flush=True)


def against_goals(r: dict, base: dict, args: argparse.Namespace) -> str:
    """The run next to the goals of :data:`GOALS` (which are set for ResNet-50 on a GPU)."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    shape = (
        "" if (args.model, args.device) == ("resnet50", "cuda") else " (set for resnet50 on cuda)"
    )
    host = max(r["peak_rss_mb"], r["peak_tree_mb"])
    rss = f"peak host memory {host:,.0f} MB vs <= {GOALS['rss_mb']:,} MB: "
    rss += verdict(host <= GOALS["rss_mb"])
    if r["variant"] == "tracker":
        tracked = "validation_step"  # the tracker's default stage
        overhead = r["steps"][tracked][0] / base["steps"][tracked][0] - 1
        size = (
            ""
            if args.val_images >= GOALS["epoch_images"]
            else f"; an epoch of {args.val_images:,} images is "
            f"under the {GOALS['epoch_images']:,} the goal is measured on"
        )
        return (
            f"    goals{shape}: tracker overhead per batch (the validation steps, summed) "
            f"{overhead:+.1%} vs <= {GOALS['tracker_overhead']:.0%}: "
            f"{verdict(overhead <= GOALS['tracker_overhead'])}{size}; {rss}"
        )
    analyses = sum(r["per_callback"].values())
    return (
        f"    goals{shape}: every analysis {analyses:.1f} s per analysed epoch vs <= "
        f"{GOALS['analyses_s']:.0f} s: {verdict(analyses <= GOALS['analyses_s'])}; {rss}"
    )


def report(r: dict, base: dict) -> None:
    cuda = f", peak CUDA {r['peak_cuda_mb']:,.0f} MB" if r["peak_cuda_mb"] is not None else ""
    w, h, tag = r["largest_image"]
    print(
        f"  {r['variant']:8s} fit {r['seconds']:8.1f} s  ratio {r['seconds'] / base['seconds']:7.2f}x"
        f"  peak RSS {r['peak_rss_mb']:,.0f} MB (with the figure workers {r['peak_tree_mb']:,.0f} MB"
        f" {r['tree'][1]}, {r['tree'][0]} processes){cuda}  artifacts "
        f"{r['artifact_bytes_per_epoch'] / 1e6:,.2f} MB/epoch  images {r['images_logged']}"
        + (f", largest {w}x{h} px ({tag})" if r["images_logged"] else ""),
        flush=True,
    )
    for stage, (total, median, count) in r["steps"].items():
        bare_total, bare_median, _ = base["steps"][stage]
        print(
            f"      {stage:20s} {total:8.2f} s for {count} batches ({total / bare_total:.3f}x the "
            f"bare fit's), median {median * 1e3:.1f} ms ({median / bare_median:.3f}x)",
            flush=True,
        )
    for name, secs in r["per_callback"].items():
        print(f"      {name:20s} {secs:8.1f} s per analysed epoch", flush=True)
    if r["variant"] == "all" and not r["hdbscan"]:
        print("      (hdbscan not installed: NeuronClustering ran with method='kmeans')")
    for failure in r["failures"]:
        print(f"      FAILED: {failure}", flush=True)


if __name__ == "__main__":
    main()
