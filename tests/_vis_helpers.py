"""Shared helpers of the visualization tests: a small trained digits CNN, and model snapshots."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lightning_neurons.hooks import count_forward_hooks

WIDTHS = (16, 32, 64)


class BNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU(inplace) -> Conv -> Dropout -> pool -> Linear: every module type
    whose behaviour differs between train and eval mode, and an in-place op after a conv."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.drop(torch.relu(self.conv2(x)))
        return self.head(self.pool(x).flatten(1))


def bn_net(in_channels: int = 1, num_classes: int = 3, seed: int = 0) -> BNNet:
    """A BNNet with seeded weights and non-trivial BatchNorm running statistics."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = BNNet(in_channels, num_classes)
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 1.5)
    return net


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    modes: list[bool]
    flags: list[bool]
    grads: list[torch.Tensor | None]
    hooks: int


def snapshot(model: nn.Module) -> Snapshot:
    """Everything about a model an analysis must leave as it found it."""
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        modes=[m.training for m in model.modules()],
        flags=[p.requires_grad for p in model.parameters()],
        grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
        hooks=count_forward_hooks(model),
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    after = snapshot(model)
    assert after.state.keys() == before.state.keys()
    for key, value in before.state.items():
        assert torch.equal(after.state[key], value), f"{key} changed"
    assert after.modes == before.modes, "training modes changed"
    assert after.flags == before.flags, "requires_grad changed"
    for a, b in zip(after.grads, before.grads, strict=True):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    assert after.hooks == before.hooks == 0


def rng_states() -> tuple:
    return (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())


def assert_same_rng(before: tuple) -> None:
    after = rng_states()
    assert torch.equal(before[0], after[0]), "torch's global RNG was used"
    assert np.array_equal(before[1], after[1]), "NumPy's global RNG was used"
    assert before[2] == after[2], "Python's global RNG was used"


@functools.lru_cache(maxsize=1)
def _trained_state() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, float]:
    from lightning_neurons.data import DigitsDataModule
    from lightning_neurons.models import SmallCNN

    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SmallCNN(widths=WIDTHS)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        epochs = 6
        for epoch in range(epochs):
            if epoch == epochs - 2:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.2  # settle the weights and the BatchNorm statistics
            model.train()
            for x, y in dm.train_dataloader():
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
    model.eval()
    val_x = torch.cat([x for x, _ in dm.val_dataloader()])
    val_y = torch.cat([y for _, y in dm.val_dataloader()])
    with torch.no_grad():
        accuracy = float((model(val_x).argmax(1) == val_y).float().mean())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, val_x, val_y, accuracy


def trained_digits_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    """A SmallCNN(widths=(16, 32, 64)) trained 6 epochs on the digits (about 98% validation
    accuracy), trained once per test process; returns a fresh copy, the validation images and
    labels, and the accuracy."""
    from lightning_neurons.models import SmallCNN

    state, val_x, val_y, accuracy = _trained_state()
    model = SmallCNN(widths=WIDTHS)
    model.load_state_dict(state)
    model.eval()
    return model, val_x, val_y, accuracy
