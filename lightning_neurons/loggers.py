"""Where analyses write: the TensorBoard writer, and files next to the event files.

Every callback of the package logs through :class:`AnalysisLogger`, so that all of them agree on
where artifacts go, warn once when no TensorBoard logger is attached, and write only on rank zero.

Files are kept per run and per stage: ``<run>/neurons/<stage>/<kind>/epoch=EEE/<name>.npz``
(``epoch=EEE-step=SSSSSSS`` for an analysis within an epoch: :mod:`lightning_neurons.schedule`), where
``<run>`` is the log folder of the Trainer's first logger that has one (TensorBoard's or CSV's
``version_N``; a new folder ``<default_root_dir>/neurons/run_N`` per Trainer without a logger) and
``<stage>`` is what the Trainer is doing (``fit``, ``validate``, ``test``). Every file is listed in
``<run>/neurons/index.jsonl``, one JSON record per line, appended (the cost of a record does not
grow with the index); :func:`load_index` reads it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_neurons.figure_worker import background_figures, close, draw
from lightning_neurons.scalar_layout import update_layout
from lightning_neurons.schedule import epoch_folder

#: Folder (under the TensorBoard log dir, or the trainer's root dir) holding our files.
ARTIFACT_DIRNAME = "neurons"
#: The index of the files, one JSON record per line.
INDEX_FILENAME = "index.jsonl"

_warned_no_tensorboard: WeakSet[Trainer] = WeakSet()
_run_folders: WeakKeyDictionary[Trainer, Path] = WeakKeyDictionary()


def find_tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    """The trainer's first :class:`TensorBoardLogger`, or ``None``."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger
    return None


def artifact_root(trainer: Trainer) -> Path:
    """The folder for this run's files: ``<log_dir>/neurons`` of the TensorBoard logger, else of
    the first logger with a ``log_dir`` (CSV's ``version_N``), else a folder
    ``<default_root_dir>/neurons/run_N`` of its own for this Trainer (the first free ``N``), so
    that runs sharing a root never write into each other's files."""
    tb = find_tensorboard(trainer)
    loggers = [tb] if tb is not None else list(trainer.loggers)
    for logger in loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return Path(log_dir) / ARTIFACT_DIRNAME
    folder = _run_folders.get(trainer)
    if folder is None:
        base = Path(trainer.default_root_dir) / ARTIFACT_DIRNAME
        number = 0
        while (base / f"run_{number}").exists():
            number += 1
        folder = base / f"run_{number}"
        folder.mkdir(parents=True, exist_ok=True)  # claims the number for this Trainer
        _run_folders[trainer] = folder
    return folder


def written_artifact_root(trainer: Trainer) -> Path | None:
    """The folder :func:`artifact_root` gives when it exists (an analysis wrote there), else
    ``None``; never makes one."""
    if find_tensorboard(trainer) is not None or any(
        getattr(logger, "log_dir", None) for logger in trainer.loggers
    ):
        folder: Path | None = artifact_root(trainer)
    else:
        folder = _run_folders.get(trainer)
    return folder if folder is not None and folder.is_dir() else None


