"""Parametrizations, transforms and the batched render loop: correctness, independence of rows,
no side effects, and images that really drive a trained CNN's channels and classes."""

from __future__ import annotations

import pytest
import torch
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

from lightning_neurons import NeuronsError
from lightning_neurons.data import Normalize
from lightning_neurons.hooks import count_forward_hooks, hooked
from lightning_neurons.visualize import Channel, ChannelGroup, ClassLogit, Neuron, evaluate, render
from lightning_neurons.visualize.param import fft_image, parametrize, pixel_image, row_seed
from lightning_neurons.visualize.sizing import (
    CPU_CHUNK_BYTES,
    DEVICE_CHUNK_BYTES,
    DEVICE_CHUNK_ROWS,
    DEVICE_FREE_SHARE,
    Probe,
    auto_batch_size,
    chunk_rows,
    device_free_bytes,
    leaf_output_sizes,
)
from lightning_neurons.visualize.transforms import (
    CenterCrop,
    Jitter,
    Pad,
    RandomAffine,
    RandomRotate,
    RandomScale,
    apply_transforms,
    resolve_transforms,
    standard_transforms,
)

# ---- parametrizations ---------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["pixel", "fft"])
@pytest.mark.parametrize("channels", [1, 3])
def test_parametrizations_give_display_images_with_independent_rows(param, channels):
    seeds = [row_seed(0, i) for i in range(3)]
    params, image_fn = parametrize(param, (3, channels, 12, 10), seeds)
    image = image_fn()
    assert image.shape == (3, channels, 12, 10)
    image_values = image.detach()
    assert float(image_values.min()) > 0.0 and float(image_values.max()) < 1.0
    assert all(p.requires_grad and p.is_leaf for p in params)
    image[1].sum().backward()  # one row's loss reaches only that row's parameters
    grad = params[0].grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    # a row's initial image depends only on its own seed
    _, alone = parametrize(param, (1, channels, 12, 10), seeds[1:2])
    # Same seed, same arithmetic, but batched FFT/conv kernels are not bitwise batch-invariant on
    # every CPU: a float32 inverse FFT of 120 points is exact to about eps * log2(120) ~ 1e-6 of
    # the spectrum's scale, and the sigmoid only shrinks errors. 1e-5 is that with a margin, and
    # 100x below the difference between two rows' (nearly grey, low-variance) initial images.
    torch.testing.assert_close(alone()[0], image[1].detach(), atol=1e-5, rtol=0)
    assert (image[0] - image[1]).abs().amax() > 1e-3


def test_fft_images_are_smoother_than_pixel_images():
    seeds = [row_seed(0, i) for i in range(8)]
    _, pixel = pixel_image((8, 1, 32, 32), seeds, sd=0.5)
    _, fft = fft_image((8, 1, 32, 32), seeds, sd=0.5)

    def roughness(x: torch.Tensor) -> float:
        x = x.detach() - x.detach().mean(dim=(2, 3), keepdim=True)
        return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() / x.abs().mean())

    assert roughness(fft()) < 0.7 * roughness(pixel())  # 1/f spectrum: about 0.6


def test_rgb_colour_decorrelation_mixes_channels():
    seeds = [row_seed(0, 0)]
    params, mixed = fft_image((1, 3, 8, 8), seeds, sd=1.0)
    _, plain = fft_image((1, 3, 8, 8), seeds, sd=1.0, decorrelate=False)
    assert not torch.allclose(mixed(), plain())
    with torch.no_grad():
        params[0][:, 1:] = 0  # only the first decorrelated channel: all colour channels move
    centred = mixed() - 0.5
    assert (centred.abs().flatten(2).amax(dim=2) > 1e-3).all()


def test_parametrize_errors():
    with pytest.raises(NeuronsError, match="`param` must be one of 'pixel', 'fft'"):
        parametrize("cppn", (1, 1, 8, 8), [0])
    with pytest.raises(NeuronsError, match="one seed per image"):
        parametrize("fft", (2, 1, 8, 8), [0])
    with pytest.raises(NeuronsError, match=r"\[N, C, H, W\]"):
        parametrize("pixel", (1, 8, 8), [0])


