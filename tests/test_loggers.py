"""Artifacts: one folder per run and per stage, and an index whose records are appended."""

from __future__ import annotations

import json
import threading
import time
import warnings

import lightning.pytorch as pl
import numpy as np
from conftest import TinyData, TinyNet, fast_trainer
from lightning.pytorch.loggers import CSVLogger

import lightning_neurons.loggers as loggers
from lightning_neurons import ActivationTracker, NeuronContribution
from lightning_neurons.loggers import AnalysisLogger, artifact_root, load_index
from lightning_neurons.models import ImageClassifier


def _module(seed: int = 0) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)


def _fit(tmp_path, seed: int, **kwargs) -> pl.Trainer:
    tracker = ActivationTracker(layers=["backbone.fc"])
    trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_module(seed), datamodule=TinyData())
    return trainer


def test_two_csv_only_runs_sharing_a_root_keep_their_own_files(tmp_path):
    first = _fit(tmp_path, 0, logger=CSVLogger(str(tmp_path), name="csv"))
    second = _fit(tmp_path, 1, logger=CSVLogger(str(tmp_path), name="csv"))
    roots = [artifact_root(t) for t in (first, second)]
    assert roots[0] != roots[1] and all(r.parent.parent.name == "csv" for r in roots)
    for root, trainer in zip(roots, (first, second), strict=True):
        (record,) = load_index(root)
        saved = np.load(root / record["file"])["class_means"]
        tracker = trainer.callbacks[0]
        # written in float32 (see _tracker_log._file_arrays)
        expected = tracker.results["backbone.fc"].class_means.float().numpy()
        assert saved.dtype == np.float32
        np.testing.assert_array_equal(saved, expected)
    assert not np.array_equal(
        np.load(roots[0] / load_index(roots[0])[0]["file"])["class_means"],
        np.load(roots[1] / load_index(roots[1])[0]["file"])["class_means"],
    )


def test_runs_without_a_logger_get_a_folder_each(tmp_path):
    roots = [artifact_root(_fit(tmp_path, seed, logger=False)) for seed in (0, 1)]
    assert [r.name for r in roots] == ["run_0", "run_1"]
    assert all(len(load_index(r)) == 1 for r in roots)


def test_validate_and_test_after_fit_write_their_own_folders(tmp_path):
    tracker = ActivationTracker(layers=["backbone.fc"], stage="validation")
    contribution = NeuronContribution(max_batches=1, max_probes=0)
    trainer = fast_trainer(tmp_path, callbacks=[tracker, contribution], max_epochs=1)
    module, data = _module(), TinyData()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
        trainer.validate(module, datamodule=data, verbose=False)
        trainer.test(module, datamodule=data, verbose=False)
    files = {(r["stage"], r["kind"]): r["file"] for r in load_index(trainer.log_dir)}
    assert files[("fit", "contribution")] == "fit/contribution/epoch=000/backbone.fc.npz"
    after = f"epoch={trainer.current_epoch:03d}"  # 1: fit has ended its only epoch
    assert files[("validate", "contribution")] == f"validate/contribution/{after}/backbone.fc.npz"
    assert files[("test", "contribution")] == f"test/contribution/{after}/backbone.fc.npz"
    assert ("validate", "activations") in files and ("test", "activations") not in files
    root = artifact_root(trainer)
    assert all((root / f).exists() for f in files.values())


def test_the_index_is_appended_without_being_read(tmp_path, monkeypatch):
    trainer = fast_trainer(tmp_path, max_epochs=1)
    out = AnalysisLogger(trainer, "activations")
    out.save_arrays("a", {"x": np.zeros(2)})
    index = out.root / loggers.INDEX_FILENAME
    before = index.read_bytes()

    def no_reading(*args, **kwargs):
        raise AssertionError("the index was parsed to append a record")

    monkeypatch.setattr(loggers.json, "loads", no_reading)
    for i in range(50):
        out.save_arrays(f"b{i}", {"x": np.zeros(2)}, meta={"i": i})
    monkeypatch.undo()
    after = index.read_bytes()
    assert after.startswith(before)  # earlier records are never rewritten
    assert after.count(b"\n") == 51
    records = load_index(out.root)
    assert [r["name"] for r in records] == ["a"] + [f"b{i}" for i in range(50)]
    assert records[-1]["meta"] == {"i": 49} and records[-1]["stage"] == "fit"
    out.save_arrays("a", {"x": np.ones(2)})  # the same file again: its latest record wins
    records = load_index(out.root)
    assert len(records) == 51 and records[0]["arrays"] == ["x"]
    assert json.loads(index.read_text().splitlines()[-1])["name"] == "a"


