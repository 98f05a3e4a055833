"""Models trained with activation checkpointing (timm's ``set_grad_checkpointing()``, Hugging
Face's ``gradient_checkpointing_enable()``): a checkpointed block runs its forward again in the
backward pass, hooks and all."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from conftest import FAST_VIS, TinyData, fast_trainer
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    NeuronsError,
)
from lightning_neurons.contribution import contribution_batch
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.models import ImageClassifier
from lightning_neurons.visualize import Channel, grad_cam, gradient, render
from lightning_neurons.visualize.cam_layers import cam_layer


class CheckpointedNet(nn.Module):
    """As timm's models are: ``grad_checkpointing`` makes ``forward`` checkpoint its block, in
    training and in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, 3)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing:
            x = checkpoint(self.block, x, use_reentrant=False)
        else:
            x = self.block(x)
        return self.head(x.mean(dim=(2, 3)))


def _net(checkpointing: bool) -> CheckpointedNet:
    torch.manual_seed(0)
    net = CheckpointedNet()
    net.grad_checkpointing = checkpointing
    return net


def test_rendering_a_checkpointed_block_renders_as_without_checkpointing():
    """Rendering takes gradients through the block: its forward, recomputed in the backward
    pass, ran the scoring hook's operations again (a `CheckpointError` before)."""
    objectives = [Channel("block.1", c) for c in range(3)]
    images = {}
    for on in (False, True):
        net = _net(on)
        images[on] = render(net, objectives, image_shape=(1, 8, 8), steps=3).images
        assert net.grad_checkpointing is on  # given back
        assert count_forward_hooks(net) == 0
    torch.testing.assert_close(images[True], images[False], atol=0, rtol=0)  # the same passes


def test_training_batches_are_counted_once_in_a_checkpointed_block(tmp_path):
    """In training the block's forward runs again in the backward pass: not a second call of
    the layer (``block#1``), nor its batches counted twice."""
    # the recomputation runs the block's conv (its output is saved for the ReLU): hooked there
    layers = ["backbone.block", "backbone.block.0", "backbone.block.1"]
    tracker = ActivationTracker(layers=layers, stage="train", enable_logging=False)
    contribution = NeuronContribution(layers=["backbone.block.1"], enable_logging=False)
    visualizer = FeatureVisualizer(["backbone.block.1"], enable_logging=False, **FAST_VIS)
    callbacks = [tracker, contribution, visualizer]
    for callback in callbacks:
        callback.on_error = "raise"
    module = ImageClassifier(_net(True), num_classes=3, lr=1e-2)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1)
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=TinyData())
    said = [str(w.message) for w in record]
    assert not [m for m in said if "times per forward pass" in m]  # not a second call
    assert set(tracker.results) == set(layers)  # no "block.0#1"
    for stats in tracker.results.values():
        assert stats.counts.tolist() == [16, 16, 16]  # 48 training images, once each
    assert set(contribution.results) == {"backbone.block.1"}
    assert "backbone.block.1" in visualizer.results
    assert module.backbone.grad_checkpointing  # given back after every analysis


