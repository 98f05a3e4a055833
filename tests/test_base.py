import platform
import random
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _operations import Operations
from conftest import TinyNet
from torch import nn

from lightning_neurons import state
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


def test_untouched_copies_and_compares_the_buffers_in_groups_not_one_by_one(monkeypatch):
    """On a GPU each copy is a kernel and each comparison waits for the device: ResNet-50's 159
    BatchNorm buffers took 318 kernels and 159 waits at every analysis, one copy and one
    comparison each. Now a group of one device and type takes one of each; a changed buffer is
    still restored, and an unchanged one is never written."""
    model = nn.Sequential(*[nn.BatchNorm2d(4) for _ in range(20)])  # 40 float, 20 int64 buffers
    with Operations() as counted, untouched(model):
        pass
    assert counted.counts["equal"] == 2 and counted.counts["cat"] == 4  # float32 and int64
    assert counted.counts["copy_"] == 0
    before = [b.clone() for b in model.buffers()]
    with untouched(model):
        model.train()
        model(torch.rand(2, 4, 3, 3))  # every running statistic and counter changes
        model[3].running_var[1] = float("nan")
    assert all(torch.equal(b, old) for b, old in zip(model.buffers(), before, strict=True))
    monkeypatch.setattr(state, "BUFFER_GROUP_BYTES", 40)  # one BatchNorm's 2 float buffers a group
    versions = [b._version for b in model.buffers()]
    with Operations() as counted, untouched(model):
        model[7].running_mean.add_(1.0)
    # 20 float groups, 4 of 5 int64 counters (8 bytes each), 2 buffers of the changed group
    assert counted.counts["equal"] == 20 + 4 + 2
    names = [name for name, _ in model.named_buffers()]
    assert torch.equal(model[7].running_mean, before[names.index("7.running_mean")])
    changed = [b._version - v for b, v in zip(model.buffers(), versions, strict=True)]
    assert {names[i]: c for i, c in enumerate(changed) if c} == {"7.running_mean": 2}


class _Marked(torch.Tensor):
    """A tensor subclass (as a DTensor is one): copied and compared alone, as it is."""


def test_untouched_restores_subclass_and_sparse_buffers_alone():
    model = nn.BatchNorm1d(3)
    model.register_buffer("marked", torch.zeros(3).as_subclass(_Marked))
    model.register_buffer("sparse", torch.eye(3).to_sparse())
    with Operations() as counted, untouched(model):
        model.marked.add_(1.0)
        model.sparse.mul_(2.0)
    assert type(model.marked) is _Marked and torch.equal(model.marked, torch.zeros(3))
    assert torch.equal(model.sparse.to_dense(), torch.eye(3))
    assert counted.counts["equal"] == 2 + 2  # the two groups (float, int64), the two alone


def test_untouched_restores_on_error():
    model = TinyNet().train()
    with pytest.raises(KeyError), untouched(model):
        model.eval()
        raise KeyError("analysis failed")
    assert model.training and all(p.requires_grad for p in model.parameters())


class _StepsCallANet(pl.LightningModule):
    """No ``forward``: the steps call ``self.net``; a loss module without parameters beside it."""

    def __init__(self, parts: int = 1) -> None:
        super().__init__()
        self.net = TinyNet()
        self.loss = nn.CrossEntropyLoss()
        if parts == 2:
            self.head = nn.Linear(3, 3)


def test_untouched_calls_the_only_child_with_parameters_of_a_module_without_forward():
    module, x = _StepsCallANet(), torch.rand(2, 1, 8, 8)
    with pytest.raises(NotImplementedError):
        module(x)
    with untouched(module):
        assert torch.equal(module(x), module.net(x))
    assert "forward" not in vars(module) and list(module._modules) == ["net", "loss"]
    with pytest.raises(KeyError), untouched(module):
        raise KeyError("analysis failed")
    assert "forward" not in vars(module)
    with pytest.raises(NotImplementedError):
        module(x)
    two = _StepsCallANet(parts=2)  # a backbone and a head: which runs first is not known
    assert state.forward_submodule(two) is None
    module.temperature = nn.Parameter(torch.ones(()))  # the steps use more than the child
    assert state.forward_submodule(module) is None
    with untouched(two), pytest.raises(NotImplementedError):
        two(x)


