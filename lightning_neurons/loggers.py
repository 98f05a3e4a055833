"""Where analyses write: the TensorBoard writer, and files next to the event files.

Every callback of the package logs through :class:`AnalysisLogger`, so that all of them agree on
where artifacts go, warn once when no TensorBoard logger is attached, and write only on rank zero.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

#: Folder (under the TensorBoard log dir, or the trainer's root dir) holding our files.
ARTIFACT_DIRNAME = "neurons"

_warned_no_tensorboard: set[int] = set()


def find_tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    """The trainer's first :class:`TensorBoardLogger`, or ``None``."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger
    return None


def artifact_root(trainer: Trainer) -> Path:
    """The folder for our files: ``<tensorboard log_dir>/neurons`` when a TensorBoard
    logger is attached, else ``<trainer.default_root_dir>/neurons``."""
    tb = find_tensorboard(trainer)
    base = tb.log_dir if tb is not None else trainer.default_root_dir
    return Path(base) / ARTIFACT_DIRNAME


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class AnalysisLogger:
    """Writes one analysis' figures, images, histograms, scalars and files.

    All methods do nothing off rank zero. Figures are closed after logging.

    Args:
        trainer: The running trainer.
        kind: The analysis' name (``"activations"``, ``"clustering"``...), used as the first part of
            TensorBoard tags and as the artifact sub-folder.
        owner: The object asking (a callback); the "no TensorBoard logger" warning is given once
            per owner.
    """

    def __init__(self, trainer: Trainer, kind: str, owner: object | None = None) -> None:
        self.trainer = trainer
        self.kind = kind
        self.is_writer = trainer.is_global_zero
        tb = find_tensorboard(trainer)
        self.experiment = tb.experiment if (tb is not None and self.is_writer) else None
        self.root = artifact_root(trainer)
        key = id(owner) if owner is not None else id(self)
        if tb is None and self.is_writer and key not in _warned_no_tensorboard:
            _warned_no_tensorboard.add(key)
            rank_zero_warn(
                f"lightning-neurons ({kind}): no TensorBoardLogger is attached to the Trainer, so "
                f"figures and images are not logged; the numbers are still written as files under "
                f"{self.root}. Add `logger=lightning.pytorch.loggers.TensorBoardLogger(...)` (or "
                "`trainer.logger: TensorBoardLogger` in YAML) to see them in TensorBoard."
            )

    @property
    def step(self) -> int:
        return self.trainer.global_step

    def tag(self, *parts: str) -> str:
        return "/".join([self.kind, *parts])

    def figure(self, tag: str, figure: Any) -> None:
        """Log a figure as an image: the ``[H, W, 3]`` uint8 array that the plot functions of
        :mod:`lightning_neurons.plots` return, or a :class:`matplotlib.figure.Figure` (drawn on an
        Agg canvas; closed afterwards if pyplot manages it). Never imports pyplot."""
        import sys

        from matplotlib.figure import Figure

        from lightning_neurons.plots._canvas import as_image

        try:
            if self.experiment is not None:
                pixels = as_image(figure)
                self.experiment.add_image(tag, pixels, global_step=self.step, dataformats="HWC")
        finally:
            pyplot = sys.modules.get("matplotlib.pyplot")
            if pyplot is not None and isinstance(figure, Figure):
                pyplot.close(figure)  # a user's pyplot figure; ours are not registered there

    def image(self, tag: str, image: torch.Tensor) -> None:
        """Log a ``[C, H, W]`` image with values in [0, 1]."""
        if self.experiment is not None:
            self.experiment.add_image(tag, image.detach().cpu().clamp(0, 1), global_step=self.step)

    def histogram(self, tag: str, values: Any) -> None:
        values = _to_numpy(values).astype(np.float64).ravel()
        values = values[np.isfinite(values)]
        if self.experiment is not None and values.size:
            self.experiment.add_histogram(tag, values, global_step=self.step)

    def text(self, tag: str, text: str) -> None:
        if self.experiment is not None:
            self.experiment.add_text(tag, text, global_step=self.step)

    def scalars(self, metrics: Mapping[str, float]) -> None:
        """Log scalars to every logger of the trainer (TensorBoard, CSV, W&B...)."""
        if not self.is_writer:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(clean, step=self.step)

    def save_arrays(
        self, name: str, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None
    ) -> Path | None:
        """Write ``arrays`` to ``<root>/<kind>/epoch=EEE/<name>.npz`` and index it.

        The index, ``<root>/index.json``, lists every file with its kind, epoch, step, name,
        array names and ``meta``, so results can be analysed without TensorBoard.

        Returns:
            The file written (``None`` off rank zero).
        """
        if not self.is_writer:
            return None
        epoch = self.trainer.current_epoch
        folder = self.root / self.kind / f"epoch={epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        safe = name.replace("/", "_").replace(os.sep, "_")
        path = folder / f"{safe}.npz"
        np.savez_compressed(path, **{k: _to_numpy(v) for k, v in arrays.items()})
        self._index(
            {
                "kind": self.kind,
                "name": name,
                "epoch": epoch,
                "step": self.step,
                "file": str(path.relative_to(self.root)),
                "arrays": sorted(arrays),
                "meta": dict(meta or {}),
            }
        )
        return path

    def save_json(self, name: str, payload: Mapping[str, Any]) -> Path | None:
        """Write ``payload`` to ``<root>/<kind>/epoch=EEE/<name>.json`` and index it."""
        if not self.is_writer:
            return None
        epoch = self.trainer.current_epoch
        folder = self.root / self.kind / f"epoch={epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name.replace('/', '_')}.json"
        path.write_text(json.dumps(payload, indent=1, default=_json_default))
        self._index(
            {
                "kind": self.kind,
                "name": name,
                "epoch": epoch,
                "step": self.step,
                "file": str(path.relative_to(self.root)),
                "arrays": [],
                "meta": {},
            }
        )
        return path

    def _index(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        index_path = self.root / "index.json"
        records = json.loads(index_path.read_text()) if index_path.exists() else []
        records = [r for r in records if r.get("file") != record["file"]]
        records.append(record)
        tmp = index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records, indent=1, default=_json_default))
        tmp.replace(index_path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _to_numpy(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def load_index(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the artifact index written by the callbacks.

    Args:
        root: The artifact folder (``<log_dir>/neurons``) or the log dir above it.

    Returns:
        The index records, each with ``kind``, ``name``, ``epoch``, ``step``, ``file``
        (relative to the artifact folder), ``arrays`` and ``meta``.
    """
    root = Path(root)
    if (root / ARTIFACT_DIRNAME / "index.json").exists():
        root = root / ARTIFACT_DIRNAME
    return json.loads((root / "index.json").read_text())
