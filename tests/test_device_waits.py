"""The callbacks' per-batch work never makes the host wait for the device.

On a GPU, reading a value back (``.item()``, ``int(t)``, a boolean mask, ``bincount``,
``nonzero``, a copy to the host) waits for everything the device was given before: the batches
still queued too, so the host and the device run one after the other. This test runs validation
batches on the CPU with every callback attached and the accelerator code paths chosen (the
tracker's label check deferred, no finite-sum shortcut) and fails on any operation that would
wait on CUDA, made by the library's per-batch code (not by the model's own ``validation_step``).
"""

from __future__ import annotations

import traceback

import torch
from conftest import TinyData, fast_trainer
from lightning.pytorch import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    RenderOptions,
)

#: Operations that read device values back on the host (or need them to size their output).
WAITS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.bincount.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
}


def _boolean_index(func, args) -> bool:
    """``t[mask]`` (and ``t[mask] = v``): the result's size is the mask's count."""
    if str(func) not in ("aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class Waits(TorchDispatchMode):
    """Records each waiting operation made by the library outside the model's own code."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[int, list[str]] = {}  # batch index -> its waits
        self.batch = -1
        self.inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in WAITS or _boolean_index(func, args):
            self.note(str(func))
        return func(*args, **(kwargs or {}))

    def note(self, what: str) -> None:
        # the library's frames, less functional.py's interception of torch functions (the
        # model's own calls of torch.relu & co. pass through it)
        ours = [
            f
            for f in traceback.extract_stack()
            if "lightning_neurons" in f.filename
            and "/tests/" not in f.filename
            and not f.filename.endswith("functional.py")
        ]
        inner = ours[-1] if ours else None
        # the model's own step (models.py), and the deferred label check reading host memory
        # that an event said was copied, are not the callbacks' waits
        if inner is not None and not (
            inner.filename.endswith("models.py") or inner.name == "settle"
        ):
            where = f"{what} at {inner.filename.split('lightning_neurons/')[-1]}:{inner.lineno}"
            self.found.setdefault(self.batch, []).append(f"{where} ({inner.name})")


def watch_host_copies(mode: Waits, monkeypatch) -> None:
    """Copies to the host (``.cpu()``, ``.tolist()``, ``.numpy()``, ``.to("cpu")``) wait on a GPU
    but are no operations at all on the CPU: noted by wrapping the methods (the index of a
    tensor's own device, ``.to(t.device)``, is not taken for the host)."""

    def wrapped(name: str):
        method = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            # `.to("cpu")`; `.to(other.device)` keeps a tensor on its device on a GPU run
            to_host = name != "to" or "cpu" in (*args, kwargs.get("device"))
            if mode.inside and to_host:
                mode.note(f"Tensor.{name}")
            return method(self, *args, **kwargs)

        return call

    for name in ("cpu", "tolist", "numpy", "to"):
        monkeypatch.setattr(torch.Tensor, name, wrapped(name))


class WatchBatches(Callback):
    """Enters the mode at the start of each validation batch (listed first: before the other
    callbacks' batch hooks) and leaves it at the batch's end (its twin, listed last)."""

    def __init__(self, mode: Waits, start: bool) -> None:
        self.mode, self.start = mode, start

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.start:
            self.mode.__enter__()
            self.mode.inside = True
            self.mode.batch = batch_idx

    def on_validation_batch_end(self, trainer, pl_module, out, batch, batch_idx, dataloader_idx=0):
        if not self.start and self.mode.inside:
            self.mode.inside = False
            self.mode.__exit__(None, None, None)


def test_no_callback_waits_for_the_device_in_a_batch(tmp_path, tiny_module, monkeypatch):
    """Once the collectors of the first images of an epoch are full (the prior's, the projector's,
    the contribution's batches, each bounded), no batch waits at all."""
    monkeypatch.setattr("lightning_neurons.stats._all_finite", lambda values: False)
    monkeypatch.setattr("lightning_neurons.callbacks.neuron_clustering.MAX_IMAGES", 16)
    tracker = ActivationTracker()
    tracker._label_range.defer = True
    callbacks = [
        tracker,
        FeatureVisualizer(
            render=RenderOptions(steps=2, continue_steps=1), saliency=["gradient"], prior_images=16
        ),
        CategoryClustering(),
        NeuronClustering(method="kmeans"),
        NeuronContribution(max_batches=2),
    ]
    mode = Waits()
    watch_host_copies(mode, monkeypatch)
    trainer = fast_trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[WatchBatches(mode, True), *callbacks, WatchBatches(mode, False)],
    )
    trainer.fit(tiny_module, datamodule=TinyData(n=96, batch_size=8))  # 6 validation batches
    assert mode.batch == 5  # every batch was watched
    late = {batch: waits for batch, waits in mode.found.items() if batch >= 2}
    assert not late, late
    # what the first batches do wait for is only the bounded collectors (and the first batch's
    # label check, made at once so that a wrong `num_classes` stops the fit before it trains;
    # and, once per fit, the first validation batch's range, which tells FeatureVisualizer how
    # the images are normalised when the first batch was a training batch)
    early = {w.split(" (")[-1] for waits in mode.found.values() for w in waits}
    once = {"guessed_normalization)", "known_normalization)"}
    assert early <= {"add_batch)", "_keep)", "update)", "check)", *once}, early
    assert not [w for w in mode.found.get(1, []) if w.split(" (")[-1] in once]