# ---- transforms ---------------------------------------------------------------------------------


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pad_and_jitter_shapes_and_shifts():
    x = torch.rand(2, 3, 10, 10)
    padded = Pad(3)(x, _gen())
    assert padded.shape == (2, 3, 16, 16)
    assert torch.equal(padded[..., 3:13, 3:13], x) and torch.all(padded[..., 0, :] == 0.5)
    assert Pad(2, mode="reflect")(x, _gen()).shape == (2, 3, 14, 14)
    jittered = Jitter(4)(x, _gen(1))
    assert jittered.shape == (2, 3, 6, 6)
    # a crop: some 6x6 window of the input, the same window for every image of the batch
    windows = [(t, left) for t in range(5) for left in range(5)]
    assert any(torch.equal(jittered, x[..., t : t + 6, left : left + 6]) for t, left in windows)
    # different steps draw different shifts
    gen = _gen(1)
    crops = {tuple(Jitter(4)(x, gen)[0, 0, 0, :2].tolist()) for _ in range(20)}
    assert len(crops) > 3
    assert CenterCrop(8, 8)(x, _gen()).shape == (2, 3, 8, 8)
    with pytest.raises(NeuronsError, match="too large"):
        Jitter(10)(x, _gen())
    with pytest.raises(NeuronsError, match="non-negative integer"):
        Pad(-1)
    with pytest.raises(NeuronsError, match="`mode`"):
        Pad(1, mode="wrap")


@pytest.mark.parametrize(
    "transform", [RandomScale(0.8, 1.2), RandomRotate(20.0), RandomAffine(2, (0.8, 1.2), 20.0)]
)
def test_scale_and_rotate_are_differentiable_seeded_and_keep_fill(transform):
    x = torch.full((2, 1, 16, 16), 0.5)
    x[:, :, 6:10, 6:10] = 1.0
    x.requires_grad_(True)
    before = rng_states()
    out = transform(x, _gen(3))
    assert_same_rng(before)
    assert out.shape == x.shape
    assert torch.allclose(out[..., 0, 0], torch.tensor(0.5))  # pixels from outside: the fill
    assert torch.equal(out, transform(x, _gen(3)))  # same generator state: same transform
    assert not torch.allclose(out, x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_standard_chain_keeps_image_size_and_resolve():
    chain = standard_transforms((1, 32, 32))
    assert len(chain) == 1 and isinstance(chain[0], RandomAffine) and chain[0].shift == 2
    lucid = [Pad(3), Jitter(4), RandomScale(), RandomRotate(), Jitter(2), CenterCrop(32, 32)]
    for shape in [(3, 32, 32), (1, 28, 20), (3, 224, 224)]:
        x = torch.rand(2, *shape)
        assert apply_transforms(x, resolve_transforms("standard", shape), _gen()).shape == x.shape
    assert apply_transforms(torch.rand(2, 1, 32, 32), lucid, _gen()).shape == (2, 1, 32, 32)
    assert resolve_transforms("none", (1, 8, 8)) == [] and resolve_transforms(None, (1, 8, 8)) == []
    with pytest.raises(NeuronsError, match="'standard', 'none', None or a list"):
        resolve_transforms("fancy", (1, 8, 8))
    with pytest.raises(NeuronsError, match="must be callable"):
        resolve_transforms([Pad(1), 3], (1, 8, 8))
    with pytest.raises(NeuronsError, match="`shift` must be a non-negative integer"):
        RandomAffine(shift=-1)
    with pytest.raises(NeuronsError, match="`scale` must be"):
        RandomAffine(scale=(1.2, 0.8))


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
@pytest.mark.parametrize(
    "angle, translate, scale",
    [(17.0, (1.5, -2.0), 1.1), (-33.0, (-3.0, 1.0), 0.85), (90.0, (0, 0), 1)],
)
def test_the_warp_is_torchvisions_affine(size, angle, translate, scale):
    from torchvision.transforms.v2 import functional as TF

    from lightning_neurons.visualize.transforms import _warp

    x = torch.rand(3, 2, *size, generator=torch.Generator().manual_seed(0))
    expected = TF.affine(
        x, angle=angle, translate=list(translate), scale=scale, shear=[0.0, 0.0],
        interpolation=TF.InterpolationMode.BILINEAR,
    )  # fmt: skip
    # both sample at float32 grid coordinates near 1, each rounded by up to ~1.2e-7 of the half
    # width (10 px): up to ~1e-6 of a pixel step of values in [0, 1], a few such roundings
    torch.testing.assert_close(_warp(x, angle, translate, scale), expected, atol=1e-5, rtol=0)


def test_random_affine_is_an_exact_shift_without_scale_and_rotation():
    x = torch.rand(3, 1, 10, 10)
    shifted = RandomAffine(shift=3, scale=(1.0, 1.0), degrees=0.0, fill=0.5)(x, _gen(5))
    moves = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)]
    # some whole-pixel shift of the input (same for the whole batch), grey where it came from outside
    found = [
        (dy, dx)
        for dy, dx in moves
        if torch.allclose(
            shifted[..., max(dy, 0) : 10 + min(dy, 0), max(dx, 0) : 10 + min(dx, 0)],
            x[..., max(-dy, 0) : 10 + min(-dy, 0), max(-dx, 0) : 10 + min(-dx, 0)],
            atol=1e-5,
        )
    ]
    assert len(found) == 1


# ---- render -------------------------------------------------------------------------------------


