"""Functional activations, activation modules of any library, and token outputs as layers."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import ActivationTracker
from lightning_neurons.ablation import ablation_effect
from lightning_neurons.activations import ActivationRule
from lightning_neurons.class_contribution import class_contributions
from lightning_neurons.errors import NeuronsError
from lightning_neurons.functional import called_ops
from lightning_neurons.hooks import (
    count_forward_hooks,
    default_layers,
    get_module,
    hooked,
    resolve_layers,
    run_layers,
)
from lightning_neurons.layouts import module_layouts, on_grid, token_grid
from lightning_neurons.visualize.saliency import grad_cam


class TutorialNet(nn.Module):
    """As PyTorch's CIFAR-10 tutorial writes it: modules for the weights, F.relu in forward."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def _images(n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _no_mode_left() -> bool:
    return torch._C._len_torch_function_stack() == 0


def test_a_tutorial_model_has_its_relu_calls_as_default_layers():
    net = TutorialNet().eval()
    assert default_layers(net) == ["relu()"]
    assert get_module(net, "relu()#2") is net
    with torch.no_grad():
        sites = run_layers(net, ["relu()"], lambda: net(_images(2)))
    assert sites == ["relu()", "relu()#1", "relu()#2"]
    seen = {}
    with torch.no_grad(), hooked(net, ["relu()"], lambda n, t: seen.update({n: t.shape})):
        net(_images(2))
    assert seen == {"relu()": (2, 6, 28, 28), "relu()#1": (2, 16, 10, 10), "relu()#2": (2, 12)}
    assert count_forward_hooks(net) == 0 and _no_mode_left()


def test_function_layers_work_in_names_globs_and_calls():
    net = TutorialNet()
    assert resolve_layers(net, ["relu()#1", "conv*"]) == ["conv1", "conv2", "relu()#1"]
    assert resolve_layers(net, ["*relu()#*"]) == ["relu()#*"]
    assert resolve_layers(nn.Sequential(net), ["0.relu()"]) == ["0.relu()"]
    with pytest.raises(NeuronsError, match="'foo' is not an activation function"):
        resolve_layers(net, ["foo()"])
    with pytest.raises(NeuronsError, match="'conv9' not found"):
        resolve_layers(net, ["conv9.relu()"])


class Spellings(nn.Module):
    """Every way of writing a relu, a gelu, an nn.ReLU child (its F.relu is its own) and a
    child module with its own F.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.inner = TutorialNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(x) + torch.relu(x) + x.relu() + x.clone().relu_() + F.relu(x.clone(), True)
        return self.inner(F.gelu(self.act(a)))


def test_every_spelling_is_a_call_of_the_op_and_children_keep_their_own():
    net = Spellings().eval()
    # a module's function layers come after its children's layers
    assert default_layers(net) == ["act", "inner.relu()", "relu()", "gelu()"]
    assert default_layers(net.inner) == ["relu()"]
    with torch.no_grad():
        sites = run_layers(
            net, ["relu()", "gelu()", "act", "inner.relu()"], lambda: net(_images(1))
        )
    relus = ["relu()", *(f"relu()#{i}" for i in range(1, 5))]
    assert sites == [*relus, "act", "gelu()", "inner.relu()", "inner.relu()#1", "inner.relu()#2"]


class Wrapper(nn.Module):
    """A model whose forward runs its backbone's parts itself: a submodule called by name
    (``b.relu(...)``, ``self.net.relu(...)``) is not a function call; its own ``F.relu`` is, and
    so is ``torch.nn.functional.relu``; a grandchild's calls (``self.net.layer1(x)``'s ReLUs,
    ``self.net.block``'s ``F.relu``) are not the wrapper's own."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.net.relu = nn.ReLU()
        self.net.layer1 = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.net.block = TutorialNet(num_classes=4)  # F.relu three times
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.net
        x = self.net.relu(b.relu(b.conv(x)))  # the module, twice
        x = F.relu(self.net.layer1(x)) + torch.nn.functional.relu(x)
        y = self.net.block(F.interpolate(x[:, :3], size=32))
        return self.head(x.mean(dim=(2, 3)) + y)


