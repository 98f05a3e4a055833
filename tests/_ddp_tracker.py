"""Run by test_tracker_ddp.py: validate a fixed model on digits with 1 or 2 CPU processes.

The validation set has an odd size (359), so under DDP the sampler pads it with a repeat. A
tracked side branch ("marker") gives NaN for some images, so that the NaN counts are compared too.

Usage: python _ddp_tracker.py OUT_DIR DEVICES
Writes OUT_DIR/stats.pt (rank zero: every statistic of every layer, and the confusion matrix) and OUT_DIR/rank<r>.json (how many files each rank wrote).
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_neurons import ActivationTracker, CategoryClustering
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.models import ImageClassifier, SmallCNN

out, devices = Path(sys.argv[1]), int(sys.argv[2])
written: list[str] = []
_save = AnalysisLogger.save_arrays


def counting_save(self, *args, **kwargs):
    path = _save(self, *args, **kwargs)
    if path is not None:
        written.append(str(path))
    return path


AnalysisLogger.save_arrays = counting_save


class WithNaNBranch(ImageClassifier):
    """The classifier, plus a tracked side branch (output unused) that is NaN on some images."""

    def __init__(self) -> None:
        super().__init__(SmallCNN(widths=(8, 16)), num_classes=10)
        self.marker = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = x[:, :, :4, :4].clone()
        patch[:, :, 0, 0] = torch.where(x[:, :, 16, 16] > x[:, :, 16, 10], torch.nan, 1.0)
        self.marker(patch)
        return super().forward(x)


torch.manual_seed(0)
model = WithNaNBranch()
layers = ["backbone.features.relu1", "backbone.features.relu2", "marker"]
tracker = ActivationTracker(layers=layers, reduction="max")
category = CategoryClustering(n_clusters=2, enable_logging=False)
trainer = pl.Trainer(
    accelerator="cpu",
    devices=devices,
    strategy="ddp" if devices > 1 else "auto",
    logger=TensorBoardLogger(str(out), name="tb"),
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[tracker, category],
)
# 359 validation images: an odd count, so DistributedSampler repeats one image on rank 1
data = DigitsDataModule(batch_size=64, val_fraction=0.1997)
trainer.validate(model, datamodule=data, verbose=False)
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"written": written}))
if trainer.is_global_zero:
    stats = {k: v.as_arrays() for k, v in tracker.results.items()}
    stats["confusion"] = torch.as_tensor(next(iter(category.results.values())).confusion)
    torch.save(stats, out / "stats.pt")
# Close the gloo process group before exit: otherwise its threads may still be joinable when the
# C++ statics are destroyed (SIGABRT, "terminate called without an active exception").
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
