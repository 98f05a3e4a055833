"""Saliency (focus): exact values on a linear model, shapes, batching, the model-randomisation
sanity check, errors, and no side effects."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision
from _vis_helpers import (
    assert_same_rng,
    assert_unchanged,
    bn_net,
    rng_states,
    snapshot,
    trained_digits_cnn,
)
from conftest import TinyNet
from torch import nn
from torch.nn import functional as F

from lightning_neurons import NeuronsError
from lightning_neurons.data import Normalize
from lightning_neurons.visualize import (
    grad_cam,
    gradient,
    integrated_gradients,
    normalize_maps,
    saliency,
    smoothgrad,
)
from lightning_neurons.visualize.cam_layers import cam_layer
from lightning_neurons.visualize.saliency import blurred


def _images(n: int = 4, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


class Linear(nn.Module):
    """logits = W x: the gradient of logit c is exactly W[c]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_integrated_gradients_of_a_linear_model_are_the_image_times_the_weights():
    # a constant gradient: every path point's is W[c], so the attributions are (x - x0) W[c]
    model = Linear()
    images = _images(3, channels=2, size=4)
    target = torch.tensor([2, 0, 1])
    weights = model.fc.weight.detach()[target].view(3, 2, 4, 4)
    for steps in (1, 7):
        got = integrated_gradients(model, images, target, steps=steps, signed=True)
        torch.testing.assert_close(got, images * weights, rtol=1e-5, atol=1e-7)
    got = integrated_gradients(model, images, target, baseline=0.5, signed=True)
    torch.testing.assert_close(got, (images - 0.5) * weights, rtol=1e-5, atol=1e-7)
    # with respect to the display image: d logit / d display = W / std, from a black image
    norm = Normalize((0.5, 0.5), (0.5, 0.25))
    got = integrated_gradients(model, images, target, input_transform=norm, signed=True)
    scale = torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    torch.testing.assert_close(got, images * weights / scale, rtol=1e-5, atol=1e-6)
    maps = integrated_gradients(model, images, target)  # the channels summed, then |.|
    torch.testing.assert_close(maps, (images * weights).sum(dim=1).abs(), rtol=1e-5, atol=1e-7)
    # from each image blurred: (x - blur(x)) W[c]; a flat image is its own blur (no attribution)
    got = integrated_gradients(model, images, target, baseline="blur", signed=True)
    torch.testing.assert_close(got, (images - blurred(images)) * weights, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(blurred(images), images, atol=0.05)
    flat = torch.full((2, 2, 4, 4), 0.3)
    torch.testing.assert_close(blurred(flat), flat, rtol=0, atol=1e-6)
    with pytest.raises(NeuronsError, match="a number, a tensor or 'blur'"):
        integrated_gradients(model, images, target, baseline="mean")
    # another blur is a tensor baseline: a heavier one (the default at 4 px: 0.5) lies further
    heavy = blurred(images, sigma=2.0)
    got = integrated_gradients(model, images, target, baseline=heavy, signed=True)
    torch.testing.assert_close(got, (images - heavy) * weights, rtol=1e-5, atol=1e-6)
    assert (images - heavy).abs().sum() > (images - blurred(images)).abs().sum()
    with pytest.raises(NeuronsError, match="`sigma` must be a positive number"):
        blurred(images, sigma=0)


def test_integrated_gradients_add_up_to_the_logits_change_from_the_baseline():
    """Completeness: the attributions sum to logit(x) - logit(baseline) up to the midpoint
    rule's error: O(1 / steps^2) on a smooth model, and shrinking on a ReLU one too (whose
    kinks along the path the rule crosses)."""
    torch.manual_seed(0)
    smooth = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 3),
    )
    images, target = _images(4), torch.tensor([0, 1, 2, 0])
    for name, model in (("smooth", smooth), ("relu", TinyNet())):
        with torch.no_grad():
            logits = model(images).gather(1, target.view(-1, 1)).flatten()
            black = model(torch.zeros_like(images)).gather(1, target.view(-1, 1)).flatten()
        change = logits - black
        errors = {}
        for steps in (2, 256):
            got = integrated_gradients(model, images, target, steps=steps, signed=True)
            errors[steps] = (got.sum(dim=(1, 2, 3)) - change).abs()
        assert errors[256].sum() < errors[2].sum() / 4, (name, errors)
        if name == "smooth":  # 1 / 256^2 of the path's curvature, and float32 sums (1e-6)
            assert (errors[256] <= 1e-3 * change.abs() + 1e-6).all(), (errors, change)
    # in chunks (of 5 path points), through `saliency`: the same maps
    maps = integrated_gradients(model, images, target, steps=16)
    chunked = saliency(model, images, "integrated", target, steps=16, batch_size=5)
    torch.testing.assert_close(chunked, maps, rtol=1e-5, atol=1e-7)
    with pytest.raises(NeuronsError, match="steps"):
        integrated_gradients(model, images, steps=0)


