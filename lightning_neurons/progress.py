"""What the analysis running at an epoch's end is doing, shown through the trainer's progress bar.

The analysis callbacks' base class runs each epoch-end analysis inside :func:`reporting`. Code
at any depth below it (the render loop, saliency, clustering, ablation) then says what it is
doing with one call, without passing anything around:

- :func:`phase`: what the analysis does now (``phase("rendering backbone.relu1")``); it
  clears the loop counter below;
- :func:`update`: how far the current phase's loop is (``update("step", 96, 128)``);
- :func:`advance`: the same for a loop without an index: each call counts one more.

Outside :func:`reporting` the three do nothing, so library functions call them freely. Inside,
each call is also where the analysis lends its torch threads to the figure workers that draw and
the writer threads that compress at that moment, and takes them back once they are done
(:mod:`lightning_neurons.cores`); and each :func:`phase` gives the heap memory that the phase
before it freed back to the system (:mod:`lightning_neurons.heap`).

Where the status goes depends on the trainer:

- a :class:`~lightning.pytorch.callbacks.TQDMProgressBar` or
  :class:`~lightning.pytorch.callbacks.RichProgressBar` drawing on a terminal: one more line
  under Lightning's own, ``FeatureVisualizer: rendering backbone.relu1, step`` with a bar at
  ``96/128``, redrawn at most every :data:`REDRAW_SECONDS` and removed when the analysis ends;
- a progress bar without a terminal (CI logs, files): nothing is drawn, and when the analysis
  ends one line says how long it took, through the logger :data:`log`, a child of
  ``lightning.pytorch`` (Lightning's handler shows it);
- no progress bar (``Trainer(enable_progress_bar=False)``), or a DDP rank other than zero:
  nothing at all.

Example:
    >>> from lightning_neurons import progress
    >>> for step in range(3):
    ...     progress.update("step", step + 1, 3)  # outside an analysis: does nothing
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.rank_zero import rank_zero_debug

from lightning_neurons.cores import CoreShare
from lightning_neurons.figure_worker import background_figures
from lightning_neurons.heap import release_freed_memory
from lightning_neurons.loggers import background_writes

#: The logger of the one line per analysis and epoch written when there is no terminal.
log = logging.getLogger("lightning.pytorch").getChild("lightning_neurons")

#: Shortest time between two redraws of the status line (seconds).
REDRAW_SECONDS = 0.25

#: Without a terminal, an analysis that reported nothing is logged only if it took this long.
LOG_AFTER_SECONDS = 1.0

#: The tqdm layout of a status without a counter.
TEXT_FORMAT = "{desc} [{elapsed}]"


@dataclass
class Count:
    """One part of a status: what, and how far (``done`` of ``total``; either may be unknown)."""

    what: str
    done: int | None = None
    total: int | None = None

    def text(self) -> str:
        """``"step 96/128"``, ``"batch 3"`` or ``"figures"``."""
        if self.done is None:
            return self.what
        return f"{self.what} {self.done}" + ("" if self.total is None else f"/{self.total}")


@dataclass
class Status:
    """What one analysis is doing: its phase and the phase's loop counter."""

    name: str
    phase: Count | None = None
    step: Count | None = None

    def text(self) -> str:
        """The whole status: ``"FeatureVisualizer: rendering relu1, step 96/128"``."""
        parts = [c.text() for c in (self.phase, self.step) if c is not None]
        return f"{self.name}: {', '.join(parts)}" if parts else self.name

    def label(self) -> str:
        """The status without the innermost counter's numbers (a bar shows them)."""
        inner = self.step or self.phase
        if inner is None or inner.done is None or inner.total is None:
            return self.text()
        outer = [self.phase.text()] if self.step is not None and self.phase is not None else []
        return f"{self.name}: {', '.join([*outer, inner.what])}"

    def counter(self) -> tuple[int, int] | None:
        """``(done, total)`` of the innermost counter, ``None`` unless it has both."""
        inner = self.step or self.phase
        if inner is None or inner.done is None or inner.total is None:
            return None
        return inner.done, inner.total