def test_render_leaves_model_rng_and_output_untouched(capsys):
    model = bn_net()
    model.train()  # BatchNorm and Dropout in training mode; render must use eval mode
    model.conv1.weight.requires_grad_(False)  # a mixture of flags to restore
    model.head.bias.grad = torch.ones_like(model.head.bias)  # and a gradient to keep
    before = snapshot(model)
    rng = rng_states()
    objectives = [Channel("conv1", 1), Channel("conv2", 5), ClassLogit(2)]
    images = render(model, objectives, image_shape=(1, 8, 8), steps=5).images
    assert images.shape == (3, 1, 8, 8) and not images.requires_grad
    assert_unchanged(model, before)  # weights, BatchNorm statistics, modes, flags, grads, hooks
    assert_same_rng(rng)
    assert capsys.readouterr() == ("", "")


def test_render_does_not_depend_on_the_global_rng():
    model = bn_net()
    torch.manual_seed(1)
    first = render(
        model, [Channel("conv2", 0), ClassLogit(1)], image_shape=(1, 8, 8), steps=4
    ).images
    torch.manual_seed(2)
    second = render(
        model, [Channel("conv2", 0), ClassLogit(1)], image_shape=(1, 8, 8), steps=4
    ).images
    assert torch.equal(first, second)
    third = render(
        model, [Channel("conv2", 0), ClassLogit(1)], image_shape=(1, 8, 8), steps=4, seed=1
    ).images
    assert not torch.equal(first, third)


@pytest.mark.parametrize("param", ["pixel", "fft"])
def test_chunks_give_the_same_images_as_one_batch(param):
    model = bn_net()
    objectives = [Channel("conv1", i) for i in range(4)] + [ClassLogit(0), Neuron("conv2", 3)]
    kwargs = dict(image_shape=(1, 12, 12), steps=12, param=param, seed=3)
    whole = render(model, objectives, **kwargs).images
    chunked = render(model, objectives, batch_size=4, **kwargs).images
    single = render(model, objectives[4:5], **kwargs).images  # alone, at index 0: a different seed
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert torch.allclose(
        render(model, objectives, batch_size=1, **kwargs).images, whole, atol=1e-5
    )
    assert not torch.allclose(single[0], whole[4], atol=1e-3)


def test_automatic_chunks_fit_the_caches_on_cpu_and_a_memory_budget_elsewhere():
    assert auto_batch_size(64, largest_output=32 * 32 * 32, device=torch.device("cpu")) <= 64
    rows = auto_batch_size(1000, largest_output=32 * 32 * 32, device=torch.device("cpu"))
    assert rows == CPU_CHUNK_BYTES // (4 * 32 * 32 * 32) == 16
    assert auto_batch_size(1000, largest_output=10**8, device=torch.device("cpu")) == 4
    assert auto_batch_size(3, largest_output=10**8, device=torch.device("cpu")) == 3
    cuda, plenty = torch.device("cuda"), 10**12  # free bytes, given: no GPU needed
    # small rows: at most DEVICE_CHUNK_ROWS, one chunk for ResNet-50's 272 channel rows at 32 px
    # (2.6 MB of layer outputs a row): a small batch costs what its kernel launches cost
    rows = auto_batch_size(1000, largest_output=10**5, device=cuda, free_bytes=plenty)
    assert rows == DEVICE_CHUNK_ROWS == 512
    assert auto_batch_size(272, 16384, cuda, total_output=656872, free_bytes=plenty) == 272
    assert auto_batch_size(40, largest_output=10**5, device=cuda, free_bytes=plenty) == 40
    # memory-bounded on an accelerator: all of a row's layer outputs count, float32
    rows = auto_batch_size(10**5, 10**6, cuda, total_output=10**8, free_bytes=plenty)
    assert rows == DEVICE_CHUNK_BYTES // (4 * 10**8) == 10
    assert auto_batch_size(1000, largest_output=10**9, device=cuda, free_bytes=plenty) == 4
    # ... and by the share of the device's free memory when that is less
    free = 2**30
    rows = auto_batch_size(10**5, 10**6, cuda, total_output=10**6, free_bytes=free)
    assert rows == int(free * DEVICE_FREE_SHARE) // (4 * 10**6) == 134
    assert auto_batch_size(10**5, 10**6, cuda, total_output=10**6, free_bytes=0) == 4
    # no free-memory figure for a CPU, nor without CUDA: the byte budget alone then
    assert device_free_bytes(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert device_free_bytes(cuda) is None
        assert auto_batch_size(10**5, 10**6, cuda, total_output=10**8) == 10


def test_a_chunk_counts_the_gram_matrices_its_rows_keep():
    """Rows compared on their Gram matrices keep channels squared elements each (16 MB at
    2,048 channels): a chunk of them holds fewer rows on an accelerator."""
    found = Probe(shapes={"deep": (2048, 1, 1)}, largest=10**5, total=4 * 10**6)
    cuda = torch.device("cuda")
    alone = chunk_rows(found, 10**4, 2, 1, cuda, None)
    kept = chunk_rows(found, 10**4, 2, 1, cuda, None, gram=2048**2)
    assert alone == DEVICE_CHUNK_BYTES // (4 * 4 * 10**6) == 268
    assert kept == DEVICE_CHUNK_BYTES // (4 * (4 * 10**6 + 2048**2)) - 1 == 130  # even: 2 a row
    assert chunk_rows(found, 10**4, 2, 3, cuda, None, gram=2048**2) == 42  # 3 views: a third


def test_leaf_output_sizes_count_every_call_and_remove_their_hooks():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.relu(self.conv(x)))

    net, x = Twice(), torch.rand(2, 1, 8, 8)
    sizes = leaf_output_sizes(net, lambda: net(x))
    assert (sizes.largest, sizes.total) == (2 * 4 * 64, 3 * 2 * 4 * 64)  # conv, relu, relu
    assert count_forward_hooks(net) == 0
    linear = nn.Linear(3, 5)  # a model without sub-modules counts its own output
    sizes = leaf_output_sizes(linear, lambda: linear(torch.rand(2, 3)))
    assert (sizes.largest, sizes.total) == (10, 10) and count_forward_hooks(linear) == 0


