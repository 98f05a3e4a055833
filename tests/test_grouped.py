"""Tracked outputs of one shape reduced together (lightning_neurons.grouped), and the tracker's
statistics with them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _operations import Operations
from conftest import fast_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import ActivationTracker
from lightning_neurons.grouped import OutputGroups, output_groups, reduce_together
from lightning_neurons.layouts import held_values
from lightning_neurons.models import ImageClassifier


def _outputs() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return [
        ("maps0", rand(4, 5, 3, 3)),
        ("one0", rand(4, 5, 1, 1)),
        ("maps1", rand(4, 5, 3, 3)),
        ("units0", rand(4, 6)),
        ("double", rand(4, 5, 3, 3, dtype=torch.float64)),  # another type: on its own
        ("maps2", rand(4, 5, 3, 3)),
        ("one1", rand(4, 5, 1, 1)),
        ("units1", rand(4, 6)),
        ("alone", rand(4, 7, 2, 2)),
        ("tokens0", rand(4, 9, 5).transpose(1, 2)),  # channels-first views of [B, N, D] tokens
        ("tokens1", rand(4, 9, 5).transpose(1, 2)),
    ]


@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("wanted", [set(), {"maps1"}, {"maps0", "maps2", "one1", "tokens1"}])
def test_reduce_together_gives_each_output_what_held_values_gives_it(reduction, wanted):
    outputs = _outputs()
    peaks = wanted.__contains__
    reduced = reduce_together(outputs, reduction, peaks)
    # one stack a shape and type: the 4-D maps, one-position maps, units, tokens; two alone
    assert sorted(len(r.names) for r in reduced) == [1, 1, 2, 2, 2, 3]
    for r in reduced:  # the layers whose peaks are wanted first, then in their order
        assert list(r.names) == sorted(r.names, key=lambda n: (not peaks(n), n))
    members = {name: (values, peak) for r in reduced for name, values, peak in r.members()}
    assert members.keys() == {name for name, _ in outputs}
    # a mean over at most 9 float32 values, summed in another order at most: a few ulps
    close = dict(rtol=1e-6, atol=1e-7)
    for name, output in outputs:
        values, peak = members[name]
        expected_values, expected_peak = held_values(output, reduction, name, peaks(name))
        torch.testing.assert_close(values, expected_values, **close)
        torch.testing.assert_close(peak, expected_peak, **close)
        assert values.dtype == output.dtype and values.shape == output.shape[:2]
        assert (peak is values) == (expected_peak is expected_values)
    before = {name: (v.clone(), p.clone()) for name, (v, p) in members.items()}
    for _, output in outputs:
        output.add_(1.0)  # the model changing its outputs in place later changes nothing held
    for name, (values, peak) in members.items():
        assert torch.equal(values, before[name][0]) and torch.equal(peak, before[name][1])


def test_reduce_together_stacks_each_shape_once_and_reduces_it_once():
    outputs = [(n, o) for n, o in _outputs() if n.startswith(("maps", "one"))]
    with Operations() as ops:
        reduce_together(outputs, "mean", {"maps1"}.__contains__)
    # maps: one stack, one mean and one peak reduction of the one output that wants it; the
    # one-position outputs: one stack (their copy), no reduction
    assert ops.counts["stack"] == 2 and ops.counts["mean"] == 1 and ops.counts["amax"] == 1


class _Chain(nn.Module):
    """Four maps of one shape: a conv that an in-place ReLU then changes, a conv, a ReLU and a
    block; and a pooled head of another shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Tanh())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(self.block(x)).flatten(1))