class _Line(Protocol):
    """A status line drawn by a progress bar."""

    def show(self, status: Status) -> None: ...

    def close(self) -> None: ...


class _TqdmLine:
    """The status as one more tqdm bar, below the open bars of a :class:`TQDMProgressBar`."""

    def __init__(self, owner: TQDMProgressBar) -> None:
        self._owner = owner
        self._bar: Tqdm | None = None
        self._key: tuple[str, int | None] | None = None

    def show(self, status: Status) -> None:
        label, counter = status.label(), status.counter()
        done, total = counter if counter is not None else (0, None)
        key = (label, total)
        if self._bar is None:
            self._bar = Tqdm(
                desc=label,
                total=total,
                initial=done,
                position=self._position(),
                leave=False,
                dynamic_ncols=True,
                file=sys.stdout,
                bar_format=self._owner.BAR_FORMAT if total else TEXT_FORMAT,
            )
        elif key != self._key:  # a new counter: its own rate and time left
            self._bar.set_description_str(label, refresh=False)
            self._bar.bar_format = self._owner.BAR_FORMAT if total else TEXT_FORMAT
            self._bar.reset(total=total)
        self._key = key
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _position(self) -> int:
        """The line below the lowest bar Lightning has open."""
        taken = []
        for name in ("train", "val", "test", "predict"):
            try:
                bar = getattr(self._owner, f"{name}_progress_bar")
            except TypeError:  # not created yet
                continue
            if not bar.disable:
                taken.append(abs(bar.pos))
        return max(taken) + 1 if taken else 2 * self._owner.process_position


class _RichLine:
    """The status as one more task of a :class:`RichProgressBar`."""

    def __init__(self, owner: RichProgressBar) -> None:
        self._owner = owner
        self._task: Any = None
        self._key: tuple[str, float] | None = None

    def show(self, status: Status) -> None:
        progress = self._owner.progress
        if progress is None:
            return
        from rich.markup import escape

        label, counter = status.label(), status.counter()
        done, total = counter if counter is not None else (0, None)
        size: float = total if total else math.inf  # Lightning's infinite task: no time left
        key = (label, size)
        if self._task is None or key != self._key:
            if self._task is not None:
                progress.remove_task(self._task)
            style = self._owner.theme.description
            text = f"[{style}]{escape(label)}" if style else escape(label)
            self._task = progress.add_task(text, total=size, completed=done)
        else:
            progress.update(self._task, completed=done)
        self._key = key
        self._owner.refresh(hard=True)

    def close(self) -> None:
        progress = self._owner.progress
        if progress is not None and self._task is not None:
            progress.remove_task(self._task)
            self._owner.refresh(hard=True)
        self._task = None


@dataclass
class Reporter:
    """The status of one analysis, drawn on ``line`` (if any) and logged when it ends (if
    ``logged``)."""

    status: Status
    line: _Line | None = None
    logged: bool = False
    where: str = ""
    reported: bool = False
    cores: CoreShare | None = None
    _drawn: float = field(default=-math.inf, repr=False)

    def phase(self, what: str, done: int | None, total: int | None) -> None:
        # what the last phase freed goes back to the system before this one allocates (a few
        # ms; glibc would keep it, and a phase whose blocks do not fit the holes grows the heap)
        release_freed_memory()
        self.status.phase = Count(what, done, total)
        self.status.step = None
        self._changed()

    def update(self, what: str, done: int | None, total: int | None) -> None:
        self.status.step = Count(what, done, total)
        self._changed()

    def advance(self, what: str, total: int | None) -> None:
        step = self.status.step
        same = step is not None and step.what == what and step.total == total
        done = step.done if same and step is not None and step.done is not None else 0
        self.update(what, done + 1, total)

    def finish(self, seconds: float) -> None:
        """Remove the line; log the time when there is no terminal."""
        if self.line is not None:
            try:
                self.line.close()
            except Exception as err:  # the display must never stop the training
                rank_zero_debug(f"lightning_neurons.progress: closing the status failed: {err!r}")
        if self.logged and (self.reported or seconds >= LOG_AFTER_SECONDS):
            log.info("%s: %s analysis took %.1f s", self.status.name, self.where, seconds)

    def _changed(self) -> None:
        self.reported = True
        if self.cores is not None:
            self.cores.check()
        if self.line is None:
            return
        now = time.monotonic()
        if now - self._drawn < REDRAW_SECONDS:
            return
        self._drawn = now
        try:
            self.line.show(self.status)
        except Exception as err:  # the display must never stop the training
            rank_zero_debug(f"lightning_neurons.progress: drawing the status failed: {err!r}")
            self.line = None


