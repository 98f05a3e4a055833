"""Transformers without a patch-embedding convolution: patches flattened into a ``Linear`` (as
tutorials and vit-pytorch write a ViT), blocks of PyTorch's own ``nn.TransformerEncoder``, and a
hybrid's attention stages after a convolutional stem (as LeViT's). Their tokens are read on the
grid of image patches that holds them."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from conftest import fast_trainer
from timm.models.hiera import Hiera
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import (
    ActivationTracker,
    FeatureVisualizer,
    NeuronContribution,
    NeuronsError,
    RenderOptions,
)
from lightning_neurons.defaults import default_layers
from lightning_neurons.functional import held_ops
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.layouts import image_token_grid, sequence_first_modules, token_order
from lightning_neurons.models import ImageClassifier
from lightning_neurons.visualize import grad_cam
from lightning_neurons.visualize.cam_layers import cam_layer, layer_outputs


def _patches(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H / size) * (W / size), C * size * size]``, raster order."""
    b, c, h, w = x.shape
    x = x.unfold(2, size, size).unfold(3, size, size)  # [B, C, h, w, size, size]
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // size) * (w // size), c * size * size)


class TutorialViT(nn.Module):
    """A ViT as tutorials write it: 4x4 patches by ``unfold`` and a ``Linear``, a class token,
    PyTorch's ``nn.TransformerEncoder`` (its layers call ``F.gelu`` held as an attribute; with
    ``batch_first=False``, torch's default, on ``[N, B, D]`` tokens), and a head on the class
    token (``pool="cls"``) or on the patch tokens' mean (``pool="mean"``)."""

    def __init__(
        self,
        pool: str = "cls",
        size: int = 16,
        dim: int = 16,
        classes: int = 3,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.pool, self.batch_first = pool, batch_first
        self.to_patch = nn.Linear(3 * 4 * 4, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (size // 4) ** 2 + 1, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, 0.0, "gelu", batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.to_patch(_patches(x, 4))
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        if self.batch_first:
            tokens = self.encoder(tokens)
        else:
            tokens = self.encoder(tokens.transpose(0, 1)).transpose(0, 1)
        return self.head(tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1))


def test_the_layers_of_torchs_transformer_encoder_are_default_layers():
    """``nn.TransformerEncoderLayer`` calls its activation through ``self.activation = F.gelu``,
    which no reading of its code finds: it counts as holding one, so each layer of the encoder
    is a block (before: no default layer at all, and every callback failed at set-up)."""
    vit = TutorialViT()
    assert held_ops(vit.encoder.layers[0]) == ["gelu"]
    assert default_layers(vit) == [f"encoder.layers.{i}" for i in range(3)]
    relu = nn.TransformerEncoderLayer(8, 2, activation="relu")
    assert held_ops(relu) == ["relu"] and held_ops(nn.Linear(2, 2)) == []
    # batch_first=False (torch's default): the encoder and every module in it take [N, B, D]
    assert sequence_first_modules(vit) == set()
    inside = sequence_first_modules(TutorialViT(batch_first=False))
    assert {"encoder", "encoder.layers.2", "encoder.layers.0.self_attn"} <= inside
    assert "encoder.layers.0.linear1" in inside and "to_patch" not in inside
    assert sequence_first_modules(relu) == {n for n, _ in relu.named_modules()}


def test_image_token_grid_finds_the_patches_after_the_leading_tokens():
    assert image_token_grid(1 + 64, (32, 32)) == (8, 8)  # a class token, 4 px patches
    assert image_token_grid(1 + 4 + 16, (64, 64)) == (4, 4)  # and 4 register tokens
    assert image_token_grid(6 * 4, (48, 32)) == (6, 4)  # 8 px patches of a 48x32 image
    assert image_token_grid(12, (224, 160)) == (4, 3)  # LeViT's last stage: 14x10 halved twice
    assert image_token_grid(100, (8, 8)) is None  # more tokens than pixels: no patch grid


def test_unfolds_patches_are_channels_first():
    """``nn.Unfold`` gives ``[B, C * 4 * 4, L]``: 48 values over 64 patches of a 32 px image,
    on their 8x8 grid (before: 48 tokens of 64 channels, read as 12 leading tokens and a 6x6
    grid, as TNT's ``pixel_embed.unfold`` was)."""
    model, x = nn.Sequential(nn.Unfold(4, stride=4)), torch.rand(2, 3, 32, 32)
    with layer_outputs(model, 2) as outputs:
        model(x)
    assert outputs.shapes["0"] == (48, 64) and outputs.grid("0", [(32, 32)]) == (8, 8)


def _by_hand(
    model: TutorialViT, images: torch.Tensor, target: torch.Tensor, block: int, size: int = 16
) -> torch.Tensor:
    """Grad-CAM at an encoder layer, written out: its 16 patch tokens (the class token dropped)
    on the 4x4 grid, each channel weighted by its mean gradient, upsampled to ``size``."""
    kept: dict[str, torch.Tensor] = {}
    layer = model.encoder.layers[block]
    handle = layer.register_forward_hook(lambda m, i, o: kept.setdefault("tokens", o))
    try:
        logits = model(images)
    finally:
        handle.remove()
    tokens = kept["tokens"]  # [B, 1 + 16, D]
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), tokens)
    grid = tokens[:, 1:].transpose(1, 2).reshape(len(images), -1, 4, 4)
    weights = grad[:, 1:].mean(dim=1)[:, :, None, None]
    cam = F.relu((weights * grid).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ].detach()


