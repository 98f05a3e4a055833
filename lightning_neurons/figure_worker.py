"""Figures drawn off the training thread: worker processes render them, training goes on.

A matplotlib figure costs a tenth of a second or more to lay out and draw, in Python code that
holds the GIL, so a thread would still slow the training loop. :class:`BackgroundFigures` hands
each figure (the plot function and its arguments, pickled) to worker processes forked from the
training process, and logs the pixels they send back with the ``global_step`` of the moment the
figure was asked for (TensorBoard orders images by step, not by arrival).

The workers are forked at fit start (:meth:`BackgroundFigures.warm`, while the training process is
small), or else when the first figure is asked for, and end once every callback that asked
for figures has waited for them (each callback of the package waits in ``teardown``, before
Lightning closes the loggers), so no process outlives a fit: a worker not gone a few seconds
later (stuck since the fork: forking a process with threads is never quite safe) is killed, as
are workers that draw nothing for :data:`FIGURE_TIMEOUT` seconds. Where ``fork`` is not available
(Windows, macOS) or a figure's arguments cannot be pickled, the figure is drawn on the spot
instead, as it would be without this module; so are all figures while
``background_figures.enabled`` is ``False``.
"""

from __future__ import annotations

import gc
import importlib
import io
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_for_futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from lightning_neurons.heap import release_freed_memory

#: Seconds :meth:`BackgroundFigures.wait` waits for the workers to draw the next figure before
#: it reports the figures not yet drawn as lost and ends the workers.
FIGURE_TIMEOUT = 600.0

#: Seconds an idle worker has to exit once its pool is shut down before it is killed.
EXIT_GRACE = 5.0


#: Tensor types that go to the workers as NumPy arrays (the others as torch pickles them).
_NUMPY_TYPES = frozenset({
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
})  # fmt: skip


def _cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


class _CPUPickler(pickle.Pickler):
    """Pickles tensors as detached CPU tensors (the worker never touches CUDA or autograd), as
    NumPy arrays where NumPy has their type: torch pickles a tensor by saving its whole storage
    with ``torch.save`` (about 0.1 ms a tensor to dump and as much to load, for the hundreds of
    tiles of a probe grid; and a view's whole base), NumPy only the tensor's own values."""

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        if obj.layout == torch.strided and obj.dtype in _NUMPY_TYPES:
            tensor = obj.detach().cpu().resolve_conj().resolve_neg()
            return _from_numpy, (tensor.numpy(),)
        if obj.requires_grad or obj.device.type != "cpu":
            return _cpu_tensor, (obj.detach().cpu(),)
        return NotImplemented


def _dumps(payload: Any) -> bytes:
    buffer = io.BytesIO()
    _CPUPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
    return buffer.getvalue()