class _Failing(AnalysisCallback):
    """An analysis that fails at the end of every validation stage."""

    def _consume(self, stage, trainer, pl_module):
        if stage == "validation" and self._due(trainer):
            self._run_safely("clustering", lambda: 1 / 0)


def test_a_failing_analysis_warns_and_training_goes_on_or_raises(tmp_path):
    from conftest import TinyData, fast_trainer

    from lightning_neurons.models import ImageClassifier

    model = ImageClassifier(TinyNet(), num_classes=3)
    warn = _Failing(on_error="warn")
    with pytest.warns(
        UserWarning, match=r"clustering failed and was skipped \(ZeroDivisionError: division by "
    ):
        trainer = fast_trainer(tmp_path, callbacks=[warn], logger=False, max_epochs=2)
        trainer.fit(model, datamodule=TinyData())
    assert trainer.current_epoch == 2  # both epochs trained
    assert warn.failures == ["clustering: ZeroDivisionError: division by zero"] * 2
    with pytest.raises(ZeroDivisionError):
        fast_trainer(tmp_path, callbacks=[_Failing(on_error="raise")], logger=False).fit(
            model, datamodule=TinyData()
        )


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


def test_every_batch_hook_hands_its_batch_over_as_a_stage_batch():
    """Lightning's six batch hooks, called positionally (as Lightning does) or by keyword, reach
    one method each for start and end, with the stage and the loader index."""
    from lightning_neurons.callbacks._base import StageBatch, StagedCallback

    class Recorder(StagedCallback):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[str, StageBatch]] = []

        def _on_batch_start(self, trainer, pl_module, step):
            self.seen.append(("start", step))

        def _on_batch_end(self, trainer, pl_module, step):
            self.seen.append(("end", step))

    cb = Recorder()
    cb.on_train_batch_start(None, None, "b0", 3)
    cb.on_train_batch_end(None, None, {"loss": 1}, "b1", 4)
    cb.on_validation_batch_start(None, None, "b2", 5)
    cb.on_validation_batch_end(None, None, None, "b3", 6, 1)
    cb.on_test_batch_start(None, None, "b4", 7, dataloader_idx=2)
    cb.on_test_batch_end(None, None, outputs=None, batch="b5", batch_idx=8)
    assert cb.seen == [
        ("start", StageBatch("train", "b0", 3, 0)),
        ("end", StageBatch("train", "b1", 4, 0)),
        ("start", StageBatch("validation", "b2", 5, 0)),
        ("end", StageBatch("validation", "b3", 6, 1)),
        ("start", StageBatch("test", "b4", 7, 2)),
        ("end", StageBatch("test", "b5", 8, 0)),
    ]


def test_the_heap_is_trimmed_after_every_analysis_and_per_epoch_state_stays_bounded(
    tmp_path, monkeypatch
):
    """What an analysis freed goes back to the system after each one (glibc keeps it otherwise,
    per thread), and the clusterings keep one previous labelling per layer whatever the epochs."""
    from conftest import TinyData, fast_trainer

    from lightning_neurons import ActivationTracker, NeuronClustering
    from lightning_neurons.callbacks import _base
    from lightning_neurons.heap import release_freed_memory
    from lightning_neurons.models import ImageClassifier

    if sys.platform.startswith("linux") and "glibc" in platform.libc_ver()[0]:
        assert release_freed_memory()
    trims = []
    monkeypatch.setattr(_base, "release_freed_memory", lambda: trims.append(1) or True)
    clustering = NeuronClustering(method="kmeans", enable_logging=False)
    trainer = fast_trainer(
        tmp_path,
        callbacks=[ActivationTracker(enable_logging=False), clustering],
        logger=False,
        max_epochs=3,
    )
    trainer.fit(ImageClassifier(TinyNet(), num_classes=3), datamodule=TinyData())
    assert len(trims) >= 3 and len(trims) % 3 == 0  # after each analysis, the same each epoch
    assert len(clustering._previous) == len(clustering.results) > 0
