"""The files that analyses write on writer threads are written without a torch operation.

A torch operation over enough elements on another thread than the training thread opens an
OpenMP parallel region there: a second team of OpenMP threads beside torch's own, after which
every torch operation of the process ran slower (the projector's sprite did this:
``docs/benchmarks.md``). This test runs a fit with every callback and records, on the writer
threads themselves, each torch operation that what they run dispatches.
"""

from __future__ import annotations

import threading

from conftest import TinyData, fast_trainer
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    RenderOptions,
)
from lightning_neurons.loggers import background_writes


class Recorded(TorchDispatchMode):
    """Records each operation dispatched on the thread it is entered on."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(f"{func} on {threading.current_thread().name}")
        return func(*args, **(kwargs or {}))


def test_no_torch_operation_runs_on_a_writer_thread(tmp_path, tiny_module, monkeypatch):
    seen: list[str] = []
    ran: list[str] = []
    submit = background_writes.submit

    def recorded_submit(owner, fn, nbytes):
        def run() -> None:
            ran.append(threading.current_thread().name)
            with Recorded(seen):  # dispatch modes are per thread: entered on the writer's
                fn()

        submit(owner, run, nbytes)

    monkeypatch.setattr(background_writes, "submit", recorded_submit)
    callbacks = [
        ActivationTracker(on_error="raise"),
        FeatureVisualizer(render=RenderOptions(steps=2, continue_steps=1), on_error="raise"),
        CategoryClustering(on_error="raise"),
        NeuronClustering(method="kmeans", on_error="raise"),
        NeuronContribution(max_batches=2, on_error="raise"),
    ]
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    trainer.fit(tiny_module, datamodule=TinyData(n=96, batch_size=16))
    assert ran and all(name.startswith("neurons-writer") for name in ran), ran
    # the projector's sprites, drawn on a writer thread, are among the files watched
    assert any(tmp_path.rglob("sprite.png"))
    assert seen == [], seen[:10]
