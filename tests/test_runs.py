"""load_run: every callback's typed results read back from a run's files equal the live ones."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    NeuronsError,
    RenderOptions,
    load_run,
)
from lightning_neurons.models import ImageClassifier

EPOCHS = 2
#: The attributes holding each callback's results (FeatureVisualizer has three).
ATTRIBUTES = {
    ActivationTracker: ("results",),
    FeatureVisualizer: ("results", "cluster_results", "saliency_results"),
    CategoryClustering: ("results",),
    NeuronClustering: ("results",),
    NeuronContribution: ("results",),
}


class _Recorder(pl.Callback):
    """After every validation epoch (when every analysis has run), what each callback held."""

    def __init__(self, callbacks: list[pl.Callback]) -> None:
        self.callbacks = callbacks
        self.held: dict[int, dict[tuple[type, str], object]] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.held[trainer.current_epoch] = {
            (type(cb), attribute): getattr(cb, attribute)
            for cb in self.callbacks
            for attribute in ATTRIBUTES[type(cb)]
        }


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """A 2-epoch run of TinyNet with every callback; what they held after each epoch."""
    tmp_path = tmp_path_factory.mktemp("live")
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)
    callbacks = [
        ActivationTracker(on_error="raise"),
        FeatureVisualizer(
            max_channels=2,
            render=RenderOptions(steps=3, continue_steps=2),
            saliency=["gradient", "gradcam"],
            max_probes=3,
            max_clusters=2,
            on_error="raise",
        ),
        CategoryClustering(on_error="raise"),
        NeuronClustering(method="kmeans", n_clusters=2, on_error="raise"),
        NeuronContribution(max_batches=2, max_probes=3, on_error="raise"),
    ]
    recorder = _Recorder(callbacks)
    trainer = fast_trainer(tmp_path, max_epochs=EPOCHS, callbacks=[*callbacks, recorder])
    trainer.fit(model, datamodule=TinyData())
    return trainer.logger.log_dir, recorder.held


def assert_same(live, loaded, where: str = "") -> None:
    """Equal values, types and shapes, recursively (NaN equals NaN)."""
    if dataclasses.is_dataclass(live):
        assert type(loaded) is type(live), where
        for f in dataclasses.fields(live):
            a, b = getattr(live, f.name), getattr(loaded, f.name)
            if f.name == "distances":
                # CategoryClusteringResult writes its distances in float32 (documented)
                assert b.dtype == a.dtype and b.shape == a.shape, where
                torch.testing.assert_close(
                    b.float(), a.float(), rtol=0, atol=0, equal_nan=True, msg=where
                )
                continue
            assert_same(a, b, f"{where}.{f.name}")
    elif isinstance(live, torch.Tensor):
        assert isinstance(loaded, torch.Tensor), where
        assert loaded.dtype == live.dtype and loaded.shape == live.shape, where
        torch.testing.assert_close(loaded, live, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(live, np.ndarray):
        assert isinstance(loaded, np.ndarray), where
        assert loaded.dtype == live.dtype and loaded.shape == live.shape, where
        np.testing.assert_array_equal(loaded, live, err_msg=where)
    elif isinstance(live, dict):
        assert list(loaded) == list(live), where
        for key in live:
            assert_same(live[key], loaded[key], f"{where}[{key!r}]")
    elif isinstance(live, (list, tuple)):
        assert len(loaded) == len(live), where
        for i, (a, b) in enumerate(zip(live, loaded, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(live, float) and np.isnan(live):
        assert np.isnan(loaded), where
    else:
        assert loaded == live, where


@pytest.mark.parametrize("callback", list(ATTRIBUTES), ids=lambda c: c.__name__)
def test_loaded_results_equal_what_the_live_callback_held(live_run, callback):
    log_dir, held = live_run
    run = load_run(log_dir)
    assert run.epochs == list(range(EPOCHS))
    for epoch, by_callback in held.items():
        for attribute in ATTRIBUTES[callback]:
            live = by_callback[(callback, attribute)]
            assert live, f"{callback.__name__}.{attribute} was empty in epoch {epoch}"
            loaded = run.results(callback, epoch, attribute=attribute)
            assert_same(live, loaded, f"{callback.__name__}.{attribute}@{epoch}")


def test_the_latest_epoch_is_the_default_and_names_work_as_classes(live_run):
    log_dir, held = live_run
    run = load_run(log_dir)
    last = held[EPOCHS - 1][(NeuronContribution, "results")]
    assert_same(last, run.results("NeuronContribution"))
    # the round trip above covered the optional parts too
    ablated = [r for r in last.values() if r.ablation is not None]
    assert ablated and all(r.ablation.effects for r in ablated)
    assert all(r.probes is not None and r.probes.preferred for r in last.values())
    saliency = held[EPOCHS - 1][(FeatureVisualizer, "saliency_results")]
    assert saliency is not None and "gradcam" in saliency.maps
    assert saliency.gradcam_layer is not None  # the layer of its maps, loaded back above
    assert held[EPOCHS - 1][(FeatureVisualizer, "results")]["classes"].probability is not None
    assert run.epochs_of(CategoryClustering) == [0, 1]
    assert set(run.callbacks()) == {c.__name__ for c in ATTRIBUTES}
    assert run.steps[1] > run.steps[0] > 0


def test_a_subclass_reads_as_its_parent(live_run):
    class MyTracker(ActivationTracker):
        pass

    run = load_run(live_run[0])
    assert run.results(MyTracker).keys() == run.results(ActivationTracker).keys()


def test_load_run_accepts_the_neurons_folder(live_run):
    run = load_run(f"{live_run[0]}/neurons")
    assert run.epochs == [0, 1] and run.stage == "fit"


def test_errors_say_what_is_there(live_run, tmp_path):
    run = load_run(live_run[0])
    with pytest.raises(NeuronsError, match="did not analyse epoch 7.*epochs 0, 1"):
        run.results("ActivationTracker", epoch=7)
    with pytest.raises(NeuronsError, match="not one of lightning-neurons' callbacks"):
        run.results("EarlyStopping")
    with pytest.raises(NeuronsError, match="no attribute 'saliency_results'|has no results"):
        run.results("ActivationTracker", attribute="saliency_results")
    with pytest.raises(NeuronsError, match="no files of stage 'test'.*'fit'"):
        load_run(live_run[0], stage="test")
    with pytest.raises(NeuronsError, match="holds no lightning-neurons files"):
        load_run(tmp_path)


def test_the_read_run_example_draws_the_figures_of_a_run(live_run, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, str(root / "examples/read_run.py"), live_run[0], "--save", tmp_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "epochs=[0, 1]" in done.stdout and "neurons that changed class" in done.stdout
    for name in ("neurons", "categories", "comparison"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
