"""The main job's entry point: the LightningCLI with the demo config, shortened."""

import warnings
from pathlib import Path

import pytest

from lightning_neurons.cli import main
from lightning_neurons.loggers import load_index

CONFIG = Path(__file__).parents[1] / "configs" / "digits.yaml"


@pytest.mark.slow
def test_demo_config_runs_every_analysis_and_says_where_the_logs_are(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                "--trainer.max_epochs=2",  # the demo renders every 2nd epoch
                "--trainer.limit_train_batches=3",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    failures = [str(w.message) for w in caught if "failed and was skipped" in str(w.message)]
    assert not failures  # on_error="warn" would hide a broken analysis from the other asserts
    out = capsys.readouterr().out
    assert "lightning-neurons: fit done in" in out
    assert "final: " in out and "val/acc = " in out
    assert "best:  val/acc = " in out and " (2 validations, epochs from 0)" in out
    assert f"tensorboard --logdir {tmp_path.resolve()}" in out
    index = load_index(tmp_path / "digits" / "version_0")
    kinds = {record["kind"] for record in index}
    assert {"activations", "category_clustering", "neuron_clustering", "contribution"} <= kinds
    assert {"preference", "focus"} & kinds
    assert {r["name"] for r in index if r["kind"] == "activations"} == {
        "backbone.features.relu1",
        "backbone.features.relu2",
        "backbone.features.relu3",
    }
    # the demo's `views: 1`: the deepest layer and the combined view
    assert {r["name"] for r in index if r["kind"] == "category_clustering"} == {
        "backbone.features.relu3",
        "combined",
        "assignments",
    }


def test_config_errors_are_reported_before_training(tmp_path):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                "--trainer.callbacks+=lightning_neurons.NoSuchCallback",
            ]
        )


def test_help_introduces_the_tool(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "what\nits neurons learn" in out or "what its neurons learn" in out.replace("\n", " ")
    for expected in ("fit", "validate", "test", "configs/digits.yaml", "tensorboard --logdir"):
        assert expected in out, expected


def test_fit_help_lists_every_callback_and_its_options(capsys):
    import inspect

    import lightning_neurons

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--trainer.callbacks.help" in out
    for name in lightning_neurons.CALLBACKS:
        assert f"lightning_neurons.{name}:" in out, name
        for option in inspect.signature(getattr(lightning_neurons, name)).parameters:
            assert f"{option}=" in out, (name, option)


def test_the_best_accuracy_is_named_by_the_epoch_lightning_counts():
    from lightning_neurons.cli import _AccuracyHistory

    history = _AccuracyHistory()  # check_val_every_n_epoch=2: epochs 1, 3, 5 validated
    history.history["val/acc"] = [(1, 0.5), (3, 0.9), (5, 0.8)]
    assert history.best() == ["val/acc = 0.9000 at epoch=3 (3 validations, epochs from 0)"]
