"""Figures drawn off the training thread: in another process, logged at the step they were asked
for, errors reported by the callback that asked, nothing left running after the fit."""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
import weakref
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_neurons import ActivationTracker, CategoryClustering
from lightning_neurons.figure_worker import BackgroundFigures, background_figures
from lightning_neurons.models import ImageClassifier
from lightning_neurons.plots import activation as activation_plots

needs_fork = pytest.mark.skipif(
    not BackgroundFigures.available(), reason="figures are drawn in forked workers on Linux only"
)


def pid_image(path: str, value: float = 0.5) -> np.ndarray:
    """A plot function: writes the pid of the process that draws, returns a 4 x 6 image."""
    Path(path).write_text(str(os.getpid()))
    return np.full((4, 6, 3), value, dtype=np.float32)


def grad_image(tensor: torch.Tensor) -> np.ndarray:
    assert not tensor.requires_grad, "the worker must get a detached tensor"
    return np.zeros((2, 2, 3), dtype=np.uint8) + int(tensor.sum())


def broken_figure(*_args: object) -> np.ndarray:
    raise ValueError("no such colour map")


def _no_children(timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


@needs_fork
def test_a_figure_is_drawn_in_another_process_and_logged_with_its_pixels(tmp_path):
    figures, logged, owner = BackgroundFigures(), [], object()
    figures.submit(owner, logged.append, pid_image, (str(tmp_path / "pid"),), {"value": 1.0})
    assert figures.wait(owner) == []
    assert int((tmp_path / "pid").read_text()) != os.getpid()
    (pixels,) = logged
    assert pixels.shape == (4, 6, 3) and pixels.dtype == np.uint8 and (pixels == 255).all()
    assert _no_children(), "the workers end once nothing is pending"


@needs_fork
def test_tensors_reach_the_worker_detached():
    figures, logged, owner = BackgroundFigures(), [], object()
    leaf = torch.full((3,), 2.0, requires_grad=True)
    figures.submit(owner, logged.append, grad_image, (leaf * 1,))
    assert figures.wait(owner) == []
    assert int(logged[0][0, 0, 0]) == 6
    assert leaf.grad is None


def test_a_payload_carries_each_tensors_own_values_detached_and_in_its_type():
    """Tensors go to the workers as NumPy arrays where NumPy has their type (torch's pickling
    saves a view's whole base, and costs about 0.1 ms a tensor), as torch pickles them else."""
    import pickle

    from lightning_neurons.figure_worker import _dumps

    base = torch.arange(10_000, dtype=torch.float32)
    leaf = torch.full((3,), 2.0, requires_grad=True)
    tensors = [
        base[10:20],  # a view: its 10 values, not its base's 10,000
        base.view(100, 100)[:3, ::7],  # a strided view
        torch.tensor([True, False]),
        torch.tensor([1, -2], dtype=torch.int64),
        torch.tensor([1.5 + 2j], dtype=torch.complex64).conj(),  # a lazy conjugate
        torch.tensor([0.5, 2.0], dtype=torch.bfloat16),  # no NumPy type: torch's pickling
        leaf * 1,
        torch.tensor(3.25),  # 0-dim
    ]
    payload = _dumps(tensors)
    assert len(payload) < 4_000  # the base's 40,000 bytes are not in it
    back = pickle.loads(payload)
    for sent, got in zip(tensors, back, strict=True):
        assert isinstance(got, torch.Tensor) and not got.requires_grad
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert torch.equal(got, sent.detach().resolve_conj())
    assert leaf.grad is None


@needs_fork
def test_errors_are_kept_for_the_owner_that_asked():
    figures, logged, mine, other = BackgroundFigures(), [], object(), object()
    figures.submit(mine, logged.append, broken_figure)
    figures.submit(other, logged.append, grad_image, (torch.ones(2),))
    assert figures.wait(other) == []
    (error,) = figures.wait(mine)
    assert isinstance(error, ValueError) and "colour map" in str(error)
    assert figures.wait(mine) == [], "each error is reported once"


def test_a_lambda_or_a_disabled_worker_draws_on_the_spot(tmp_path):
    logged: list[np.ndarray] = []
    path = str(tmp_path / "pid")
    BackgroundFigures().submit(object(), logged.append, lambda: pid_image(path))
    assert int(Path(path).read_text()) == os.getpid() and len(logged) == 1
    BackgroundFigures(enabled=False).submit(object(), logged.append, pid_image, (path,))
    assert int(Path(path).read_text()) == os.getpid() and len(logged) == 2
    with pytest.raises(ValueError, match="colour map"):  # on the spot: raised to the caller
        BackgroundFigures(enabled=False).submit(object(), logged.append, broken_figure)


def _gated_image(gate: str) -> np.ndarray:
    """A plot function that waits (at most 60 s) until the file ``gate`` exists."""
    deadline = time.monotonic() + 60
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return np.zeros((2, 2, 3), dtype=np.float32)


@needs_fork
def test_a_figure_that_cannot_be_pickled_is_logged_in_its_turn(tmp_path):
    """A lambda is drawn in this process at once, but logged after the figures asked for before
    it (TensorBoard drops a tag's images at or after the step of one that arrives late); its
    error, like a worker's, is reported by wait()."""
    figures, logged, owner, gate = BackgroundFigures(workers=1), [], object(), tmp_path / "gate"
    figures.submit(owner, lambda _: logged.append("first"), _gated_image, (str(gate),))
    path = str(tmp_path / "pid")
    figures.submit(owner, lambda _: logged.append("lambda"), lambda: pid_image(path))
    assert int(Path(path).read_text()) == os.getpid(), "drawn here, at once"
    assert logged == [], "held back by the figure asked for before it"
    gate.touch()
    assert figures.wait(owner) == []
    assert logged == ["first", "lambda"]
    figures.submit(owner, logged.append, lambda: broken_figure())
    (error,) = figures.wait(owner)
    assert isinstance(error, ValueError) and "colour map" in str(error)


def _fit(
    tmp_path, epochs: int, others: tuple = (), **tracker_kw
) -> tuple[pl.Trainer, ActivationTracker]:
    pl.seed_everything(0, verbose=False)
    tracker = ActivationTracker(layers=["backbone.fc"], **tracker_kw)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callbacks = [tracker, *others]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs, logger=logger)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ImageClassifier(TinyNet(), num_classes=3, lr=1e-2), datamodule=TinyData())
    return trainer, tracker