def test_gradient_is_exact_on_a_linear_model():
    model = Linear()
    images = _images(3, channels=2, size=4)
    target = torch.tensor([2, 0, 1])
    maps = gradient(model, images, target)
    expected = model.fc.weight.detach()[target].view(3, 2, 4, 4).abs().amax(dim=1)
    assert torch.allclose(maps, expected)
    # the default target is the predicted class
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    expected = model.fc.weight.detach()[predicted].view(3, 2, 4, 4).abs().amax(dim=1)
    assert torch.allclose(gradient(model, images), expected)
    # the gradient is taken with respect to the display image, through input_transform
    norm = Normalize((0.5, 0.5), (0.5, 0.25))
    scaled = gradient(model, images, target, input_transform=norm)
    per_channel = model.fc.weight.detach()[target].view(3, 2, 4, 4) / torch.tensor(
        [0.5, 0.25]
    ).view(1, 2, 1, 1)
    assert torch.allclose(scaled, per_channel.abs().amax(dim=1))


def test_smoothgrad_without_noise_is_the_gradient_and_is_seeded():
    model = bn_net()
    images = _images()
    assert torch.allclose(
        smoothgrad(model, images, samples=3, noise=0.0), gradient(model, images), atol=1e-6
    )
    a = smoothgrad(model, images, samples=6, seed=1)
    assert torch.equal(a, smoothgrad(model, images, samples=6, seed=1))
    assert not torch.allclose(a, smoothgrad(model, images, samples=6, seed=2))
    chunked = smoothgrad(model, images, samples=6, seed=1, batch_size=5)  # chunks split copies
    assert torch.allclose(a, chunked, atol=1e-6)


def test_smoothgrad_map_of_an_image_depends_only_on_its_index_not_on_the_other_images():
    model = bn_net()
    images, others = _images(4), _images(4, seed=7)
    whole = smoothgrad(model, images, samples=5, seed=3)
    # in parts, each part told where it starts (as the ranks of a DDP run are): the same maps
    parts = [
        smoothgrad(model, images[:1], samples=5, seed=3),
        smoothgrad(model, images[1:3], samples=5, seed=3, first_index=1),
        saliency(model, images[3:], "smoothgrad", samples=5, seed=3, first_index=3),
    ]
    # Each image's gradients are its own in eval mode (BatchNorm uses running statistics) and
    # its noise comes from (seed, index); only the batch the float32 kernels see differs, which
    # may change the last bits of each gradient (~1e-7 relative), averaged over 5 samples.
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-7)
    # image 2 between other images (other predicted classes, other value ranges)
    mixed = torch.cat([others[:2], images[2:3], others[2:]])
    torch.testing.assert_close(
        smoothgrad(model, mixed, samples=5, seed=3)[2], whole[2], rtol=1e-5, atol=1e-7
    )
    # ... while another index draws other noise
    assert not torch.allclose(smoothgrad(model, images[2:3], samples=5, seed=3)[0], whole[2])
    with pytest.raises(NeuronsError, match="`first_index` must be an integer >= 0"):
        smoothgrad(model, images, first_index=-1)


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_batching_and_no_side_effects(channels):
    model = bn_net(in_channels=channels)
    model.train()
    before, rng = snapshot(model), rng_states()
    images = _images(5, channels=channels, size=12)
    for method in ["gradient", "smoothgrad", "gradcam"]:
        maps = saliency(model, images, method, samples=4)
        assert maps.shape == (5, 12, 12) and maps.dtype == torch.float32
        assert (maps >= 0).all() and maps.sum() > 0
        again = saliency(model, images, method, samples=4, batch_size=2)
        assert torch.allclose(maps, again, atol=1e-5)
    assert_unchanged(model, before)
    assert_same_rng(rng)


