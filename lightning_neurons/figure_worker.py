"""Figures drawn off the training thread: worker processes render them, training goes on.

A matplotlib figure costs a tenth of a second or more to lay out and draw, in Python code that
holds the GIL, so a thread would still slow the training loop. :class:`BackgroundFigures` hands
each figure (the plot function and its arguments, pickled) to worker processes forked from the
training process, and logs the pixels they send back with the ``global_step`` of the moment the
figure was asked for, in the order the figures were asked for: TensorBoard keeps a tag's images
in the order they arrive, and its data server drops every image of a tag at or after the step of
one that arrives late.

The workers are forked at fit start (:meth:`BackgroundFigures.warm`, while the training process is
small), or else when the first figure is asked for, and end once every callback that asked
for figures has waited for them (each callback of the package waits in ``teardown``, before
Lightning closes the loggers), so no process outlives a fit: a worker not gone a few seconds
later (stuck since the fork: forking a process with threads is never quite safe) is killed.
Workers that use no CPU at all for :data:`STALL_TIMEOUT` seconds while figures wait are stuck:
they are ended, and their figures (as those of a worker that was killed) are drawn in the training
process, in their turn, the next time an analysis asks for a figure, reports its progress or waits
for its figures; none is lost. Workers that draw nothing for :data:`FIGURE_TIMEOUT` seconds,
busy or not, are ended and their figures reported lost. Where ``fork`` is not available
(Windows, macOS), the figures are drawn on the spot instead, as they would be without this
module; so are all figures while ``background_figures.enabled`` is ``False``. A figure whose
arguments cannot be pickled (a lambda) is drawn in the training process, and logged in its turn.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib
import io
import math
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
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_for_futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from lightning_neurons.heap import release_freed_memory

#: Seconds :meth:`BackgroundFigures.wait` waits for the workers to draw the next figure before
#: it reports the figures not yet drawn as lost and ends the workers.
FIGURE_TIMEOUT = 600.0

#: Seconds the workers may use no CPU at all while figures wait for them before they are taken
#: as stuck (a worker that draws always uses some): they are ended and the figures they did not
#: draw are drawn on the spot when their callback waits for them.
STALL_TIMEOUT = 30.0

#: Seconds an idle worker has to exit once its pool is shut down before it is killed.
EXIT_GRACE = 5.0

#: Seconds between two looks at the workers while a figure is waited for.
_POLL = 0.5


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


@dataclasses.dataclass(eq=False)
class _Figure:
    """A figure asked for: its pickled arguments (kept until its pixels are logged, to draw it
    again if its worker is lost), how its pixels are logged, and its two futures."""

    payload: bytes | None
    log: Callable[[np.ndarray], None]
    drawn: Future[np.ndarray]
    logged: Future[None] = dataclasses.field(default_factory=Future)
    #: ``False`` once reported lost to :data:`FIGURE_TIMEOUT`: never drawn again.
    redraw: bool = True


#: How a figure fails when its worker is lost (killed, or ended as stuck): it is drawn again.
_WORKER_LOST = (BrokenProcessPool, CancelledError)


@dataclasses.dataclass
class _Watch:
    """What the workers of ``pool`` have done (their CPU time, the figures drawn and logged),
    and since when it has not changed."""

    pool: ProcessPoolExecutor
    seen: tuple[int, int] | None = None
    since: float = 0.0
    looked: float = -math.inf  # when the workers' CPU time was last read

    def stalled(self, progress: int) -> bool:
        """Whether nothing changed for :data:`STALL_TIMEOUT` seconds (never where the workers'
        CPU time cannot be read). Reads it at most every :data:`_POLL` seconds."""
        now = time.monotonic()
        if now - self.looked < _POLL:
            return False
        self.looked = now
        ticks = _cpu_ticks(self.pool)
        if ticks is None:
            return False
        if (ticks, progress) != self.seen:
            self.seen, self.since = (ticks, progress), now
            return False
        return now - self.since >= STALL_TIMEOUT


class BackgroundFigures:
    """Worker processes that draw figures and hands their pixels to a TensorBoard writer.

    Memory stays bounded: a figure's pickled arguments stay in this process until its pixels
    are logged, so while more than ``max_pending_bytes`` of them wait to be drawn, a new figure
    waits for the oldest (an analysis that asks for many figures at once, with the figures of
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
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._order: deque[_Figure] = deque()  # not yet logged, in the order asked for
        self._pending: dict[int, list[_Figure]] = {}  # owner id -> figures not yet waited for
        self._log_lock = threading.Lock()
        self._progress = 0  # figures drawn or logged so far (what the stall watch sees)
        self._watch: _Watch | None = None

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

        ``log`` runs on a thread of this process once the pixels are back, after the figures
        asked for before (or at once, when the figure is drawn on the spot: workers disabled or
        not available; its errors then reach the caller); its errors, and the figure's, are kept
        for :meth:`wait`. A figure whose arguments cannot be pickled is drawn here, now, and
        logged in its turn.
        """
        kwargs = dict(kwargs or {})
        if not (self.enabled and self.available()):
            log(draw(fn, *args, **kwargs))  # on the spot: errors reach the caller now
            return
        payload = _payload(fn, args, kwargs)
        self._redraw_lost()
        if payload is not None:
            self._make_room(len(payload))
        with self._lock:
            drawn = None if payload is None else self._to_workers(payload)
            figure = _Figure(payload, log, drawn or Future())
            self._pending.setdefault(id(owner), []).append(figure)
            self._order.append(figure)
        if drawn is None:  # arguments that cannot be pickled, or no worker starts: drawn here,
            # and logged in its turn (after the figures asked for before it)
            _set_drawn(figure.drawn, functools.partial(draw, fn, *args, **kwargs))
        figure.drawn.add_done_callback(lambda _: self._log_in_order())

    def _to_workers(self, payload: bytes) -> Future[np.ndarray] | None:
        """``payload`` sent to the workers (new ones if the last have died); ``None`` if no
        worker can start. Called holding the lock."""
        for _ in range(2):
            gc.freeze()  # a forked worker's collector leaves the parent's objects (and pages) alone
            try:
                return self._start().submit(_draw_pickled, payload)
            except (BrokenProcessPool, RuntimeError):  # the workers died: new ones
                self._pool = None
            finally:
                gc.unfreeze()
        return None

    def _redraw_lost(self) -> None:
        """Draw here the figures whose workers were lost (killed, or ended as stuck), then log
        what can be logged: they hold back the figures asked for after them (see
        :meth:`_log_in_order`). Called on the thread that asks for figures and waits for them,
        never on a pool's own thread (forking while another thread draws could fork its locks)."""
        with self._lock:
            lost = [f for f in self._order if f.redraw and f.payload is not None and _lost(f)]
        for figure in lost:
            redrawn: Future[np.ndarray] = Future()
            _set_drawn(redrawn, functools.partial(_draw_pickled, figure.payload))
            figure.drawn = redrawn
        if lost:
            self._log_in_order()

    def _undrawn(self) -> list[_Figure]:
        with self._lock:
            return [figure for figure in self._order if not figure.drawn.done()]

    def _make_room(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more of pickled arguments fit under ``max_pending_bytes`` (or
        nothing else waits)."""
        while True:
            undrawn = self._undrawn()
            held = sum(len(figure.payload or b"") for figure in undrawn)
            if not undrawn or held + nbytes <= self.max_pending_bytes:
                return
            if not self._await(undrawn[0].drawn, time.monotonic() + FIGURE_TIMEOUT):
                return  # the workers draw nothing: wait() reports it, the figure goes on

    def _await(self, future: Future, deadline: float) -> bool:
        """Wait for ``future`` until ``deadline`` (``False`` if it is not done by then), ending
        the workers if they are stuck meanwhile (their figures then fail, and :meth:`wait`
        draws them again)."""
        while not future.done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            wait_for_futures([future], timeout=min(_POLL, left))
            self._end_if_stalled()
            self._redraw_lost()
        return True

    def _end_if_stalled(self) -> None:
        """End the workers if figures wait and the workers have used no CPU, drawn nothing and
        logged nothing for :data:`STALL_TIMEOUT` seconds."""
        with self._lock:
            pool = self._pool
            if pool is None or all(figure.drawn.done() for figure in self._order):
                self._watch = None
                return
            if self._watch is None or self._watch.pool is not pool:
                self._watch = _Watch(pool)
            if not self._watch.stalled(self._progress):
                return
            self._pool = self._watch = None
            waiting = sum(1 for figure in self._order if not figure.drawn.done())
        warnings.warn(
            f"lightning-neurons: the figure workers used no CPU for {STALL_TIMEOUT:g} s with "
            f"{waiting} figure(s) to draw, so they were ended; those figures are drawn in the "
            "training process instead, when their callback waits for them",
            RuntimeWarning,
            stacklevel=2,
        )
        _end(pool, grace=0.0)

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
        :attr:`workers` (the analyses give them their cores: :mod:`lightning_neurons.cores`).
        Stuck workers are ended first (see :data:`STALL_TIMEOUT`), and their figures drawn here."""
        self._end_if_stalled()
        self._redraw_lost()
        return min(len(self._undrawn()), self.workers)

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
        """Log the figures drawn so far, in the order they were asked for, up to the first one
        not drawn yet or whose worker was lost (it is drawn again by :meth:`_redraw_lost`).
        TensorBoard shows a tag's images in the order they reach the event file, and its data
        server drops every image of a tag at or after the step of one that arrives late."""
        self._progress += 1
        with self._log_lock:
            while True:
                with self._lock:
                    head = self._order[0] if self._order else None
                    if head is None or not head.drawn.done() or _to_redraw(head):
                        return
                    figure = self._order.popleft()
                self._log(figure)
                self._progress += 1

    @staticmethod
    def _log(figure: _Figure) -> None:
        try:
            figure.log(figure.drawn.result())
        except BaseException as err:  # noqa: BLE001 - kept for the owner's wait()
            figure.logged.set_exception(err)
        else:
            figure.logged.set_result(None)
        finally:
            figure.payload = None

    def wait(self, owner: object) -> list[BaseException]:
        """Wait until every figure of ``owner`` is logged; the errors they raised (once each).

        A figure whose worker was lost (killed, or ended as stuck) is drawn here, in its turn.
        The workers end once no figure of any owner is pending. If they draw nothing for
        :data:`FIGURE_TIMEOUT` seconds, the figures not yet drawn are reported lost (one error)
        and the workers are ended; a figure asked for later starts new ones."""
        self._redraw_lost()
        with self._lock:
            mine = self._pending.pop(id(owner), [])
        errors: list[BaseException] = []
        deadline, lost = time.monotonic() + FIGURE_TIMEOUT, 0
        for figure in mine:
            if not self._await(figure.logged, deadline):
                figure.redraw, lost = False, lost + 1
                continue
            if (error := figure.logged.exception()) is not None:
                errors.append(error)
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
            if lost:  # what those workers did not draw may never end: not drawn again
                for figure in self._order:
                    figure.redraw = False
        if pool is not None:
            _end(pool, grace=0.0 if lost else EXIT_GRACE)
        if lost:
            self._log_in_order()  # the figures not drawn again are reported, not held
        return errors


def _lost(figure: _Figure) -> bool:
    """Whether ``figure``'s drawing failed because its worker was lost (killed, or ended)."""
    drawn = figure.drawn
    return drawn.done() and (drawn.cancelled() or isinstance(drawn.exception(), _WORKER_LOST))


def _to_redraw(figure: _Figure) -> bool:
    """Whether ``figure`` waits to be drawn again (its worker lost, and it may be redrawn)."""
    return figure.redraw and figure.payload is not None and _lost(figure)


def _payload(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict) -> bytes | None:
    """The pickled figure; ``None`` for a lambda, a local function, an open file...: drawn in
    this process."""
    try:
        return _dumps((fn, tuple(args), kwargs))
    except Exception:  # noqa: BLE001 - whatever pickling raises, the figure is drawn here
        return None


def _set_drawn(future: Future, make: Callable[[], np.ndarray]) -> None:
    """Draw a figure here: ``make()``'s pixels, or its error, as ``future``'s outcome."""
    try:
        pixels = make()
    except Exception as err:  # noqa: BLE001 - reported by the owner's wait()
        future.set_exception(err)
    else:
        future.set_result(pixels)


def _cpu_ticks(pool: ProcessPoolExecutor) -> int | None:
    """The CPU time, in clock ticks, that the workers of ``pool`` have used (``/proc``); ``None``
    where it cannot be read."""
    total = 0
    for worker in list((pool._processes or {}).values()):  # noqa: SLF001 - see _end
        try:
            with open(f"/proc/{worker.pid}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime and stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            return None
    return total


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