@pytest.mark.parametrize(("pool", "block"), [("cls", 1), ("mean", 2)])
def test_grad_cam_reads_a_tutorial_vits_tokens_on_its_patch_grid(pool, block):
    """No ``Conv2d``: the patch grid is read from the image (16 tokens after the class token on
    a 16x16 image: 4x4). By default the last layer, or the one before it under a class-token
    head (the last layer's patch tokens do not reach that head); the maps are Grad-CAM's written
    out (before: "has no Conv2d layer", and a named layer "needs [N, K, h, w] output")."""
    torch.manual_seed(0)
    vit = TutorialViT(pool).eval()
    images, target = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2])
    assert cam_layer(vit, image=images[:1]) == f"encoder.layers.{block}"
    maps = grad_cam(vit, images, target)
    expected = _by_hand(vit, images, target, block)
    assert expected.amax() > 0
    # float32 sums over 16 channels of values of order 1: the kernels' order differs by ~1e-6
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    named = grad_cam(vit, images, target, layer="encoder.layers.0")
    torch.testing.assert_close(named, _by_hand(vit, images, target, 0), atol=1e-5, rtol=1e-4)
    assert count_forward_hooks(vit) == 0
    assert all(p.requires_grad and p.grad is None for p in vit.parameters())


def test_the_patch_grid_is_read_on_the_model_inputs_when_the_transform_resizes():
    """6x6 display images resized to the model's 16x16 inputs: no patch size cuts a 6x6 image
    into 4x4 cells, the model input's 4 px patches do, after one leading token (fewer than any
    grid of the display images takes); the maps are at the display size."""
    torch.manual_seed(0)
    vit = TutorialViT().eval()
    images, target = torch.rand(2, 3, 6, 6), torch.tensor([0, 2])

    def resize(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)

    maps = grad_cam(vit, images, target, layer="encoder.layers.0", input_transform=resize)
    expected = _by_hand(vit, resize(images), target, 0, size=6)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    # on 6x6 images alone, 17 tokens would be 8 leading ones and a 3x3 grid: the fewest win
    assert image_token_grid(17, (6, 6)) == (3, 3)
    assert image_token_grid(17, (6, 6), (16, 16)) == (4, 4)


