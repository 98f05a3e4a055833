"""Analyses that run extra passes of the model on each rank alone refuse sharded models at set-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from lightning_neurons import ActivationTracker, FeatureVisualizer, NeuronContribution
from lightning_neurons.errors import NeuronsError
from lightning_neurons.strategies import sharded_strategy


def _deepspeed(stage: int) -> DeepSpeedStrategy:
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed need not be installed
    strategy.config = {"zero_optimization": {"stage": stage}}
    return strategy


def test_sharded_strategies_are_recognised():
    assert sharded_strategy(SimpleNamespace(strategy=FSDPStrategy())) == "FSDPStrategy"
    assert "stage 3" in sharded_strategy(SimpleNamespace(strategy=_deepspeed(3)))
    assert sharded_strategy(SimpleNamespace(strategy=_deepspeed(2))) is None
    assert sharded_strategy(SimpleNamespace(strategy=DDPStrategy())) is None


@pytest.mark.parametrize("callback", [FeatureVisualizer, NeuronContribution])
def test_callbacks_that_run_the_model_refuse_a_sharded_model_at_setup(callback):
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[ActivationTracker()])
    with pytest.raises(
        NeuronsError, match=rf"{callback.__name__} runs extra forward.*FSDPStrategy"
    ):
        callback().setup(trainer, None, "fit")
