"""``lightning-neurons analyze``: the analyses of a run trained without callbacks, checkpoint by
checkpoint, logged at each checkpoint's epoch and step and read back with load_run."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_neurons import ActivationTracker, NeuronsError, load_run
from lightning_neurons.analyze import analyze_checkpoints
from lightning_neurons.cli import main
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.models import ImageClassifier, SmallCNN

EPOCHS = 3
WIDTHS = [4, 8, 8]
LAYERS = ["backbone.features.relu1", "backbone.features.relu2", "backbone.features.relu3"]
DATA = {"image_size": 8, "batch_size": 64}


class TrainOnly(DigitsDataModule):
    """The digits with no validation (or test) data."""

    val_dataloader = pl.LightningDataModule.val_dataloader
    test_dataloader = pl.LightningDataModule.test_dataloader

    def train_dataloader(self) -> DataLoader:
        return super().train_dataloader()


def config(tmp_path: Path, widths=WIDTHS, data: str = "DigitsDataModule", **trainer) -> Path:
    """A small version of configs/digits.yaml: the same callbacks, light settings."""
    data_class = (
        "test_analyze.TrainOnly" if data == "TrainOnly" else f"lightning_neurons.data.{data}"
    )
    content = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "limit_val_batches": 2,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "digits"},
            },
            "callbacks": [
                {
                    "class_path": "lightning_neurons.ActivationTracker",
                    "init_args": {"layers": LAYERS, "on_error": "raise"},
                },
                {
                    "class_path": "lightning_neurons.CategoryClustering",
                    "init_args": {"on_error": "raise"},
                },
                {
                    "class_path": "lightning_neurons.NeuronClustering",
                    "init_args": {"method": "kmeans", "n_clusters": 2, "on_error": "raise"},
                },
                {
                    "class_path": "lightning_neurons.NeuronContribution",
                    "init_args": {"max_batches": 1, "max_probes": 2, "on_error": "raise"},
                },
            ],
            **trainer,
        },
        "model": {
            "class_path": "lightning_neurons.models.ImageClassifier",
            "init_args": {
                "backbone": {
                    "class_path": "lightning_neurons.models.SmallCNN",
                    "init_args": {"widths": list(widths)},
                },
                "num_classes": 10,
            },
        },
        "data": {"class_path": data_class, "init_args": DATA},
    }
    path = tmp_path / f"config_{data}_{'_'.join(map(str, widths))}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A tiny run trained with no callback: 3 epochs of 3 batches, a checkpoint per epoch."""
    folder = tmp_path_factory.mktemp("trained") / "checkpoints"
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(widths=WIDTHS), num_classes=10, lr=0.01)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        limit_train_batches=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1)],
    )
    trainer.fit(model, datamodule=DigitsDataModule(**DATA))
    assert len(list(folder.glob("*.ckpt"))) == EPOCHS
    return folder


@pytest.fixture(scope="module")
def analysed(checkpoints, tmp_path_factory) -> Path:
    """``lightning-neurons analyze`` over the 3 checkpoints (a glob); the TensorBoard log dir."""
    tmp_path = tmp_path_factory.mktemp("analysed")
    main(["analyze", "--config", str(config(tmp_path)), "--ckpt_path", f"{checkpoints}/*.ckpt"])
    return tmp_path / "runs" / "digits" / "version_0"


def _steps(folder: Path) -> dict[int, int]:
    steps = {}
    for path in folder.glob("*.ckpt"):
        head = torch.load(path, map_location="cpu", weights_only=True)
        steps[int(head["epoch"])] = int(head["global_step"])
    return steps


