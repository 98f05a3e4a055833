"""What the ActivationTracker costs the demo, piece by piece: the steadier figure beside
``demo_runs.py``'s fit times.

On a VM whose bare fit moves by a third from one run to the next, a 5% goal cannot be judged
from fit times. This script runs the demo config through the CLI in-process twice, with the
tracker alone and with no callback (interleaved, ``--repeats`` each, every run in a fresh
process), and times what the tracker adds on the training thread: its hooks (the forward hooks
on the tracked layers), its epoch ends (the statistics computed, the figures and files handed
to the workers), and its teardown (the wait for the last figures and files); and the CPU time of
the figure workers (forked processes, drawing while training goes on). It prints each as a share
of the bare fit's median time.

``--all`` adds the config as it is (every analysis) to the interleaved runs. For each setup
with figures it prints the workers' CPU seconds per plot function (timed inside the workers).

Usage:
    python benchmarks/tracker_costs.py [--repeats 3] [--all]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_runs import config_for  # noqa: E402

#: The tracker's methods timed (wall seconds on the training thread), and what they are.
TIMED = {
    "_on_activation": "hooks (every tracked layer, every batch)",
    "_publish": "epoch ends (statistics, figures and files handed over)",
    "teardown": "teardown (waiting for the last figures and files)",
}


#: Where the figure workers log each figure (set in the child before its fit).
_DRAWS: list[Path] = []


def _draw_and_count(payload: bytes):
    """The figure worker's ``_draw_pickled``, appending the plot function's name and CPU seconds
    to ``_DRAWS[0]`` (module level: the pool pickles it by name; the workers are forked)."""
    from lightning_neurons.figure_worker import draw

    fn, args, kwargs = pickle.loads(payload)
    start = time.process_time()
    try:
        return draw(fn, *args, **kwargs)
    finally:
        name = getattr(fn, "__name__", type(fn).__name__)
        with open(_DRAWS[0], "a", encoding="utf-8") as out:
            out.write(f"{name} {time.process_time() - start:.6f}\n")


def _figure_seconds(log: Path) -> dict[str, list[float]]:
    """``{plot function: [figures, CPU seconds]}`` from the workers' log."""
    figures: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if log.exists():
        for line in log.read_text().splitlines():
            name, seconds = line.split()
            figures[name][0] += 1
            figures[name][1] += float(seconds)
    return dict(figures)


def child(config: str, workdir: str) -> None:
    """One fit through the CLI in this process; prints its costs as one JSON line."""
    import lightning_neurons.figure_worker as worker
    from lightning_neurons.callbacks.tracker import ActivationTracker
    from lightning_neurons.cli import main

    draws = Path(workdir) / "draws.log"
    _DRAWS.append(draws)
    worker._draw_pickled = _draw_and_count

    spent: dict[str, float] = defaultdict(float)
    for name in TIMED:
        original = getattr(ActivationTracker, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - start

        setattr(ActivationTracker, name, timed)
    sys.argv = [
        "lightning-neurons",
        "fit",
        "--config",
        config,
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={workdir}/runs",
        f"--trainer.default_root_dir={workdir}",
    ]
    try:
        main()
    except SystemExit as end:
        if end.code:
            raise
    while multiprocessing.active_children():  # the workers reaped: their CPU time counted
        time.sleep(0.01)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = workers.ru_utime + workers.ru_stime
    print(json.dumps({"workers": cpu, "figures": _figure_seconds(draws), **spent}))


def run(setup: str, workdir: Path) -> dict[str, float]:
    workdir.mkdir(parents=True)
    config = str(config_for(setup, workdir))
    out = subprocess.run(
        [sys.executable, __file__, "--child", config, str(workdir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"the {setup} run failed:\n{out.stderr[-3000:]}")
    fit = re.search(r"fit done in ([0-9.]+) s", out.stdout)  # the CLI's own summary
    if fit is None:
        raise SystemExit(f"no fit time in the {setup} run's output:\n{out.stdout[-3000:]}")
    return {"fit": float(fit.group(1)), **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--all", action="store_true", help="also every analysis (the config as it is)"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    runs: dict[str, list[dict]] = {"tracker": [], "none": [], **({"all": []} if args.all else {})}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for setup in runs:
                result = run(setup, Path(tmp) / f"{setup}{repeat}")
                runs[setup].append(result)
                print(f"{setup} run {repeat + 1}: fit {result['fit']:.1f} s", flush=True)
    bare = statistics.median(r["fit"] for r in runs["none"])
    tracked = statistics.median(r["fit"] for r in runs["tracker"])
    print(f"\nbare fit (median of {args.repeats}): {bare:.1f} s; with the tracker {tracked:.1f} s")
    print("| the tracker's | seconds per fit (each run) | median | share of the bare fit |")
    print("|---|---|---|---|")
    rows = {**TIMED, "workers": "figure workers' CPU time (beside the training)"}
    total = 0.0
    for key, what in rows.items():
        values = [r.get(key, 0.0) for r in runs["tracker"]]
        median = statistics.median(values)
        total += median if key != "workers" else 0.0
        each = ", ".join(f"{v:.3f}" for v in values)
        print(f"| {what} | {each} | {median:.3f} s | {median / bare:.1%} |")
    print(f"| on the training thread, in all | | {total:.3f} s | {total / bare:.1%} (goal 5%) |")
    for setup in ("tracker", "all"):
        if runs.get(setup):
            figures_table(setup, runs[setup], bare)


def figures_table(setup: str, runs: list[dict], bare: float) -> None:
    """The figure workers' CPU seconds per plot function (medians over the runs)."""
    fits = ", ".join(f"{r['fit']:.1f}" for r in runs)
    workers = statistics.median(r["workers"] for r in runs)
    print(f"\n{setup}: fits {fits} s; the figure workers' CPU {workers:.2f} s (median), ")
    print(f"{workers / bare:.1%} of the bare fit; per plot function (medians):")
    print("| plot function | figures | CPU seconds | per figure |")
    print("|---|---|---|---|")
    names = {name for r in runs for name in r["figures"]}
    rows = []
    for name in names:
        count = statistics.median(r["figures"].get(name, [0, 0.0])[0] for r in runs)
        seconds = statistics.median(r["figures"].get(name, [0, 0.0])[1] for r in runs)
        rows.append((seconds, name, count))
    for seconds, name, count in sorted(rows, reverse=True):
        print(f"| {name} | {count:g} | {seconds:.3f} | {seconds / max(count, 1):.3f} |")


if __name__ == "__main__":
    main()