def test_a_wrapper_calling_its_backbone_s_parts_has_only_its_own_calls():
    net = Wrapper().eval()
    assert default_layers(net) == ["net.relu", "net.layer1.1", "net.block.relu()", "relu()"]
    with torch.no_grad():
        sites = run_layers(net, ["relu()", "net.block.relu()", "net.relu"], lambda: net(_images(1)))
    block = ["net.block.relu()", "net.block.relu()#1", "net.block.relu()#2"]
    assert sites == ["net.relu", "net.relu#1", "relu()", "relu()#1", *block]
    assert count_forward_hooks(net) == 0 and _no_mode_left()


class ModuleCallsOnly(nn.Module):
    """Calls a grandchild ``relu`` module by name, three ways; ``x.gelu()`` and
    ``torch.nn.functional.silu`` are function calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.relu(self.net.relu(x)) + [self.net][0].relu(x)
        return torch.nn.functional.silu(x.gelu())


class Unbuilt(nn.Module):
    """Reads ``self.parts.relu`` in a branch not taken; ``parts`` raises until built."""

    @property
    def parts(self) -> nn.Module:
        raise RuntimeError("not built yet")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.relu(x) if x.dim() == 5 else F.gelu(x)


def test_a_submodule_called_by_name_is_not_a_function_call():
    assert called_ops(ModuleCallsOnly(), ("relu", "gelu", "silu")) == ["silu", "gelu"]
    assert default_layers(ModuleCallsOnly()) == ["net.relu", "silu()", "gelu()"]
    # reading the code runs no property to its error: an unknown owner reads as a function
    assert called_ops(Unbuilt(), ("relu", "gelu")) == ["relu", "gelu"]


def test_zeroing_a_function_layer_replaces_the_op_result():
    net = TutorialNet().eval()
    with torch.no_grad(), hooked(net, ["relu()#2"], lambda n, t: torch.zeros_like(t)):
        out = net(_images(2))
    # nothing reaches fc2 but its bias
    torch.testing.assert_close(out, net.fc2.bias.expand(2, -1).detach())
    x, y = _images(6), torch.arange(6) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    res = ablation_effect(net, "relu()#2", list(range(12)), loader)
    bias = net.fc2.bias.detach().double()
    torch.testing.assert_close(res.ablated_logit, bias, atol=1e-6, rtol=0)
    assert count_forward_hooks(net) == 0 and _no_mode_left()


def test_contributions_of_a_function_layer_are_activation_times_weight():
    net = TutorialNet().eval()
    x, y = _images(6), torch.arange(6) % 3
    stats = class_contributions(net, ["relu()#2"], DataLoader(TensorDataset(x, y), batch_size=6))
    with torch.no_grad():
        acts = {}
        with hooked(net, ["relu()#2"], lambda n, t: acts.update({n: t})):
            net(x)
    expected = acts["relu()#2"] * net.fc2.weight.detach()[y]  # the logit is linear in fc1's relu
    for c in range(3):
        got = stats["relu()#2"].class_contribution[c]
        torch.testing.assert_close(got, expected[y == c].mean(0), atol=1e-5, rtol=0)


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x))
        raise ValueError("boom")


def test_hooks_and_the_mode_are_gone_after_an_error():
    net = Raises()
    with pytest.raises(ValueError, match="boom"), hooked(net, ["relu()"], lambda n, t: None):
        net(torch.rand(2, 4))
    assert count_forward_hooks(net) == 0 and _no_mode_left()
    F.relu(torch.rand(2))  # no mode left to see it
    assert _no_mode_left()


# ---- activation modules of any library -------------------------------------------------------


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sigmoid()


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x + 1


class UnitNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) / x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


class Net(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = act
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("act", "recognised"),
    [
        (Swish(), True),  # elementwise, rectifier-like
        (Gate(), False),  # saturates at 1: a gate
        (Scale(), False),  # affine
        (UnitNorm(), False),  # not elementwise
        (nn.Identity(), False),  # torch's own classes go by the list
        (nn.Dropout(), False),
        (nn.Sigmoid(), False),
        (nn.GELU(), True),
    ],
)
def test_activation_modules_are_recognised_by_the_rule(act, recognised):
    model = Net(act)
    assert (default_layers(model) == ["act"]) is recognised
    assert model.training  # the probe gives the flag back


def test_timm_gelu_is_an_activation():
    timm = pytest.importorskip("timm")
    assert ActivationRule()(timm.layers.activations.GELU())


def test_activations_argument_names_classes_and_ops():
    assert default_layers(Net(Gate()), activations=["Gate"]) == ["act"]
    qualified = f"{Gate.__module__}.{Gate.__qualname__}"
    assert default_layers(Net(Gate()), activations=[qualified]) == ["act"]
    assert resolve_layers(Net(Gate()), None, activations=["Gate"]) == ["act"]
    # a functional gate, named by its op, becomes a default layer (Gate's x.sigmoid() here)
    assert default_layers(Net(Gate()), activations=["sigmoid"]) == ["act.sigmoid()"]
    with pytest.raises(NeuronsError, match="'Swish2' is neither a functional op"):
        default_layers(Net(Gate()), activations=["Swish2"])
    with pytest.raises(NeuronsError, match="`activations` must be a list"):
        ActivationTracker(activations=[3])
    tracker = ActivationTracker(activations=["Gate"])
    assert tracker.resolve_layers(Net(Gate()), None) == ["act"]


# ---- transformer tokens ----------------------------------------------------------------------


def _tv_vit() -> nn.Module:
    vit = torchvision.models.vision_transformer.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=3,
    )
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision starts the head at zero
    return vit.eval()


def test_token_outputs_reach_the_analyses_as_neurons_over_tokens():
    vit = _tv_vit()
    layers = default_layers(vit)
    assert layers == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    seen, raw = {}, {}
    block = get_module(vit, layers[0])
    handle = block.register_forward_hook(lambda m, i, o: raw.setdefault("out", o))
    with torch.no_grad(), hooked(vit, layers[:1], lambda n, t: seen.update({n: t})):
        out = vit(_images(2))
    handle.remove()
    # [B, N, D] = [2, 1 + 16, 32] handed over as 32 neurons over 17 tokens, the same values
    assert seen[layers[0]].shape == (2, 32, 17)
    torch.testing.assert_close(seen[layers[0]], raw["out"].transpose(1, 2))
    with torch.no_grad():
        torch.testing.assert_close(out, vit(_images(2)))  # the model's output is untouched


def test_grad_cam_reads_tokens_on_the_patch_grid():
    vit = _tv_vit()
    maps = grad_cam(vit, _images(3), target=[0, 1, 2])
    assert maps.shape == (3, 32, 32)
    assert bool((maps >= 0).all()) and bool((maps.flatten(1).amax(dim=1) > 0).any())
    tokens = torch.arange(2 * 17.0).view(1, 2, 17)  # class token first, then a 4x4 grid
    assert on_grid(tokens, (4, 4))[0, 1, 0, 0] == 18.0
    with pytest.raises(NeuronsError, match="cannot hold the 5x5 patch grid"):
        on_grid(tokens, (5, 5))
    assert count_forward_hooks(vit) == 0


class MergingNet(nn.Module):
    """A hierarchical transformer as Swin's is: 4x4 patches of a 32x32 image (an 8x8 grid of
    tokens), then patch merging (each 2x2 group of tokens concatenated: a 4x4 grid), raster
    order; every weight positive, so the brighter an image region, the more its tokens fire."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        self.merge = nn.Linear(16, 6)
        self.act = nn.GELU()
        self.head = nn.Linear(6, 2)
        for p in self.parameters():
            nn.init.uniform_(p, 0.1, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.embed(x)  # [B, 4, 8, 8]
        b, c = grid.shape[:2]
        merged = grid.view(b, c, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 16)
        tokens = self.act(self.merge(merged))  # [B, 16, 6]: the 4x4 grid's tokens
        return self.head(tokens.mean(dim=1))


def test_grad_cam_reads_a_later_stages_tokens_on_the_halved_grid():
    assert token_grid(16, (8, 8)) == (0, (4, 4))
    assert token_grid(1 + 64, (8, 8)) == (1, (8, 8))
    assert token_grid(9, (5, 6)) == (0, (3, 3))  # sides rounded up, as patch merging pads
    with pytest.raises(NeuronsError, match="nor that grid halved"):
        token_grid(17, (8, 8))
    net = MergingNet().eval()
    images = torch.zeros(2, 3, 32, 32)
    images[0, :, :8, :8] = 1.0  # image 0 bright in the top-left token of the 4x4 grid
    images[1, :, 24:, 8:16] = 1.0  # image 1 in row 3, column 1
    maps = grad_cam(net, images, target=[0, 0], layer="act")
    assert maps.shape == (2, 32, 32)
    cells = maps.view(2, 4, 8, 4, 8).mean(dim=(2, 4)).flatten(1)  # the map on the 4x4 grid
    assert cells.argmax(dim=1).tolist() == [0, 3 * 4 + 1]
    assert count_forward_hooks(net) == 0


def test_activations_reach_the_tracker_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ActivationTracker, "tracker")
    config = parser.parse_string("tracker:\n  activations: [Gate, sigmoid]\n")
    tracker = parser.instantiate_classes(config).tracker
    assert tracker.activations == ["Gate", "sigmoid"]
    assert tracker.resolve_layers(Net(Gate()), None) == ["act"]