@pytest.mark.parametrize("channels", [1, 3])
def test_render_increases_objectives_grey_and_rgb(channels):
    model = bn_net(in_channels=channels)
    objectives = [
        Channel("conv2", 0),
        Neuron("conv1", 2),
        ChannelGroup("conv2", [1, 4]),
        ClassLogit(1),
    ]
    objectives.append(ClassLogit(0) - ClassLogit(2))
    shape = (channels, 16, 16)
    start = render(model, objectives, image_shape=shape, steps=1, lr=1e-9, transforms="none").images
    images = render(model, objectives, image_shape=shape, steps=40).images
    assert images.shape == (5, *shape) and float(images.min()) >= 0 and float(images.max()) <= 1
    gain = evaluate(model, objectives, images) - evaluate(model, objectives, start)
    assert (gain > 0).all(), gain


def test_pixel_param_no_transforms_penalties_and_steps():
    model = bn_net()
    objective = [Channel("conv2", 2)]
    kwargs = dict(image_shape=(1, 8, 8), steps=30, param="pixel", transforms="none")
    plain = render(model, objective, **kwargs).images
    smooth = render(model, objective, tv=5.0, **kwargs).images
    grey = render(model, objective, l2=50.0, **kwargs).images

    def tv(x: torch.Tensor) -> float:
        return float(
            (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()
        )

    assert tv(smooth) < tv(plain)
    assert float((grey - 0.5).abs().mean()) < float((plain - 0.5).abs().mean())


def test_input_transform_is_applied_after_the_transforms():
    """A model that needs normalised input, rendered with input_transform=Normalize, gives the
    same images as the same model with the normalisation as its first layer."""
    net = bn_net(in_channels=3)
    normalize = Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))

    class Plain(nn.Module):
        def __init__(self, built_in: bool) -> None:
            super().__init__()
            self.net, self.built_in = net, built_in

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(normalize(x) if self.built_in else x)

    objectives = [Channel("net.conv2", 1), ClassLogit(2)]
    kwargs = dict(image_shape=(3, 16, 16), steps=15)
    with_transform = render(Plain(False), objectives, input_transform=normalize, **kwargs).images
    built_in = render(Plain(True), objectives, **kwargs).images
    without = render(Plain(False), objectives, **kwargs).images
    assert torch.allclose(with_transform, built_in, atol=1e-5)
    assert not torch.allclose(with_transform, without, atol=1e-3)


def test_forward_stops_after_the_last_needed_layer():
    model = TinyNet()
    calls = []
    model.head.register_forward_hook(lambda *args: calls.append(1))
    render(model, [Channel("conv1", 0)], image_shape=(1, 8, 8), steps=3)
    assert calls == [1]  # only check_objectives' probe reached the head
    calls.clear()
    render(model, [Channel("conv1", 0) + ClassLogit(0)], image_shape=(1, 8, 8), steps=3)
    assert len(calls) == 4


