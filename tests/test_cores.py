"""An analysis lends its torch threads to the figure workers that draw beside it and takes them
back; the training loop always runs on the threads it started with."""

from __future__ import annotations

import sys
import threading
import types

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer
from lightning.pytorch.callbacks import Callback
from threadpoolctl import ThreadpoolController

import lightning_neurons.callbacks.contribution as contribution_callback
from lightning_neurons import ActivationTracker, NeuronContribution, cores, progress
from lightning_neurons.cores import CoreShare
from lightning_neurons.figure_worker import background_figures
from lightning_neurons.loggers import background_writes
from lightning_neurons.models import ImageClassifier


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def busy(monkeypatch) -> list[int]:
    """Two cores, and as many busy figure workers as ``busy[0]`` says."""
    busy = [0]
    monkeypatch.setattr(background_figures, "busy", lambda: busy[0])
    monkeypatch.setattr(cores, "usable_cores", lambda: 2)
    return busy


@pytest.mark.parametrize(
    ("threads", "cores_", "busy_", "wanted"),
    [
        (2, 2, 0, 2),
        (2, 2, 1, 1),
        (2, 2, 2, 1),  # never fewer than one
        (16, 16, 2, 14),
        (8, 16, 2, 8),  # never more than the analysis started with
        (4, 2, 0, 4),  # nothing of ours busy: the user's choice stands
    ],
)
def test_the_threads_are_the_cores_the_busy_workers_leave(threads, cores_, busy_, wanted):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert CoreShare(lambda: busy_, cores=cores_).wanted() == wanted
    finally:
        torch.set_num_threads(before)


def _trainer() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        is_global_zero=True, progress_bar_callback=None, current_epoch=0, state="fit"
    )


def test_an_analysis_gives_up_threads_while_workers_draw_and_takes_them_back(two_threads, busy):
    busy[0] = 1
    with progress.reporting(_trainer(), ActivationTracker(), "validation"):
        assert torch.get_num_threads() == 1, "a worker draws: one core is left"
        busy[0] = 0
        progress.update("step", 1, 3)
        assert torch.get_num_threads() == 2
        busy[0] = 2
        progress.advance("batch")
        assert torch.get_num_threads() == 1
        progress.phase("figures")
    assert torch.get_num_threads() == 2, "the analysis's threads are restored when it ends"
    with (
        pytest.raises(RuntimeError, match="analysis broke"),
        progress.reporting(_trainer(), ActivationTracker(), "validation"),
    ):
        raise RuntimeError("analysis broke")
    assert torch.get_num_threads() == 2, "and when it fails"


def _blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in ThreadpoolController().select(user_api="blas").info()}


def test_the_blas_libraries_lend_their_threads_too_and_get_them_back(two_threads, busy):
    """NumPy's and SciPy's BLAS (scikit-learn's PCA, the clusterings) run on as many threads as
    torch while workers draw; their own count, and torch's, come back."""
    two = ThreadpoolController().select(user_api="blas").limit(limits=2)  # wherever this runs
    try:
        assert _blas_threads() == {2}
        busy[0] = 1
        with progress.reporting(_trainer(), ActivationTracker(), "validation"):
            assert _blas_threads() == {1} and torch.get_num_threads() == 1
            busy[0] = 0
            progress.update("step", 1, 3)
            assert _blas_threads() == {2} and torch.get_num_threads() == 2
            busy[0] = 2
            progress.advance("batch")
            assert _blas_threads() == {1} and torch.get_num_threads() == 1
        assert _blas_threads() == {2} and torch.get_num_threads() == 2
    finally:
        two.restore_original_limits()


def test_a_writer_thread_compressing_takes_a_core_too(two_threads, busy):
    """No figure worker draws, but a writer thread compresses an analysis's ``.npz``: the
    analysis runs on the other core, and takes both once the write is done."""
    gate, started, owner = threading.Event(), threading.Event(), object()

    def write() -> None:
        started.set()
        gate.wait(10)

    with progress.reporting(_trainer(), ActivationTracker(), "validation"):
        assert torch.get_num_threads() == 2
        background_writes.submit(owner, write, 1)
        assert started.wait(10)
        progress.update("step", 1, 2)
        assert torch.get_num_threads() == 1 and _blas_threads() == {1}
        gate.set()
        assert background_writes.wait(owner) == []
        progress.update("step", 2, 2)
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


class ThreadsSeen(Callback):
    def __init__(self) -> None:
        self.training: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        self.training.append(torch.get_num_threads())


def test_training_runs_on_its_own_threads_and_the_analysis_on_what_workers_leave(
    tmp_path, two_threads, busy, monkeypatch
):
    busy[0] = 1  # a worker draws all the time
    analysed: list[int] = []
    original = contribution_callback.contribution_batch

    def counted(*args, **kwargs):
        analysed.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(contribution_callback, "contribution_batch", counted)
    seen = ThreadsSeen()
    callbacks = [ActivationTracker(on_error="raise"), NeuronContribution(on_error="raise"), seen]
    pl.seed_everything(0, verbose=False)
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    trainer.fit(ImageClassifier(TinyNet(), num_classes=3, lr=1e-2), TinyData())
    assert analysed and set(analysed) == {1}
    assert len(seen.training) == 12 and set(seen.training) == {2}
    assert torch.get_num_threads() == 2


def test_the_blas_search_is_redone_only_after_an_import(monkeypatch):
    """threadpoolctl's search of the loaded libraries (1.5 ms) is kept until a module is
    imported: a library that an import loads is found then."""
    first = cores.loaded_blas()
    assert cores.loaded_blas() is first
    monkeypatch.setitem(sys.modules, "lightning_neurons_test_just_imported", types.ModuleType("m"))
    again = cores.loaded_blas()
    assert again is not first
    assert [c.filepath for c in again.lib_controllers] == [
        c.filepath for c in first.lib_controllers
    ]
    assert cores.loaded_blas() is again
