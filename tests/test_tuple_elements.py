"""Naming one element of a layer's tuple output: ``"blocks.0[1]"``. DPN's blocks return
``(residual, dense)`` and CrossViT's both branches' tokens, each with a row per image; without
a name for the element, only the first could be read."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import fast_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    NeuronsError,
)
from lightning_neurons.hooks import count_forward_hooks, get_module, hooked, resolve_layers
from lightning_neurons.models import ImageClassifier
from lightning_neurons.outputs import element, split_element
from lightning_neurons.runs import load_run
from lightning_neurons.visualize import grad_cam


class DualPathBlock(nn.Module):
    """A DPN block, small: takes and returns ``(residual [B, R, H, W], dense [B, D, H, W])``;
    the residual path adds, the dense path grows by ``grow`` channels."""

    def __init__(self, residual: int, dense: int, grow: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(residual + dense, residual + grow, 3, padding=1)

    def forward(self, paths: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        residual, dense = paths
        out = F.relu(self.conv(torch.cat([residual, dense], dim=1)))
        r = residual.shape[1]
        return residual + out[:, :r], torch.cat([dense, out[:, r:]], dim=1)


class DualPathNet(nn.Module):
    """A stem, two dual-path blocks (the dense path 4 -> 6 -> 8 channels), a head on both."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(DualPathBlock(4, 4, 2), DualPathBlock(4, 6, 2))
        self.head = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = F.relu(self.stem(x))
        residual, dense = self.blocks((stem[:, :4], stem[:, 4:]))
        return self.head(torch.cat([residual, dense], dim=1).mean(dim=(2, 3)))


def _second(model: DualPathNet, block: int, images: torch.Tensor) -> torch.Tensor:
    """Block ``block``'s dense path on ``images``, read by a hand-written hook."""
    kept: list[torch.Tensor] = []
    hook = model.blocks[block].register_forward_hook(lambda m, i, o: kept.append(o[1]))
    try:
        model(images)
    finally:
        hook.remove()
    return kept[0]


def test_split_element_and_element():
    assert split_element("blocks.0[1]") == ("blocks.0", (1,))
    assert split_element("stage[0][2]") == ("stage", (0, 2))
    assert split_element("layer[1-2]") == ("layer[1-2]", ())  # a glob's range stays a glob
    a, b = torch.zeros(2, 3), torch.ones(2, 4)
    assert element((a, (b, 5)), (1,))[1] == (1, 0)  # an index holding a tuple: its first
    assert element((a, (b, 5)), (1,))[0] is b
    with pytest.raises(NeuronsError, match=r"no tensor at \[2\].*m\[0\] \[2, 3\], m\[1\]\[0\]"):
        element((a, (b, 5)), (2,), "m[2]")
    with pytest.raises(NeuronsError, match="returned one tensor: name it 'm'"):
        element(a, (0,), "m[0]")


def test_names_with_elements_resolve_and_bad_ones_say_what_is_there():
    model = DualPathNet()
    assert get_module(model, "blocks.1[1]") is model.blocks[1]
    assert resolve_layers(model, ["blocks.?[1]", "stem"]) == ["stem", "blocks.0[1]", "blocks.1[1]"]
    # `*` crosses dots: with an element, the blocks that return the tuple, not their convs
    assert resolve_layers(model, ["blocks.*[1]"]) == ["blocks.0[1]", "blocks.1[1]"]
    assert "blocks.0.conv" in resolve_layers(model, ["blocks.*"])  # without, everything
    assert resolve_layers(model, ["blocks.1[0]#0"]) == ["blocks.1[0]#0"]
    with pytest.raises(NeuronsError, match=r"Did you mean: blocks.1\[1\]"):
        get_module(model, "blockz.1[1]")
    with pytest.raises(NeuronsError, match="a function layer returns one tensor"):
        get_module(model, "relu()[0]")
    no_element = r"'blocks.1' returned tuple with no tensor at \[2\]"
    with pytest.raises(NeuronsError, match=no_element), hooked(model, ["blocks.1[2]"], print):
        model(torch.rand(2, 1, 8, 8))
    assert count_forward_hooks(model) == 0


def test_a_hook_on_an_element_reads_and_replaces_that_element_only():
    torch.manual_seed(0)
    model, images = DualPathNet().eval(), torch.rand(4, 1, 8, 8)
    seen: dict[str, torch.Size] = {}

    def zero(name: str, output: torch.Tensor) -> torch.Tensor:
        seen[name] = output.shape
        return torch.zeros_like(output)

    with torch.no_grad(), hooked(model, ["blocks.1[1]"], zero):
        ours = model(images)

    def by_hand(_m: nn.Module, _i: object, out: tuple) -> tuple:
        return out[0], torch.zeros_like(out[1])

    hook = model.blocks[1].register_forward_hook(by_hand)
    with torch.no_grad():
        expected = model(images)
    hook.remove()
    assert seen == {"blocks.1[1]": torch.Size([4, 8, 8, 8])}
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, model(images))  # the dense path mattered