class ConvPoolLinear(nn.Module):
    """conv -> global average pool -> linear: logit_c = sum_k W[c, k] mean_ij A_k(i, j) + b_c."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_grad_cam_equals_its_closed_form_on_conv_pool_linear():
    # d logit_c / d A_k(i, j) = W[c, k] / (h w) everywhere, so Grad-CAM's channel weights are
    # W[c, k] / (h w) and its map ReLU(sum_k W[c, k] A_k / (h w)); the conv keeps the 6 x 6 size,
    # so the bilinear upsampling to the image size is the identity.
    torch.manual_seed(0)
    model = ConvPoolLinear()
    images = _images(5, channels=2, size=6)
    with torch.no_grad():  # computed here with torch.nn.functional, not through the model's hooks
        a = F.conv2d(images, model.conv.weight, model.conv.bias, padding=1)
        predicted = (a.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias).argmax(dim=1)
    target = torch.tensor([0, 1, 2, 1, 0])
    for chosen, maps in [
        (target, grad_cam(model, images, target)),
        (predicted, grad_cam(model, images)),  # defaults: the predicted class, the last Conv2d
        (target, grad_cam(model, images, target, layer="conv", batch_size=2)),
    ]:
        weights = model.fc.weight.detach()[chosen] / 36.0  # [N, K]
        expected = torch.relu(torch.einsum("nk,nkij->nij", weights, a))
        torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)
    assert expected.gt(0).any() and expected.eq(0).any()  # the ReLU matters in this example


class ShiftedInPlace(ConvPoolLinear):
    """ConvPoolLinear whose forward adds a shift to the conv's output in place (as a residual
    block's ``out += identity`` does to its last layer's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        a += torch.arange(1.0, 5.0).view(1, 4, 1, 1)
        return self.fc(a.mean(dim=(2, 3)))


def test_grad_cam_reads_the_layers_own_output_when_the_model_changes_it_in_place():
    # The shift does not change d logit / d A (W[c, k] / (h w), as in ConvPoolLinear), so the
    # conv's own output gives ConvPoolLinear's closed form; the shifted output would add
    # sum_k W[c, k] (k + 1) / 36 to every position.
    torch.manual_seed(0)
    model = ShiftedInPlace()
    images = _images(5, channels=2, size=6)
    with torch.no_grad():
        a = F.conv2d(images, model.conv.weight, model.conv.bias, padding=1)
    target = torch.tensor([0, 1, 2, 1, 0])
    maps = grad_cam(model, images, target, layer="conv")
    expected = torch.relu(torch.einsum("nk,nkij->nij", model.fc.weight.detach()[target] / 36.0, a))
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)
    shift = model.fc.weight.detach()[target] @ torch.arange(1.0, 5.0) / 36.0
    assert shift.abs().min() > 1e-3  # reading the shifted output would fail the comparison
    assert snapshot(model).hooks == 0


def test_grad_cam_layer_choice():
    model = TinyNet()
    images = _images(3)
    assert grad_cam(model, images, layer="relu1").shape == (3, 8, 8)
    with pytest.raises(NeuronsError, match="layer 'conv7' not found"):
        grad_cam(model, images, layer="conv7")
    with pytest.raises(NeuronsError, match=r"Grad-CAM needs a layer with \[N, K, h, w\] output"):
        grad_cam(model, images, layer="fc")
    with pytest.raises(NeuronsError, match="has no Conv2d layer"):
        grad_cam(Linear(), _images(2, channels=2, size=4))
    assert snapshot(model).hooks == 0


