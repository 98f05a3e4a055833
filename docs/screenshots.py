"""The README's TensorBoard screenshots, taken as a new user sees them: a demo run, TensorBoard,
and a real headless Chromium.

    python docs/screenshots.py                      # a fresh demo run (10 epochs, ~2 min on 2 cores)
    python docs/screenshots.py --run-dir runs/digits/version_0   # an existing run
    python docs/screenshots.py --epochs 4 --out /tmp/shots       # quicker, elsewhere

It trains ``configs/digits.yaml`` into a temporary folder (unless ``--run-dir`` is given),
starts TensorBoard on a free local port, opens the Scalars, Images, Text, Projector and Custom Scalars tabs in
headless Chromium (``chromium``, ``chromium-browser`` or ``google-chrome`` on the PATH; Debian:
``apt-get install chromium``), writes ``tensorboard_<tab>.png`` (256-colour PNGs, a few hundred KB)
and stops everything it started, also on error or Ctrl-C. Not part of the tests: it needs a
browser and takes minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (file name, URL fragment, window height, virtual milliseconds to let the page load). The
#: Scalars shot is unfiltered, as TensorBoard opens: the first groups open (Lightning's epoch and
#: hp_metric), then the analyses' one neurons/ group and train/ and val/, a click each; the Images
#: shot the last layer's figures and the preferred images.
SHOTS = [
    ("tensorboard_scalars", "scalars", 1000, 20_000),
    ("tensorboard_images", "images&tagFilter=relu3%7Cclasses", 3150, 30_000),
    ("tensorboard_text", "text&tagFilter=relu3%2Fprobes", 1000, 20_000),
    ("tensorboard_projector", "projector", 1000, 60_000),
    ("tensorboard_custom_scalars", "custom_scalars", 1000, 20_000),
]
WIDTH = 1400


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="an existing TensorBoard run to show")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the fresh demo run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go")
    args = parser.parse_args(argv)
    browser = _browser()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ln-shots-") as tmp:
        run_dir = args.run_dir or _demo_run(Path(tmp), args.epochs)
        port = _free_port()
        board = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir)]
            + ["--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as a whole below
        )
        try:
            _wait_for(f"http://127.0.0.1:{port}/data/logdir", board)
            for name, fragment, height, budget in SHOTS:
                path = args.out / f"{name}.png"
                _screenshot(browser, f"http://127.0.0.1:{port}/#{fragment}", path, height, budget)
                print(f"{path} ({path.stat().st_size // 1024} KB)")
        finally:
            _stop(board)
    return 0


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no chromium on the PATH (Debian/Ubuntu: apt-get install chromium)")


def _demo_run(tmp: Path, epochs: int) -> Path:
    """``lightning-neurons fit --config configs/digits.yaml`` into ``tmp``; its run folder."""
    command = [sys.executable, "-m", "lightning_neurons.cli", "fit"]
    command += ["--config", str(ROOT / "configs" / "digits.yaml")]
    command += ["--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.logger.init_args.save_dir", str(tmp)]
    print("demo run:", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return tmp / "digits" / "version_0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"TensorBoard exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer {url} within {timeout:.0f} s")


def _screenshot(browser: str, url: str, path: Path, height: int, budget: int) -> None:
    """One headless-Chromium screenshot, stored as a 256-colour PNG."""
    from PIL import Image

    raw = path.with_suffix(".raw.png")
    command = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--mute-audio"]
    command += ["--enable-unsafe-swiftshader", "--use-angle=swiftshader"]  # WebGL for the projector
    command += [f"--window-size={WIDTH},{height}", f"--virtual-time-budget={budget}"]
    command += [f"--screenshot={raw}", url]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root
    with tempfile.TemporaryDirectory(prefix="ln-chromium-") as profile:
        command.insert(1, f"--user-data-dir={profile}")
        chromium = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=profile,
            start_new_session=True,  # its renderer and GPU processes are stopped with it
        )
        try:
            if chromium.wait(timeout=budget / 1000 + 120) != 0:
                raise RuntimeError(f"chromium exited with code {chromium.returncode} on {url}")
        finally:
            _stop(chromium)
    try:
        with Image.open(raw) as image:
            image.convert("RGB").quantize(colors=256).save(path, optimize=True)
    finally:
        raw.unlink(missing_ok=True)


def _stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and whatever of its group is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group has exited already
        process.wait()
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


if __name__ == "__main__":
    sys.exit(main())
