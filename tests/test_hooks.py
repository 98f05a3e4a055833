import pytest
import torch
from conftest import TinyNet
from torch import nn

from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import (
    count_forward_hooks,
    default_layers,
    get_module,
    hooked,
    reduce_activation,
    resolve_layers,
)


def test_default_layers_skip_the_final_classifier():
    assert default_layers(TinyNet()) == ["conv1", "conv2", "fc"]


def test_globs_resolve_in_model_order():
    assert resolve_layers(TinyNet(), ["fc", "conv*"]) == ["conv1", "conv2", "fc"]


def test_unknown_layer_lists_available_names_and_suggests():
    with pytest.raises(
        NeuronsError, match=r"layer 'conv9' not found in TinyNet.*Available: conv1, relu1"
    ):
        resolve_layers(TinyNet(), ["conv9"])
    nested = nn.Sequential(TinyNet())
    with pytest.raises(NeuronsError, match=r"Did you mean: 0\.conv1"):
        get_module(nested, "conv1")


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(NeuronsError, match=r"pattern 'block\*' matches no module"):
        resolve_layers(TinyNet(), ["block*"])


def test_model_without_layers_to_track():
    with pytest.raises(
        NeuronsError, match="no Conv2d or Linear layer besides its final classifier"
    ):
        resolve_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), None)


def test_hooks_are_removed_even_when_the_forward_raises():
    model = TinyNet()
    seen = []
    with pytest.raises(RuntimeError), hooked(model, ["conv1", "fc"], lambda n, t: seen.append(n)):
        assert count_forward_hooks(model) == 2
        model(torch.rand(2, 3, 8, 8))  # wrong channel count
    assert count_forward_hooks(model) == 0
    with hooked(model, ["conv1", "fc"], lambda n, t: seen.append((n, tuple(t.shape)))):
        model(torch.rand(2, 1, 8, 8))
    assert seen == [("conv1", (2, 4, 8, 8)), ("fc", (2, 8))]
    assert count_forward_hooks(model) == 0


def test_reduce_activation_shapes_and_errors():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert reduce_activation(x, "mean").item() == pytest.approx(7.5)
    assert reduce_activation(x, "max").item() == 15.0
    assert reduce_activation(torch.ones(3, 5), "mean").shape == (3, 5)
    with pytest.raises(NeuronsError, match=r"shape \(2, 3, 4\).*\[B, K\].*\[B, K, H, W\]"):
        reduce_activation(torch.ones(2, 3, 4), "mean", "seq")
