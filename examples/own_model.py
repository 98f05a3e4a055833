"""Attach lightning-neurons to your own LightningModule, in plain Python.

    python examples/own_model.py
    tensorboard --logdir runs

Any LightningModule works: the callbacks only need the names of the layers to analyse (as in
``model.named_modules()``) and batches that carry labels (``(x, y)`` tuples, or dicts with a
``label``/``target``/``y`` key, or pass ``label_fn=`` / ``input_fn=`` to the tracker; a model
output other than logits, a tuple with the logits first or a mapping with ``logits`` needs
``output_fn=``).
"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F

from lightning_neurons import ActivationTracker
from lightning_neurons.data import DigitsDataModule


class MyNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


if __name__ == "__main__":
    pl.seed_everything(0)
    # "body.1", "body.4" and "body.8" are the ReLUs: post-activation neurons, non-negative.
    tracker = ActivationTracker(layers=["body.1", "body.4", "body.8"], top_k=3)
    trainer = pl.Trainer(
        max_epochs=5, logger=TensorBoardLogger("runs", name="own_model"), callbacks=[tracker]
    )
    trainer.fit(MyNet(), datamodule=DigitsDataModule())
    stats = tracker.results["body.8"]
    print("class profile", tuple(stats.class_means.shape))
    print("mean selectivity", float(stats.selectivity.mean()))
    print("dead neurons", int(stats.dead.sum()))
    print("dominant neurons of digit 3:", stats.dominant[3].tolist())