def stage_folder(trainer: Trainer) -> str:
    """``"fit"``, ``"validate"``, ``"test"`` (what the Trainer is running), as a folder name."""
    fn = trainer.state.fn
    return str(getattr(fn, "value", fn) or "fit")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez_compressed`` at zlib level 1: the same ``.npz`` (read by ``np.load``), faster
    to write than at the default level 6 for files a little larger (floats compress little at any
    level)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def _write_npz_atomically(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """:func:`write_npz` to a temporary name, then renamed: a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    try:
        write_npz(partial, arrays)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class BackgroundWrites:
    """The analyses' ``.npz`` files, compressed and written on background threads.

    At many classes the ``[C, K]`` arrays of every layer take a while to compress. zlib releases
    the GIL, so files written on ``threads`` threads compress in parallel, with each other and
    with training. The files of an
    analysis are complete when its callback's ``teardown`` returns (every callback of the package
    waits for its own files there, and reports a failed write per its ``on_error``), before
    Lightning closes the loggers; a ``.npz`` appears under its final name only once written.

    Memory stays bounded: while more than ``max_pending_bytes`` of arrays wait to be written, a
    new write waits for the oldest. The threads are not daemons: the interpreter finishes the
    writes before it exits.

    Args:
        threads: Writer threads (default: the CPUs, at most 8).
        max_pending_bytes: Bytes of arrays held for writing before a new write waits.
    """

    def __init__(self, threads: int | None = None, max_pending_bytes: int = 1 << 30) -> None:
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        self.max_pending_bytes = max_pending_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pending: list[tuple[Future[None], int, int]] = []  # (future, bytes, owner id)
        self._errors: dict[int, list[BaseException]] = {}

    def submit(self, owner: object, fn: Callable[[], None], nbytes: int) -> None:
        """Run ``fn`` on a writer thread; its error is kept for :meth:`wait` of ``owner``."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # a forked child (ddp_fork, say) inherits the pool object but not its threads
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="neurons-writer")
                self._pid = os.getpid()
                self._pending, self._errors = [], {}
            pool = self._pool
        while True:
            with self._lock:
                held = sum(n for _, n, _ in self._pending)
                oldest = self._pending[0] if self._pending else None
            if oldest is None or held + nbytes <= self.max_pending_bytes:
                break
            self._settle(oldest)
        future = pool.submit(fn)
        entry = (future, nbytes, id(owner))
        with self._lock:
            self._pending.append(entry)
        # a finished write leaves the list at once (its error kept for its owner), so the list
        # holds the writes not yet done, not every write of the fit: busy() and the count of
        # held bytes, called at every progress report and write, stay short
        future.add_done_callback(lambda _: self._settle(entry))

    def _settle(self, entry: tuple[Future[None], int, int]) -> None:
        future, _, key = entry
        error = future.exception()
        with self._lock:
            if entry in self._pending:
                self._pending.remove(entry)
                if error is not None:
                    self._errors.setdefault(key, []).append(error)

    def busy(self) -> int:
        """How many writes run now, each compressing on a core of its own (the analyses give
        them their cores, as to the figure workers: :mod:`lightning_neurons.cores`)."""
        with self._lock:
            return sum(1 for future, _, _ in self._pending if future.running())

    def wait(self, owner: object) -> list[BaseException]:
        """Wait until every write of ``owner`` is done; the errors they raised (once each)."""
        key = id(owner)
        with self._lock:
            mine = [entry for entry in self._pending if entry[2] == key]
        for entry in mine:
            self._settle(entry)
        with self._lock:
            return self._errors.pop(key, [])


#: The writer of every :class:`AnalysisLogger`'s ``.npz`` files.
background_writes = BackgroundWrites()


def wait_for_output(owner: object) -> list[BaseException]:
    """Wait until every file and figure that ``owner`` asked for is written; their errors."""
    return [*background_figures.wait(owner), *background_writes.wait(owner)]


#: The first word of every analysis scalar's tag (see :meth:`AnalysisLogger.scalars`).
SCALAR_GROUP = "neurons"


