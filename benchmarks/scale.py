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
  the last one's stage-end hook, and is counted for its own callback); with ``--epochs`` over 1,
  the first analysed epoch apart from the later ones (a FeatureVisualizer round that continues
  the last round's images runs ``continue_steps``, not ``steps``);
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
    python benchmarks/scale.py --model resnet50 --device cuda --val-images 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

# the library of the worktree this script lies in (copied into an older one, that one's), in
# each fit's child process too
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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

    def __init__(self, interval: float = 0.5, label: Callable[[], str] | None = None) -> None:
        self.interval = interval
        self.label = label or (lambda: "")
        self.peak_mb = 0.0
        self.peak_label = ""
        #: The peak during each label (what ``label()`` said when the sample was taken).
        self.by_label: dict[str, float] = defaultdict(float)
        self.processes = 0
        #: At the peak, per process (this one first, then the figure workers): ``[Pss, Pss_Anon,
        #: Private]`` in MB. A worker's Pss counts a share of the pages it still shares with
        #: this process; its private memory is what the worker alone adds.
        self.peak_split: list[list[float]] = []
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
        label = self.label()
        pids = _tree(os.getpid())
        sizes = [self._kb(pid) / 1024 for pid in pids]
        total = sum(sizes)
        self.by_label[label] = max(self.by_label[label], total)
        if total > self.peak_mb:
            self.peak_mb, self.processes, self.peak_label = total, len(pids), label
            self.peak_split = [
                [size, *_rollup_mb(pid)] for pid, size in zip(pids, sizes, strict=True)
            ]

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


def _rollup_mb(pid: int) -> tuple[float, float]:
    """``Pss_Anon`` (heap, stacks and tensors, not libraries) and private memory (``Private_Clean``
    + ``Private_Dirty``) of ``pid`` in MB; 0 where the kernel does not say."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0.0, 0.0
    kb = {k: float(v.split()[0]) for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
    private = kb.get("Private_Clean", 0.0) + kb.get("Private_Dirty", 0.0)
    return kb.get("Pss_Anon", 0.0) / 1024, private / 1024


def libraries_mb(pid: int, top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """The ``Pss`` of the files ``pid`` maps (its shared libraries, chiefly), in MB: the total and
    the ``top`` largest by file name. On a GPU the CUDA libraries the analyses load (cuFFT for the
    rendered images' Fourier parameters, say) are host memory the bare fit does not have."""
    by_file: dict[str, float] = defaultdict(float)
    name = None
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return 0.0, []
    for line in lines:
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            path = head[5] if len(head) == 6 else ""
            name = Path(path).name if path.startswith("/") else None
        elif name and line.startswith("Pss:"):
            by_file[name] += float(line.split()[1]) / 1024
    largest = sorted(by_file.items(), key=lambda kv: -kv[1])[:top]
    return sum(by_file.values()), largest


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


class PhaseClock:
    """Times the phases that the analyses announce (:func:`lightning_neurons.progress.phase`):
    each phase lasts until the next phase of its analysis starts, or the analysis ends. Patches
    :class:`lightning_neurons.progress.Reporter` in this (fresh) process."""

    def __init__(self) -> None:
        from lightning_neurons import progress

        self.seconds: dict[str, float] = defaultdict(float)
        self._open: dict[int, tuple[str, float]] = {}
        clock, phase, finish = self, progress.Reporter.phase, progress.Reporter.finish

        def timed_phase(reporter, what, done=None, total=None):
            clock._mark(reporter, f"{reporter.status.name}: {what}")
            return phase(reporter, what, done, total)

        def timed_finish(reporter, seconds):
            clock._mark(reporter, None)
            return finish(reporter, seconds)

        progress.Reporter.phase, progress.Reporter.finish = timed_phase, timed_finish

    def current(self) -> str:
        """The phases open now (``"; "``-joined), or ``"no analysis"``."""
        return "; ".join(sorted(what for what, _ in list(self._open.values()))) or "no analysis"

    def _mark(self, reporter, what: str | None) -> None:
        now = time.perf_counter()
        last = self._open.pop(id(reporter), None)
        if last is not None:
            self.seconds[last[0]] += now - last[1]
        if what is not None:
            self._open[id(reporter)] = (what, now)


def callback_seconds(profiler, callbacks: list) -> dict[str, float]:
    """Each callback's seconds so far: its hooks in Lightning's ``SimpleProfiler`` (every
    ``[Callback]...`` entry), plus what it ran in another callback's hook and less what others
    ran in its own (an analysis that waits for its peers runs in the last one's hook)."""
    seconds: dict[str, float] = defaultdict(float)
    for key, durations in profiler.recorded_durations.items():
        if key.startswith("[Callback]"):
            name = key[len("[Callback]") :].split("{")[0].split(".")[0]
            seconds[name] += sum(durations)
    for cb in callbacks:
        name = type(cb).__name__
        seconds[name] += getattr(cb, "_seconds_elsewhere", 0.0)
        seconds[name] -= getattr(cb, "_hosted_seconds", 0.0)
    return {type(cb).__name__: seconds.get(type(cb).__name__, 0.0) for cb in callbacks}


def epoch_clock(profiler, callbacks: list):
    """A callback, placed last, that notes :func:`callback_seconds` at each training epoch's end
    (after every other callback's hooks of that epoch): its ``marks`` give per-epoch seconds."""
    import lightning.pytorch as pl

    class EpochClock(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[dict[str, float]] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.marks.append(callback_seconds(profiler, callbacks))

    return EpochClock()


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
    phases = PhaseClock()
    sizes = ImageSizes()
    workdir = Path(tempfile.mkdtemp(prefix="ln-scale-"))
    logger = TensorBoardLogger(str(workdir), name="scale")
    sizes.attach(logger)
    profiler = SimpleProfiler(dirpath=str(workdir), filename="profile")
    clock = epoch_clock(profiler, callbacks)
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
        callbacks=[*callbacks, clock],
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with TreeMemory(label=phases.current) as tree:
        trainer.fit(
            model,
            DataLoader(train, batch_size=args.batch_size, shuffle=True),
            DataLoader(val, batch_size=args.batch_size),
        )
        seconds = time.perf_counter() - start
        libraries = libraries_mb(os.getpid())
    artifact_bytes = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
    if not args.keep_logs:  # hundreds of MB a fit at 1,000 classes
        shutil.rmtree(workdir, ignore_errors=True)
    largest = max(sizes.sizes, key=lambda s: s[0] * s[1]) if sizes.sizes else (0, 0, "")
    failures = [f for cb in callbacks for f in getattr(cb, "failures", [])]
    return {
        "variant": which,
        "seconds": seconds,
        **analysis_seconds(profiler, callbacks, clock.marks, args.epochs),
        "phases": sorted(phases.seconds.items(), key=lambda kv: -kv[1]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_tree_mb": tree.peak_mb,
        "peak_tree_during": tree.peak_label,
        "tree_by_phase": sorted(tree.by_label.items(), key=lambda kv: -kv[1]),
        "tree": [tree.processes, tree.field],
        "peak_split": tree.peak_split,
        "libraries": libraries,
        "peak_cuda_mb": (
            torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
        ),
        "largest_image": list(largest),
        "images_logged": len(sizes.sizes),
        "artifact_bytes_per_epoch": artifact_bytes / args.epochs,
        "failures": failures,
        "hdbscan": hdbscan_ok,
        "steps": model_steps(profiler),
        "logs": str(workdir) if args.keep_logs else None,
    }


def analysis_seconds(profiler, callbacks: list, marks: list[dict], epochs: int) -> dict:
    """Per callback, the seconds per analysed epoch and those of each analysed epoch (from the
    :func:`epoch_clock`'s marks; what runs after the last epoch's end counts in that epoch)."""
    totals = callback_seconds(profiler, callbacks)
    marks = [dict.fromkeys(totals, 0.0), *marks[:-1], totals]
    per_epoch = {
        name: [marks[e + 1][name] - marks[e][name] for e in range(len(marks) - 1)]
        for name in totals
    }
    analysed = {
        type(cb).__name__: [
            e for e in range(epochs) if (e + 1) % getattr(cb, "every_n_epochs", 1) == 0
        ]
        for cb in callbacks
    }
    return {
        "per_callback": {n: totals[n] / max(1, len(analysed[n])) for n in analysed},
        "per_epoch": {n: [per_epoch[n][e] for e in analysed[n]] for n in analysed},
    }


def model_steps(profiler) -> dict[str, list[float]]:
    """The model's training and validation steps (the tracker's hooks run inside them):
    ``[total seconds, median seconds, count]`` of each."""
    steps = {}
    for stage in ("training_step", "validation_step"):
        durations = profiler.recorded_durations.get(f"[Strategy]SingleDeviceStrategy.{stage}", [])
        if durations:
            steps[stage] = [sum(durations), statistics.median(durations), len(durations)]
    return steps


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
    parser.add_argument(
        "--phases", type=int, default=0, help="print the analyses' N longest phases (default 0)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of fits, each a bare fit and then every set (interleaved); with more than "
        "one, a summary of the ratios each set paired with its round's bare fit (default 1)",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep each fit's TensorBoard logs and files (default: deleted after the fit)",
    )
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
    rounds: list[tuple[dict, dict[str, dict]]] = []
    for repeat in range(args.repeats):
        if args.repeats > 1:
            print(f"round {repeat + 1} of {args.repeats}", flush=True)
        base = run_child(args, "none")
        report(base, base, args)
        results = {}
        for which in args.callbacks:
            results[which] = result = run_child(args, which)
            report(result, base, args)
            print(against_goals(result, base, args), flush=True)
        rounds.append((base, results))
    if args.repeats > 1:
        summary(rounds, args)


def summary(rounds: list[tuple[dict, dict[str, dict]]], args: argparse.Namespace) -> None:
    """Each set's validation steps (summed over the epoch) paired with its round's bare fit:
    the median ratio and its range. A host-bound step varies from one fit to the next by more
    than the 5% goal, so one pair cannot judge it."""
    print(f"summary of {len(rounds)} rounds (each set against its round's bare fit):")
    for which in args.callbacks:
        ratios = [
            r[which]["steps"]["validation_step"][0] / base["steps"]["validation_step"][0]
            for base, r in rounds
        ]
        text = (
            f"  {which:8s} validation steps {statistics.median(ratios):.3f}x the bare fit's "
            f"(paired, median; {min(ratios):.3f}-{max(ratios):.3f}x)"
        )
        if which == "tracker":
            goal = 1 + GOALS["tracker_overhead"]
            met = "met" if statistics.median(ratios) <= goal else "NOT met"
            text += f" vs <= {goal:.2f}x: {met}"
        else:
            firsts = [sum(e[0] for e in r[which]["per_epoch"].values()) for _, r in rounds]
            text += (
                f"; every analysis in the first analysed epoch {statistics.median(firsts):.1f} s"
            )
        print(text, flush=True)


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
        total, _, count = r["steps"][tracked]
        bare_total = base["steps"][tracked][0]
        overhead = total / bare_total - 1
        # the same added time per batch against the bare fit's training step (the goal's words)
        added = (total - bare_total) / count
        train_step = base["steps"]["training_step"][1]
        size = (
            ""
            if args.val_images >= GOALS["epoch_images"]
            else f"; an epoch of {args.val_images:,} images is "
            f"under the {GOALS['epoch_images']:,} the goal is measured on"
        )
        goal = GOALS["tracker_overhead"]
        return (
            f"    goals{shape}: tracker overhead per batch {overhead:+.1%} of the validation "
            f"steps it runs in (summed) vs <= {goal:.0%}: {verdict(overhead <= goal)}; "
            f"{added * 1e3:+.2f} ms a batch = {added / train_step:+.1%} of the bare training "
            f"step ({train_step * 1e3:.1f} ms, median) vs <= {goal:.0%}: "
            f"{verdict(added / train_step <= goal)}{size}; {rss}"
        )
    epochs = [sum(per) for per in zip(*r["per_epoch"].values(), strict=True)]
    first, later = epochs[0], epochs[1:]
    goal = GOALS["analyses_s"]
    text = f"every analysis {first:.1f} s in the first analysed epoch: {verdict(first <= goal)}"
    if later:
        typical = statistics.median(later)
        text += f", {typical:.1f} s in the later ones (median): {verdict(typical <= goal)}"
    return f"    goals{shape}: {text} (vs <= {goal:.0f} s); {rss}"


def report(r: dict, base: dict, args: argparse.Namespace) -> None:
    cuda = f", peak CUDA {r['peak_cuda_mb']:,.0f} MB" if r["peak_cuda_mb"] is not None else ""
    w, h, tag = r["largest_image"]
    print(
        f"  {r['variant']:8s} fit {r['seconds']:8.1f} s  ratio {r['seconds'] / base['seconds']:7.2f}x"
        f"  peak RSS {r['peak_rss_mb']:,.0f} MB (with the figure workers {r['peak_tree_mb']:,.0f} MB"
        f" {r['tree'][1]}, {r['tree'][0]} processes, during: {r['peak_tree_during']}){cuda}"
        "  artifacts "
        f"{r['artifact_bytes_per_epoch'] / 1e6:,.2f} MB/epoch  images {r['images_logged']}"
        + (f", largest {w}x{h} px ({tag})" if r["images_logged"] else "")
        + (f"  logs {r['logs']}" if r.get("logs") else ""),
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
        epochs = r["per_epoch"][name]
        later = (
            f" (the first {epochs[0]:.1f} s, the later ones {statistics.median(epochs[1:]):.1f} s "
            "median)"
            if len(epochs) > 1
            else ""
        )
        print(f"      {name:20s} {secs:8.1f} s per analysed epoch{later}", flush=True)
    if r.get("peak_split"):
        (pss, anon, _), *workers = r["peak_split"]
        shown = "; ".join(f"{w[0]:,.0f} MB ({w[2]:,.0f} MB its own)" for w in workers) or "none"
        print(
            f"      at the peak ({r['tree'][1]}): the training process {pss:,.0f} MB ({anon:,.0f} MB"
            f" anonymous: heap and tensors), the figure workers {shown}",
            flush=True,
        )
    if r.get("libraries") and r["libraries"][1]:
        total, largest = r["libraries"]
        shown = ", ".join(f"{name} {mb:,.0f}" for name, mb in largest)
        print(f"      files mapped at the fit's end: {total:,.0f} MB Pss (MB: {shown})", flush=True)
    if r["phases"] and args.phases:
        print(f"      the analyses' longest phases (seconds, the whole fit; top {args.phases}):")
        for what, secs in r["phases"][: args.phases]:
            print(f"        {secs:8.2f}  {what}", flush=True)
        print(f"      peak host memory (MB, {r['tree'][1]} of the tree) while, top {args.phases}:")
        for what, mb in r["tree_by_phase"][: args.phases]:
            print(f"        {mb:8,.0f}  {what}", flush=True)
    if r["variant"] == "all" and not r["hdbscan"]:
        print("      (hdbscan not installed: NeuronClustering ran with method='kmeans')")
    for failure in r["failures"]:
        print(f"      FAILED: {failure}", flush=True)


if __name__ == "__main__":
    main()