def test_evaluate_reads_outputs_before_in_place_ops():
    model = bn_net()  # conv1 -> bn1 -> ReLU(inplace=True)
    images = torch.rand(6, 1, 8, 8, generator=_gen(0))
    seen = {}
    with torch.no_grad(), hooked(model.eval(), ["bn1"], lambda n, t: seen.update({n: t.clone()})):
        model(images)
    values = evaluate(model, [Channel("bn1", i % 4) for i in range(6)], images)
    expected = torch.stack([seen["bn1"][i, i % 4].mean() for i in range(6)])
    assert torch.allclose(values, expected, atol=1e-6)
    assert (values < 0).any()  # before the in-place ReLU


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_shape": (8, 8)}, "`image_shape` must be"),
        ({"image_shape": (1, 8, 8), "steps": 0}, "`steps` must be a positive integer"),
        ({"image_shape": (1, 8, 8), "lr": -1.0}, "`lr` must be a positive number"),
        ({"image_shape": (1, 8, 8), "param": "cppn"}, "`param` must be one of"),
        ({"image_shape": (1, 8, 8), "batch_size": 0}, "`batch_size` must be a positive integer"),
        ({"image_shape": (1, 8, 8), "tv": -1.0}, "`tv` must be a number >= 0"),
        ({"image_shape": (1, 8, 8), "transforms": "heavy"}, "`transforms` must be"),
        ({"image_shape": (3, 8, 8)}, "failed on a"),
        (
            {"image_shape": (1, 8, 8), "restarts": 2, "select_after": 1, "mask": True},
            "`select_after` cannot be combined with `mask=True`",
        ),
        ({"image_shape": (1, 8, 8), "restarts": 2, "n_images": 2}, "cannot be combined with"),
        ({"image_shape": (1, 8, 8), "converge_tol": None, "param": "fancy"}, "`param` must be"),
    ],
)
def test_render_argument_errors(kwargs, match):
    model = TinyNet()
    with pytest.raises(NeuronsError, match=match):
        render(model, [Channel("conv1", 0)], **kwargs)
    assert snapshot(model).hooks == 0


# ---- on a trained CNN ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    return trained_digits_cnn()


def test_trained_cnn_channel_images_beat_real_data(trained):
    """For >= 90% of a layer's channels, the rendered image drives the channel above its largest
    value on any real validation image."""
    model, val_x, _, accuracy = trained
    assert accuracy > 0.9
    layers = ["features.conv2", "features.conv3"]
    seen = {}
    with torch.no_grad(), hooked(model, layers, lambda n, t: seen.update({n: t})):
        model(val_x)
    for layer in layers:
        real_max = seen[layer].mean(dim=(2, 3)).amax(dim=0)
        objectives = [Channel(layer, k) for k in range(real_max.numel())]
        images = render(model, objectives, image_shape=(1, 32, 32), steps=64, lr=0.1).images
        reached = evaluate(model, objectives, images)
        above = (reached > real_max).float().mean()
        print(f"{layer}: {float(above):.3f} of the channels above their validation maximum")
        assert above >= 0.9, (layer, float(above))


def test_trained_cnn_class_images_are_classified_as_their_class(trained):
    """The rendered model recognises most of its own class images.

    Measured 8, 9 and 10 of 10 on different CPUs and thread counts (the model and the 64 render
    steps both follow the machine's rounding), so the test asks for 7 of 10 (chance: 1 of 10);
    `benchmarks/visualization.py --quality` reports the full figures.
    """
    model = trained[0]
    images = render(
        model, [ClassLogit(c) for c in range(10)], image_shape=(1, 32, 32), steps=64, lr=0.1
    ).images
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    print(f"class images recognised: {predicted.tolist()}")
    assert (predicted == torch.arange(10)).float().mean() >= 0.7, predicted.tolist()


@pytest.mark.parametrize("param", ["pixel", "fft"])
def test_render_continues_from_returned_parameters(param):
    model = bn_net()
    objectives = [Channel("conv1", i) for i in range(3)] + [ClassLogit(0)]
    kwargs = dict(image_shape=(1, 12, 12), param=param, seed=3)
    result = render(model, objectives, steps=8, **kwargs)
    images, params = result.images, result.params
    assert params.shape[0] == 4 and not params.requires_grad and params.device.type == "cpu"
    # a step of a vanishing size from the returned parameters gives back the same images
    again = render(model, objectives, steps=1, lr=1e-9, init=params, **kwargs).images
    torch.testing.assert_close(again, images, atol=1e-6, rtol=0)  # float32, one step of 1e-9
    # continuing (in chunks too) moves on from there, and differs from starting over
    more = render(model, objectives, steps=4, init=params, **kwargs).images
    chunked = render(model, objectives, steps=4, init=params, batch_size=1, **kwargs).images
    torch.testing.assert_close(chunked, more, atol=1e-5, rtol=0)  # as the chunking test above
    fresh = render(model, objectives, steps=4, **kwargs).images
    assert not torch.allclose(more, fresh, atol=1e-3)
    values = evaluate(model, objectives, more)
    assert (values >= evaluate(model, objectives, fresh) - 1e-4).float().mean() >= 0.5


def test_render_init_of_the_wrong_shape_is_refused():
    model = bn_net()
    objectives = [Channel("conv1", 0), Channel("conv1", 1)]
    params = render(model, objectives, image_shape=(1, 8, 8), steps=1).params
    with pytest.raises(NeuronsError, match=r"`init` must be the parameters of every row"):
        render(model, objectives[:1], image_shape=(1, 8, 8), steps=1, init=params)


