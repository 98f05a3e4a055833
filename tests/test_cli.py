"""The main job's entry point: the LightningCLI with the demo config, shortened."""

from pathlib import Path

import pytest

from lightning_neurons.cli import main
from lightning_neurons.loggers import load_index

CONFIG = Path(__file__).parents[1] / "configs" / "digits.yaml"


def test_demo_config_runs_every_analysis_and_says_where_the_logs_are(tmp_path, capsys):
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    assert "lightning-neurons: fit done in" in out
    assert "val/acc = " in out
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
