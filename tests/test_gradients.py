"""Where the analyses' backward passes stop: at the layers they explain, not at the image (except
through a reentrant checkpoint, which only a whole ``backward()`` gets through)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_neurons import NeuronsError
from lightning_neurons.contribution import contribution_batch, neuron_contributions
from lightning_neurons.gradients import gradients_at, reentrant
from lightning_neurons.visualize import Channel, grad_cam, gradient, render


class _Counted(torch.autograd.Function):
    """The identity, counting the backward passes that run through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        _Counted.calls += 1
        return grad


class SpiedNet(nn.Module):
    """A stem whose backward is counted, ``middle`` (checkpointed with ``use_reentrant=True`` when
    ``reentrant``), ``block`` and a linear head."""

    def __init__(self, reentrant: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.middle = nn.Conv2d(4, 4, 1)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _Counted.apply(self.stem(x))
        if self.reentrant and torch.is_grad_enabled():
            x = checkpoint(self.middle, x, use_reentrant=True)
        else:
            x = self.middle(x)
        return self.head(self.block(x).mean(dim=(2, 3)))


def _images() -> torch.Tensor:
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "analysis",
    [
        lambda net, x: grad_cam(net, x, layer="block.0"),
        lambda net, x: contribution_batch(net, ["block.0", "block.1"], x),
        lambda net, x: neuron_contributions(net, "block.1", x, chunk_size=4),  # 3 logits of 5
    ],
    ids=["grad_cam", "contribution_batch", "all_logits"],
)
def test_the_backward_pass_stops_at_the_explained_layers(analysis):
    """Nothing below ``block`` is differentiated (the stem's backward never runs), and the
    results are those of a whole ``backward()``, which a reentrant checkpoint below ``block``
    needs (its backward runs through the stem)."""
    x = _images()
    _Counted.calls = 0
    pruned = analysis(SpiedNet(), x)
    assert _Counted.calls == 0
    whole = analysis(SpiedNet(reentrant=True), x)
    assert _Counted.calls > 0
    if isinstance(pruned, torch.Tensor):
        pruned, whole = {"cam": pruned}, {"cam": whole}
    elif not isinstance(pruned, dict):
        pruned, whole = pruned.contributions, whole.contributions
    assert pruned.keys() == whole.keys()
    for name in pruned:  # the same arithmetic (float32 sums in the same order)
        torch.testing.assert_close(pruned[name], whole[name], atol=1e-6, rtol=1e-5)


def test_the_input_gradient_runs_through_the_whole_model():
    x = _images()
    _Counted.calls = 0
    gradient(SpiedNet(), x)
    assert _Counted.calls > 0


def test_reentrant_is_found_behind_any_path():
    x = torch.ones(3, requires_grad=True)
    inner = checkpoint(torch.sin, x * 2, use_reentrant=True)
    assert reentrant((x.exp() + inner.cos()).sum())  # on the second branch of an addition
    assert not reentrant((x.exp() + checkpoint(torch.sin, x, use_reentrant=False)).sum())
    assert not reentrant(x.sum().detach())  # no graph: nothing to walk


def test_gradients_at_gives_none_off_the_path_on_both_ways():
    x = torch.ones(2, requires_grad=True)
    off = torch.zeros(2, requires_grad=True) * 1
    for value in (x.exp().sum(), checkpoint(torch.exp, x, use_reentrant=True).sum()):
        grad, unused = gradients_at(value, [x, off])
        torch.testing.assert_close(grad, torch.full((2,), torch.e))
        assert unused is None


class PositionalNet(nn.Module):
    """A ``positions`` layer computed from a buffer alone (as positional embeddings are), added
    to the image's features; ``hidden`` is the features' block, run under ``torch.no_grad()``
    when ``frozen``."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.positions = nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, 3)
        self.register_buffer(
            "grid", torch.stack(torch.meshgrid(*[torch.arange(8.0)] * 2, indexing="ij"))
        )
        self.frozen = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.hidden(x)
        return self.head((hidden + self.positions(self.grid[None])).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "analysis",
    [
        lambda net, layer: contribution_batch(net, [layer], _images()),
        lambda net, layer: grad_cam(net, _images(), layer=layer),
        lambda net, layer: render(net, [Channel(layer, 0)], image_shape=(1, 8, 8), steps=2),
    ],
    ids=["contribution_batch", "grad_cam", "render"],
)
def test_a_layer_without_a_gradient_from_the_image_is_told_why(analysis):
    """A layer computed under ``torch.no_grad()`` is said to be; one computed from a buffer
    alone, with the grad mode on, is not (its inputs are what have no graph)."""
    with pytest.raises(NeuronsError, match="computes it from inputs without a gradient") as e:
        analysis(PositionalNet(), "positions")
    assert "from parameters and buffers alone" in str(e.value)
    with pytest.raises(NeuronsError, match=r"computes it under torch.no_grad\(\) or inside") as e:
        analysis(PositionalNet(frozen=True), "hidden.1")
    assert "buffers" not in str(e.value)