def test_files_are_complete_when_fit_returns_and_a_failed_write_follows_on_error(
    tmp_path, monkeypatch
):
    # the .npz are written on background threads; teardown waits for them
    trainer = _fit(tmp_path / "ok", 0)
    (record,) = load_index(artifact_root(trainer))
    path = artifact_root(trainer) / record["file"]
    assert np.load(path)["class_means"].shape[0] == 3
    assert not list(path.parent.glob("*.partial"))

    def disk_full(path, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loggers, "write_npz", disk_full)
    tracker = ActivationTracker(layers=["backbone.fc"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast_trainer(tmp_path / "warn", callbacks=[tracker], max_epochs=1).fit(
            _module(), datamodule=TinyData()
        )
    assert tracker.failures and "No space left on device" in tracker.failures[0]
    assert any("writing files and figures failed" in str(w.message) for w in caught)
    assert tracker.results  # the analysis itself stands
    strict = ActivationTracker(layers=["backbone.fc"], on_error="raise")
    try:
        fast_trainer(tmp_path / "raise", callbacks=[strict], max_epochs=1).fit(
            _module(), datamodule=TinyData()
        )
    except OSError as err:
        assert "No space left" in str(err)
    else:
        raise AssertionError("on_error='raise' should raise the failed write")


def test_background_writes_hold_at_most_max_pending_bytes(tmp_path):
    writes = loggers.BackgroundWrites(threads=1, max_pending_bytes=100)
    gate = threading.Event()
    done: list[int] = []
    owner = object()

    def slow() -> None:
        gate.wait(5)
        done.append(1)

    writes.submit(owner, slow, 60)
    # a second 60-byte write would hold 120 > 100: it waits until the first is written
    releaser = threading.Timer(0.2, gate.set)
    releaser.start()
    writes.submit(owner, lambda: done.append(2), 60)
    assert done[:1] == [1]  # the first was written before the second was accepted
    assert writes.wait(owner) == []
    assert done == [1, 2]
    failing = object()
    writes.submit(failing, lambda: 1 / 0, 1)
    (error,) = writes.wait(failing)
    assert isinstance(error, ZeroDivisionError)
    assert writes.wait(failing) == []  # reported once


def test_a_finished_write_leaves_the_pending_list_and_its_error_is_kept():
    # busy() and submit() go through the pending writes at every progress report and write: the
    # list must hold the writes not yet done, not every write of the fit
    writes = loggers.BackgroundWrites(threads=2)
    ok, failing = object(), object()
    for _ in range(50):
        writes.submit(ok, lambda: None, 1)
    writes.submit(failing, lambda: 1 / 0, 1)
    deadline = time.monotonic() + 10
    while writes._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writes._pending == []  # no wait() called: each left when it was written
    (error,) = writes.wait(failing)
    assert isinstance(error, ZeroDivisionError)
    assert writes.wait(failing) == [] and writes.wait(ok) == []


def test_background_writes_count_the_writes_running_now():
    # what an analysis leaves its cores to (lightning_neurons.cores): running writes, not queued
    writes = loggers.BackgroundWrites(threads=2)
    gate, owner = threading.Event(), object()
    started: list[threading.Event] = [threading.Event() for _ in range(3)]

    def held(i: int) -> None:
        started[i].set()
        gate.wait(10)

    assert writes.busy() == 0
    for i in range(3):
        writes.submit(owner, lambda i=i: held(i), 1)
    assert started[0].wait(10) and started[1].wait(10)
    assert writes.busy() == 2, "two threads: the third write waits, and takes no core"
    gate.set()
    assert writes.wait(owner) == []
    assert writes.busy() == 0


def test_several_analyses_without_tensorboard_warn_once(tmp_path):
    from lightning_neurons import CategoryClustering, NeuronClustering

    callbacks = [
        ActivationTracker(layers=["backbone.fc"]),
        CategoryClustering(),
        NeuronClustering(method="kmeans"),
    ]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_module(), datamodule=TinyData())
    said = [str(w.message) for w in caught if "no TensorBoardLogger" in str(w.message)]
    assert len(said) == 1 and "written as files under" in said[0]
    assert {r["kind"] for r in load_index(artifact_root(trainer))} >= {"activations"}


def test_fast_dev_run_runs_the_analyses_and_writes_nothing(tmp_path):
    """Lightning turns logging off under fast_dev_run (a DummyLogger in place of the user's):
    the analyses run, to show that they work, and nothing is written or warned about."""
    from lightning_neurons import CategoryClustering

    tracker = ActivationTracker(layers=["backbone.fc"], on_error="raise")
    clustering = CategoryClustering(on_error="raise")
    trainer = fast_trainer(tmp_path, callbacks=[tracker, clustering], fast_dev_run=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_module(), datamodule=TinyData())
    assert tracker.results and clustering.results, "the analyses ran"
    assert not [w for w in caught if "lightning-neurons" in str(w.message)]
    assert not list(tmp_path.rglob("neurons")) and not list(tmp_path.rglob("*.npz"))