def test_a_fit_logs_every_epoch_figure_at_its_step_before_it_returns(tmp_path):
    trainer, _ = _fit(tmp_path, epochs=3)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    steps = [e.step for e in events.Images("activations/backbone.fc/class_profile")]
    per_epoch = trainer.global_step // 3
    assert steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    # the evolution figure holds every epoch so far: drawn for the last one, at the end
    assert [e.step for e in events.Images("activations/backbone.fc/evolution")] == steps[-1:]
    assert _no_children(), "no worker outlives the fit"


def test_the_evolution_figure_is_drawn_every_few_epochs_and_at_the_end(tmp_path, monkeypatch):
    import lightning_neurons.callbacks._evolution_log as evolution_log

    monkeypatch.setattr(evolution_log, "EVOLUTION_EVERY", 2)
    trainer, _ = _fit(tmp_path, epochs=5, others=(CategoryClustering(on_error="raise"),))
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    per_epoch = trainer.global_step // 5
    for kind, scalar in (
        ("activations", "preference_changed"),
        ("category_clustering", "distance_correlation"),
    ):
        evolution = [e.step for e in events.Images(f"{kind}/backbone.fc/evolution")]
        assert evolution == [2 * per_epoch, 4 * per_epoch, 5 * per_epoch], kind
        changed = events.Scalars(f"neurons/{kind}/backbone.fc/{scalar}")
        assert [e.step for e in changed] == [k * per_epoch for k in range(2, 6)], kind


def test_an_evolution_figure_held_to_the_end_is_logged_at_the_step_of_its_epoch(tmp_path):
    # analysed epochs 2 and 4 of 5: the figures drawn at the end show epoch 4, at its step
    others = (CategoryClustering(every_n_epochs=2, on_error="raise"),)
    trainer, _ = _fit(tmp_path, epochs=5, others=others, every_n_epochs=2)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    per_epoch = trainer.global_step // 5
    for kind in ("activations", "category_clustering"):
        steps = [e.step for e in events.Images(f"{kind}/backbone.fc/evolution")]
        assert steps == [4 * per_epoch], kind


