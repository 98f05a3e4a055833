"""Images that other models recognise: the data prior, the 'maco' parametrization (phase only,
the data's amplitudes), views, n_images with diversity, the transparency mask, ClassLogProb,
and the FeatureVisualizer options that use them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _vis_helpers import BNNet, bn_net
from conftest import TinyData, fast_trainer
from torch import nn

from lightning_neurons import NeuronsError, RenderOptions
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.data import Normalize
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.models import ImageClassifier
from lightning_neurons.state import analysis_mode
from lightning_neurons.visualize import (
    Channel,
    ClassLogit,
    ClassLogProb,
    DataPrior,
    Neuron,
    evaluate,
    render,
)
from lightning_neurons.visualize.anchors import ClassAnchors, deepest_with_positions
from lightning_neurons.visualize.param import maco_image, soft_clip
from lightning_neurons.visualize.penalties import similarity_to_others
from lightning_neurons.visualize.prior import DataPriorEstimate, amplitude_spectrum
from lightning_neurons.visualize.transforms import robust_transforms

# float32 FFTs and convolutions of 8x8-16x16 images: rounding errors are ~1e-7 per value; a few
# hundred of them accumulate to well below 1e-5. Comparisons of the same computation in other
# batch sizes use 1e-5 for that reason; after Adam steps (which divide by the gradient's running
# scale and so can amplify a 1e-7 difference of a tiny gradient to a step of lr) see below.
FFT_TOL = 1e-5


def _uniform_prior(size: int = 16, mean: float = 0.5, std: float = 0.05, seed: int = 0):
    """A prior with flat pixel statistics and a random amplitude spectrum small enough that the
    image never reaches the soft clip's knees (|pattern| * spread stays far below 0.4)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(1, size, size // 2 + 1, generator=g) * 0.02
    return DataPrior(
        magnitude=magnitude,
        mean=torch.full((1, size, size), mean),
        std=torch.full((1, size, size), std),
        count=1,
    )


# ---- the data prior ----------------------------------------------------------------------------


def test_streamed_prior_equals_the_prior_of_all_images():
    images = torch.rand(20, 2, 8, 6, generator=torch.Generator().manual_seed(0))
    estimate = DataPriorEstimate(max_images=None)
    for part in images.split(7):
        estimate.update(part)
    prior = estimate.compute()
    # float64 sums of 20 images: differences are rounding of the float32 result only
    torch.testing.assert_close(prior.mean, images.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(prior.std, images.std(0, unbiased=False), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        prior.magnitude, amplitude_spectrum(images).float(), atol=1e-6, rtol=0
    )
    assert prior.magnitude.shape == (2, 8, 4) and prior.count == 20
    # the zero frequency of the orthonormal FFT is the mean times sqrt(H * W)
    dc = prior.magnitude[:, 0, 0] / (8 * 6) ** 0.5
    torch.testing.assert_close(dc, images.mean(dim=(0, 2, 3)), atol=1e-6, rtol=0)


def test_prior_estimate_is_capped_reset_and_summed_over_processes():
    estimate = DataPriorEstimate(max_images=5)
    estimate.update(torch.rand(4, 1, 8, 8))
    estimate.update(torch.ones(4, 1, 8, 8))  # only one of these is used
    assert estimate.count == 5 and estimate.full
    # a fake two-process sum: twice every sum and count gives the same statistics
    sums = estimate.sums()
    assert sums is not None
    alone, doubled = estimate.compute(), DataPrior.from_sums({k: 2 * v for k, v in sums.items()})
    assert doubled.count == 10
    torch.testing.assert_close(doubled.mean, alone.mean)
    estimate.reset()
    assert estimate.count == 0 and not estimate.full
    with pytest.raises(NeuronsError, match="no images seen yet"):
        estimate.compute()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: DataPriorEstimate(max_images=0), "`max_images` must be a positive integer"),
        (lambda: DataPriorEstimate().update(torch.rand(4, 8, 8)), r"\[N, C, H, W\]"),
        (lambda: amplitude_spectrum(torch.rand(0, 1, 8, 8)), "non-empty"),
    ],
)
def test_prior_errors(call, match):
    with pytest.raises(NeuronsError, match=match):
        call()


def test_prior_estimate_rejects_another_image_shape():
    estimate = DataPriorEstimate()
    estimate.update(torch.rand(2, 1, 8, 8))
    with pytest.raises(NeuronsError, match="same image shape"):
        estimate.update(torch.rand(2, 1, 16, 16))


