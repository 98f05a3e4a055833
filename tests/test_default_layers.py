"""Default layers are the responses (activation and block outputs) on the models people train."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import fast_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import ActivationTracker
from lightning_neurons.activations import ActivationRule
from lightning_neurons.defaults import auxiliary_classifiers
from lightning_neurons.functional import is_function_layer
from lightning_neurons.hooks import (
    SIGNED,
    count_forward_hooks,
    default_layers,
    get_module,
    run_layers,
)
from lightning_neurons.models import ImageClassifier, SmallCNN
from lightning_neurons.visualize.cam_layers import cam_layer

RESNET_BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def _tv(name: str) -> nn.Module:
    return getattr(torchvision.models, name)(weights=None, num_classes=4).eval()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", ["relu", *RESNET_BLOCKS]),
        (
            "vgg11_bn",
            [f"features.{i}" for i in (2, 6, 10, 13, 17, 20, 24, 27)]
            + ["classifier.1", "classifier.4"],
        ),
        (
            "mobilenet_v3_small",
            [
                "features.0.2",
                *[f"features.{i}" for i in range(1, 12)],
                "features.12.2",
                "classifier.1",
            ],
        ),
        (
            "efficientnet_b0",
            [
                "features.0.2",
                "features.1.0",
                "features.2.0",
                "features.2.1",
                "features.3.0",
                "features.3.1",
                "features.4.0",
                "features.4.1",
                "features.4.2",
                "features.5.0",
                "features.5.1",
                "features.5.2",
                "features.6.0",
                "features.6.1",
                "features.6.2",
                "features.6.3",
                "features.7.0",
                "features.8.2",
            ],
        ),
        (
            "densenet121",
            [
                "features.relu0",
                "features.denseblock1",
                "features.transition1.relu",
                "features.denseblock2",
                "features.transition2.relu",
                "features.denseblock3",
                "features.transition3.relu",
                "features.denseblock4",
                "relu()",  # DenseNet's forward: F.relu(features) after norm5
            ],
        ),
        (
            "convnext_tiny",
            [f"features.{s}.{b}" for s, n in ((1, 3), (3, 3), (5, 9), (7, 3)) for b in range(n)],
        ),
    ],
)
def test_default_layers_of_torchvision_models(name, expected):
    model = _tv(name)
    layers = default_layers(model)
    assert layers == expected
    rule = ActivationRule()
    for layer in layers:  # responses: activations or blocks holding one, never a signed layer
        module = get_module(model, layer)
        if is_function_layer(layer):  # F.relu in the model's own forward
            assert module is model
            continue
        assert not isinstance(module, SIGNED)
        assert any(rule(m) for m in module.modules())
    # each runs exactly once per forward pass, and the deepest one is near the output
    with torch.no_grad():
        sites = run_layers(model, layers, lambda: model(torch.rand(1, 3, 32, 32)))
    assert sites == layers
    assert count_forward_hooks(model) == 0


def test_auxiliary_classifiers_are_not_default_layers_and_the_main_logits_are_trained(tmp_path):
    """GoogLeNet's ``aux1``/``aux2`` (and Inception v3's ``AuxLogits``) run in training mode
    only: as default layers, every analysis (eval mode) found them not run, and the
    FeatureVisualizer's set-up stopped the fit. ImageClassifier trains the main logits of the
    namedtuple such models return in training mode."""
    with_aux = torchvision.models.googlenet(weights=None, num_classes=4, init_weights=False)
    without = torchvision.models.googlenet(
        weights=None, num_classes=4, aux_logits=False, init_weights=False
    )
    layers = default_layers(with_aux)
    assert layers == default_layers(without) and len(layers) == 12
    assert auxiliary_classifiers(with_aux) == ["aux1", "aux2"]
    assert cam_layer(with_aux) == "inception5b.branch4.1.conv"  # Grad-CAM's default layer
    inception = torchvision.models.inception_v3(weights=None, num_classes=4, init_weights=False)
    assert auxiliary_classifiers(inception) == ["AuxLogits"]
    assert not any("AuxLogits" in layer for layer in default_layers(inception))
    # a module named aux that is not a classifier head stays a default layer's source
    net = nn.ModuleDict({"aux": nn.Sequential(nn.Linear(2, 8), nn.ReLU()), "fc": nn.Linear(8, 2)})
    assert auxiliary_classifiers(net) == [] and default_layers(net) == ["aux.1"]

    class TwoHeads(nn.Module):  # as GoogLeNet: (logits, aux logits) in training mode only
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU())
            self.aux, self.fc = nn.Linear(16, 4), nn.Linear(16, 4)

        def forward(self, x):
            h = self.body(x)
            return (self.fc(h), self.aux(h)) if self.training else self.fc(h)

    model = ImageClassifier(TwoHeads(), num_classes=4)
    head = model.backbone.fc.weight.detach().clone()
    data = DataLoader(TensorDataset(torch.rand(8, 3, 8, 8), torch.arange(8) % 4), batch_size=4)
    fast_trainer(tmp_path, max_epochs=1).fit(model, data, data)
    assert not torch.equal(model.backbone.fc.weight, head)  # trained on the main logits
    assert model.backbone.aux.weight.grad is None  # the auxiliary head is not


INCEPTIONS = {
    # the stem's activations, then the Inception modules (Lucid's mixed3a ... mixed5b)
    "googlenet": (
        [f"conv{i}.relu()" for i in (1, 2, 3)]
        + [f"inception{b}" for b in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")],
        64,
    ),
    "inception_v3": (
        [f"{c}.relu()" for c in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3")]
        + [f"{c}.relu()" for c in ("Conv2d_3b_1x1", "Conv2d_4a_3x3")]
        + [
            f"Mixed_{b}" for b in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")
        ],
        80,
    ),
}


@pytest.mark.parametrize("name", sorted(INCEPTIONS))
def test_an_inception_module_is_one_layer(name):
    """A module that concatenates shallow branches is a block, wherever it lies: GoogLeNet gave
    57 default layers before (each branch's convolutions), Inception v3 94."""
    expected, size = INCEPTIONS[name]
    model = getattr(torchvision.models, name)(weights=None, num_classes=4, init_weights=False)
    model.eval()
    layers = default_layers(model)
    assert layers == expected
    with torch.no_grad():
        sites = run_layers(model, layers, lambda: model(torch.rand(1, 3, size, size)))
    assert sites == layers


class _Branches(nn.Module):
    """Two branches concatenated, each ``depth`` conv + ReLU layers."""

    def __init__(self, depth: int) -> None:
        super().__init__()

        def branch() -> nn.Sequential:
            layers = [m for _ in range(depth) for m in (nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())]
            return nn.Sequential(*layers)

        self.left, self.right = branch(), branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=1)