@needs_fork
def test_a_figure_that_fails_in_the_worker_is_reported_and_training_goes_on(tmp_path, monkeypatch):
    import lightning_neurons.plots.activation as activation

    monkeypatch.setattr(activation, "class_profile_image", broken_figure)
    trainer, tracker = _fit(tmp_path, epochs=2)  # the default on_error: warn and go on
    assert trainer.current_epoch == 2 and tracker.results
    assert tracker.failures == ["writing files and figures: ValueError: no such colour map"] * 2
    with pytest.raises(ValueError, match="colour map"):
        _fit(tmp_path / "raise", epochs=1, on_error="raise")
    assert background_figures.wait(tracker) == []


def slow_image(seconds: float) -> np.ndarray:
    time.sleep(seconds)
    return np.zeros((2, 2, 3), dtype=np.uint8)


@needs_fork
def test_busy_counts_the_workers_drawing_now():
    figures, logged, owner = BackgroundFigures(workers=2), [], object()
    assert figures.busy() == 0
    figures.submit(owner, logged.append, slow_image, (1.0,))
    assert figures.busy() == 1, "one figure asked for and not drawn: one worker busy"
    for _ in range(3):
        figures.submit(owner, logged.append, slow_image, (0.2,))
    assert figures.busy() == 2, "never more than the workers"
    assert figures.wait(owner) == [] and len(logged) == 4
    assert figures.busy() == 0
    assert BackgroundFigures(enabled=False).busy() == 0


def slow_sum(seconds: float, payload: np.ndarray) -> np.ndarray:
    time.sleep(seconds)
    return np.zeros((2, 2, 3), dtype=np.uint8) + int(payload.sum() > 0)


@needs_fork
def test_figures_not_yet_drawn_hold_at_most_max_pending_bytes_of_arguments():
    """Three figures of 1 MB each, 2.5 MB allowed: the third waits until the first is drawn (with
    two workers and one-second figures, none would be drawn yet); a figure larger than the
    bound alone goes on."""
    figures, logged, owner = BackgroundFigures(workers=2, max_pending_bytes=5 << 19), [], object()
    megabyte = np.ones(1 << 17)  # float64: 1 MB pickled
    for _ in range(3):
        figures.submit(owner, logged.append, slow_sum, (1.0, megabyte))
    drawn = [f.drawn.done() for f in figures._order] + [True] * len(logged)
    assert drawn.count(False) <= 2, "the third figure waited for the first"
    figures.submit(owner, logged.append, slow_sum, (0.0, np.ones(1 << 20)))  # 8 MB, nothing else
    assert figures.wait(owner) == [] and len(logged) == 4
    unbounded = BackgroundFigures(workers=2)
    for _ in range(3):
        unbounded.submit(owner, logged.append, slow_sum, (1.0, megabyte))
    assert [f.drawn.done() for f in unbounded._order].count(False) == 3
    assert unbounded.wait(owner) == []
    assert _no_children(), "the workers end once nothing is pending"


_DRAWN: list[weakref.ref] = []


def remembered_image(values: np.ndarray) -> np.ndarray:
    """A plot function that keeps a weak reference to its argument."""
    _DRAWN.append(weakref.ref(values))
    return np.zeros((2, 2, 3), dtype=np.uint8)


def test_a_worker_gives_a_figures_memory_back_once_its_arguments_are_gone(monkeypatch):
    """After each figure the worker gives the heap memory it freed back to the system (a worker
    keeps only what the next figure needs); the figure's arguments are freed before that."""
    from lightning_neurons import figure_worker

    alive_at_trim: list[bool] = []
    monkeypatch.setattr(
        figure_worker,
        "release_freed_memory",
        lambda: alive_at_trim.append(_DRAWN[-1]() is not None) or True,
    )
    payload = figure_worker._dumps((remembered_image, (np.ones(1 << 16),), {}))
    for _ in range(2):
        assert figure_worker._draw_pickled(payload).shape == (2, 2, 3)
    assert alive_at_trim == [False, False]


def _count_trim(path: str) -> bool:
    with open(path, "a") as marks:
        marks.write(f"{os.getpid()}\n")
    return True