def test_resized_prior_keeps_brightness():
    prior = DataPrior.from_images(torch.full((3, 1, 8, 8), 0.3))
    big = prior.resized(32, 32)
    assert big.mean.shape == (1, 32, 32) and big.magnitude.shape == (1, 32, 17)
    torch.testing.assert_close(big.mean, torch.full((1, 32, 32), 0.3))
    torch.testing.assert_close(big.magnitude[0, 0, 0] / 32, torch.tensor(0.3))
    assert prior.resized(8, 8) is prior


# ---- the 'maco' parametrization ----------------------------------------------------------------


def test_maco_image_shape_range_and_parameters():
    prior = DataPrior.from_images(
        torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    )
    params, image_fn = maco_image((3, 1, 16, 16), seeds=[0, 1, 2], prior=prior, contrast=3.0)
    assert len(params) == 1 and params[0].shape == (3, 1, 16, 9) and params[0].requires_grad
    image = image_fn()
    assert image.shape == (3, 1, 16, 16)
    assert float(image.min()) >= 0 and float(image.max()) <= 1


def test_maco_image_has_the_priors_mean_and_amplitudes():
    prior = _uniform_prior()
    _, image_fn = maco_image((2, 1, 16, 16), seeds=[0, 1], prior=prior, contrast=2.0)
    image = image_fn().detach()
    assert float((image - 0.5).abs().max()) < 0.4  # inside the soft clip's identity range
    # spatial mean: the prior's (the pattern has no zero frequency)
    torch.testing.assert_close(
        image.mean(dim=(1, 2, 3)), torch.full((2,), 0.5), atol=FFT_TOL, rtol=0
    )
    spectrum = torch.fft.rfft2(image - 0.5, norm="ortho").abs()
    # Columns 1 .. W/2 - 1 hold independent frequencies and keep their amplitude exactly; the
    # first and the Nyquist column are their own mirror images (row k pairs with row H - k),
    # where irfft2 keeps only the Hermitian part of the two, so they are not compared.
    expected = 2.0 * prior.magnitude.expand(2, -1, -1, -1)
    torch.testing.assert_close(spectrum[..., 1:-1], expected[..., 1:-1], atol=FFT_TOL, rtol=0)


def test_phase_only_optimisation_keeps_the_amplitudes():
    model = bn_net(seed=0)
    prior = _uniform_prior()
    images = render(
        model,
        [Channel("conv2", k) for k in range(3)],
        image_shape=(1, 16, 16),
        steps=12,
        lr=0.2,
        param="maco",
        prior=prior,
        contrast=1.0,  # the pattern's amplitudes are then the prior's
        transforms="robust",
    ).images
    assert float((images - 0.5).abs().max()) < 0.4
    spectrum = torch.fft.rfft2(images - images.mean(dim=(2, 3), keepdim=True), norm="ortho").abs()
    expected = prior.magnitude.expand(3, -1, -1, -1)
    torch.testing.assert_close(spectrum[..., 1:-1], expected[..., 1:-1], atol=FFT_TOL, rtol=0)
    # ... while the image did change: the phases moved
    start = render(
        model, [Channel("conv2", k) for k in range(3)], image_shape=(1, 16, 16), steps=1,
        lr=1e-9, param="maco", prior=prior,
    ).images  # fmt: skip
    assert float((images - start).abs().max()) > 1e-3