class _TwoPaths(nn.Module):
    """``_Branches`` then a classifier, in a ``forward`` of its own (no container around them)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.body, self.fc = _Branches(depth), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


def test_shallow_branches_are_one_block_and_deep_streams_are_walked_into():
    for depth, expected in (
        (3, ["body"]),  # an Inception-like module: its joined output
        (4, [f"body.{side}.{i}" for side in ("left", "right") for i in (1, 3, 5, 7)]),  # streams
    ):
        model = _TwoPaths(depth).eval()
        layers = default_layers(model)
        assert layers == expected, depth
        with torch.no_grad():
            assert run_layers(model, layers, lambda m=model: m(torch.rand(1, 3, 8, 8))) == layers


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 3, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x)) + x


class _Stage(nn.Module):
    """Runs its blocks from its own ``forward``, as timm's RegNet stages do."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = _Block(), _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


class _StagedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage, self.fc = _Stage(), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage(x).mean(dim=(2, 3)))


def test_a_module_running_its_children_in_turn_is_a_container():
    """Its children are blocks, as a Sequential's are (their inner ReLUs were the layers)."""
    model = _StagedNet().eval()
    layers = default_layers(model)
    assert layers == ["stage.b1", "stage.b2"]
    with torch.no_grad():
        assert run_layers(model, layers, lambda: model(torch.rand(1, 3, 4, 4))) == layers


def test_an_activation_module_with_a_child_is_a_layer_when_named():
    timm = pytest.importorskip("timm")
    model = timm.create_model("caformer_s18", pretrained=False, num_classes=4)
    assert default_layers(model)[-1] == "head.fc.act.relu"  # the nn.ReLU in SquaredReLU
    assert default_layers(model, ["SquaredReLU"])[-1] == "head.fc.act"  # relu(x) ** 2


def test_default_layers_of_the_demo_model():
    model = ImageClassifier(SmallCNN(num_classes=4), num_classes=4)
    assert default_layers(model) == [f"backbone.features.relu{i}" for i in (1, 2, 3)]


def test_a_sequential_head_on_a_backbone_is_walked_into():
    # the backbone holds the final classifier: it is not a block whose output would be the logits
    model = nn.Sequential(_tv("resnet18"), nn.Softmax(dim=1))
    assert default_layers(model) == ["0.relu", *(f"0.{b}" for b in RESNET_BLOCKS)]


def test_tracker_defaults_on_resnet18_count_every_image_once(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(12, 3, 32, 32), torch.arange(12) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    model = ImageClassifier(_tv("resnet18"), num_classes=4)
    tracker = ActivationTracker(enable_logging=False, on_error="raise")
    fast_trainer(tmp_path, callbacks=[tracker]).validate(model, loader, verbose=False)
    assert list(tracker.results) == [f"backbone.{n}" for n in ["relu", *RESNET_BLOCKS]]
    for res in tracker.results.values():
        assert res.counts.tolist() == [3.0] * 4  # 12 images, 3 per class, each once
        assert bool((res.class_means >= 0).all())  # post-ReLU block outputs
    assert count_forward_hooks(model) == 0