@needs_fork
def test_the_workers_give_memory_back_after_every_figure(tmp_path, monkeypatch):
    from lightning_neurons import figure_worker

    marks = tmp_path / "trims"
    # the workers are forked after this: they inherit the counting stand-in
    monkeypatch.setattr(figure_worker, "release_freed_memory", lambda: _count_trim(str(marks)))
    figures, logged, owner = BackgroundFigures(workers=1), [], object()
    for _ in range(3):
        figures.submit(owner, logged.append, slow_sum, (0.0, np.ones(8)))
    assert figures.wait(owner) == [] and len(logged) == 3
    pids = marks.read_text().split()
    assert len(pids) == 3 and all(int(pid) != os.getpid() for pid in pids)
    assert _no_children(), "the workers end once nothing is pending"


@needs_fork
def test_the_workers_are_forked_at_fit_start_and_end_with_the_fit(tmp_path, monkeypatch):
    """Forked before the analyses allocate anything (a page the training process rewrites
    after the fork stays in the worker as it was), and gone when fit returns."""
    forked_at: list[bool] = []
    real = BackgroundFigures.warm

    def spy(self):
        forked_at.append(self._pool is None)
        real(self)
        assert self._pool is not None and len(multiprocessing.active_children()) == self.workers

    monkeypatch.setattr(BackgroundFigures, "warm", spy)
    _fit(tmp_path, epochs=1)
    assert forked_at and forked_at[0], "warmed at fit start, before any figure"
    assert _no_children(), "the workers end with the fit"


_STUCK_WORKER = """
import os, sys, time
import numpy as np
from lightning_neurons import figure_worker

def stuck_or_ready():  # the first worker to start never does (as if it hung since the fork)
    try:
        os.close(os.open(sys.argv[1], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    time.sleep(3600)

figure_worker._init_worker = stuck_or_ready
figure_worker.EXIT_GRACE = 1.0  # the stuck worker is killed 1 s after the figures are logged
figures, logged = figure_worker.BackgroundFigures(workers=2), []
for _ in range(4):
    figures.submit(figures, logged.append, np.full, ((2, 2, 3), 7, np.uint8))
print(len(figures.wait(figures)), "errors", len(logged), "logged", flush=True)
"""


@needs_fork
def test_a_worker_stuck_since_its_fork_does_not_keep_the_process_from_exiting(tmp_path):
    """The other worker draws every figure; at the end the stuck one is killed. Before, the
    interpreter joined it at exit for ever: a DDP fit in CI hung that way after `fit` ended."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _STUCK_WORKER, str(tmp_path / "first")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0 errors 4 logged"


def _never_ready() -> None:
    time.sleep(3600)


@needs_fork
def test_workers_that_draw_nothing_are_ended_and_their_figures_reported(tmp_path, monkeypatch):
    from lightning_neurons import figure_worker

    monkeypatch.setattr(figure_worker, "FIGURE_TIMEOUT", 2.0)
    monkeypatch.setattr(figure_worker, "_init_worker", _never_ready)
    figures, logged, owner = BackgroundFigures(), [], object()
    for i in range(3):
        figures.submit(owner, logged.append, pid_image, (str(tmp_path / f"pid{i}"),))
    started = time.monotonic()
    (error,) = figures.wait(owner)
    waited = time.monotonic() - started
    assert isinstance(error, TimeoutError) and str(error).startswith("3 figure(s) were not drawn")
    assert waited < 2.0 * 2, "one wait for the workers (not one per figure), then killed"
    assert logged == [] and _no_children(timeout=1.0), "the stuck workers are killed"
    monkeypatch.undo()  # workers that start: a later figure is drawn by new ones
    figures.submit(owner, logged.append, pid_image, (str(tmp_path / "pid"),))
    assert figures.wait(owner) == [] and len(logged) == 1


_LOCKED_STDERR = """
import io, multiprocessing.util, os, sys, threading, time, warnings
import numpy as np
from lightning_neurons import figure_worker

def warn_and_draw():
    warnings.warn("a figure's warning")
    return np.zeros((2, 2, 3), np.uint8)