def test_maco_is_deterministic_with_a_seed_and_rows_are_independent():
    model = bn_net(seed=0)
    prior = DataPrior.from_images(
        torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    )
    objectives = [Channel("conv2", k) for k in range(4)]
    kwargs = dict(image_shape=(1, 16, 16), steps=8, lr=0.05, param="maco", prior=prior, views=2)
    first = render(model, objectives, seed=5, **kwargs).images
    again = render(model, objectives, seed=5, **kwargs).images
    other = render(model, objectives, seed=6, **kwargs).images
    # the same computation twice; only threading could reorder float sums (~1e-7)
    torch.testing.assert_close(first, again, atol=FFT_TOL, rtol=0)
    assert float((first - other).abs().mean()) > 1e-2
    # Row 2 rendered alone, in chunks of one, and in the batch of four: its own seed and the same
    # transforms; other batch sizes change only the kernels' rounding (1e-7), which 8 Adam steps
    # of lr 0.05 through the soft clip keep far below 1e-3 of a [0, 1] pixel.
    alone = render(model, [objectives[2]], **{**kwargs, "seed": 5}).images
    chunked = render(model, objectives, seed=5, batch_size=1, **kwargs).images
    torch.testing.assert_close(chunked, first, atol=1e-3, rtol=0)
    index_two = render(model, objectives[:3], seed=5, **kwargs).images[2]
    torch.testing.assert_close(index_two, first[2], atol=1e-3, rtol=0)
    assert alone.shape == (1, 1, 16, 16)  # row 0 of its own rendering: a different seed
    assert float((alone[0] - first[2]).abs().mean()) > 1e-2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"param": "maco"}, "param='maco' needs the data's statistics"),
        ({"param": "maco", "prior": "digits"}, "`prior` must be a DataPrior"),
        ({"views": 0}, "`views` must be a positive integer"),
        ({"n_images": 0}, "`n_images` must be a positive integer"),
        ({"diversity": -1.0}, "`diversity` must be a number >= 0"),
        ({"transforms": "heavy"}, "or 'robust'"),
    ],
)
def test_render_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        render(bn_net(), [Channel("conv2", 0)], image_shape=(1, 8, 8), steps=1, **kwargs)


def test_maco_errors():
    prior = DataPrior.from_images(torch.rand(4, 3, 8, 8))
    with pytest.raises(NeuronsError, match="3 channels but the rendered images have 1"):
        maco_image((1, 1, 8, 8), seeds=[0], prior=prior)
    with pytest.raises(NeuronsError, match="`contrast` must be a positive number"):
        maco_image((1, 3, 8, 8), seeds=[0], prior=prior, contrast=0)


def test_soft_clip_is_the_identity_inside_and_bounded_outside():
    x = torch.linspace(-3, 4, 701, dtype=torch.float64)
    y = soft_clip(x)
    inside = (x >= 0.1) & (x <= 0.9)
    assert torch.equal(y[inside], x[inside])  # clamp returns the values themselves
    assert bool((y >= 0).all() and (y <= 1).all())
    near = (x > -0.5) & (x < 1.5)  # far out, float64 rounds 1 - 1e-28 to 1
    assert bool((y[near] > 0).all() and (y[near] < 1).all())
    assert bool((y.diff() >= 0).all())  # monotone
    # continuous at the knees (value and slope 1): steps of 0.01 move it by about 0.01
    assert float(y.diff().max()) <= 0.01 + 1e-9
    # the definition: 2 * knee * sigmoid(2 * (x - knee) / knee) below the knee, mirrored above
    low = 0.2 * torch.sigmoid(2 * (x - 0.1) / 0.1)
    high = 1 - 0.2 * torch.sigmoid(2 * (0.9 - x) / 0.1)
    defined = torch.where(x < 0.1, low, torch.where(x > 0.9, high, x))
    torch.testing.assert_close(y, defined, atol=1e-15, rtol=0)  # float64 rounding of both
    x32 = x.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(soft_clip(x32).sum(), x32)
    expected = torch.where((x >= 0.1) & (x <= 0.9), 1.0, 4 * low * (1 - low / 0.2) / 0.2)
    expected = torch.where(x > 0.9, 4 * (1 - high) * (1 - (1 - high) / 0.2) / 0.2, expected)
    torch.testing.assert_close(grad.double(), expected, atol=1e-6, rtol=0)  # float32 slopes


# ---- views, diversity, mask, ClassLogProb --------------------------------------------------------


def test_views_and_robust_transforms():
    model = bn_net(seed=0)
    one = render(model, [Channel("conv2", 0)], image_shape=(1, 16, 16), steps=4, views=1).images
    four = render(model, [Channel("conv2", 0)], image_shape=(1, 16, 16), steps=4, views=4).images
    assert one.shape == four.shape == (1, 1, 16, 16)
    assert float((one - four).abs().max()) > 0  # other views, other gradients
    (warp,) = robust_transforms((1, 32, 32), fill=0.0)
    assert warp.shift == 4 and warp.scale == (0.8, 1.2) and warp.fill == 0.0
    assert count_forward_hooks(model) == 0


