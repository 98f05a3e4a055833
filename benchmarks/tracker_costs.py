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

Usage:
    python benchmarks/tracker_costs.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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


def child(config: str, workdir: str) -> None:
    """One fit through the CLI in this process; prints its costs as one JSON line."""
    from lightning_neurons.callbacks.tracker import ActivationTracker
    from lightning_neurons.cli import main

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
    print(json.dumps({"workers": workers.ru_utime + workers.ru_stime, **spent}))


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
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    runs: dict[str, list[dict[str, float]]] = {"tracker": [], "none": []}
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


if __name__ == "__main__":
    main()