figure_worker.FIGURE_TIMEOUT = 20.0
# the parent flushes its streams just before the fork (waiting for a thread that writes): the
# thread can take the lock again in between; without that flush it surely holds it at the fork
multiprocessing.util._flush_std_streams = lambda: None
_, w = os.pipe()  # nobody reads: a write of more than the pipe holds blocks, holding the lock
sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(w, "w")), write_through=True)
threading.Thread(target=sys.stderr.write, args=("x" * (1 << 20),), daemon=True).start()
time.sleep(0.5)
figures, logged = figure_worker.BackgroundFigures(workers=1), []
figures.submit(figures, logged.append, warn_and_draw)
errors = figures.wait(figures)
print(len(errors), "errors", len(logged), "logged", file=sys.__stdout__, flush=True)
os._exit(0)  # the writing thread never ends
"""


@needs_fork
def test_a_worker_writes_its_warnings_though_a_thread_held_stderr_at_the_fork():
    """The worker's streams are its own: the inherited stderr's lock, held by a thread of the
    training process that was writing at the fork, stays held in the worker, and its first
    warning waited on it for ever (the figure lost after FIGURE_TIMEOUT)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _LOCKED_STDERR], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0 errors 1 logged"
    assert "a figure's warning" in done.stderr  # written to the process's stderr (fd 2)


def _parent_image(path: str, parent: int) -> np.ndarray:
    """A plot function that records where it was drawn; killed in a worker on its first try."""
    Path(path).write_text(str(os.getpid()))
    if os.getpid() != parent:
        os.kill(os.getpid(), 9)
    return np.full((4, 6, 3), 1.0, dtype=np.float32)


@needs_fork
def test_workers_that_use_no_cpu_are_ended_and_their_figures_drawn_here(tmp_path, monkeypatch):
    """Workers stuck since the fork (asleep: no CPU) with figures to draw are ended after
    STALL_TIMEOUT, not FIGURE_TIMEOUT, and nothing is lost: wait() draws the figures here."""
    from lightning_neurons import figure_worker

    monkeypatch.setattr(figure_worker, "STALL_TIMEOUT", 1.0)
    monkeypatch.setattr(figure_worker, "_init_worker", _never_ready)
    figures, logged, owner = BackgroundFigures(), [], object()
    for i in range(3):
        figures.submit(owner, logged.append, pid_image, (str(tmp_path / f"pid{i}"), 1.0))
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"used no CPU for 1 s with 3 figure\(s\)"):
        assert figures.wait(owner) == []
    assert time.monotonic() - started < 30.0, "STALL_TIMEOUT, not FIGURE_TIMEOUT (600 s)"
    assert len(logged) == 3 and all((pixels == 255).all() for pixels in logged)
    assert {int((tmp_path / f"pid{i}").read_text()) for i in range(3)} == {os.getpid()}
    assert _no_children(timeout=1.0), "the stuck workers are killed"
    assert all(figure.payload is None for figure in figures._order), "no payload kept"


@needs_fork
def test_busy_ends_stuck_workers_while_training_goes_on(tmp_path, monkeypatch):
    """The analyses ask busy() at each progress report: stuck workers do not keep the analyses
    on fewer threads for the rest of the fit."""
    from lightning_neurons import figure_worker

    monkeypatch.setattr(figure_worker, "STALL_TIMEOUT", 1.0)
    monkeypatch.setattr(figure_worker, "_init_worker", _never_ready)
    figures, logged, owner = BackgroundFigures(workers=2), [], object()
    figures.submit(owner, logged.append, pid_image, (str(tmp_path / "pid"),))
    assert figures.busy() == 1
    deadline = time.monotonic() + 20.0
    with pytest.warns(RuntimeWarning, match="used no CPU"):
        while figures.busy() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert figures.busy() == 0 and _no_children(timeout=1.0)
    assert figures.wait(owner) == [] and len(logged) == 1
    assert int((tmp_path / "pid").read_text()) == os.getpid(), "drawn here, once they were ended"