class HybridNet(nn.Module):
    """LeViT's shape: a convolutional stem (a 4x4 map of 16x16 images), its map flattened into
    16 tokens, then blocks of tokens with no patch embedding to say where they lie."""

    class Block(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(x)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList([self.Block(8), self.Block(8)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # [B, 16, 8]
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(tokens.mean(dim=1))


def test_a_hybrids_default_grad_cam_layer_is_its_last_token_block_on_the_stems_grid():
    """The last conv's grid (the stem's 4x4) holds the blocks' 16 tokens: the default is the
    last block there (before: the stem, the shallowest layer on that grid), as LeViT's first
    attention stage rather than its stem."""
    torch.manual_seed(0)
    net, images = HybridNet().eval(), torch.rand(2, 3, 16, 16)
    assert cam_layer(net, image=images[:1]) == "blocks.1"
    torch.testing.assert_close(grad_cam(net, images), grad_cam(net, images, layer="blocks.1"))
    with pytest.raises(NeuronsError, match="on a grid of image patches"):
        grad_cam(net, images, layer="head")
    assert count_forward_hooks(net) == 0


def test_every_callback_on_a_tutorial_vit(tmp_path):
    """The tracker, FeatureVisualizer and NeuronContribution at their defaults on the tutorial
    ViT: its encoder layers are the layers, Grad-CAM's maps are made at the layer before the
    last, and nothing fails."""
    torch.manual_seed(0)
    x, y = torch.rand(24, 3, 16, 16), torch.arange(24) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    quiet = dict(on_error="raise", enable_logging=False)
    callbacks = [
        ActivationTracker(**quiet),
        FeatureVisualizer(
            render=RenderOptions(steps=2), max_channels=2, smoothgrad_samples=2, **quiet
        ),
        NeuronContribution(max_batches=1, **quiet),
    ]
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(TutorialViT(), num_classes=3, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1).fit(module, loader, loader)
    tracker, vis, contribution = callbacks
    layers = [f"backbone.encoder.layers.{i}" for i in range(3)]
    assert list(tracker.results) == layers
    assert {s.num_neurons for s in tracker.results.values()} == {16}
    assert vis.saliency_results.gradcam_layer == "backbone.encoder.layers.1"
    assert set(vis.saliency_results.maps) == {"gradient", "smoothgrad", "gradcam"}
    assert set(contribution.results) == set(layers)
    assert not any(cb.failures for cb in callbacks)
    assert count_forward_hooks(module) == 0


def _every_result(tmp_path, batch_first: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.rand(24, 3, 16, 16), torch.arange(24) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    quiet = dict(on_error="raise", enable_logging=False)
    layers = ["backbone.encoder.layers.1", "backbone.encoder.layers.2.linear1"]
    tracker = ActivationTracker(layers=layers, **quiet)
    vis = FeatureVisualizer(layers[:1], render=RenderOptions(steps=2), max_channels=2, **quiet)
    contribution = NeuronContribution(layers=layers, max_batches=1, **quiet)
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(TutorialViT(batch_first=batch_first), num_classes=3, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast_trainer(tmp_path, callbacks=[tracker, vis, contribution], max_epochs=1).fit(
            module, loader, loader
        )
    assert not tracker.failures and not vis.failures and not contribution.failures
    assert count_forward_hooks(module) == 0
    results = {f"tracker.{n}": s.class_means for n, s in tracker.results.items()}
    results |= {f"contribution.{n}": c.class_contribution for n, c in contribution.results.items()}
    results["gradcam"] = vis.saliency_results.maps["gradcam"]
    results["images"] = vis.results["backbone.encoder.layers.1"].images
    return results


def test_torchs_sequence_first_encoder_is_read_as_the_batch_first_one(tmp_path):
    """``nn.TransformerEncoderLayer(batch_first=False)``, torch's default, gives ``[N, B, D]``
    tokens (and so do the layers inside it): they are handed over as ``[B, D, N]``, and every
    result is the batch-first model's (the same weights; before: "produced 17 rows for a batch
    of 8 labels"). The kernels differ (a transposed input's matrix products, in training too),
    so the results agree to float32 rounding, not bit for bit: 2.4e-7 at most on values up to
    1.4 here, a few units in the last place; the tolerance leaves 40 times that."""
    first = _every_result(tmp_path / "batch", True)
    sequence = _every_result(tmp_path / "sequence", False)
    assert set(sequence) == set(first) and len(first) == 6
    for key, value in first.items():
        assert value.abs().amax() > 0, key
        torch.testing.assert_close(sequence[key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize(
    ("name", "options", "size", "expected"),
    [
        # a conv stem, then attention stages with no patch embedding, on grids of 14x14, 7x7 and
        # 4x4 patches: the last stage with 3 x 3 (before: the first, on the stem's grid); at 64
        # px (4x4, 2x2, 1x1) the first
        ("levit_128s", {}, 224, "stages.2"),
        ("levit_128s", {"img_size": 64}, 64, "stages.0"),
        # Hiera's stages of unrolled tokens on 56x56 to 7x7 patches: the last block; MViTv2's
        # stages on 56x56 to 7x7: the last (before: the 14x14 one, on its last conv's grid)
        ("hiera_tiny_224", {}, 224, "blocks.11"),
        ("mvitv2_tiny", {}, 224, "stages.3"),
        # two branches (20x20 and 15x15 patches), class tokens `cls_token_0` / `_1`: the block
        # before the last on the first branch's grid (before: the second's position dropout)
        ("crossvit_tiny_240", {}, 240, "blocks.1"),
        # a ResNet stem, then ViT blocks with a class-token head: the block before the last
        ("vit_small_r26_s32_224", {}, 224, "blocks.10"),
        # conv patches, blocks without a class token, then class attention: not the final norm
        ("xcit_nano_12_p16_224", {"img_size": 32, "patch_size": 8}, 32, "cls_attn_blocks.0"),
        # stages of token blocks with a positional conv in each: the stage's last block
        ("twins_pcpvt_small", {}, 64, "blocks.2.5"),
        # 4-D stages, the last one flattened into tokens: that stage, not its downsampling conv
        ("efficientformer_l1", {}, 224, "stages.3"),
        # blocks of tokens inside a stage whose output is a feature map: the stage, as before
        ("pit_ti_224", {"img_size": 64}, 64, "transformers.1"),
    ],
)
def test_grad_cams_default_on_timms_hybrids_is_a_block_of_tokens(name, options, size, expected):
    """On hybrids, Grad-CAM's default is a block whose tokens lie on the last grid with 3 x 3
    patches of a conv or a block (one forward pass of one image; before: LeViT's stem, the ViT
    hybrid's and XCiT's patch projections, Twins' positional conv, EfficientFormer's
    downsampling conv, Hiera's first block)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **options).eval()
    assert cam_layer(model, image=torch.rand(1, 3, size, size)) == expected
    assert count_forward_hooks(model) == 0


class TwoBranchNet(nn.Module):
    """CrossViT's shape: a patch embedding (4x4 patches of 32x32 images, an 8x8 grid), and a
    second branch on the image halved, in 4x4 patches by a ``Linear`` (a 4x4 grid of 16 tokens
    after a class token) that does not hold the embedding's grid. Every weight positive, so the
    brighter an image region, the more its tokens fire."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        self.small = nn.Linear(48, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.mix = nn.GELU()
        self.head = nn.Linear(4, 2)
        for p in [*self.embed.parameters(), *self.small.parameters(), *self.head.parameters()]:
            nn.init.uniform_(p, 0.1, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        large = self.embed(x).flatten(2).mean(dim=2)  # [B, 4]
        tokens = self.small(_patches(F.avg_pool2d(x, 2), 4))  # [B, 16, 4]: a 4x4 grid
        tokens = self.mix(torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1))
        return self.head(large + tokens[:, 1:].mean(dim=1))


def test_tokens_that_do_not_hold_the_patch_embeddings_grid_are_read_on_the_images():
    """17 tokens cannot hold the 8x8 grid of the patch embedding: they are read on the 4x4 grid
    of image patches that holds them after the class token (before: "cannot hold the 8x8 patch
    grid"), and the map is brightest where the image is."""
    net = TwoBranchNet().eval()
    images = torch.zeros(2, 3, 32, 32)
    images[0, :, :8, :8] = 1.0  # the top-left cell of the 4x4 grid
    images[1, :, 24:, 8:16] = 1.0  # row 3, column 1
    maps = grad_cam(net, images, target=[0, 0], layer="mix")
    cells = maps.view(2, 4, 8, 4, 8).mean(dim=(2, 4)).flatten(1)
    assert cells.argmax(dim=1).tolist() == [0, 3 * 4 + 1]
    assert count_forward_hooks(net) == 0


def _hiera() -> nn.Module:
    """timm's Hiera, small: 64x64 images in 4 px patches, one block per stage on 16x16, 8x8,
    4x4 and 2x2 tokens, unrolled (each pooling window's tokens together) until the last. Its
    head starts at zero (timm's initialisation): drawn here, so that the logits have a
    gradient."""
    model = Hiera(img_size=(64, 64), embed_dim=8, num_heads=1, stages=(1, 1, 1, 1), num_classes=3)
    nn.init.normal_(model.head.fc.weight)
    return model


def _hiera_by_hand(model: nn.Module, images: torch.Tensor, target: torch.Tensor, stage: int):
    """Grad-CAM at a stage's block written out: its tokens and their gradients put back on the
    grid by the model's ``reroll`` (where timm's ``forward_intermediates`` puts them), each
    channel weighted by its mean gradient, upsampled to 64 px."""
    kept: list[torch.Tensor] = []
    hook = model.blocks[stage].register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        logits = model(images)
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), kept[0])
    grid, grad = (model.reroll(t, stage).permute(0, 3, 1, 2) for t in (kept[0], grad))
    (timms,) = model.forward_intermediates(images, indices=[stage], intermediates_only=True)
    torch.testing.assert_close(grid, timms)  # the same values: no arithmetic between them
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * grid).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0].detach()


def test_hieras_unrolled_tokens_are_read_where_timm_puts_them_back():
    """Hiera's blocks return their tokens unrolled; Grad-CAM reads them through the model's own
    ``reroll`` (before: in the order they lie, a scrambled map), as timm's feature maps give
    them, at every stage; the default is its last stage with 3 x 3 patches."""
    torch.manual_seed(0)
    model, images, target = _hiera().eval(), torch.rand(3, 3, 64, 64), torch.tensor([0, 1, 2])
    order = token_order(model, "blocks.0", 256)
    assert order is not None and sorted(order.tolist()) == list(range(256))
    assert order.tolist() != list(range(256))  # unrolled: not raster order
    assert cam_layer(model, image=images[:1]) == "blocks.2"
    for stage in range(4):
        expected = _hiera_by_hand(model, images, target, stage)
        assert expected.amax() > 0
        # float32 sums over at most 64 channels of values of order 1: ~1e-6 apart
        ours = grad_cam(model, images, target, layer=f"blocks.{stage}")
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4, msg=f"stage {stage}")
    assert token_order(model, "blocks.3", 4).tolist() == [0, 1, 2, 3]  # raster by then
    assert token_order(model, "head", 4) is None and token_order(model, "blocks.0", 17) is None
    assert count_forward_hooks(model) == 0