def draw(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> np.ndarray:
    """``fn(*args, **kwargs)`` as ``[H, W, 3]`` uint8 pixels (the figure closed)."""
    from lightning_neurons.plots._canvas import as_image

    figure = fn(*args, **kwargs)
    try:
        return as_image(figure)
    finally:
        close(figure)


def close(figure: Any) -> None:
    """Close ``figure`` if it is a figure that pyplot manages (a user's; the package's figures
    are not registered there). Never imports pyplot."""
    from matplotlib.figure import Figure

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and isinstance(figure, Figure):
        pyplot.close(figure)


def _draw_pickled(payload: bytes) -> np.ndarray:
    fn, args, kwargs = pickle.loads(payload)
    try:
        return draw(fn, *args, **kwargs)
    finally:
        del fn, args, kwargs  # the figure's arguments, then the heap memory they and it freed
        release_freed_memory()  # (workers' own memory at the peak: 50-62 -> 35-39 MB each)


def _fresh_std_streams() -> None:
    """New ``sys.stdout``/``sys.stderr`` on the same file descriptors. A thread of the training
    process that was writing to one of them at the fork held its lock, which stays held in the
    worker for ever: the worker's first warning, or its flush at exit, would wait on it."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            stream = open(fd, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
        except OSError:  # the descriptor is closed: the stream stays as it was
            continue
        setattr(sys, name, stream)


def _init_worker() -> None:
    _fresh_std_streams()
    torch.set_num_threads(1)  # the figures take no more than a core each from training
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the fit, not us mid-figure
    # what every figure needs, loaded once per worker rather than in the first figure's time
    import matplotlib.font_manager  # noqa: F401  (builds or reads the font cache)

    for module in ("activation", "clustering", "contribution", "evolution", "images"):
        importlib.import_module(f"lightning_neurons.plots.{module}")


class BackgroundFigures:
    """Worker processes that draw figures and hands their pixels to a TensorBoard writer.

    Memory stays bounded: a figure's pickled arguments stay in this process until its pixels
    are back, so while more than ``max_pending_bytes`` of them wait, a new figure waits for the
    oldest to be drawn (an analysis that asks for many figures at once, with the figures of
    every layer at 1,000 classes, would otherwise hold them all).

    Args:
        enabled: Draw figures in the workers (``False``: on the calling thread).
        workers: Worker processes (default: 2, or 1 on a single CPU): the figures of an epoch
            are drawn while the next one trains, and those of the last epoch, which ``fit``
            waits for, in parallel.
        max_pending_bytes: Bytes of pickled arguments of figures not yet drawn before a new
            figure waits.
    """

    def __init__(
        self, enabled: bool = True, workers: int | None = None, max_pending_bytes: int = 256 << 20
    ) -> None:
        self.enabled = enabled
        self.workers = workers or min(2, os.cpu_count() or 1)
        self.max_pending_bytes = max_pending_bytes
        self._queued: deque[tuple[Future[np.ndarray], int]] = deque()  # not yet drawn, bytes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, list[Future[None]]] = {}  # owner id -> logged-when-done futures
        self._order: deque[tuple[Future[np.ndarray], Callable[[np.ndarray], None], Future]] = (
            deque()
        )
        self._log_lock = threading.Lock()
        self._errors: dict[int, list[BaseException]] = {}

    @staticmethod
    def available() -> bool:
        return (
            sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
        )

    def submit(
        self,
        owner: object,
        log: Callable[[np.ndarray], None],
        fn: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Draw ``fn(*args, **kwargs)`` in the worker and call ``log(pixels)`` with the result.

        ``log`` runs on a thread of this process once the pixels are back (or at once, when the
        figure is drawn on the spot); its errors, and the figure's, are kept for :meth:`wait`.
        """
        kwargs = dict(kwargs or {})
        payload = self._payload(fn, args, kwargs)
        if payload is None:
            log(draw(fn, *args, **kwargs))  # on the spot: errors reach the caller now
            return
        self._make_room(len(payload))
        with self._lock:
            gc.freeze()  # a forked worker's collector leaves the parent's objects (and pages) alone
            try:
                future = self._start().submit(_draw_pickled, payload)
            except (BrokenProcessPool, RuntimeError):  # the worker died: a new one next time
                self._pool = None
                future = None
            finally:
                gc.unfreeze()
            logged: Future[None] = Future()
            if future is not None:
                self._pending.setdefault(id(owner), []).append(logged)
                self._order.append((future, log, logged))
                self._queued.append((future, len(payload)))
        if future is None:
            log(draw(fn, *args, **kwargs))
            return
        future.add_done_callback(lambda _: self._log_in_order())

    def _make_room(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more of pickled arguments fit under ``max_pending_bytes`` (or
        nothing else waits)."""
        while True:
            with self._lock:
                while self._queued and self._queued[0][0].done():
                    self._queued.popleft()
                held = sum(n for drawn, n in self._queued if not drawn.done())
                oldest = self._queued[0][0] if self._queued else None
            if oldest is None or held + nbytes <= self.max_pending_bytes:
                return
            wait_for_futures([oldest], timeout=FIGURE_TIMEOUT)
            if not oldest.done():  # a stuck worker: wait() reports it, the figure goes on
                return

    def warm(self) -> None:
        """Fork the workers now, while the training process is small (before the analyses'
        statistics and held batches exist): a page the training process rewrites after the fork
        stays in every worker as it was, so a worker forked late holds a copy of what training
        has rewritten since. Nothing happens where figures are drawn on the spot or while the
        workers run."""
        if not (self.enabled and self.available()):
            return
        with self._lock:
            if self._pool is not None:
                return
            gc.freeze()
            try:
                self._start().submit(os.getpid)  # with fork, every worker starts with the first
            except (BrokenProcessPool, RuntimeError):
                self._pool = None
            finally:
                gc.unfreeze()

    def busy(self) -> int:
        """How many workers draw now: the figures asked for and not yet drawn, at most
        :attr:`workers` (the analyses give them their cores: :mod:`lightning_neurons.cores`)."""
        with self._lock:
            waiting = sum(1 for drawn, _, _ in self._order if not drawn.done())
        return min(waiting, self.workers)

    def _payload(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict) -> bytes | None:
        if not (self.enabled and self.available()):
            return None
        try:
            return _dumps((fn, tuple(args), kwargs))
        except Exception:  # a lambda, a local function, an open file...: drawn on the spot
            return None

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            with warnings.catch_warnings():  # Python >= 3.12 warns of fork in threaded processes
                warnings.simplefilter("ignore", DeprecationWarning)
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("fork"),
                    initializer=_init_worker,
                )
        return self._pool

    def _log_in_order(self) -> None:
        """Log the figures drawn so far, in the order they were asked for (TensorBoard's slider
        shows a tag's images in the order they reach the event file)."""
        with self._log_lock:
            while True:
                with self._lock:
                    if not (self._order and self._order[0][0].done()):
                        return
                    done, log, logged = self._order.popleft()
                self._log(done, log, logged)

    @staticmethod
    def _log(done: Future[np.ndarray], log: Callable[[np.ndarray], None], logged: Future) -> None:
        try:
            log(done.result())
        except BaseException as err:  # noqa: BLE001 - kept for the owner's wait()
            logged.set_exception(err)
        else:
            logged.set_result(None)

    def wait(self, owner: object) -> list[BaseException]:
        """Wait until every figure of ``owner`` is logged; the errors they raised (once each).

        The workers end once no figure of any owner is pending. If they draw nothing for
        :data:`FIGURE_TIMEOUT` seconds, the figures not yet drawn are reported lost (one error)
        and the workers are ended; a figure asked for later starts new ones."""
        with self._lock:
            mine = self._pending.pop(id(owner), [])
        errors: list[BaseException] = []
        deadline, lost = time.monotonic() + FIGURE_TIMEOUT, 0
        for logged in mine:
            try:
                logged.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                lost += 1
                continue
            except BaseException as err:  # noqa: BLE001 - reported by the owner
                errors.append(err)
            deadline = time.monotonic() + FIGURE_TIMEOUT  # the workers go on: a full wait again
        if lost:
            errors.append(
                TimeoutError(
                    f"{lost} figure(s) were not drawn: the figure workers drew nothing for "
                    f"{FIGURE_TIMEOUT:.0f} s and were ended"
                )
            )
        with self._lock:
            pool = None
            if lost or not any(self._pending.values()):
                pool, self._pool = self._pool, None
        if pool is not None:
            _end(pool, grace=0.0 if lost else EXIT_GRACE)
        return errors


def _end(pool: ProcessPoolExecutor, grace: float) -> None:
    """Shut ``pool`` down and see its workers gone: one still alive ``grace`` seconds later
    (stuck since it was forked, say) is killed. The interpreter joins every worker of a
    pool at exit, so a worker that never ends would keep the training process from ever
    exiting, its fit done."""
    workers = list((pool._processes or {}).values())  # noqa: SLF001 - public from Python 3.14 only
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


#: The figure worker of every :class:`~lightning_neurons.loggers.AnalysisLogger`.
background_figures = BackgroundFigures()