def test_n_images_with_diversity_are_less_alike():
    model = bn_net(seed=0)
    kwargs = dict(image_shape=(1, 16, 16), steps=30, lr=0.1, n_images=3, transforms="none")
    objectives = [Channel("conv2", 0), Channel("conv2", 1)]
    plain = render(model, objectives, diversity=0.0, **kwargs).images
    diverse = render(model, objectives, diversity=5.0, diversity_on="pixels", **kwargs).images
    assert plain.shape == diverse.shape == (6, 1, 16, 16)
    similarity = float(similarity_to_others(plain, 3).mean())
    assert float(similarity_to_others(diverse, 3).mean()) < similarity - 0.1
    # images of one objective stay in one chunk: batch_size counts objectives
    chunked = render(
        model, objectives, diversity=5.0, diversity_on="pixels", batch_size=1, **kwargs
    ).images
    torch.testing.assert_close(chunked, diverse, atol=1e-3, rtol=0)


def _gram_similarity(model: nn.Module, images: torch.Tensor, layer: str, group: int) -> float:
    """Mean cosine similarity of the layer's Gram matrices within each group, computed apart
    from the library: einsum over the positions of the hooked output."""
    seen = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: seen.setdefault("out", out.detach())
    )
    model.eval()
    with torch.no_grad():
        model(images)
    handle.remove()
    a = seen["out"].flatten(2)
    grams = torch.einsum("rcp,rdp->rcd", a, a).flatten(1)
    unit = torch.nn.functional.normalize(grams, dim=1).view(-1, group, grams.shape[1])
    cosine = unit @ unit.transpose(1, 2)
    off_diagonal = cosine.sum() - cosine.diagonal(dim1=1, dim2=2).sum()
    return float(off_diagonal / (cosine.shape[0] * group * (group - 1)))


def test_diversity_on_features_makes_the_layer_see_different_things():
    """Olah et al.'s diversity: pixel diversity gives images the layer sees alike (a shifted
    copy has nearly the same Gram matrix); diversity on the Gram matrices changes what fires."""
    model = bn_net(seed=0)
    kwargs = dict(image_shape=(1, 16, 16), steps=40, lr=0.1, n_images=3, transforms="none")
    objectives = [Channel("conv2", i) for i in range(4)]
    settings = {"none": (0.0, "pixels"), "pixels": (5.0, "pixels"), "features": (5.0, "features")}
    similarity = {}
    for name, (weight, on) in settings.items():
        images = render(model, objectives, diversity=weight, diversity_on=on, **kwargs).images
        similarity[name] = _gram_similarity(model, images, "conv2", 3)
    # measured: 1.000 without diversity, 0.993 on pixels, 0.849 on features (any CPU: margins
    # of 0.05 are far above float32 rounding of 40 Adam steps on 16x16 images)
    assert similarity["features"] < similarity["pixels"] - 0.05
    assert similarity["features"] < similarity["none"] - 0.05
    assert count_forward_hooks(model) == 0
    with pytest.raises(NeuronsError, match="`diversity_on` must be one of 'features', 'pixels'"):
        render(model, objectives, diversity_on="gram", **kwargs)


def test_restarts_keep_the_candidate_the_model_scores_best():
    model = bn_net(seed=0)
    objectives = [Channel("conv2", 0), Channel("conv2", 3)]
    kwargs = dict(image_shape=(1, 16, 16), steps=6, lr=0.1, transforms="none")
    best = render(model, objectives, restarts=3, **kwargs).images
    candidates = render(model, objectives, n_images=3, **kwargs).images  # the same rows and seeds
    assert best.shape == (2, 1, 16, 16)
    values = evaluate(model, [o for o in objectives for _ in range(3)], candidates).view(2, 3)
    for j in range(2):
        # without transforms the choice is the highest value (ties aside: values differ here)
        winner = int(values[j].argmax())
        torch.testing.assert_close(best[j], candidates[3 * j + winner], atol=1e-5, rtol=0)
    with pytest.raises(NeuronsError, match="cannot be combined with n_images=2"):
        render(model, objectives, restarts=2, n_images=2, **kwargs)