def test_a_block_of_rows_rendered_alone_gives_its_rows_of_the_whole():
    model = bn_net()
    objectives = [Channel("conv1", i) for i in range(3)] + [ClassLogit(0), ClassLogit(2)]
    kwargs = dict(image_shape=(1, 12, 12), steps=6, param="fft", seed=5, restarts=2)
    whole = render(model, objectives, **kwargs).images
    block = render(model, objectives[2:4], first_row=2 * 2, **kwargs).images  # 2 candidates each
    torch.testing.assert_close(block, whole[2:4], atol=1e-5, rtol=0)  # as the chunking test
    with pytest.raises(NeuronsError, match="`first_row` must be an integer >= 0"):
        render(model, objectives, first_row=-1, **kwargs)


def test_renderings_of_several_lists_in_one_batch_give_each_lists_images():
    """``first_row`` as a list (each objective's first row): two renderings in one batch, each
    row from the noise of its own rendering, and the same images and steps."""
    model = bn_net()
    shallow = [Channel("conv1", i) for i in range(3)]
    deep = [Channel("conv2", i) for i in range(2)] + [ClassLogit(1)]
    kwargs = dict(image_shape=(1, 12, 12), steps=12, param="fft", seed=2, n_images=2)
    kwargs |= dict(converge_tol=0.03, converge_window=2, diversity=0.5)
    apart = [render(model, objectives, **kwargs) for objectives in (shallow, deep)]
    firsts = [2 * j for j in range(3)] + [2 * j for j in range(3)]
    together = render(model, shallow + deep, first_row=firsts, **kwargs)
    assert torch.equal(together.steps, torch.cat([r.steps for r in apart]))
    images = torch.cat([r.images for r in apart])
    torch.testing.assert_close(together.images, images, atol=1e-5, rtol=0)  # as the chunking test
    with pytest.raises(NeuronsError, match="`first_row` lists 2 first rows for 6 objectives"):
        render(model, shallow + deep, first_row=[0, 2], **kwargs)
    with pytest.raises(NeuronsError, match="`first_row` must be an integer >= 0"):
        render(model, shallow, first_row=[0, -2, 4], **kwargs)


def test_on_cpu_a_chunk_holds_rows_of_one_depth():
    """On CPU the forward pass of a chunk stops after its deepest layer: rows of other layers
    are not mixed into one chunk (on an accelerator they are, one batch for all)."""
    from lightning_neurons.visualize.optimise import ChunkSettings, chunks_of

    rows = [Channel("conv1", 0)] * 3 + [Channel("conv2", 1)] * 2 + [ClassLogit(0)] * 4
    rows += [Channel("conv1", 2)]
    settings = ChunkSettings(
        param="fft", image_shape=(1, 8, 8), seed=0, decorrelate=True,
        device=torch.device("cpu"), prior=None, contrast=1.0, views=1, n_images=1,
        output_fn=None, diversity_on="pixels", spatial=frozenset({"conv1", "conv2"}),
    )  # fmt: skip
    chunks = chunks_of(rows, 2, settings, first_row=[10 + i for i in range(len(rows))])
    assert [[repr(o) for o in c.objectives] for c in chunks] == [
        [repr(rows[0])] * 2, [repr(rows[0])], [repr(rows[3])] * 2, [repr(rows[5])] * 2,
        [repr(rows[5])] * 2, [repr(rows[9])],
    ]  # fmt: skip
    # each row keeps its own noise whatever chunk it lands in
    alone = chunks_of(rows[3:5], 8, settings, first_row=[13, 14])
    torch.testing.assert_close(chunks[2].image_fn(), alone[0].image_fn(), atol=0, rtol=0)


def _chunk(rows, views: int, n_images: int):
    from lightning_neurons.visualize.optimise import Chunk, ChunkSettings

    settings = ChunkSettings(
        param="fft", image_shape=(1, 8, 8), seed=0, decorrelate=True,
        device=torch.device("cpu"), prior=None, contrast=1.0, views=views, n_images=n_images,
        output_fn=None, diversity_on="features", spatial=frozenset({"conv1", "conv2"}),
    )  # fmt: skip
    return Chunk(rows, range(len(rows)), settings)