class PooledClassifier(nn.Module):
    """DLA's head: the features pooled to one position, then a 1x1 convolution as classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x))).flatten(1)


def test_grad_cams_default_is_the_last_conv_with_more_than_one_position():
    torch.manual_seed(0)
    model, images = PooledClassifier(), _images(3)
    assert cam_layer(model) == "fc"  # without images: the last Conv2d
    assert cam_layer(model, image=images[:1]) == "features"  # the conv's block: after the ReLU
    maps = grad_cam(model, images)  # the default layer, on these images' sizes
    torch.testing.assert_close(maps, grad_cam(model, images, layer="features"))
    spread = maps.flatten(1).std(dim=1) / maps.flatten(1).amax(dim=1)
    assert (spread > 1e-3).all()  # maps that are not flat
    flat = grad_cam(model, images, layer="fc").flatten(1)  # one position: one value everywhere
    assert (flat.std(dim=1) <= 1e-5 * flat.amax(dim=1)).all()  # but for float32 rounding
    for target in (None, [0, 1, 2]):  # the positions seen in the pass that predicts, or the probe
        torch.testing.assert_close(
            grad_cam(model, images, target), grad_cam(model, images, target, layer="features")
        )
    # a ResNet's stage outputs with at least 3 x 3 positions: at 32 px layer4 is 1 x 1 and
    # layer3 2 x 2, at 64 px layer4 is 2 x 2, at 96 px 3 x 3
    resnet = torchvision.models.resnet18(num_classes=3)
    for size, expected in [(32, "layer2"), (48, "layer3"), (64, "layer3"), (96, "layer4")]:
        assert cam_layer(resnet, image=torch.rand(1, 3, size, size)) == expected
    with torch.inference_mode():  # an image made in Lightning's validation
        image = torch.rand(1, 3, 32, 32)
    assert cam_layer(resnet, image=image) == "layer2"
    # a VGG: the ReLU after its last conv on that grid, not the conv (nor the pooled output)
    vgg = torchvision.models.vgg11(num_classes=3)
    assert cam_layer(vgg, image=torch.rand(1, 3, 64, 64)) == "features.19"
    assert snapshot(model).hooks == 0 and snapshot(resnet).hooks == 0


class GeluBlock(nn.Module):
    """A residual block on a feature map: ``x + GELU(conv(x))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(channels, channels, 3, padding=1), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x))


class EmbeddingsThenBlocks(nn.Module):
    """Hugging Face's PoolFormer layout: an encoder (returning a dict) that holds its patch
    embeddings in one list and each stage's blocks in another, deeper one."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embeddings = nn.ModuleList([nn.Conv2d(3, 8, 4, 4), nn.Conv2d(8, 16, 2, 2)])
        self.block = nn.ModuleList([nn.ModuleList([GeluBlock(c)]) for c in (8, 16)])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for embed, blocks in zip(self.patch_embeddings, self.block, strict=True):
            x = embed(x)
            for block in blocks:
                x = block(x)
        return {"last_hidden_state": x}


class PooledKeys(nn.Module):
    """CvT's attention, small: queries on the map's positions, keys and values from a strided
    conv on a grid halved; returns the map on the input's grid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.kv = nn.Conv2d(channels, channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        queries, kv = x.flatten(2).transpose(1, 2), self.kv(x).flatten(2).transpose(1, 2)
        attention = torch.softmax(queries @ kv.transpose(1, 2) / c**0.5, dim=-1)
        return x + (attention @ kv).transpose(1, 2).reshape(b, c, h, w)


