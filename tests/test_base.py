import random

import numpy as np
import pytest
import torch
from conftest import TinyNet
from torch import nn

from lightning_neurons.callbacks._base import AnalysisCallback
from lightning_neurons.state import untouched


def test_untouched_restores_modes_flags_grads_buffers_and_rng():
    model = nn.Sequential(TinyNet(), nn.BatchNorm1d(3))
    model.train()
    model[0].fc.requires_grad_(False)
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: None if g is None else g.clone() for n, g in grads.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    running = model[1].running_mean.clone()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    with torch.inference_mode(), untouched(model):
        assert torch.is_grad_enabled()
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
        x = torch.rand(4, 1, 8, 8, requires_grad=True)
        model(x).sum().backward()  # train mode: BatchNorm updates its running stats
        assert x.grad is not None
        model.eval()
        torch.rand(10), random.random(), np.random.rand()
    assert (torch.rand(1), random.random(), np.random.rand()) == expected
    assert all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert p.grad is grads[n]
        assert p.requires_grad == flags[n]
        if p.grad is not None:
            assert torch.equal(p.grad, grad_values[n])
    assert torch.equal(model[1].running_mean, running)


def test_untouched_restores_on_error():
    model = TinyNet().train()
    with pytest.raises(KeyError), untouched(model):
        model.eval()
        raise KeyError("analysis failed")
    assert model.training and all(p.requires_grad for p in model.parameters())


class _Broken(AnalysisCallback):
    """An analysis that fails at each validation end, as a subclass's analysis may."""

    def on_validation_end(self, trainer, pl_module) -> None:
        def broken():
            raise ZeroDivisionError("bad maths")

        self._run_safely("clustering", broken)


def test_a_failing_analysis_warns_or_raises_as_on_error_says(tmp_path, tiny_module):
    from conftest import TinyData, fast_trainer

    cb = _Broken(on_error="warn")
    with pytest.warns(
        UserWarning, match=r"clustering failed and was skipped \(ZeroDivisionError: bad maths\)"
    ):
        fast_trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(tiny_module, TinyData())
    assert cb.failures == ["clustering: ZeroDivisionError: bad maths"]
    with pytest.raises(ZeroDivisionError):
        trainer = fast_trainer(tmp_path, callbacks=[_Broken(on_error="raise")], max_epochs=1)
        trainer.fit(tiny_module, TinyData())


def test_find_callback_finds_by_type_and_says_how_to_add_a_missing_one():
    from types import SimpleNamespace

    from lightning_neurons import ActivationTracker, NeuronsError
    from lightning_neurons.callbacks._base import find_callback

    class MyTracker(ActivationTracker):
        pass

    class ActivationTrackerLookalike(AnalysisCallback):  # the same name is not the same type
        pass

    first, second = MyTracker(), ActivationTracker()
    trainer = SimpleNamespace(callbacks=[ActivationTrackerLookalike(), first, second])
    assert find_callback(trainer, ActivationTracker) is first  # subclasses count; the first wins
    assert find_callback(trainer, MyTracker, required="Someone") is first
    empty = SimpleNamespace(callbacks=[ActivationTrackerLookalike()])
    assert find_callback(empty, ActivationTracker) is None
    with pytest.raises(
        NeuronsError, match="NeuronClustering reads the results of an ActivationTracker"
    ):
        find_callback(empty, ActivationTracker, required="NeuronClustering")
    with pytest.raises(NeuronsError, match="class_path: lightning_neurons.ActivationTracker"):
        find_callback(empty, ActivationTracker, required="NeuronClustering")