def test_the_diversity_term_compares_each_rows_gram_matrices_of_its_own_layer(monkeypatch):
    """In a chunk of rows of several layers (as on an accelerator), each row's Gram matrices
    are those of its own layer, taken for its rows only: a Gram matrix is channels squared per
    row (16 MB at 2,048 channels), and taking every layer's for every row of a chunk of 272
    rows of ResNet-50 took tens of GB."""
    from lightning_neurons.visualize import scoring
    from lightning_neurons.visualize.penalties import similarity_to_others

    model = bn_net().eval()
    rows = [Channel("conv1", 0)] * 2 + [Channel("conv2", 1)] * 2 + [Channel("conv1", 2)] * 2
    chunk = _chunk(rows, views=2, n_images=2)
    taken, gram = [], scoring.gram_matrices
    monkeypatch.setattr(scoring, "gram_matrices", lambda out: taken.append(len(out)) or gram(out))
    outputs = {}
    hooks = [
        dict(model.named_modules())[n].register_forward_hook(
            lambda m, i, o, n=n: outputs.setdefault(n, o.detach().clone())
        )
        for n in ("conv1", "conv2")
    ]
    with torch.no_grad():
        image = chunk.rows_image()
        with chunk.scoring.attached(model):
            chunk.scoring.forward(model, image.repeat(2, 1, 1, 1), image.repeat(2, 1, 1, 1))
        similarity = chunk.similarity(image)
    for hook in hooks:
        hook.remove()
    assert sorted(taken) == [4, 8]  # conv2: 2 rows x 2 views; conv1: 4 rows x 2 views
    expected = torch.zeros(6)
    for layer, picked in (("conv1", [0, 1, 4, 5]), ("conv2", [2, 3])):
        both = torch.tensor(picked + [6 + i for i in picked])  # the rows of both views
        grams = gram(outputs[layer][both]).view(2, len(picked), -1).mean(dim=0)
        expected[picked] = similarity_to_others(grams, 2, centre=False)
    torch.testing.assert_close(similarity, expected, atol=1e-6, rtol=0)
    assert bool((expected.abs() > 1e-3).all())  # the images of an objective differ, not alike


def test_without_several_images_an_objective_takes_no_gram_matrix(monkeypatch):
    from lightning_neurons.visualize import scoring

    calls = []
    monkeypatch.setattr(scoring, "gram_matrices", lambda out: calls.append(out) or out)
    model = bn_net()
    objectives = [Channel("conv1", 0), Channel("conv2", 1)]
    render(model, objectives, image_shape=(1, 8, 8), steps=2, diversity=1.0, n_images=1)
    assert calls == [] and _chunk(objectives, views=1, n_images=1).scoring.gram_rows == {}
    # candidates are not compared (the diversity term is off for restarts): no Gram matrices
    render(model, objectives, image_shape=(1, 8, 8), steps=2, diversity=1.0, restarts=2)
    render(model, objectives, image_shape=(1, 8, 8), steps=2, diversity=0.0, n_images=2)
    assert calls == []
    render(model, objectives, image_shape=(1, 8, 8), steps=2, diversity=1.0, n_images=2)
    assert len(calls) > 0


def test_the_kept_candidates_parameters_continue_alone():
    model = bn_net()
    objectives = [ClassLogit(0), ClassLogit(2)]
    kwargs = dict(image_shape=(1, 12, 12), param="fft", seed=1)
    result = render(model, objectives, steps=6, restarts=3, **kwargs)
    images, params = result.images, result.params
    assert params.shape[0] == 2  # the kept candidate of each objective
    again = render(model, objectives, steps=1, lr=1e-9, init=params, **kwargs).images
    torch.testing.assert_close(again, images, atol=1e-6, rtol=0)  # float32, one step of 1e-9


def test_selecting_the_candidate_early_continues_the_kept_one_alone():
    model = bn_net()
    objectives = [ClassLogit(0), ClassLogit(1), ClassLogit(2)]
    kwargs = dict(image_shape=(1, 12, 12), param="fft", seed=4, views=2)
    early = render(model, objectives, steps=8, restarts=3, select_after=3, **kwargs).images
    # the same by hand: 3 steps of every candidate, then the kept ones alone for 5 more steps
    kept = render(model, objectives, steps=3, restarts=3, **kwargs).params
    by_hand = render(model, objectives, steps=5, init=kept, **kwargs).images
    torch.testing.assert_close(early, by_hand, atol=1e-5, rtol=0)  # as the chunking test
    late = render(model, objectives, steps=8, restarts=3, **kwargs).images
    assert torch.equal(
        render(model, objectives, steps=8, restarts=3, select_after=8, **kwargs).images, late
    )
    with pytest.raises(NeuronsError, match="`select_after` must be a positive integer"):
        render(model, objectives, steps=8, restarts=3, select_after=0, **kwargs)


# ---- the convergence test -----------------------------------------------------------------------


def _ramp_and_offset_ramp() -> nn.Module:
    """A 1x1 convolution whose channel 0 is the mean pixel (it rises while the pixels' sigmoid
    has room) and channel 1 the same plus 100 (the same rise, but relative to 100: converged)."""
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([0.0, 100.0]))
    return nn.Sequential(conv)