def spin_image(seconds: float) -> np.ndarray:
    """A plot function that keeps its CPU busy for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return np.zeros((2, 2, 3), dtype=np.uint8)


@needs_fork
def test_a_worker_drawing_a_long_figure_is_not_taken_as_stuck(monkeypatch, recwarn):
    from lightning_neurons import figure_worker

    monkeypatch.setattr(figure_worker, "STALL_TIMEOUT", 0.5)
    figures, logged, owner = BackgroundFigures(workers=1), [], object()
    figures.submit(owner, logged.append, spin_image, (3.0,))
    assert figures.wait(owner) == [] and len(logged) == 1
    assert not [w for w in recwarn if "used no CPU" in str(w.message)]


@needs_fork
def test_a_figure_whose_worker_was_killed_is_drawn_here(tmp_path):
    """A worker that dies mid-figure (the kernel's out-of-memory killer, say) breaks the pool:
    its figures are drawn in this process, the others are drawn by new workers."""
    figures, logged, owner = BackgroundFigures(workers=1), [], object()
    figures.submit(owner, logged.append, _parent_image, (str(tmp_path / "pid"), os.getpid()))
    assert figures.wait(owner) == [] and len(logged) == 1
    assert int((tmp_path / "pid").read_text()) == os.getpid()
    figures.submit(owner, logged.append, pid_image, (str(tmp_path / "next"),))
    assert figures.wait(owner) == [] and len(logged) == 2
    assert int((tmp_path / "next").read_text()) != os.getpid(), "new workers draw the next"


def _until(done, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@needs_fork
def test_a_figure_drawn_again_is_logged_before_the_figures_asked_for_after_it(tmp_path):
    """TensorBoard's data server drops every image of a tag at or after the step of an image
    that arrives late: a figure whose worker was lost is drawn again and logged in its turn, not
    after the figures asked for once new workers had started."""
    figures, logged, owner = BackgroundFigures(workers=1), [], object()
    first = (str(tmp_path / "pid"), os.getpid())
    figures.submit(owner, lambda _: logged.append("first"), _parent_image, first)
    lost = figures._order[-1]
    _until(lost.drawn.done)  # its worker killed itself
    figures.submit(owner, lambda _: logged.append("second"), pid_image, (str(tmp_path / "next"),))
    second = figures._order[-1]
    _until(second.logged.done)
    assert figures.wait(owner) == []
    assert logged == ["first", "second"]
    assert int((tmp_path / "pid").read_text()) == os.getpid()
    assert int((tmp_path / "next").read_text()) != os.getpid(), "new workers draw the next"


_PROFILE = activation_plots.class_profile_image


def _profile_killing_its_worker_once(*args: object, **kwargs: object) -> np.ndarray:
    """The class profile figure, whose first drawing kills its worker (an out-of-memory kill)."""
    flag, parent = os.environ["LN_KILLED_FLAG"].split(os.pathsep)
    if not Path(flag).exists() and os.getpid() != int(parent):  # never the test's own process
        Path(flag).write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)
    return _PROFILE(*args, **kwargs)


@needs_fork
def test_a_fit_whose_worker_is_killed_logs_each_tags_images_in_step_order(tmp_path, monkeypatch):
    """The figure whose worker was killed at the first epoch reaches the event file before the
    later epochs' figures of its tag (TensorBoard's data server would drop those otherwise)."""
    monkeypatch.setenv("LN_KILLED_FLAG", f"{tmp_path / 'killed'}{os.pathsep}{os.getpid()}")
    monkeypatch.setattr(activation_plots, "class_profile_image", _profile_killing_its_worker_once)
    trainer, tracker = _fit(tmp_path, epochs=3)
    assert tracker.failures == [] and (tmp_path / "killed").exists()
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    per_epoch = trainer.global_step // 3
    steps = [e.step for e in events.Images("activations/backbone.fc/class_profile")]
    assert steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]  # in the order they arrived
    assert _no_children(timeout=5.0)


@needs_fork
def test_a_fit_whose_figure_workers_hang_logs_every_figure(tmp_path, monkeypatch):
    """The CI hang's shape (workers that never start), in a whole fit: every epoch's figures are
    logged at their steps all the same (drawn here: these workers draw nothing), and no worker
    is left."""
    from lightning_neurons import figure_worker

    monkeypatch.setattr(figure_worker, "STALL_TIMEOUT", 1.0)
    monkeypatch.setattr(figure_worker, "_init_worker", _never_ready)
    trainer, tracker = _fit(tmp_path, epochs=2)  # (its warnings silenced)
    assert tracker.failures == []
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    per_epoch = trainer.global_step // 2
    steps = [e.step for e in events.Images("activations/backbone.fc/class_profile")]
    assert steps == [per_epoch, 2 * per_epoch]
    assert _no_children(timeout=1.0)