def _grad_cam_by_hand(model: DualPathNet, images: torch.Tensor, target: torch.Tensor):
    """Grad-CAM on block 1's dense path, written out (8x8 maps of 8x8 images: no upsampling)."""
    kept: list[torch.Tensor] = []
    hook = model.blocks[1].register_forward_hook(lambda m, i, o: kept.append(o[1]))
    try:
        logits = model(images)
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), kept[0])
    return F.relu((grad.mean(dim=(2, 3), keepdim=True) * kept[0]).sum(dim=1)).detach()


def test_grad_cam_at_an_element_is_grad_cam_on_that_tensor():
    torch.manual_seed(0)
    model, images = DualPathNet().eval(), torch.rand(4, 1, 8, 8)
    target = torch.tensor([0, 1, 2, 0])
    ours = grad_cam(model, images, target, layer="blocks.1[1]")
    expected = _grad_cam_by_hand(model, images, target)
    first = grad_cam(model, images, target, layer="blocks.1")
    assert (expected.flatten(1).amax(1) > 0).sum() >= 2  # not all maps flat zero
    # float32 sums over 8 channels of values below 1: the kernels' order differs by ~1e-7
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(first, expected, atol=1e-3)  # the residual path's maps differ


def _scalar_tags(log_dir) -> set[str]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return set(events.Tags()["scalars"]) | set(events.Tags()["images"])


def test_every_callback_on_the_dense_paths(tmp_path):
    """Every callback on ``blocks.?[1]``, logging to TensorBoard: the tracker's class means of
    ``blocks.1[1]`` are those of the dense path read by hand, and the tags name the element."""
    torch.manual_seed(0)
    images, labels = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    module = ImageClassifier(DualPathNet(), 3)
    layers = ["backbone.blocks.?[1]"]
    quiet = dict(on_error="raise")
    callbacks = [
        ActivationTracker(layers, **quiet),
        FeatureVisualizer(
            layers, max_channels=1, smoothgrad_samples=2, gradcam_layer="backbone.blocks.1[1]"
        ),
        CategoryClustering(layers, **quiet),
        NeuronClustering(layers, **quiet),
        NeuronContribution(layers, **quiet),
    ]
    callbacks[1].on_error = "raise"
    pl.seed_everything(0, verbose=False)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1)
    trainer.validate(module, loader)
    tracker, vis, _, _, contribution = callbacks
    names = ["backbone.blocks.0[1]", "backbone.blocks.1[1]"]
    assert list(tracker.results) == names
    with torch.no_grad():
        dense = _second(module.backbone.eval(), 1, images).mean(dim=(2, 3))
    expected = torch.stack([dense[labels == k].mean(dim=0) for k in range(3)])
    # float32 means over 64 positions and 4 images, batched differently: a few ulps of ~1
    stats = tracker.results["backbone.blocks.1[1]"]
    torch.testing.assert_close(stats.class_means.float(), expected, rtol=1e-5, atol=1e-5)
    assert vis.saliency_results.gradcam_layer == "backbone.blocks.1[1]"
    assert set(contribution.results) == set(names)
    tags = _scalar_tags(trainer.logger.log_dir)
    assert "activations/backbone.blocks.1[1]/class_profile" in tags, sorted(tags)[:20]
    assert "neurons/contribution/backbone.blocks.1[1]/mean_domination" in tags
    read = load_run(trainer.logger.log_dir).results("ActivationTracker", epoch=0)
    assert torch.equal(torch.as_tensor(read[names[1]].class_means), stats.class_means)
    assert count_forward_hooks(module) == 0


def test_an_element_of_each_call_of_a_shared_module():
    """A block run twice in one forward pass: ``blk[1]`` selects its dense path at both calls
    (``blk[1]`` and ``blk[1]#1``), ``blk[1]#1`` at the second only."""
    block = DualPathBlock(4, 4, 0)  # grows nothing: its output fits its input
    model = nn.Sequential()
    model.add_module("blk", block)
    x = torch.rand(2, 8, 4, 4)
    with torch.no_grad():
        first = block((x[:, :4], x[:, 4:]))
        second = block(first)
    assert resolve_layers(model, ["blk[1]#1", "blk[0]"]) == ["blk[0]", "blk[1]#1"]
    for layers, expected in (
        (["blk[1]"], {"blk[1]": first[1], "blk[1]#1": second[1]}),
        (["blk[1]#1"], {"blk[1]#1": second[1]}),
    ):
        seen: dict[str, torch.Tensor] = {}
        with (
            torch.no_grad(),
            hooked(model, layers, lambda n, t, seen=seen: seen.update({n: t})) as hooks,
        ):
            hooks.new_pass()  # the calls are the block's own, not the model's: count from here
            block(block((x[:, :4], x[:, 4:])))
        assert list(seen) == list(expected)
        for name, tensor in expected.items():
            assert torch.equal(seen[name], tensor)
    assert count_forward_hooks(model) == 0