class ChannelsLast(nn.Module):
    """Says its outputs are [B, H, W, C], as timm's Swin does; its conv stays channels first."""

    output_fmt = "NHWC"

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 5, 4, stride=4)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(x).permute(0, 2, 3, 1))
        return self.head(x.mean(dim=(1, 2)))


def test_channels_last_outputs_are_handed_over_channels_first():
    net = ChannelsLast().eval()
    seen = {}
    with torch.no_grad(), hooked(net, ["proj", "norm"], lambda n, t: seen.update({n: t})):
        net(_images(2, size=16))
    assert seen["proj"].shape == seen["norm"].shape == (2, 5, 4, 4)
    # LayerNorm over the channels: every position's 5 values have mean 0 in the view's dim 1
    torch.testing.assert_close(seen["norm"].mean(dim=1), torch.zeros(2, 4, 4), atol=1e-5, rtol=0)
    x, y = _images(6, size=16), torch.arange(6) % 3
    res = ablation_effect(net, "norm", list(range(5)), DataLoader(TensorDataset(x, y)))
    torch.testing.assert_close(
        res.ablated_logit, net.head.bias.detach().double(), atol=1e-6, rtol=0
    )


class PermutedNet(nn.Module):
    """Channels last by ``Permute`` modules, as torchvision's Swin and ConvNeXt are written: a
    patch embedding that permutes to ``[B, H, W, C]``, a stage of ``[B, H, W, C]`` blocks, a
    ConvNeXt-style block that permutes there and back, and the head's permute back."""

    def __init__(self) -> None:
        super().__init__()
        permute = torchvision.ops.misc.Permute
        self.embed = nn.Sequential(nn.Conv2d(3, 5, 4, stride=4), permute([0, 2, 3, 1]))
        self.stage = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 6))
        self.back = permute([0, 3, 1, 2])
        self.block = nn.Sequential(
            nn.Conv2d(6, 6, 3, padding=1, groups=6),
            permute([0, 2, 3, 1]),
            nn.Linear(6, 7),
            nn.GELU(),
            permute([0, 3, 1, 2]),
        )
        self.own = PermuteBack(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.own(self.block(self.back(self.stage(self.embed(x)))))
        return self.head(x.mean(dim=(2, 3)))


class PermuteBack(nn.Module):
    """A LayerNorm over the channels of ``[B, C, H, W]`` maps: a ``Permute`` module there, and
    ``x.permute`` in ``forward`` back, which no walk of the modules sees."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.to_last = torchvision.ops.misc.Permute([0, 2, 3, 1])
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.to_last(x)).permute(0, 3, 1, 2)


def test_permute_modules_make_their_maps_channels_last():
    net = PermutedNet().eval()
    layouts = module_layouts(net)
    last = {"embed", "embed.1", "stage", "stage.0", "stage.1", "block.1", "block.2", "block.3"}
    last |= {"own.to_last", "own.norm"}  # `own` itself permutes back in its forward
    assert {name for name, is_last in layouts.items() if is_last} == last
    seen = {}
    layers = ["embed", "stage.0", "stage", "back", "block.2", "block", "own.norm", "own"]
    with torch.no_grad(), hooked(net, layers, lambda n, t: seen.update({n: t.clone()})):
        net(_images(2, size=16))
    shapes = {name: tuple(seen[name].shape) for name in layers}
    assert shapes == {
        "embed": (2, 5, 4, 4),
        "stage.0": (2, 5, 4, 4),
        "stage": (2, 6, 4, 4),
        "back": (2, 6, 4, 4),
        "block.2": (2, 7, 4, 4),
        "block": (2, 7, 4, 4),
        "own.norm": (2, 7, 4, 4),
        "own": (2, 7, 4, 4),
    }
    # LayerNorm over the channels: every position's values have mean 0 along the view's dim 1
    for name in ("stage.0", "own.norm", "own"):
        torch.testing.assert_close(seen[name].mean(dim=1), torch.zeros(2, 4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["stage"], seen["back"])  # the stage read as its permute back
    # zeroing a channel of the channels-last Linear zeroes that channel of the block's output
    with torch.no_grad(), hooked(net, ["block.2", "block"], lambda n, t: _zero_channel(n, t, seen)):
        net(_images(2, size=16))
    assert float(seen["after"][:, 4].abs().max()) == 0.0
    assert float(seen["after"][:, 3].abs().max()) > 0.0


def _zero_channel(name: str, t: torch.Tensor, seen: dict) -> torch.Tensor | None:
    if name == "block.2":
        t = t.clone()
        t[:, 4] = 0.0  # GELU(0) = 0: channel 4 stays zero to the block's output
        return t
    seen["after"] = t.clone()
    return None


def test_torchvision_swin_stages_are_read_channels_last():
    swin = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2]
    ).eval()
    seen = {}
    with (
        torch.no_grad(),
        hooked(swin, ["features.1", "features.3"], lambda n, t: seen.update({n: t})),
    ):
        swin(_images(2, size=16))
    # [B, H, W, C] maps of 8 and 16 channels on the 4x4 and 2x2 patch grids, handed over [B, C, H, W]
    assert {n: tuple(t.shape) for n, t in seen.items()} == {
        "features.1": (2, 8, 4, 4),
        "features.3": (2, 16, 2, 2),
    }


def test_two_hook_sets_on_one_function_layer_at_once():
    net = TutorialNet().eval()
    x = _images(2)
    outer, inner = [], []
    with torch.no_grad():
        with hooked(net, ["relu()#1"], lambda n, t: torch.zeros_like(t)):
            expected = net(x)
        with (
            hooked(net, ["relu()"], lambda n, t: outer.append(n)),
            hooked(net, ["relu()#1"], lambda n, t: inner.append(n) or torch.zeros_like(t)),
        ):
            got = net(x)
    torch.testing.assert_close(got, expected)  # the inner set's replacement reached the model
    assert outer == ["relu()", "relu()#1", "relu()#2"] and inner == ["relu()#1"]
    assert count_forward_hooks(net) == 0 and _no_mode_left()


def test_objectives_read_a_neuron_over_the_tokens_or_at_one():
    from lightning_neurons.visualize import Channel, Neuron

    tokens = torch.arange(2 * 4 * 5.0).view(2, 4, 5)  # channels first: 4 neurons, 5 tokens
    torch.testing.assert_close(Channel("l", 1).value(tokens), tokens[:, 1].mean(dim=1))
    torch.testing.assert_close(Neuron("l", 1, x=3).value(tokens), tokens[:, 1, 3])
    torch.testing.assert_close(Neuron("l", 1).value(tokens), tokens[:, 1, 2])  # the middle token
    batched = Neuron.batched([Neuron("l", 1, x=3), Neuron("l", 2, x=0)])(tokens)
    torch.testing.assert_close(batched, torch.stack([tokens[0, 1, 3], tokens[1, 2, 0]]))
    Channel("l", 3).check((4, 5))
    with pytest.raises(NeuronsError, match="`x` is the token"):
        Neuron("l", 1, y=0, x=1).check((4, 5))
    with pytest.raises(NeuronsError, match="channel 4 is out of range"):
        Channel("l", 4).check((4, 5))
