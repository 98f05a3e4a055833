"""Layers that return tuples: the tensor with a row per image is read. timm's TNT blocks return
``(pixel tokens [B * N, P, C], patch tokens [B, N, D])``; before, the hooks read the first and
the tracker stopped ("produced 512 rows for a batch of 8 labels")."""

from __future__ import annotations

from collections import namedtuple

import lightning.pytorch as pl
import pytest
import torch
from conftest import fast_trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import (
    ActivationTracker,
    FeatureVisualizer,
    NeuronContribution,
    NeuronsError,
)
from lightning_neurons.defaults import default_layers
from lightning_neurons.hooks import count_forward_hooks, hooked
from lightning_neurons.models import ImageClassifier
from lightning_neurons.outputs import image_tensor, leading_size, with_tensor
from lightning_neurons.visualize import grad_cam
from lightning_neurons.visualize.cam_layers import cam_layer

PATCH, GRID = 4, 4  # 4x4 px patches of 16x16 px images: 16 patches


class PixelPatchBlock(nn.Module):
    """A TNT block: inner attention on each patch's pixel tokens (here an MLP), their sum into
    the patch tokens, attention and an MLP on the patch tokens; returns ``(pixels, patches)``."""

    def __init__(self, inner: int, dim: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(inner, inner), nn.GELU())
        self.proj = nn.Linear(4 * inner, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def forward(
        self, pixels: torch.Tensor, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixels + self.inner(pixels)  # [B * N, 4, inner]
        b, n = patches.shape[0], patches.shape[1] - 1
        summed = patches[:, 1:] + self.proj(pixels.reshape(b, n, -1))
        patches = torch.cat([patches[:, :1], summed], dim=1)
        patches = patches + self.attn(patches, patches, patches, need_weights=False)[0]
        return pixels, patches + self.mlp(patches)


class ToyTNT(nn.Module):
    """Transformer in transformer, small: each 4x4 patch's pixels embedded by a ``Conv2d`` run
    on the patches one by one (``[B * N, C, 2, 2]``: no map of the images), a class token, two
    blocks taking and returning ``(pixels, patches)``, a head on the class token."""

    def __init__(self, inner: int = 4, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.pixel_embed = nn.Conv2d(3, inner, 2, stride=2)
        self.patch_embed = nn.Linear(4 * inner, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList([PixelPatchBlock(inner, dim) for _ in range(2)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        patches = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [B, C, 4, 4, 4, 4]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * GRID * GRID, c, PATCH, PATCH)
        pixels = self.pixel_embed(patches).flatten(2).transpose(1, 2)  # [B * 16, 4, inner]
        tokens = self.patch_embed(pixels.reshape(b, GRID * GRID, -1))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        for block in self.blocks:
            pixels, tokens = block(pixels, tokens)
        return self.head(tokens[:, 0])


def test_image_tensor_picks_the_element_with_a_row_per_image():
    pixels, patches = torch.zeros(3 * 16, 4, 5), torch.zeros(3, 17, 8)
    assert image_tensor((pixels, patches), 3)[1] == (1,)
    assert image_tensor([patches, pixels], 3)[1] == (0,)  # the first, when it is per image
    assert image_tensor((pixels, patches), None)[1] == (0,)  # unknown batch: the first
    assert image_tensor((pixels, pixels), 3)[1] == (0,)  # none per image: the first (fails later)
    x = torch.zeros(3, 5)
    assert image_tensor(x, 3) == (x, ())
    # nested, as Hugging Face's PVT-v2 stages return ((hidden_states,), height, width)
    assert image_tensor(((patches,), 4, 4), 3) == (patches, (0, 0))
    assert image_tensor((None, x), None) == (x, (1,))
    with pytest.raises(NeuronsError, match="returned dict, not a tensor"):
        image_tensor({"x": x}, 3)
    # sequence-first tokens [N, B, D]: the batch is dim 1 (torch's attention, batch_first=False)
    attn, weights = torch.zeros(17, 3, 8), torch.zeros(3, 17, 17)
    assert image_tensor((attn, weights), 3, sequence_first=True)[1] == (0,)
    assert image_tensor((weights, attn), 3, sequence_first=True)[1] == (1,)


def test_with_tensor_replaces_one_element_and_keeps_the_tuples_type():
    Pair = namedtuple("Pair", "pixels patches")
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    replaced = with_tensor(Pair(a, b), (1,), c)
    assert isinstance(replaced, Pair) and replaced.pixels is a and replaced.patches is c
    assert with_tensor([a, b], (0,), c) == [c, b] and with_tensor(a, (), c) is c
    nested = with_tensor(((a,), 4, 4), (0, 0), c)
    assert nested[0][0] is c and nested[1:] == (4, 4)


def test_leading_size_reads_the_first_tensor_of_a_call():
    x = torch.zeros(5, 3, 8, 8)
    assert leading_size(((x,), {})) == 5
    assert leading_size(((), {"pixel_values": x})) == 5
    assert leading_size(((3, None), {})) is None


def test_a_hook_reads_and_replaces_the_patch_tokens():
    torch.manual_seed(0)
    model, x = ToyTNT().eval(), torch.rand(2, 3, 16, 16)
    seen: dict[str, torch.Size] = {}

    def zero(name: str, output: torch.Tensor) -> torch.Tensor:
        seen[name] = output.shape  # channels first: [B, D, 1 + N]
        return torch.zeros_like(output)

    with torch.no_grad(), hooked(model, ["blocks.0"], zero):
        ours = model(x)
    assert seen == {"blocks.0": torch.Size([2, 8, 17])}

    def by_hand(_m: nn.Module, _i: object, out: tuple) -> tuple:
        return out[0], torch.zeros_like(out[1])

    handle = model.blocks[0].register_forward_hook(by_hand)
    with torch.no_grad():
        expected = model(x)
    handle.remove()
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)  # the same operations
    assert count_forward_hooks(model) == 0


class SubmoduleStep(ImageClassifier):
    """Its steps call ``self.backbone(x)``: no pre-hook of the LightningModule sees the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the steps call the backbone")

    def _step(self, batch, stage: str, acc) -> torch.Tensor:
        return F.cross_entropy(self.backbone(batch[0]), batch[1])


def test_the_tracker_reads_each_images_patch_tokens(tmp_path):
    """10 images in batches of 4, 4 and 2, the steps calling a submodule: each block's class
    means are the means over the patch tokens (class token included) of its images."""
    torch.manual_seed(0)
    images, labels = torch.rand(10, 3, 16, 16), torch.arange(10) % 3
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    module = SubmoduleStep(ToyTNT(), 3)
    assert default_layers(module) == ["backbone.blocks.0", "backbone.blocks.1"]
    tracker = ActivationTracker(on_error="raise", enable_logging=False)
    pl.seed_everything(0, verbose=False)
    fast_trainer(tmp_path, callbacks=[tracker], logger=False).validate(module, loader)
    kept: list[torch.Tensor] = []
    hook = module.backbone.blocks[1].register_forward_hook(lambda m, i, o: kept.append(o[1]))
    with torch.no_grad():
        module.backbone.eval()(images)
    hook.remove()
    means = kept[0].mean(dim=1)  # [10, D]
    expected = torch.stack([means[labels == k].mean(dim=0) for k in range(3)])
    stats = tracker.results["backbone.blocks.1"]
    assert stats.counts.tolist() == [4, 3, 3]
    # float32 sums of 17 tokens and at most 4 images, batched differently: a few ulps of ~1
    torch.testing.assert_close(stats.class_means.float(), expected, rtol=1e-5, atol=1e-5)
    assert count_forward_hooks(module) == 0


def _grad_cam_by_hand(model: ToyTNT, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at ``blocks.0`` written out: its patch tokens (the class token dropped) on the
    4x4 grid, each channel weighted by its mean gradient, upsampled to the 16 px image."""
    kept: list[torch.Tensor] = []
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: kept.append(o[1]))
    try:
        logits = model(images)
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), kept[0])
    grid = kept[0][:, 1:].transpose(1, 2).reshape(len(images), -1, GRID, GRID)
    cam = F.relu((grad[:, 1:].mean(dim=1)[:, :, None, None] * grid).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[:, 0].detach()


def test_grad_cam_reads_the_patch_tokens_when_the_convs_embed_each_patch():
    """The only ``Conv2d`` runs on each patch: no map of the images. Grad-CAM's default is the
    block before the class-token head's last (as a ViT's), on the 4x4 patch grid, not on the
    2x2 grid that conv gives each patch (before: its ``Conv2d``, then 13 leading tokens and a
    2x2 grid)."""
    torch.manual_seed(0)
    model, images = ToyTNT().eval(), torch.rand(4, 3, 16, 16)
    assert cam_layer(model, image=images[:1]) == "blocks.0"
    target = torch.tensor([0, 1, 2, 0])
    ours, expected = grad_cam(model, images, target), _grad_cam_by_hand(model, images, target)
    assert (expected.flatten(1).amax(1) > 0).sum() >= 2  # not all maps flat zero
    # float32 sums over 8 channels of values below 0.1: the kernels' order differs by ~1e-9
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layers", [None, ["backbone.blocks.1"]])
def test_every_callback_on_a_pixel_and_patch_model(tmp_path, layers):
    torch.manual_seed(0)
    images, labels = torch.rand(12, 3, 16, 16), torch.arange(12) % 3
    loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    module = ImageClassifier(ToyTNT(), 3)
    quiet = dict(on_error="raise", enable_logging=False)
    callbacks = [
        ActivationTracker(layers, **quiet),
        FeatureVisualizer(layers, max_channels=1, smoothgrad_samples=2, **quiet),
        NeuronContribution(layers, **quiet),
    ]
    fast_trainer(tmp_path, callbacks=callbacks, logger=False).validate(module, loader)
    tracker, vis, contribution = callbacks
    assert set(tracker.results) == set(layers or ["backbone.blocks.0", "backbone.blocks.1"])
    assert all(s.counts.sum() == 12 for s in tracker.results.values())
    assert vis.saliency_results.gradcam_layer == "backbone.blocks.0"
    assert set(contribution.results) == set(tracker.results)
    assert count_forward_hooks(module) == 0


class NestedStage(nn.Module):
    """Hugging Face's PVT-v2 stage: a patch embedding to tokens, an MLP block, and the return
    ``((hidden_states,), height, width)``."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor], int, int]:
        maps = self.embed(x)
        height, width = maps.shape[-2:]
        tokens = maps.flatten(2).transpose(1, 2)
        return (tokens + self.mlp(tokens),), height, width


class NestedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([NestedStage()])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (tokens,), _, _ = self.stages[0](x)
        return self.head(tokens.mean(dim=1))


def test_a_tensor_in_nested_tuples_is_read_and_replaced(tmp_path):
    """The stage's tokens inside ``((tokens,), h, w)`` are its output (before: "returned
    tuple, not a tensor"): the tracker's means are theirs, and an ablation that zeroes every
    neuron there zeroes the tokens the head reads."""
    torch.manual_seed(0)
    model, images = NestedNet().eval(), torch.rand(6, 3, 16, 16)
    with torch.no_grad(), hooked(model, ["stages.0"], lambda n, t: torch.zeros_like(t)):
        ablated = model(images)
    torch.testing.assert_close(ablated, model.head(torch.zeros(6, 8)).detach())
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    module = ImageClassifier(model, 3)
    tracker = ActivationTracker(["backbone.stages.0"], on_error="raise", enable_logging=False)
    fast_trainer(tmp_path, callbacks=[tracker], logger=False).validate(module, loader)
    with torch.no_grad():
        (tokens,), _, _ = model.stages[0](images)
    means = tokens.mean(dim=1)
    expected = torch.stack([means[labels == k].mean(dim=0) for k in range(3)])
    # float32 means over 16 tokens and 2 images, batched differently: a few ulps of ~1
    stats = tracker.results["backbone.stages.0"]
    torch.testing.assert_close(stats.class_means.float(), expected, rtol=1e-5, atol=1e-5)
    assert count_forward_hooks(module) == 0


def test_an_element_without_a_row_per_image_says_which_to_name(tmp_path):
    """``blocks.0[0]`` names TNT's pixel tokens, ``[B * 16, 4, inner]``: the tracker stops and
    says to name the element with a row per image."""
    loader = DataLoader(TensorDataset(torch.rand(4, 3, 16, 16), torch.arange(4) % 3), batch_size=4)
    tracker = ActivationTracker(["backbone.blocks.0[0]"], on_error="raise", enable_logging=False)
    module = ImageClassifier(ToyTNT(), 3)
    with pytest.raises(NeuronsError, match=r"64 rows for a batch of 4 labels.*'name\[1\]'"):
        fast_trainer(tmp_path, callbacks=[tracker], logger=False).validate(module, loader)
    assert count_forward_hooks(module) == 0
