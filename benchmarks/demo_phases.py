"""Where the demo's analysis time goes: the wall and CPU seconds of every phase the analyses
announce (the lines under the progress bar, without their counts), summed over the analysed
epochs, or per round.

It runs the README's main job in this process (``lightning-neurons fit --config
configs/digits.yaml``, logging to a temporary folder) with the phases timed, then prints them,
largest first. CPU seconds are this process's (every thread), not the figure workers'; a phase
whose CPU is well below twice its wall time on 2 cores lent its threads to the workers drawing.

Usage:
    python benchmarks/demo_phases.py                 # summed over the rounds
    python benchmarks/demo_phases.py --by-round      # each round's phases apart (#0, #1, ...)
    python benchmarks/demo_phases.py --config configs/other.yaml -- --trainer.max_epochs 4
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class PhaseTimes:
    """Wall and CPU seconds of each announced phase (until the next phase of its analysis, or
    the analysis' end), patched into :class:`lightning_neurons.progress.Reporter`."""

    def __init__(self, by_round: bool) -> None:
        from lightning_neurons import progress

        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._open: dict[int, tuple[str, float, float]] = {}
        self._rounds: dict[str, int] = defaultdict(int)
        phase, finish, times = progress.Reporter.phase, progress.Reporter.finish, self

        def timed_phase(reporter, what, done=None, total=None):
            # "rendering channels (64 objectives of 4 layers) and clusters (10 clusters of 3
            # layers)": one row whatever the counts
            name = f"{reporter.status.name}: {what.split(' (')[0]}"
            if by_round:
                times._rounds[name] += 1
                name = f"{name} #{times._rounds[name] - 1}"
            times._mark(reporter, name)
            return phase(reporter, what, done, total)

        def timed_finish(reporter, seconds):
            times._mark(reporter, None)
            return finish(reporter, seconds)

        progress.Reporter.phase, progress.Reporter.finish = timed_phase, timed_finish

    @staticmethod
    def now() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), usage.ru_utime + usage.ru_stime

    def _mark(self, reporter, name: str | None) -> None:
        wall, cpu = self.now()
        last = self._open.pop(id(reporter), None)
        if last is not None:
            self.wall[last[0]] += wall - last[1]
            self.cpu[last[0]] += cpu - last[2]
        if name is not None:
            self._open[id(reporter)] = (name, wall, cpu)

    def report(self) -> None:
        print("| wall s | CPU s | CPU / wall | phase |\n|---|---|---|---|")
        for name in sorted(self.wall, key=lambda n: -self.wall[n]):
            wall, cpu = self.wall[name], self.cpu[name]
            print(f"| {wall:.2f} | {cpu:.2f} | {cpu / max(wall, 1e-9):.2f} | {name} |")
        print(f"| {sum(self.wall.values()):.2f} | {sum(self.cpu.values()):.2f} | | every phase |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    parser.add_argument("--by-round", action="store_true", help="each round's phases apart")
    parser.add_argument("cli_args", nargs="*", help="more arguments for `lightning-neurons fit`")
    args = parser.parse_args()
    times = PhaseTimes(args.by_round)
    from lightning_neurons.cli import main as cli

    with tempfile.TemporaryDirectory() as logs:
        sys.argv = ["lightning-neurons", "fit", "--config", args.config]
        sys.argv += ["--trainer.logger.init_args.save_dir", logs, *args.cli_args]
        start = times.now()
        cli()
        end = times.now()
    print(f"\nthe whole fit: {end[0] - start[0]:.1f} s wall, {end[1] - start[1]:.1f} s CPU\n")
    times.report()


if __name__ == "__main__":
    main()