def test_convergence_stops_a_converged_objective_and_not_an_improving_one():
    model = _ramp_and_offset_ramp()
    objectives = [Channel("0", 0), Channel("0", 1)]
    kwargs = dict(image_shape=(1, 6, 6), param="pixel", transforms="none", lr=0.05, seed=2)
    result = render(model, objectives, steps=24, converge_tol=0.01, converge_window=4, **kwargs)
    images, ran = result.images, result.steps
    # the mean pixel, ~0.5, rises ~0.05 per 4 steps (sigmoid slope ~0.25, Adam steps ~lr), ~10%:
    # it never stops; 100 + the mean pixel rises 0.05%: it stops at the second comparison in a
    # row that found it calm, two windows in
    assert ran.tolist() == [24, 8]
    assert ran.dtype == torch.int64 and ran.device.type == "cpu"
    # the frozen image is the image after 8 steps (Adam's momentum did not move it on), and the
    # other image is that of 24 steps: each as rendered without the test (float32, 1x1 kernels
    # over batches of 2 and 1 rows)
    eight = render(model, objectives, steps=8, **kwargs).images
    full = render(model, objectives, steps=24, **kwargs).images
    torch.testing.assert_close(images[1], eight[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(images[0], full[0], atol=1e-6, rtol=0)
    # its gradient is the other's: Adam's momentum would have moved it on (had it not been put
    # back); by 16 steps of ~lr before the sigmoid, i.e. by far more than 1e-3
    assert not torch.allclose(eight[1], full[1], atol=1e-3)


def test_without_the_convergence_test_every_image_runs_all_steps():
    model = bn_net()
    objectives = [Channel("conv1", i) for i in range(4)] + [ClassLogit(0), ClassLogit(1)]
    kwargs = dict(image_shape=(1, 12, 12), steps=20, param="fft", seed=3)
    plain = render(model, objectives, **kwargs).images
    for tol in (None, 0, 0.0):
        result = render(model, objectives, converge_tol=tol, **kwargs)
        images, ran = result.images, result.steps
        assert torch.equal(images, plain)
        assert ran.tolist() == [20] * 6
    # with the test, the same model stops some images early (see the next test)
    ran = render(model, objectives, converge_tol=0.03, **kwargs).steps
    assert ran.min() < 20


def test_convergence_is_deterministic_and_per_image():
    """An image's steps and result depend on its own objective only: rendered twice, in chunks,
    or alone (``first_row``), the same."""
    model = bn_net()
    objectives = [Channel("conv1", i) for i in range(4)] + [ClassLogit(0), ClassLogit(1)]
    kwargs = dict(image_shape=(1, 12, 12), steps=40, param="fft", seed=3, converge_tol=0.03)
    result = render(model, objectives, **kwargs)
    images, ran = result.images, result.steps
    result = render(model, objectives, **kwargs)
    again, ran_again = result.images, result.steps
    assert torch.equal(images, again) and torch.equal(ran, ran_again)
    # some images stop as early as they can (two windows), some never: the runs below mix both
    assert ran.min() == 8 and ran.max() == 40, ran.tolist()
    result = render(model, objectives, batch_size=2, **kwargs)
    chunked, ran_chunked = result.images, result.steps
    assert torch.equal(ran_chunked, ran)
    torch.testing.assert_close(chunked, images, atol=1e-5, rtol=0)  # as the chunking test
    result = render(model, objectives[1:4], first_row=1, **kwargs)
    alone, ran_alone = result.images, result.steps
    assert torch.equal(ran_alone, ran[1:4])
    torch.testing.assert_close(alone, images[1:4], atol=1e-5, rtol=0)


def test_convergence_with_candidates_masks_and_continued_images():
    model = bn_net()
    objectives = [ClassLogit(0), ClassLogit(1), ClassLogit(2)]
    kwargs = dict(image_shape=(1, 12, 12), param="fft", seed=4, converge_tol=0.03)
    # with restarts the kept candidate's steps of both phases add up; each phase at least two
    # windows of 4
    ran = render(model, objectives, steps=32, restarts=2, select_after=16, **kwargs).steps
    assert ((ran >= 16) & (ran <= 32)).all() and ran.min() < 32, ran.tolist()
    masks = render(model, objectives, steps=16, mask=True, **kwargs).masks
    assert masks.shape == (3, 1, 12, 12) and float(masks.amax()) == 1.0
    # a continued image that has converged runs two windows only
    params = render(
        model,
        objectives,
        steps=16,
        seed=4,
        image_shape=(1, 12, 12),
        param="fft",
    ).params
    ran = render(model, objectives, steps=16, init=params, **kwargs).steps
    assert ran.min() == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"converge_tol": -0.1}, "`converge_tol` must be a number >= 0"),
        ({"converge_tol": "fast"}, "`converge_tol` must be a number >= 0"),
        ({"converge_window": 0}, "`converge_window` must be a positive integer"),
    ],
)
def test_convergence_argument_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        render(TinyNet(), [Channel("conv1", 0)], image_shape=(1, 8, 8), **kwargs)