def test_each_checkpoint_is_logged_at_its_step_to_the_live_runs_tags(checkpoints, analysed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = _steps(checkpoints)
    assert sorted(steps) == [0, 1, 2] and len(set(steps.values())) == EPOCHS
    events = EventAccumulator(str(analysed), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    for layer in LAYERS:
        tag = f"activations/{layer}/class_profile"
        assert [e.step for e in events.Images(tag)] == sorted(steps.values())
    # the model's own validation metrics too, at the step the run logged them
    assert [e.step for e in events.Scalars("val/acc")] == sorted(steps.values())
    # the evolution figures from the second checkpoint on
    evolution = events.Images(f"activations/{LAYERS[-1]}/evolution")
    assert [e.step for e in evolution] == sorted(steps.values())[1:]
    # files where a live `validate` writes them, one folder per epoch
    for epoch in range(EPOCHS):
        assert (
            analysed / f"neurons/validate/activations/epoch={epoch:03d}/{LAYERS[0]}.npz"
        ).exists()


def test_the_run_read_back_equals_a_live_tracker_on_the_last_checkpoint(checkpoints, analysed):
    run = load_run(analysed)
    assert run.stage == "validate" and run.epochs == [0, 1, 2]
    assert run.steps == _steps(checkpoints)
    last = next(checkpoints.glob("epoch=2-*.ckpt"))
    tracker = ActivationTracker(layers=LAYERS)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[tracker],
    )
    model = ImageClassifier(SmallCNN(widths=WIDTHS), num_classes=10)
    trainer.validate(model, datamodule=DigitsDataModule(**DATA), ckpt_path=last, verbose=False)
    loaded = run.results("ActivationTracker", epoch=2)
    for layer in LAYERS:
        live = tracker.results[layer].class_means
        # Both are float32 means (computed in float64 from the same float32 activations; the file
        # keeps float32 exactly); 1e-4 only allows for float32 convolutions summed in another
        # order (thread count), ~1e-6 relative. Epochs differ by far more (checked below).
        torch.testing.assert_close(loaded[layer].class_means, live, rtol=1e-4, atol=1e-4)
    earlier = run.results("ActivationTracker", epoch=1)[LAYERS[-1]].class_means
    assert (earlier - loaded[LAYERS[-1]].class_means).abs().max() > 1e-2


def test_one_file_and_a_folder_are_paths_too(checkpoints, tmp_path):
    first = sorted(checkpoints.glob("epoch=0*.ckpt"))[0]
    main(["analyze", "--config", str(config(tmp_path)), "--ckpt_path", str(first)])
    assert load_run(tmp_path / "runs/digits/version_0").epochs == [0]


def _parts(tmp_path: Path, **kwargs):
    """The trainer, model and data of a config (as analyze builds them)."""
    from lightning_neurons.cli import NeuronsCLI

    cli = NeuronsCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(config(tmp_path, **kwargs)), "--trainer.enable_progress_bar=false"],
        run=False,
    )
    return cli.trainer, cli.model, cli.datamodule


def test_errors_say_what_is_wrong(checkpoints, tmp_path):
    trainer, model, data = _parts(tmp_path)
    with pytest.raises(NeuronsError, match="no file matches .*nothing"):
        analyze_checkpoints(trainer, model, data, f"{tmp_path}/nothing/*.ckpt", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        NeuronsError, match=r"holds no \*.ckpt, \*.pt, \*.pth, \*.pth.tar or \*.safetensors file"
    ):
        analyze_checkpoints(trainer, model, data, tmp_path / "empty", progress=False)
    other = _parts(tmp_path, widths=[4, 8, 16])
    with pytest.raises(
        NeuronsError, match=r"not of the config's model.*conv3.weight \(8, 8, 3, 3\)"
    ):
        analyze_checkpoints(*other, checkpoints, progress=False)
    no_val = _parts(tmp_path, data="TrainOnly")
    with pytest.raises(NeuronsError, match="no validation data.*val_dataloader"):
        analyze_checkpoints(*no_val, checkpoints, progress=False)
    empty_val = _parts(tmp_path, limit_val_batches=0)
    with pytest.raises(NeuronsError, match="validation data is empty"):
        analyze_checkpoints(*empty_val, checkpoints, progress=False)
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(NeuronsError, match="cannot read checkpoint"):
        analyze_checkpoints(trainer, model, data, tmp_path / "bad.ckpt", progress=False)


def test_a_config_without_our_callbacks_or_with_a_training_tracker_is_refused(
    checkpoints, tmp_path
):
    trainer, model, data = _parts(tmp_path)
    bare = pl.Trainer(logger=False, enable_progress_bar=False)
    with pytest.raises(NeuronsError, match="no lightning-neurons callback"):
        analyze_checkpoints(bare, model, data, checkpoints, progress=False)
    on_train = pl.Trainer(logger=False, callbacks=[ActivationTracker(stage="train")])
    with pytest.raises(NeuronsError, match="stage='train'"):
        analyze_checkpoints(on_train, model, data, checkpoints, progress=False)


def test_help_says_how_to_call_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt_path" in out and "load_run" in out


@pytest.mark.slow
def test_the_demo_config_as_is(checkpoints, tmp_path):
    """configs/digits.yaml unchanged but for where it logs, on checkpoints of the demo model."""
    folder = tmp_path / "demo_checkpoints"
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(widths=(32, 64, 128)), num_classes=10)
    pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1)],
    ).fit(model, datamodule=DigitsDataModule())
    demo = Path(__file__).parents[1] / "configs" / "digits.yaml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [
                "analyze",
                "--config",
                str(demo),
                "--ckpt_path",
                str(folder),
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )
    # the demo's on_error="warn" would hide a broken analysis from the asserts below
    assert not [str(w.message) for w in caught if "failed and was skipped" in str(w.message)]
    run = load_run(tmp_path / "digits" / "version_0")
    assert run.epochs == [0, 1]
    assert set(run.callbacks()) == {
        "ActivationTracker",
        "FeatureVisualizer",
        "CategoryClustering",
        "NeuronClustering",
        "NeuronContribution",
    }