class AlwaysCheckpointedNet(nn.Module):
    """A model that checkpoints its block in its own ``forward``, behind no flag (``"none"``:
    the same model without checkpointing; ``"no_grad"``: its block frozen under ``no_grad``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.how == "none":
            x = self.block(x)
        elif self.how == "no_grad":
            with torch.no_grad():
                x = self.block(x)
        else:
            x = checkpoint(self.block, x, use_reentrant=self.how == "reentrant")
        return self.head(x.mean(dim=(2, 3)))


def _every_result(how: str, tmp_path) -> dict[str, torch.Tensor]:
    """A fit with every analysis on layers inside the block and before it: their results."""
    layers = ["backbone.stem.1", "backbone.block.1", "backbone.block.3"]
    quiet = dict(on_error="raise", enable_logging=False)
    tracker = ActivationTracker(layers=layers, **quiet)
    visualizer = FeatureVisualizer(layers=layers, **quiet, **FAST_VIS)
    contribution = NeuronContribution(layers=layers, max_batches=1, max_probes=2, **quiet)
    callbacks = [
        tracker,
        visualizer,
        CategoryClustering(n_clusters=2, **quiet),
        NeuronClustering(method="kmeans", n_clusters=2, **quiet),
        contribution,
    ]
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(AlwaysCheckpointedNet(how), num_classes=3, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast_trainer(tmp_path / how, callbacks=callbacks, max_epochs=1).fit(
            module, datamodule=TinyData()
        )
    results = {f"weights.{k}": v for k, v in module.state_dict().items()}
    for name, stats in tracker.results.items():
        results[f"tracker.{name}"] = stats.class_means
    for name, rendered in visualizer.results.items():
        results[f"images.{name}"] = rendered.images
    for method, maps in visualizer.saliency_results.maps.items():
        results[f"saliency.{method}"] = maps
    for name, found in contribution.results.items():
        results[f"contribution.{name}"] = found.class_contribution
    assert count_forward_hooks(module) == 0
    return results


def test_every_analysis_of_a_model_that_checkpoints_in_its_forward_is_as_without(tmp_path):
    """``checkpoint(self.block, x, use_reentrant=False)`` in ``forward``, no flag to turn off:
    the hooks' own operations in the block were dropped and missing from the recomputation
    (``CheckpointError``: "a different number of tensors was saved"); now they are kept, and
    every result is the one of the same model without checkpointing (the same kernels run in
    the same order: the recomputation only refills what the backward pass reads)."""
    plain = _every_result("none", tmp_path)
    checkpointed = _every_result("non_reentrant", tmp_path)
    assert set(checkpointed) == set(plain)
    assert {"images.backbone.block.3", "saliency.gradcam", "contribution.backbone.block.1"} <= set(
        plain
    )
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, msg=key)


@pytest.mark.parametrize("how", ["reentrant", "no_grad"])
def test_a_layer_computed_without_a_graph_gets_a_clear_error(how):
    """A layer inside ``checkpoint(..., use_reentrant=True)`` or under ``torch.no_grad()`` has
    no gradient: rendering it, its Grad-CAM and its contributions say so and what would work
    (torch's "element 0 of tensors does not require grad" before); a layer before the block
    renders, and its contributions are taken through a reentrant block (torch refused
    ``torch.autograd.grad`` there) or, under ``no_grad``, where no gradient reaches it from the
    logits, said to be out of reach."""
    torch.manual_seed(0)
    net = AlwaysCheckpointedNet(how).eval()
    x, targets = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    expected = "'block.1' gave an output without a gradient.*use_reentrant=False.*outside"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own: "none of the inputs have requires_grad"
        with pytest.raises(NeuronsError, match=expected):
            render(net, [Channel("block.1", 0)], image_shape=(1, 8, 8), steps=2)
        with pytest.raises(NeuronsError, match=expected):
            grad_cam(net, x, target=targets, layer="block.1")
        with pytest.raises(NeuronsError, match=expected):
            contribution_batch(net, ["block.1"], x, targets)
        skipped = contribution_batch(net, ["block.1"], x, targets, without_gradient="skip")
        assert skipped.without_gradient == ["block.1"] and not skipped.contributions
        # rendering a layer before the block takes its gradient through the block's backward
        image = render(net, [Channel("stem.1", 0)], image_shape=(1, 8, 8), steps=2).images
        assert image.isfinite().all()
        if how == "reentrant":
            torch.manual_seed(0)
            plain = contribution_batch(AlwaysCheckpointedNet("none").eval(), ["stem.1"], x, targets)
            got = contribution_batch(net, ["stem.1"], x, targets)
            assert plain.contributions["stem.1"].abs().amax() > 0
            torch.testing.assert_close(got.contributions, plain.contributions)
        else:
            with pytest.raises(NeuronsError, match=r"no gradient reaches layers \['stem.1'\]"):
                contribution_batch(net, ["stem.1"], x, targets)
            with pytest.raises(NeuronsError, match="logits carry no gradient.*torch.no_grad()"):
                gradient(net, x, targets)
    assert count_forward_hooks(net) == 0
    # the model's own gradients untouched (its parameters train: `backward` went round them)
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("none", "block"),
        ("non_reentrant", "block"),
        ("reentrant", "block"),
        ("no_grad", "stem"),
    ],
)
def test_grad_cams_default_layer_has_a_graph(how, expected):
    """Grad-CAM's default is the output of the last conv's block whose output has a gradient
    from the image when the forward pass returns: the block's (a reentrant checkpoint gives the
    block's output its graph when it returns it; before, the stem's, read when the block ran,
    and ``grad_cam`` itself read the block) unless the model runs the block under ``no_grad``,
    then the stem's; without an image to read, the last conv. ``grad_cam`` without a layer
    makes the maps of that layer (before: an error for the block's conv); under ``no_grad`` the
    logits have no graph either, which it says."""
    torch.manual_seed(0)
    net, x = AlwaysCheckpointedNet(how), torch.rand(3, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own: "none of the inputs have requires_grad"
        assert cam_layer(net, image=x[:1]) == expected
        if how == "no_grad":
            with pytest.raises(NeuronsError, match="logits carry no gradient.*torch.no_grad()"):
                grad_cam(net, x)
        else:
            torch.testing.assert_close(grad_cam(net, x), grad_cam(net, x, layer=expected))
    assert cam_layer(net) == "block.2"
    assert count_forward_hooks(net) == 0
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


class ResNetWithCheckpointedStage(nn.Module):
    """torchvision's ResNet-18 run by hand, ``layer3`` in ``checkpoint(..., use_reentrant=True)``
    (as training code written before torch 2.4 often did)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))
        x = checkpoint(net.layer3, x, use_reentrant=True)
        return net.fc(torch.flatten(net.avgpool(net.layer4(x)), 1))


