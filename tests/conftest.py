"""Shared fixtures: tiny models and data that make every test fast on 2 CPU cores.

Heavy tests (the model zoo, category defaults, DDP runs, scikit-learn's estimator checks, anything
over about ten seconds) carry ``@pytest.mark.slow``. CI runs every test (plain ``pytest``); the
quick local run leaves the slow ones out::

    OMP_NUM_THREADS=1 pytest -m "not slow"

DDP tests use one harness, ``tests/ddp.py`` (``run_ranks``): read its docstring.
"""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import RenderOptions

os.environ.setdefault("MPLBACKEND", "Agg")
# Threads: OMP_NUM_THREADS when it is set (the suite must pass with 1 and with 2), else at most 2.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
# Deterministic algorithms on (default) or off (LN_TEST_DETERMINISTIC=0): the suite must pass
# both ways. Lightning's `Trainer(deterministic=...)` sets this globally for the process, so every
# test starts from the same setting (see `_deterministic_setting` below).
DETERMINISTIC = os.environ.get("LN_TEST_DETERMINISTIC", "1") != "0"
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


class TinyNet(nn.Module):
    """Two conv layers, one hidden linear layer and a classifier: small and fast."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.head(torch.relu(self.fc(self.pool(x).flatten(1))))


def random_images(
    n: int = 48, num_classes: int = 3, size: int = 8, channels: int = 1, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.rand(n, channels, size, size, generator=g) + y.view(-1, 1, 1, 1) * 0.3
    return x, y


class TinyData(pl.LightningDataModule):
    """Random images whose brightness depends on the class; deterministic."""

    def __init__(
        self, n: int = 48, num_classes: int = 3, batch_size: int = 8, size: int = 8
    ) -> None:
        super().__init__()
        self.x, self.y = random_images(n, num_classes, size)
        self.vx, self.vy = random_images(n // 2, num_classes, size, seed=1)
        self.batch_size = batch_size
        self.num_classes = num_classes

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True, generator=g
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.vx, self.vy), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


#: FeatureVisualizer options that render in a blink (2 steps, 2 channels, 2 SmoothGrad samples).
FAST_VIS = dict(render=RenderOptions(steps=2), smoothgrad_samples=2, max_channels=2)


def fast_trainer(tmp_path, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer logging to TensorBoard under ``tmp_path``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    options = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        num_sanity_val_steps=0,
        deterministic=DETERMINISTIC,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(**options)


@pytest.fixture(autouse=True)
def _deterministic_setting():
    """Every test starts with the suite's setting, whatever an earlier Trainer left behind."""
    torch.use_deterministic_algorithms(DETERMINISTIC)
    yield


@pytest.fixture
def tiny_module():
    from lightning_neurons.models import ImageClassifier

    pl.seed_everything(0, verbose=False)
    return ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)


@pytest.fixture
def tiny_data():
    return TinyData()
