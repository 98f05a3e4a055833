"""The ``lightning-neurons`` command: a LightningCLI (fit / validate / test / predict).

Example:
    lightning-neurons fit --config configs/digits.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from lightning_neurons.callbacks._base import AnalysisCallback
from lightning_neurons.loggers import find_tensorboard, written_artifact_root


class _AccuracyHistory(pl.Callback):
    """Remembers each epoch's validation accuracies (``val*/acc*`` metrics) for the summary.

    It only reads ``trainer.callback_metrics``: nothing about the training changes.
    """

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val") and key.endswith("acc"):
                self.history.setdefault(key, []).append((trainer.current_epoch, float(value)))

    def best(self) -> list[str]:
        """``"val/acc = 0.9861 at epoch=6 (10 validations, epochs from 0)"`` for each validation
        accuracy seen: the epoch as Lightning counts it (checkpoint names, the figures' titles)."""
        out = []
        for key, values in sorted(self.history.items()):
            epoch, value = max(values, key=lambda ev: ev[1])
            out.append(
                f"{key} = {value:.4f} at epoch={epoch} ({len(values)} validations, epochs from 0)"
            )
        return out


class NeuronsCLI(LightningCLI):
    """LightningCLI whose model and data are given by ``class_path`` in the config.

    After each run it prints a summary: the time, the seconds each analysis took, the final
    metrics, the best validation accuracy and its epoch, and where the logs and analysis files
    are.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._started = time.perf_counter()
        self._history = _AccuracyHistory()
        super().__init__(*args, **kwargs)

    def before_fit(self) -> None:
        self.trainer.callbacks.append(self._history)

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
            if ("acc" in k or "loss" in k) and not k.endswith(("_step", "_epoch", "_best"))
        }
        seconds = time.perf_counter() - self._started
        lines = ["", f"lightning-neurons: {trainer.state.fn.value} done in {seconds:.1f} s."]
        lines += _analysis_times(trainer)
        if metrics:
            final = ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items()))
            lines.append(f"  final: {final}")
        if trainer.state.fn.value == "fit" and self._history.history:
            lines.append(f"  best:  {', '.join(self._history.best())}")
        files = written_artifact_root(trainer)
        tb = find_tensorboard(trainer)
        if tb is not None:
            logdir = Path(tb.save_dir).resolve()
            lines.append(f"  TensorBoard logs: {Path(tb.log_dir).resolve()}")
            if files is not None:
                lines.append(f"  Analysis files:   {files.resolve()}")
            lines.append(f"  Open them with:   tensorboard --logdir {logdir}")
        elif files is not None:
            lines.append(f"  Analysis files: {files.resolve()} (no TensorBoard logger)")
        print("\n".join(lines), flush=True)


def _analysis_times(trainer: pl.Trainer) -> list[str]:
    """``analyses: 41.2 s in all (FeatureVisualizer 30.1 s, ...)``: the seconds each analysis
    callback took over the run, wrapped at 100 columns (no line without analysis callbacks)."""
    analyses = [cb for cb in trainer.callbacks if isinstance(cb, AnalysisCallback)]
    if not analyses:
        return []
    total = sum(cb.analysis_seconds for cb in analyses)
    items = [f"{type(cb).__name__} {cb.analysis_seconds:.1f} s" for cb in analyses]
    lines = [f"  analyses: {total:.1f} s in all ("]
    for i, item in enumerate(items):
        text = item + (")" if i == len(items) - 1 else ",")
        if len(lines[-1]) + len(text) + 1 > 100:
            lines.append("   ")
        lines[-1] += text if lines[-1].endswith("(") else f" {text}"
    return lines


DESCRIPTION = """\
Train an image classifier with PyTorch Lightning while lightning-neurons' callbacks show what
its neurons learn: per-class activation statistics, preferred images and saliency, category and
neuron clusters, and each neuron's contribution, logged to TensorBoard epoch after epoch.

The model, the data and the callbacks come from a LightningCLI YAML config. Example configs (in
the repository's configs/ folder):
  configs/digits.yaml    the demo: a small CNN on scikit-learn's digits (no download)
  configs/cifar10.yaml   a torchvision ResNet-18 on CIFAR-10

  lightning-neurons fit --config configs/digits.yaml
  lightning-neurons fit --config configs/digits.yaml --seed_everything 1 --trainer.max_epochs 5
  lightning-neurons fit --help      (every option, and our callbacks' options)

Then open what the run logged:
  tensorboard --logdir runs

Analyse checkpoints saved by any run (with or without these callbacks), epoch by epoch:
  lightning-neurons analyze --config configs/digits.yaml --ckpt_path "checkpoints/*.ckpt"
"""


def _callback_options() -> str:
    """One paragraph per callback: its first docstring line and its options with defaults."""
    import inspect
    import textwrap

    import lightning_neurons

    paragraphs = []
    for name in lightning_neurons.CALLBACKS:
        cls = getattr(lightning_neurons, name)
        summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        options = [
            f"{p.name}={p.default!r}"
            for p in inspect.signature(cls).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        body = textwrap.fill(
            ", ".join(options), width=96, initial_indent="    ", subsequent_indent="    "
        )
        title = textwrap.fill(
            f"lightning_neurons.{name}: {summary}",
            width=96,
            initial_indent="  ",
            subsequent_indent="      ",
        )
        paragraphs.append(f"{title}\n{body}")
    return (
        "lightning-neurons callbacks (add them under trainer.callbacks by class_path); the full\n"
        "help of one: lightning-neurons fit --trainer.callbacks.help ActivationTracker\n\n"
        + "\n\n".join(paragraphs)
        + "\n\nOpen the logs with: tensorboard --logdir <the logger's save_dir>"
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-neurons`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["analyze"]:
        from lightning_neurons.analyze import main as analyze

        analyze(argv[1:], NeuronsCLI)
        return
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the description's and the epilog's line breaks."""

    NeuronsCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": DESCRIPTION,
            "formatter_class": Formatter,
            "fit": {"epilog": _callback_options(), "formatter_class": Formatter},
        },
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