def test_restarts_by_agreement_keep_the_candidate_the_model_names_most_surely():
    """``select_by="agreement"``: among the candidates whose top class is theirs on the most
    views, the highest log-probability; ``"value"`` the highest logit. Without transforms there
    is one view, so the choice can be recomputed from the candidates' logits."""
    model = bn_net(seed=0, num_classes=3)
    objectives = [ClassLogit(c) for c in range(3)]
    kwargs = dict(image_shape=(1, 16, 16), steps=6, lr=0.1, transforms="none")
    candidates = render(model, objectives, n_images=6, **kwargs).images  # the same rows and seeds
    with torch.no_grad():
        logits = model.eval()(candidates).view(3, 6, 3)
    kept = {}
    for select_by in ("agreement", "value"):
        best = kept[select_by] = render(
            model, objectives, restarts=6, select_by=select_by, **kwargs
        ).images
        for c in range(3):
            top = logits[c].argmax(dim=1) == c
            log_prob = logits[c].log_softmax(dim=1)[:, c]
            if select_by == "agreement" and top.any():
                winner = int(log_prob.masked_fill(~top, -torch.inf).argmax())
            elif select_by == "agreement":
                winner = int(log_prob.argmax())
            else:
                winner = int(logits[c, :, c].argmax())
            torch.testing.assert_close(best[c], candidates[6 * c + winner], atol=1e-5, rtol=0)
    # measured: the rules keep different candidates of class 1 here (its highest logit is not
    # its highest log-probability), so the test tells them apart
    assert not torch.equal(kept["agreement"], kept["value"])
    # a channel objective has no class: "agreement" compares it by its value
    channels = [Channel("conv2", 0), Channel("conv2", 3)]
    by_value = render(model, channels, restarts=3, select_by="value", **kwargs).images
    by_agreement = render(model, channels, restarts=3, select_by="agreement", **kwargs).images
    torch.testing.assert_close(by_agreement, by_value, atol=0, rtol=0)
    with pytest.raises(NeuronsError, match="`select_by` must be one of 'value', 'agreement'"):
        render(model, objectives, restarts=2, select_by="logit", **kwargs)


def test_similarity_to_others():
    a = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    same = torch.cat([a, a, 2 * a + 1])  # centred cosine ignores brightness and contrast
    torch.testing.assert_close(similarity_to_others(same, 3), torch.ones(3), atol=1e-6, rtol=0)
    opposite = torch.cat([a, 1 - a])
    torch.testing.assert_close(similarity_to_others(opposite, 2), -torch.ones(2), atol=1e-6, rtol=0)


def test_mask_marks_the_receptive_field_of_a_neuron():
    model = bn_net(seed=0)
    # conv1 and conv2 are 3x3 with padding 1: Neuron(conv2, y=2, x=2) sees pixels 0..4 only
    result = render(
        model,
        [Neuron("conv2", 0, y=2, x=2), ClassLogit(1)],
        image_shape=(1, 16, 16),
        steps=5,
        transforms="none",
        mask=True,
    )
    images, mask = result.images, result.masks
    assert images.shape == (2, 1, 16, 16) and mask.shape == (2, 1, 16, 16)
    assert float(mask.min()) >= 0 and torch.allclose(mask.flatten(1).amax(1), torch.ones(2))
    outside = mask[0].clone()
    outside[:, :5, :5] = 0
    assert float(outside.abs().max()) == 0.0  # no gradient outside the receptive field
    assert float(mask[1, :, 8:, 8:].max()) > 0  # the class logit reads the whole image


def test_class_log_prob():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    expected = logits.log_softmax(dim=1)
    assert torch.allclose(ClassLogProb(2).value(logits), expected[:, 2])
    batched = ClassLogProb.batched([ClassLogProb(0), ClassLogProb(2)])(logits)
    assert torch.allclose(batched, torch.stack([expected[0, 0], expected[1, 2]]))
    with pytest.raises(NeuronsError, match="class 5 is out of range"):
        ClassLogProb(5).check((3,))


# ---- FeatureVisualizer -------------------------------------------------------------------------


def _module(seed: int = 0) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(BNNet(), num_classes=3, lr=1e-2)


FAST = dict(saliency=[], max_channels=2, on_error="raise")
FAST_RENDER = RenderOptions(steps=3)


