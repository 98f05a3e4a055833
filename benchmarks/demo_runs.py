"""The digits demo, run exactly as the README's main command, for several seeds: accuracy and time.

For each seed it runs ``lightning-neurons fit --config configs/digits.yaml --seed_everything S``
(every analysis attached) and, interleaved with it, the same command without any callback, then
prints each run's final and best validation accuracy, its fit time, and the cost of the analyses
(fit with every analysis / fit without), measured side by side.

Usage:
    python benchmarks/demo_runs.py                  # seeds 0 1 2, with and without analyses
    python benchmarks/demo_runs.py --seeds 0 --no-baseline
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
CLI = Path(sys.executable).parent / "lightning-neurons"


def run(seed: int, analyses: bool, workdir: Path) -> dict[str, float]:
    """One fit through the console script; returns its time and accuracies from the summary."""
    command = [
        str(CLI),
        "fit",
        "--config",
        str(CONFIG),
        "--seed_everything",
        str(seed),
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={workdir / 'runs'}",
        f"--trainer.default_root_dir={workdir}",
    ]
    if not analyses:
        command += ["--trainer.callbacks", "[]"]
    out = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    text = out.stdout
    seconds = float(re.search(r"fit done in ([0-9.]+) s", text).group(1))
    final = float(re.search(r"final: .*?val/acc = ([0-9.]+)", text).group(1))
    best = re.search(r"best:  val/acc = ([0-9.]+) \(epoch (\d+) of (\d+)\)", text)
    failures = (text + out.stderr).count("failed and was skipped")
    return {
        "seconds": seconds,
        "final": final,
        "best": float(best.group(1)),
        "best_epoch": int(best.group(2)),
        "failures": failures,
    }


def above_max_by_round(runs: Path) -> list[tuple[int, float]]:
    """Per FeatureVisualizer round (by global step), the share of all channel images that drive their channel
    above its maximum on the validation images (the ``neurons/preference/<layer>/above_max_fraction``
    scalars, weighted by the layers' image counts: 16 per layer in the demo)."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rounds: dict[int, list[float]] = {}
    for events_dir in {p.parent for p in runs.rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith("neurons/preference/") and tag.endswith("/above_max_fraction"):
                for e in events.Scalars(tag):
                    rounds.setdefault(int(e.step), []).append(e.value)
    return [(step, float(np.mean(values))) for step, values in sorted(rounds.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-baseline", action="store_true", help="skip the runs without analyses")
    args = parser.parse_args()
    print(
        f"command: lightning-neurons fit --config configs/digits.yaml --seed_everything S ({CLI})"
    )
    print(
        "| seed | final val/acc | best val/acc (epoch) | fit time, every analysis | "
        "fit time, no callback | ratio |"
    )
    print("|---|---|---|---|---|---|")
    ratios = []
    for seed in args.seeds:
        workdir = Path(tempfile.mkdtemp(prefix=f"demo{seed}_"))
        try:
            full = run(seed, analyses=True, workdir=workdir)
            rounds = above_max_by_round(workdir / "runs")
            bare = None if args.no_baseline else run(seed, analyses=False, workdir=workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if full["failures"]:
            print(f"seed {seed}: {full['failures']} analysis failures were reported", flush=True)
        ratio = full["seconds"] / bare["seconds"] if bare else float("nan")
        if bare:
            ratios.append(ratio)
        print(
            f"| {seed} | {full['final']:.4f} | {full['best']:.4f} ({full['best_epoch']}) | "
            f"{full['seconds']:.1f} s | {bare['seconds'] if bare else float('nan'):.1f} s | "
            f"{ratio:.2f}x |",
            flush=True,
        )
        print(
            "  channel images driven above their validation maximum (all layers), per round: "
            + ", ".join(
                f"round {i} (step {step}): {f:.0%}" for i, (step, f) in enumerate(rounds, 1)
            ),
            flush=True,
        )
    if ratios:
        print(f"median cost of the analyses: {statistics.median(ratios):.2f}x the bare fit")


if __name__ == "__main__":
    main()