def test_grad_cams_default_on_a_resnet_with_a_reentrant_stage_is_the_stage():
    """At 64 px the default's grid is ``layer3``'s (4 x 4): its convs have no graph, the stage's
    output has one when the checkpoint returns it. ``cam_layer`` took ``layer2`` (the last conv
    with a graph) while ``grad_cam`` read ``layer3``; both read ``layer3`` now."""
    torch.manual_seed(0)
    model, x = ResNetWithCheckpointedStage().eval(), torch.rand(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own: "none of the inputs have requires_grad"
        assert cam_layer(model, image=x[:1]) == "net.layer3"
        maps = grad_cam(model, x, target=[0, 1])
        torch.testing.assert_close(maps, grad_cam(model, x, target=[0, 1], layer="net.layer3"))
    assert maps.amax() > 0
    assert count_forward_hooks(model) == 0


def _fit_reentrant(
    tmp_path, layers: list[str], gradcam_layer: str
) -> tuple[FeatureVisualizer, ImageClassifier, list[str]]:
    """A FeatureVisualizer's fit of a model with its block in a reentrant checkpoint: the
    callback, the model and the warnings said."""
    visualizer = FeatureVisualizer(
        layers=layers,
        gradcam_layer=gradcam_layer,
        on_error="raise",
        enable_logging=False,
        **FAST_VIS,
    )
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(AlwaysCheckpointedNet("reentrant"), num_classes=3, lr=1e-2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, callbacks=[visualizer], max_epochs=1).fit(
            module, datamodule=TinyData()
        )
    return visualizer, module, [str(w.message) for w in record]


def test_a_named_grad_cam_layer_that_a_reentrant_checkpoint_returns_is_read(tmp_path):
    """The block that a model runs in a reentrant checkpoint has no graph when it runs and one
    when the checkpoint returns its output: FeatureVisualizer's Grad-CAM reads it when named, as
    ``grad_cam`` does (before: left out with a warning), and the maps are those of the same
    weights without checkpointing, for every class. The block's channels, scored when the block
    runs, are left out with a warning."""
    layers = ["backbone.stem.1", "backbone.block"]
    visualizer, module, said = _fit_reentrant(tmp_path, layers, "backbone.block")
    said = [m for m in said if "'backbone.block'" in m]
    assert len(said) == 1 and "Grad-CAM" not in said[0], said  # the channels' warning only
    assert not visualizer.failures and "backbone.block" not in visualizer.results
    got = visualizer.saliency_results
    assert got.gradcam_layer == "backbone.block" and "backbone.stem.1" in visualizer.results
    plain = AlwaysCheckpointedNet("none")
    plain.load_state_dict(module.backbone.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own: "none of the inputs have requires_grad"
        expected = grad_cam(module, got.images, got.predicted, layer="backbone.block")
        torch.testing.assert_close(got.maps["gradcam"], expected)
        every = torch.stack(
            [grad_cam(module.backbone, got.images, c, layer="block") for c in range(3)]
        )
        torch.testing.assert_close(
            every, torch.stack([grad_cam(plain, got.images, c, layer="block") for c in range(3)])
        )
    assert every.amax() > 0  # (the predicted class's maps are all 0 at this seed; others not)
    assert count_forward_hooks(module) == 0


def test_a_named_grad_cam_layer_without_a_graph_is_left_out_with_a_warning(tmp_path):
    """A `gradcam_layer` the user names is kept as named: inside a reentrant block it has no
    graph, so one warning says so and the other maps are made."""
    visualizer, _, said = _fit_reentrant(tmp_path, ["backbone.stem.1"], "backbone.block.2")
    said = [m for m in said if "Grad-CAM's layer" in m]
    assert len(said) == 1 and "'backbone.block.2'" in said[0]
    assert not visualizer.failures
    assert set(visualizer.saliency_results.maps) == {"gradient", "smoothgrad"}


@pytest.mark.parametrize("how", ["reentrant", "no_grad"])
def test_feature_visualizer_renders_what_carries_a_gradient(how, tmp_path):
    """FeatureVisualizer on a model with a block computed without a graph: one warning at set-up
    names the block's layers, which are left out; the rest renders (before, the first such layer
    failed the whole round: nothing was rendered). Grad-CAM's default is read where the last
    conv with a graph when the forward pass returns is: under ``no_grad`` the stem's output, in a
    reentrant checkpoint the block's, which gets its graph when the checkpoint returns it
    (before: the last conv, inside the block, and no Grad-CAM maps; then the stem's). Under ``no_grad`` the logits have no gradient either: no class images, no
    saliency."""
    layers = ["backbone.stem.1", "backbone.block.1", "backbone.block.3"]
    quiet = dict(layers=layers, on_error="raise", enable_logging=False)
    visualizer = FeatureVisualizer(**quiet, **FAST_VIS)
    contribution = NeuronContribution(**quiet, max_batches=1, max_probes=2)
    tracker = ActivationTracker(layers=layers, enable_logging=False)
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(AlwaysCheckpointedNet(how), num_classes=3, lr=1e-2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, callbacks=[tracker, visualizer, contribution], max_epochs=2).fit(
            module, datamodule=TinyData()
        )
    said = [str(w.message) for w in record]
    lost = "layers ['backbone.block.1', 'backbone.block.3'] without a graph"
    assert len([m for m in said if m.startswith("FeatureVisualizer") and lost in m]) == 1
    # where: the block ran with the grad mode off (not "after a .detach()")
    assert any(f"{lost} from the image (under torch.no_grad() or inside" in m for m in said)
    assert not visualizer.failures and not contribution.failures
    # NeuronContribution: the layers out of the gradient's reach left out, said once (2 epochs)
    unreached = [m for m in said if m.startswith("NeuronContribution")]
    assert len(unreached) == 1
    if how == "reentrant":  # the logits have a gradient: through the block's backward
        assert set(visualizer.results) == {"backbone.stem.1", "classes"}
        assert not any("Grad-CAM's layer" in m for m in said)
        assert visualizer._plan.cam_layer == "backbone.block"
        assert visualizer.saliency_results.gradcam_layer == "backbone.block"
        assert set(visualizer.saliency_results.maps) == {"gradient", "smoothgrad", "gradcam"}
        got = visualizer.saliency_results
        expected = grad_cam(module, got.images, got.predicted)  # the function's default
        torch.testing.assert_close(got.maps["gradcam"], expected)
        assert "['backbone.block.1', 'backbone.block.3']" in unreached[0]
        assert set(contribution.results) == {"backbone.stem.1"}  # through the reentrant block
    else:
        assert any("its logits without a graph" in m for m in said)
        assert set(visualizer.results) == {"backbone.stem.1"}
        assert not visualizer.saliency_results or not visualizer.saliency_results.maps
        assert "['backbone.stem.1', 'backbone.block.1', 'backbone.block.3']" in unreached[0]
        assert not contribution.results
    assert count_forward_hooks(module) == 0


def test_saliency_through_a_reentrant_block_is_as_without_checkpointing():
    """Gradient saliency and Grad-CAM on a layer before a block checkpointed with
    ``use_reentrant=True`` take their gradients through the block's backward (torch refuses
    ``torch.autograd.grad`` there): the maps of the same model without checkpointing (the same
    kernels, recomputed)."""
    x, target = torch.rand(2, 1, 8, 8), torch.tensor([0, 2])
    maps = {}
    for how in ("none", "reentrant"):
        torch.manual_seed(0)
        net = AlwaysCheckpointedNet(how).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own: "none of the inputs have requires_grad"
            maps[how] = (gradient(net, x, target), grad_cam(net, x, target, layer="stem.0"))
        assert count_forward_hooks(net) == 0
        assert all(p.grad is None for p in net.parameters())
    for plain, checkpointed in zip(maps["none"], maps["reentrant"], strict=True):
        assert plain.abs().amax() > 0
        torch.testing.assert_close(checkpointed, plain)


class DetachedBranchNet(nn.Module):
    """A stop-gradient side branch, and ``F.relu`` called three times (one call site each)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu(self.conv1(x))
        x = x + 0.1 * torch.nn.functional.relu(self.branch(x.detach()))
        x = torch.nn.functional.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def test_a_call_site_out_of_the_gradients_reach_is_left_out_alone(tmp_path):
    """The second of three ``F.relu`` calls is on a detached branch: NeuronContribution leaves
    that call site out (one warning) and explains its probe images with the other two; the
    first call's name, ``relu()``, selects every call as a layer list entry (the probes failed on
    the detached one: the analysis was lost every epoch)."""
    tracker = ActivationTracker(enable_logging=False)
    contribution = NeuronContribution(
        on_error="raise", enable_logging=False, max_batches=1, max_probes=2
    )
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(DetachedBranchNet(), num_classes=3, lr=1e-2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, callbacks=[tracker, contribution], max_epochs=2).fit(
            module, datamodule=TinyData()
        )
    sites = ["backbone.relu()", "backbone.relu()#1", "backbone.relu()#2"]
    assert list(tracker.results) == sites
    said = [str(w.message) for w in record if str(w.message).startswith("NeuronContribution")]
    assert len(said) == 1 and "layers ['backbone.relu()#1'] from the logits" in said[0]
    assert list(contribution.results) == [sites[0], sites[2]]
    for result in contribution.results.values():
        assert result.probes is not None and result.class_contribution.abs().amax() > 0