def test_visualizer_estimates_the_prior_from_validation_and_judges_classes(tmp_path):
    judge = bn_net(seed=4)
    vis = FeatureVisualizer(
        render=RenderOptions(steps=3, n_images=2), judge=judge, prior_images=10, **FAST
    )
    trainer = fast_trainer(tmp_path, callbacks=[vis], max_epochs=1)
    data = TinyData()
    trainer.fit(_module(), datamodule=data)
    prior = vis.estimated_prior
    assert prior is not None and prior.count == 10  # the first 10 validation images
    torch.testing.assert_close(prior.mean, data.vx[:10].mean(0), atol=1e-6, rtol=0)
    res = vis.results["backbone.relu1"]
    assert res.images.shape == (4, 1, 8, 8)
    assert res.channels.tolist() == [0, 0, 1, 1]  # two images per channel
    classes = vis.results["classes"]
    assert classes.judge_predicted.shape == (3,)
    assert count_forward_hooks(judge) == 0 and judge.training  # left as found (train mode)
    with torch.no_grad():
        expected = judge.eval()(classes.images).argmax(dim=1)
    assert torch.equal(classes.judge_predicted, expected)
    vis.reset_prior()
    assert vis.estimated_prior is None


class NormalizedData(TinyData):
    """Loaders yield normalised model inputs; the transform is a Normalize (invertible)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_transform = Normalize((0.4,), (0.2,))
        self.display_vx = self.vx.clone()
        self.x, self.vx = self.input_transform(self.x), self.input_transform(self.vx)


def test_visualizer_inverts_normalize_for_the_prior(tmp_path):
    vis = FeatureVisualizer(prior_images=12, render=FAST_RENDER, **FAST)
    data = NormalizedData()
    fast_trainer(tmp_path, callbacks=[vis], max_epochs=1, logger=False).fit(
        _module(), datamodule=data
    )
    prior = vis.estimated_prior
    assert prior is not None
    # x * 0.2 + 0.4 undoes the normalisation up to float32 rounding (~1e-7); display images are
    # clamped to the display range [0, 1] (TinyData's brightest classes reach 1.6)
    expected = data.display_vx[:12].clamp(0, 1).mean(0)
    torch.testing.assert_close(prior.mean, expected, atol=1e-5, rtol=0)


class OpaqueTransformData(TinyData):
    def __init__(self) -> None:
        super().__init__()
        self.input_transform = nn.Identity()  # not invertible as far as the callback knows


def test_visualizer_falls_back_to_fft_without_display_images(tmp_path):
    vis = FeatureVisualizer(render=FAST_RENDER, **FAST)
    trainer = fast_trainer(tmp_path, callbacks=[vis], max_epochs=1, logger=False)
    with pytest.warns(UserWarning, match="rendering with param='fft'"):
        trainer.fit(_module(), datamodule=OpaqueTransformData())
    assert vis.results["backbone.relu1"].images.shape == (2, 1, 8, 8)


def test_visualizer_uses_a_given_prior_and_checks_arguments(tmp_path):
    prior = DataPrior.from_images(torch.rand(6, 1, 8, 8))
    vis = FeatureVisualizer(prior=prior, render=FAST_RENDER, **FAST)
    fast_trainer(tmp_path, callbacks=[vis], max_epochs=1, logger=False).fit(
        _module(), datamodule=OpaqueTransformData()
    )
    assert vis.estimated_prior is None  # nothing estimated
    for kwargs, match in [
        ({"prior": torch.rand(1, 8, 8)}, "`prior` must be a DataPrior"),
        ({"judge": "resnet"}, "`judge` must be an nn.Module"),
    ]:
        with pytest.raises(NeuronsError, match=match):
            FeatureVisualizer(**kwargs)
    for kwargs, match in [
        ({"n_images": 0}, "`n_images` must be a positive integer"),
        ({"class_views": 0}, "`class_views` must be a positive integer"),
        ({"class_restarts": 0}, "`class_restarts` must be a positive integer"),
        ({"contrast": 0}, "`contrast` must be a number > 0"),
        ({"param": "cppn"}, "`param` must be one of 'fft', 'pixel', 'maco'"),
    ]:
        with pytest.raises(NeuronsError, match=match):
            RenderOptions(**kwargs)


# ---- cluster images, the prior in the checkpoint -----------------------------------------------


def test_visualizer_renders_neuron_clusters_with_the_judges_verdict(tmp_path):
    from lightning_neurons.callbacks.neuron_clustering import NeuronClustering
    from lightning_neurons.callbacks.tracker import ActivationTracker
    from lightning_neurons.loggers import load_index

    judge = bn_net(seed=4)
    clustering = NeuronClustering(method="kmeans", n_clusters=2, on_error="raise")
    vis = FeatureVisualizer(judge=judge, prior_images=10, render=FAST_RENDER, **FAST)
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(), clustering, vis])
    model = _module()
    trainer.fit(model, datamodule=TinyData())
    # BNNet's ReLU module and its torch.relu call
    assert vis.layers == list(clustering.results) == ["backbone.relu1", "backbone.relu()"]
    assert set(vis.cluster_results) == {"backbone.relu1", "backbone.relu()"}
    for layer, res in vis.cluster_results.items():
        labels = torch.as_tensor(clustering.results[layer].labels)
        assert res.sizes.tolist() == [int((labels == k).sum()) for k in res.clusters]
        assert res.sizes.tolist() == sorted(res.sizes.tolist(), reverse=True)
        profiles = torch.as_tensor(clustering.results[layer].cluster_profiles)
        assert torch.equal(res.preferred_class, profiles[res.clusters].argmax(dim=1))
        assert res.images.shape == (len(res.clusters), 1, 8, 8)
        with torch.no_grad():  # what the model and the judge see, computed apart
            assert torch.equal(res.predicted, model.eval()(res.images).argmax(dim=1))
            assert torch.equal(res.judge_predicted, judge.eval()(res.images).argmax(dim=1))
        assert res.clusters_epoch in (0, 1) and res.epoch == 1
    assert count_forward_hooks(judge) == 0 and count_forward_hooks(model) == 0
    names = {r["name"] for r in load_index(tmp_path / "tb" / "version_0") if r["epoch"] == 1}
    assert "clusters_backbone.relu1" in names


def test_estimated_prior_is_kept_in_the_checkpoint(tmp_path):
    vis = FeatureVisualizer(prior_images=10, render=FAST_RENDER, **FAST)
    trainer = fast_trainer(tmp_path, callbacks=[vis], max_epochs=1, logger=False)
    trainer.fit(_module(), datamodule=TinyData())
    saved = vis.estimated_prior
    assert saved is not None
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    # a resumed run renders with the saved prior: it does not estimate one again
    again = FeatureVisualizer(prior_images=10, render=FAST_RENDER, **FAST)
    resumed = fast_trainer(tmp_path, callbacks=[again], max_epochs=2, logger=False)
    other = TinyData()
    other.vx = other.vx.flip(0)  # other validation images: another prior, were it re-estimated
    resumed.fit(_module(), datamodule=other, ckpt_path=path)
    assert again.estimated_prior is not None
    for name in ("magnitude", "mean", "std"):
        assert torch.equal(getattr(again.estimated_prior, name), getattr(saved, name))
    assert again.estimated_prior.count == saved.count == 10
    assert set(again.results) == {"backbone.relu1", "backbone.relu()", "classes"}  # it rendered


# ---- one set of defaults ------------------------------------------------------------------------


def test_render_given_a_prior_renders_as_the_visualizer_does(tmp_path):
    """The images of a FeatureVisualizer round at its defaults are those of render() called with
    the same model, objectives and prior and nothing else: the same code with the same settings,
    so equal to the last bit. Its class objectives are anchored on the first 8 validation images
    of each class (class by class) at the deepest visualized layer with positions."""
    data = TinyData()
    prior = DataPrior.from_images(data.vx.clamp(0, 1))
    vis = FeatureVisualizer(prior=prior, max_channels=3, saliency=[], on_error="raise")
    module = _module()
    fast_trainer(tmp_path, callbacks=[vis], max_epochs=1, logger=False).fit(
        module, datamodule=TinyData()
    )
    layers = [key for key in vis.results if key != "classes"]
    assert layers
    first = torch.cat([(data.vy == c).nonzero()[:8, 0] for c in range(3)])
    with analysis_mode(module, grad=False):  # (a forward in training mode would move BatchNorm)
        deepest = deepest_with_positions(module, vis.layers, lambda: module(data.vx[:1]))
    anchors = ClassAnchors.from_images(module, deepest, data.vx[first], data.vy[first])
    for key, objectives in (
        *(
            (layer, [Channel(layer, int(c)) for c in vis.results[layer].channels])
            for layer in layers
        ),
        ("classes", [anchors.objective(c) for c in range(3)]),
    ):
        result = render(module, objectives, image_shape=(1, 8, 8), prior=prior)
        assert torch.equal(result.images.cpu(), vis.results[key].images), key