_current: ContextVar[Reporter | None] = ContextVar("lightning_neurons_progress", default=None)


def _reporter(trainer: Trainer, name: str, stage: str) -> Reporter:
    status = Status(name)
    bar = trainer.progress_bar_callback
    if not trainer.is_global_zero or bar is None or not getattr(bar, "is_enabled", True):
        return Reporter(status)
    where = f"epoch {trainer.current_epoch}" if trainer.state.fn == "fit" else stage
    if isinstance(bar, TQDMProgressBar) and getattr(sys.stdout, "isatty", lambda: False)():
        return Reporter(status, line=_TqdmLine(bar), where=where)
    if isinstance(bar, RichProgressBar) and bar.progress and bar.progress.console.is_terminal:
        return Reporter(status, line=_RichLine(bar), where=where)
    return Reporter(status, logged=True, where=where)  # no terminal: a line in the log


def _busy() -> int:
    """What of ours takes a core now: figure workers drawing, writer threads compressing."""
    return background_figures.busy() + background_writes.busy()


@contextmanager
def reporting(trainer: Trainer, callback: Callback, stage: str) -> Iterator[Reporter]:
    """Show what ``callback``'s analysis at the end of ``stage`` does while the block runs.

    Args:
        trainer: The trainer (its progress bar, rank and epoch).
        callback: The callback whose analysis runs; its class name heads the status.
        stage: ``"train"``, ``"validation"`` or ``"test"``.

    Yields:
        The reporter that :func:`phase`, :func:`update` and :func:`advance` talk to.
    """
    reporter = _reporter(trainer, type(callback).__name__, stage)
    cores = reporter.cores = CoreShare(_busy)
    token = _current.set(reporter)
    start = time.perf_counter()
    try:
        cores.check()
        yield reporter
    finally:
        _current.reset(token)
        cores.restore()
        reporter.finish(time.perf_counter() - start)


def phase(what: str, done: int | None = None, total: int | None = None) -> None:
    """Say what the running analysis does now; clears the loop counter of the phase before.

    Args:
        what: For example ``"rendering backbone.relu1"`` or ``"figures and files"``.
        done: The phase's number, when the phases are counted (``phase("view", 2, 4)``).
        total: How many such phases there are.
    """
    reporter = _current.get()
    if reporter is not None:
        reporter.phase(what, done, total)


def update(what: str, done: int | None = None, total: int | None = None) -> None:
    """Say how far the current phase's loop is: ``update("step", 96, 128)``.

    Args:
        what: What is counted (``"step"``, ``"batch"``).
        done: The one being worked on, from 1.
        total: How many there are (``None``: unknown).
    """
    reporter = _current.get()
    if reporter is not None:
        reporter.update(what, done, total)


def advance(what: str, total: int | None = None) -> None:
    """Count one more of ``what`` in the current phase (the first call gives 1): for loops
    without an index.

    Args:
        what: What is counted (``"batch"``).
        total: How many there are (``None``: unknown).
    """
    reporter = _current.get()
    if reporter is not None:
        reporter.advance(what, total)
