"""How long the demo's terminal stays still: the longest gap between two writes to the screen.

Runs ``lightning-neurons fit --config configs/digits.yaml`` (this checkout's code) for 2 epochs
in a 160 x 40 pseudo-terminal (``TERM=xterm``), times every write the process makes to it, and
reports the longest gap after the first epoch bar appears, with what the screen showed when the
gap began. A person watching a terminal that does not change for long thinks the run hung; the
goal is a gap of at most 5 s.

Usage:
    python benchmarks/terminal_gaps.py                 # 2 epochs of the demo
    python benchmarks/terminal_gaps.py --epochs 4 --goal 5 -- --seed_everything 1
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
FIRST_BAR = re.compile(rb"Epoch 0")


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[tuple[float, bytes]], int]:
    """The demo in a pseudo-terminal: every write as ``(seconds since start, bytes)``, and the
    exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", args.lines, args.columns, 0, 0))
    env = {
        **os.environ,
        "TERM": "xterm",
        "COLUMNS": str(args.columns),
        "LINES": str(args.lines),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).strip(
            os.pathsep
        ),
    }
    command = [
        sys.executable,
        "-m",
        "lightning_neurons.cli",
        "fit",
        "--config",
        str(CONFIG),
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.logger.init_args.save_dir={workdir / 'runs'}",
        f"--trainer.default_root_dir={workdir}",
        *args.cli,
    ]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=workdir, close_fds=True
    )
    os.close(slave)
    writes: list[tuple[float, bytes]] = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the process has exited and closed the terminal
                break
            if not data:
                break
            writes.append((time.perf_counter() - start, data))
        elif process.poll() is not None:
            break
    os.close(master)
    return writes, process.wait()


def screen_line(data: bytes) -> str:
    """The last non-empty line of ``data`` as a person would read it."""
    text = ESCAPES.sub(b"", data).decode("utf-8", "replace")
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--columns", type=int, default=160)
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--goal", type=float, default=5.0, help="longest gap allowed (seconds)")
    parser.add_argument("cli", nargs="*", help="more arguments for the CLI (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ln-gaps-") as tmp:
        writes, code = run(args, Path(tmp))
    output = b"".join(data for _, data in writes)
    first = next((i for i, (_, data) in enumerate(writes) if FIRST_BAR.search(data)), None)
    if code != 0 or first is None:
        sys.stdout.write(output.decode("utf-8", "replace")[-4000:])
        raise SystemExit(f"the demo failed (exit code {code}) or drew no epoch bar")
    gaps = [
        (writes[i + 1][0] - writes[i][0], i) for i in range(first, len(writes) - 1)
    ]  # after the first epoch bar
    longest, at = max(gaps) if gaps else (0.0, first)
    total = writes[-1][0]
    print(f"demo: {args.epochs} epochs in a {args.columns}x{args.lines} pseudo-terminal")
    print(
        f"  run: {total:.1f} s, {len(writes)} writes; first epoch bar at {writes[first][0]:.1f} s"
    )
    print(
        f"  longest gap after it: {longest:.2f} s, from {writes[at][0]:.1f} s, the screen showing:"
    )
    print(f"    {screen_line(writes[at][1])[:150]}")
    for seconds, i in sorted(gaps, reverse=True)[1:5]:
        print(
            f"  next: {seconds:.2f} s from {writes[i][0]:.1f} s: {screen_line(writes[i][1])[:110]}"
        )
    summary = ESCAPES.sub(b"", output).decode("utf-8", "replace")
    if "lightning-neurons: fit done in" in summary:
        print(summary[summary.index("lightning-neurons: fit done in") :].rstrip())
    verdict = "within" if longest <= args.goal else "OVER"
    print(f"{verdict} the goal of {args.goal:.0f} s")
    raise SystemExit(0 if longest <= args.goal else 1)


if __name__ == "__main__":
    main()
