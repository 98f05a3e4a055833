"""The ``lightning-neurons`` command: a LightningCLI (fit / validate / test / predict).

Example:
    lightning-neurons fit --config configs/digits.yaml
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from lightning_neurons.loggers import artifact_root, find_tensorboard


class NeuronsCLI(LightningCLI):
    """LightningCLI whose model and data are given by ``class_path`` in the config."""

    def __init__(self, *args, **kwargs) -> None:
        self._started = time.perf_counter()
        super().__init__(*args, **kwargs)

    def after_fit(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()

    def _report(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if ("acc" in k or "loss" in k) and not k.endswith(("_step", "_epoch"))
        }
        seconds = time.perf_counter() - self._started
        lines = ["", f"lightning-neurons: {trainer.state.fn.value} done in {seconds:.1f} s."]
        if metrics:
            lines.append("  " + ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items())))
        tb = find_tensorboard(trainer)
        if tb is not None:
            logdir = Path(tb.save_dir).resolve()
            lines.append(f"  TensorBoard logs: {Path(tb.log_dir).resolve()}")
            lines.append(f"  Analysis files:   {artifact_root(trainer).resolve()}")
            lines.append(f"  Open them with:   tensorboard --logdir {logdir}")
        else:
            lines.append(
                f"  Analysis files: {artifact_root(trainer).resolve()} (no TensorBoard logger)"
            )
        print("\n".join(lines), flush=True)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-neurons`` console script."""
    NeuronsCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