def test_output_groups_hold_outputs_of_one_shape_that_nothing_changes_afterwards():
    model = _Chain()
    x = torch.rand(2, 3, 6, 6)
    layers = ["conv1", "conv2", "act2", "block", "pool", "fc"]
    groups = output_groups(model, layers, lambda: model(x))
    # conv1's output is changed in place by act1; pool's and fc's shapes are each alone
    assert groups.groups == (("conv2", "act2", "block"),)
    assert groups.group_of("act2") == 0 and groups.group_of("conv1") is None
    assert groups.closes("block") and not groups.closes("conv2")
    assert output_groups(model, ["conv2", "pool"], lambda: model(x)).groups == ()

    def fails() -> None:
        model(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        output_groups(model, layers, fails)
    assert OutputGroups().group_of("conv2") is None and not OutputGroups().closes("conv2")


def _loader(n: int = 48, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _validated_states(tmp_path, net: nn.Module, layers=None, callbacks=()) -> dict:
    model = ImageClassifier(net, num_classes=3)
    tracker = ActivationTracker(layers=layers, enable_logging=False, on_error="raise")
    trainer = fast_trainer(tmp_path, callbacks=[*callbacks, tracker])
    trainer.validate(model, _loader(), verbose=False)
    return {"groups": tracker._groups, "states": tracker._saved_states}


def test_resnet_statistics_are_those_of_its_layers_reduced_one_by_one(tmp_path, monkeypatch):
    """torchvision's ResNet-18 (random weights) at 32 px: the blocks of a stage are reduced
    together, and every state equals the one of each layer reduced on its own."""
    import torchvision

    from lightning_neurons import grouped as grouped_module

    runs = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(grouped_module, "output_groups", lambda *a: OutputGroups())
        torch.manual_seed(0)  # the same weights both times
        runs.append(_validated_states(tmp_path, torchvision.models.resnet18(num_classes=3)))
    stages = [tuple(f"backbone.layer{s}.{b}" for b in (0, 1)) for s in (1, 2, 3, 4)]
    assert set(runs[0]["groups"].groups) == set(stages) and runs[1]["groups"].groups == ()
    assert runs[0]["states"].keys() == runs[1]["states"].keys()
    for name, states in runs[0]["states"].items():
        other = runs[1]["states"][name]
        for key in ("images", "fired", "nan"):
            assert torch.equal(states[key], other[key]), (name, key)
        # float32 means over at most 256 positions, summed in float64 over 48 images: the one
        # difference is the float32 summation order of a mean (a few ulps of each value)
        for key in ("sum", "sum_sq", "max"):
            torch.testing.assert_close(states[key], other[key], rtol=1e-5, atol=1e-6)


class _Skips(nn.Module):
    """Three ReLUs of one shape; the third runs only when ``third`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b, self.c = nn.ReLU(), nn.Sigmoid(), nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.third = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(self.conv(x)))
        if self.third:
            x = self.c(x - 0.5)
        return self.fc(x.mean(dim=(2, 3)))


class _EvenBatchesRunTheThird(pl.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        pl_module.backbone.third = batch_idx % 2 == 0


def test_a_group_whose_last_layer_does_not_run_is_reduced_at_the_batch_end(tmp_path):
    """The first batch runs ``c`` (the group a, b, c closes at c); the second does not: a and b
    are reduced at its end, and every layer's sums are a hand computation's."""
    torch.manual_seed(0)
    net = _Skips()
    out = _validated_states(
        tmp_path,
        net,
        ["backbone.a", "backbone.b", "backbone.c"],
        callbacks=[_EvenBatchesRunTheThird()],
    )
    assert out["groups"].groups == (("backbone.a", "backbone.b", "backbone.c"),)
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    labels: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    for name in seen:
        getattr(net, name).register_forward_hook(
            lambda m, i, o, n=name: seen[n].append(o.detach().mean(dim=(2, 3)).double())
        )
    with torch.no_grad():
        for i, (x, y) in enumerate(_loader()):
            net.third = i % 2 == 0
            net(x)
            for name in ("a", "b", "c") if net.third else ("a", "b"):
                labels[name].append(y)
    for name in seen:
        values, y = torch.cat(seen[name]), torch.cat(labels[name])
        expected = torch.stack([values[y == c].sum(0) for c in range(3)])
        states = out["states"][f"backbone.{name}"]
        # float32 means of 1,024 positions, summed in float64: each within ~1e-7 relative
        torch.testing.assert_close(states["sum"], expected, rtol=1e-5, atol=1e-6)
        assert states["images"].sum() == len(y)
    assert out["states"]["backbone.c"]["images"].sum() == 32  # batches 0 and 2 of 16


class _Widens(_Skips):
    """``a``, ``b`` and ``c`` of one shape until ``wide`` is set: then ``c`` doubles its width."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(self.conv(x)))
        y = self.c(torch.cat([x, x], 1) if self.wide else x - 0.5)
        return self.fc(x.mean(dim=(2, 3))) + 0 * y.sum()


class _WidensAfterTheFirstBatch(pl.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        pl_module.backbone.wide = batch_idx > 0


def test_a_layer_that_changes_width_mid_epoch_keeps_the_batches_held_with_it(tmp_path):
    """``c`` is held with ``a`` and ``b`` for the first batch, then doubles its width: its
    statistics start again at the new width, and ``a``'s and ``b``'s keep every batch (before,
    the batches held with ``c`` were dropped with its own)."""
    torch.manual_seed(0)
    layers = ["backbone.a", "backbone.b", "backbone.c"]
    out = _validated_states(tmp_path, _Widens(), layers, callbacks=[_WidensAfterTheFirstBatch()])
    assert out["groups"].groups == (tuple(layers),)
    states = out["states"]
    assert states["backbone.a"]["images"].sum() == 48
    assert states["backbone.b"]["images"].sum() == 48
    assert states["backbone.c"]["images"].sum() == 32  # batches 1 and 2 of 16, at width 8
    assert states["backbone.c"]["sum"].shape == (3, 8)


def test_a_layer_whose_output_an_in_place_op_changes_is_not_held_and_keeps_its_values(tmp_path):
    """``conv1``'s output, of the group's shape, is changed in place by ``act1`` (a
    ``ReLU(inplace=True)``) after it runs: it is reduced at once, and its sums are those of its
    signed values; the others are reduced together."""
    torch.manual_seed(0)
    net = _Chain()
    layers = ["backbone.conv1", "backbone.conv2", "backbone.act2", "backbone.block"]
    out = _validated_states(tmp_path, net, layers)
    assert out["groups"].groups == (("backbone.conv2", "backbone.act2", "backbone.block"),)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in ("conv1", "conv2", "act2", "block")}
    for name in seen:
        getattr(net, name).register_forward_hook(
            lambda m, i, o, n=name: seen[n].append(o.detach().mean(dim=(2, 3)).double())
        )
    labels = []
    with torch.no_grad():
        for x, y in _loader():
            net(x)
            labels.append(y)
    y = torch.cat(labels)
    for name, values in seen.items():
        expected = torch.stack([torch.cat(values)[y == c].sum(0) for c in range(3)])
        # float32 means of 1,024 positions, summed in float64: each within ~1e-7 relative
        torch.testing.assert_close(
            out["states"][f"backbone.{name}"]["sum"], expected, rtol=1e-5, atol=1e-6
        )
    assert (out["states"]["backbone.conv1"]["sum"] < 0).any()  # signed: before the ReLU


class _Functional(nn.Module):
    """Two ``F.relu`` calls on maps of one shape, as the tutorials write them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.conv2(nn.functional.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_function_layers_are_grouped_too_and_keep_their_statistics(tmp_path, monkeypatch):
    from lightning_neurons import grouped as grouped_module

    runs = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(grouped_module, "output_groups", lambda *a: OutputGroups())
        torch.manual_seed(0)
        runs.append(_validated_states(tmp_path, _Functional(), ["backbone.relu()*"]))
    assert runs[0]["groups"].groups == (("backbone.relu()", "backbone.relu()#1"),)
    for name, states in runs[0]["states"].items():
        for key, state in states.items():
            # float32 means of 1,024 positions, summed in float64: a few ulps of each value
            torch.testing.assert_close(state, runs[1]["states"][name][key], rtol=1e-5, atol=1e-6)