class AnalysisLogger:
    """Writes one analysis' figures, images, histograms, scalars and files.

    All methods do nothing off rank zero, and nothing under ``fast_dev_run`` (Lightning turns
    logging off there; the analyses still run, to show that they work). Figures are closed after
    logging.

    Args:
        trainer: The running trainer.
        kind: The analysis' name (``"activations"``, ``"clustering"``...), used as the first part of
            TensorBoard tags and as the artifact sub-folder.
        owner: The object asking (a callback), whose figures and files
            :func:`wait_for_output` waits for.
    """

    def __init__(self, trainer: Trainer, kind: str, owner: object | None = None) -> None:
        self.trainer = trainer
        self.kind = kind
        self.owner = owner if owner is not None else self
        self.is_writer = trainer.is_global_zero and not trainer.fast_dev_run
        tb = find_tensorboard(trainer)
        self.experiment = tb.experiment if (tb is not None and self.is_writer) else None
        self.root = artifact_root(trainer) if self.is_writer else Path(ARTIFACT_DIRNAME)
        self._step: int | None = None
        if tb is None and self.is_writer and trainer not in _warned_no_tensorboard:
            _warned_no_tensorboard.add(trainer)  # once per Trainer, whatever the callbacks
            rank_zero_warn(
                "lightning-neurons: no TensorBoardLogger is attached to the Trainer, so the "
                "analyses' figures and images are not logged; their numbers are still written as "
                f"files under {self.root}. Add `logger=lightning.pytorch.loggers."
                "TensorBoardLogger(...)` (or `trainer.logger: TensorBoardLogger` in YAML) to see "
                "them in TensorBoard."
            )

    @property
    def step(self) -> int:
        """The step everything is logged at: the trainer's ``global_step``, or the one given to
        :meth:`at_step`."""
        return self.trainer.global_step if self._step is None else self._step

    def at_step(self, step: int) -> AnalysisLogger:
        """This logger, logging at ``step`` (what was held back from an earlier epoch)."""
        held = copy.copy(self)
        held._step = step
        return held

    def tag(self, *parts: str) -> str:
        return "/".join([self.kind, *parts])

    def figure(self, tag: str, figure: Any, *args: Any, **kwargs: Any) -> None:
        """Log a figure as an image.

        ``figure`` is either what to log (an ``[H, W, 3]`` uint8 array, or a
        :class:`matplotlib.figure.Figure`, drawn on an Agg canvas and closed afterwards if pyplot
        manages it) or a plot function, called as ``figure(*args, **kwargs)``: then the figure is
        drawn off the training thread (see :mod:`lightning_neurons.figure_worker`) and only when
        a TensorBoard logger will show it; it is logged with the current ``global_step`` once
        drawn, and :func:`wait_for_output` waits for it. Never imports pyplot."""
        from matplotlib.figure import Figure

        if callable(figure) and not isinstance(figure, Figure):
            if self.experiment is not None:
                log = functools.partial(self._add_image, self.experiment, tag, self.step)
                background_figures.submit(self.owner, log, figure, args, kwargs)
        elif self.experiment is not None:  # an image or a figure: closed whether logged or not
            self._add_image(self.experiment, tag, self.step, draw(lambda: figure))
        else:
            close(figure)

    @staticmethod
    def _add_image(experiment: Any, tag: str, step: int, pixels: np.ndarray) -> None:
        experiment.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def image(self, tag: str, image: torch.Tensor) -> None:
        """Log a ``[C, H, W]`` image with values in [0, 1]."""
        if self.experiment is not None:
            self.experiment.add_image(tag, image.detach().cpu().clamp(0, 1), global_step=self.step)

    def histogram(self, tag: str, values: Any) -> None:
        values = _to_numpy(values).astype(np.float64).ravel()
        values = values[np.isfinite(values)]
        if self.experiment is not None and values.size:
            self.experiment.add_histogram(tag, values, global_step=self.step)

    def text(self, tag: str, text: str) -> None:
        if self.experiment is not None:
            self.experiment.add_text(tag, text, global_step=self.step)

    def scalars(self, metrics: Mapping[str, float]) -> None:
        """Log scalars to every logger of the trainer (TensorBoard, CSV, W&B...), each tag under
        :data:`SCALAR_GROUP` (``neurons/activations/<layer>/dead_fraction``): TensorBoard's
        Scalars tab groups charts by their first word, in alphabetical order, 12 to a page, so
        the analyses' charts form one group beside ``train/`` and ``val/``. TensorBoard's Custom
        Scalars tab shows every layer of a metric on one chart
        (:mod:`lightning_neurons.scalar_layout`)."""
        if not self.is_writer:
            return
        clean = {f"{SCALAR_GROUP}/{k}": float(v) for k, v in metrics.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(clean, step=self.step)
        if self.experiment is not None:  # every layer of a metric on one Custom Scalars chart
            update_layout(self.experiment, clean)

    def _path(self, name: str, suffix: str) -> Path:
        """``<root>/<stage>/<kind>/epoch=EEE/<name><suffix>``, its folder created."""
        folder = self.root / stage_folder(self.trainer) / self.kind / epoch_folder(self.trainer)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{name.replace('/', '_').replace(os.sep, '_')}{suffix}"

    def save_arrays(
        self, name: str, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None
    ) -> Path | None:
        """Write ``arrays`` to ``<root>/<stage>/<kind>/epoch=EEE/<name>.npz`` and index it.

        The file is compressed and written on a background thread (see
        :class:`BackgroundWrites`): it is complete once ``background_writes.wait(owner)`` has
        returned (every callback of the package calls it in ``teardown``). The arrays must not be
        changed after the call.

        The index, ``<root>/index.jsonl``, lists every file with its kind, stage, epoch, step,
        name, array names and ``meta``, so results can be analysed without TensorBoard.

        Returns:
            The file written (``None`` off rank zero).
        """
        if not self.is_writer:
            return None
        path = self._path(name, ".npz")
        # on the CPU now (a GPU tensor's copy; a CPU tensor is shared: the package's callbacks
        # never change an array they have logged), compressed and written in the background
        ready = {k: _to_numpy(v) for k, v in arrays.items()}
        background_writes.submit(
            self.owner,
            lambda: _write_npz_atomically(path, ready),
            sum(a.nbytes for a in ready.values()),
        )
        self._index(name, path, sorted(arrays), dict(meta or {}))
        return path

    def save_json(self, name: str, payload: Mapping[str, Any]) -> Path | None:
        """Write ``payload`` to ``<root>/<stage>/<kind>/epoch=EEE/<name>.json`` and index it."""
        if not self.is_writer:
            return None
        path = self._path(name, ".json")
        path.write_text(json.dumps(payload, indent=1, default=_json_default))
        self._index(name, path, [], {})
        return path

    def _index(self, name: str, path: Path, arrays: list[str], meta: dict[str, Any]) -> None:
        """Append one line to the index: O(1) whatever its length (nothing is re-read)."""
        record = {
            "kind": self.kind,
            "stage": stage_folder(self.trainer),
            "name": name,
            "epoch": self.trainer.current_epoch,
            "step": self.step,
            "file": path.relative_to(self.root).as_posix(),
            "arrays": arrays,
            "meta": meta,
        }
        line = json.dumps(record, default=_json_default)
        with open(self.root / INDEX_FILENAME, "a", encoding="utf-8") as index:
            index.write(line + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _to_numpy(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def load_index(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the artifact index written by the callbacks.

    Args:
        root: The artifact folder (``<log_dir>/neurons``) or the log dir above it.

    Returns:
        The index records in the order the files were first written, each with ``kind``,
        ``stage``, ``name``, ``epoch``, ``step``, ``file`` (relative to the artifact folder),
        ``arrays`` and ``meta``; a file written again (a repeated ``validate``) has its latest
        record. An index written as one JSON list (``index.json``) is read too.

    Raises:
        FileNotFoundError: If there is no index under ``root``.
    """
    root = Path(root)
    if not (root / INDEX_FILENAME).exists() and not (root / "index.json").exists():
        root = root / ARTIFACT_DIRNAME
    path = root / INDEX_FILENAME
    if not path.exists() and (root / "index.json").exists():
        return json.loads((root / "index.json").read_text())
    records: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as index:
        for line in index:
            if line.strip():
                record = json.loads(line)
                records[record["file"]] = record
    return list(records.values())