class Encoded(nn.Module):
    """``encoder`` (``EmbeddingsThenBlocks``, or a stem and a ``PooledKeys`` block) and a head."""

    def __init__(self, encoder: nn.Module, channels: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        if isinstance(features, dict):
            features = features["last_hidden_state"]
        return self.head(features.mean(dim=(2, 3)))


def test_grad_cams_default_passes_embeddings_and_pooled_keys_over():
    """The outermost layer on the 4x4 grid is the patch embedding, which returns before the
    stage's block and holds none: the block is taken (before: the embedding, a conv before any
    of the stage's work). A strided conv inside an attention block that returns the 8x8 map
    gives a 4x4 grid of keys and values only: passed over for the block on the 8x8 grid
    (before: the keys' conv)."""
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    staged = Encoded(EmbeddingsThenBlocks(), 16).eval()
    assert cam_layer(staged, image=image) == "encoder.block.1.0"
    cvt = Encoded(nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.GELU(), PooledKeys(8)), 8).eval()
    assert cam_layer(cvt, image=image) == "encoder"
    maps = grad_cam(cvt, torch.rand(2, 3, 32, 32), [0, 1])
    assert maps.shape == (2, 32, 32) and snapshot(cvt).hooks == 0


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """A downsampling conv and a block: half the grid."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 2, 2), GeluBlock(c_out))


def test_grad_cams_default_names_the_stage_not_the_container_of_stages():
    """TinyViT's layout: ``stages`` holds every stage and returns the last one's tensor. On 32 px
    images the stages run on 8x8 and 4x4 grids: the default names the last stage,
    ``encoder.1.1`` (before: ``encoder``, the same maps under the name of the whole model); a
    stage whose children run on its grid keeps its name (a ResNet's ``layer4``)."""
    torch.manual_seed(0)
    stages = nn.Sequential(_stage(8, 8), _stage(8, 16))
    tiny = Encoded(nn.Sequential(nn.Conv2d(3, 8, 2, 2), stages), 16).eval()
    image = torch.rand(1, 3, 32, 32)
    assert cam_layer(tiny, image=image) == "encoder.1.1"
    flat = Encoded(nn.Sequential(nn.Conv2d(3, 8, 4, 4), _stage(8, 8), _stage(8, 16)), 16).eval()
    assert cam_layer(flat, image=image) == "encoder.1"  # 8x8 -> 4x4 -> 2x2: the 4x4 stage
    assert snapshot(tiny).hooks == 0


def test_errors():
    model = TinyNet()
    images = _images(2)
    with pytest.raises(NeuronsError, match="outside the model's 3 classes"):
        gradient(model, images, target=[0, 3])
    with pytest.raises(NeuronsError, match="one class per image"):
        grad_cam(model, images, target=[0, 1, 2])
    with pytest.raises(NeuronsError, match=r"\[N, C, H, W\] tensor"):
        gradient(model, images[0])
    with pytest.raises(NeuronsError, match="`samples` must be a positive integer"):
        smoothgrad(model, images, samples=0)
    with pytest.raises(NeuronsError, match="`noise` must be a number >= 0"):
        smoothgrad(model, images, noise=-0.1)
    with pytest.raises(NeuronsError, match="`method` must be one of"):
        saliency(model, images, "occlusion")
    with pytest.raises(NeuronsError, match="`batch_size` must be a positive integer"):
        gradient(model, images, batch_size=0)
    assert snapshot(model).hooks == 0


@pytest.mark.parametrize("method", ["gradient", "smoothgrad", "gradcam"])
def test_one_probe_pass_gives_the_class_count_and_the_chunk_size(method):
    """Given the classes, a map runs one forward pass of one image before its own passes: it
    tells the model's class count (to check the targets) and the rows a chunk may hold (before:
    a pass for each); the targets are checked where they are given, on the host."""
    model, images = TinyNet(), _images(6)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    maps = saliency(model, images, method, target=torch.tensor([0, 1, 2, 0, 1, 2]), samples=3)
    rows = 6 * 3 if method == "smoothgrad" else 6
    assert sizes == [1, rows] and maps.shape == (6, 8, 8)
    sizes.clear()
    saliency(model, images, method, target=torch.tensor([0, 1, 2, 0, 1, 2]), batch_size=4)
    assert sizes[0] == 1 and max(sizes[1:]) == 4  # the class count alone
    sizes.clear()
    saliency(model, images, method, batch_size=32, samples=3)  # predicted: nothing to probe
    assert sizes == [6, rows]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1) - a.flatten(1).mean(dim=1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def test_maps_change_when_the_weights_are_randomised():
    """Adebayo et al.'s sanity check: maps that survive randomising the model say nothing about it."""
    model, val_x, val_y, _ = trained_digits_cnn()
    images = torch.stack([val_x[val_y == c][0] for c in range(10)])
    random_model, _, _, _ = trained_digits_cnn()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for module in random_model.modules():
            if hasattr(module, "reset_parameters") and not isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
    target = torch.arange(10)
    for method in ["gradient", "smoothgrad", "gradcam"]:
        trained_maps = normalize_maps(saliency(model, images, method, target, samples=8))
        random_maps = normalize_maps(saliency(random_model, images, method, target, samples=8))
        same = _correlation(trained_maps, saliency(model, images, method, target, samples=8))
        changed = _correlation(trained_maps, random_maps)
        assert torch.allclose(same, torch.ones(10), atol=1e-4)
        assert changed.mean() < 0.6, (method, changed)


def test_only_grad_cams_default_reads_every_modules_output(monkeypatch):
    """The shapes of every module's output (hooks on all of them) are read only where Grad-CAM
    picks its layer: not for gradient or SmoothGrad maps, nor for a named Grad-CAM layer."""
    module = importlib.import_module("lightning_neurons.visualize.probe")
    calls: list[int] = []
    real = module.layer_outputs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "layer_outputs", counted)
    model, images = TinyNet(), _images(3)
    gradient(model, images)
    smoothgrad(model, images, samples=2)
    grad_cam(model, images, layer="conv2")
    assert not calls
    torch.testing.assert_close(grad_cam(model, images), grad_cam(model, images, layer="relu2"))
    assert calls
