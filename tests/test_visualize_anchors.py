"""Class anchors: each class's mean feature map on real images, and the class images they pull."""

from __future__ import annotations

import pytest
import torch
from _vis_helpers import WIDTHS, assert_unchanged, snapshot, trained_digits_cnn
from torch import nn

from lightning_neurons import NeuronsError
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.models import SmallCNN
from lightning_neurons.visualize import Channel, ClassLogit, continuation, evaluate, render
from lightning_neurons.visualize.anchors import (
    ClassAnchors,
    deepest_with_positions,
)
from lightning_neurons.visualize.continuation import (
    asked_class,
    candidate_scores,
    choose_candidates,
)
from lightning_neurons.visualize.optimise import Ascent
from lightning_neurons.visualize.penalties import Penalties
from lightning_neurons.visualize.sizing import leaf_output_sizes
from lightning_neurons.visualize.transforms import robust_transforms

LAYER = "features.relu3"


def _model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(widths=(4, 8, 16)).eval()


def _layer_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(LAYER).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0].double()


def test_the_anchors_are_each_class_mean_output_and_each_channel_spread():
    model = _model()
    x = torch.rand(23, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([i % 3 for i in range(23)])
    anchors = ClassAnchors.from_images(model, LAYER, x, y, batch_size=5)
    out = _layer_outputs(model, x)  # [23, 16, 8, 8]
    assert anchors.counts == {0: 8, 1: 8, 2: 7}
    for c in range(3):
        # float64 sums of float32 outputs, the mean stored in float32: ~1e-7 relative
        torch.testing.assert_close(anchors.means[c], out[y == c].mean(dim=0).float())
    sd = out.transpose(0, 1).flatten(1).std(dim=1, unbiased=False)
    floor = 0.01 * float(sd.mean())
    torch.testing.assert_close(anchors.scale, sd.clamp_min(floor).float(), rtol=1e-5, atol=1e-7)
    # the batches the images went through do not matter (float64 sums: float32 rounding)
    whole = ClassAnchors.from_images(model, LAYER, x, y, batch_size=64)
    for c in range(3):
        torch.testing.assert_close(whole.means[c], anchors.means[c], rtol=1e-6, atol=1e-7)


def test_an_anchor_is_the_standardised_squared_distance_from_its_class_mean():
    model = _model()
    x = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.arange(12) % 2
    anchors = ClassAnchors.from_images(model, LAYER, x, y)
    probe = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    got = evaluate(model, [anchors[0], anchors[1], anchors[0], anchors[1]], probe)
    out = _layer_outputs(model, probe).float()
    target = torch.stack([anchors.means[c] for c in (0, 1, 0, 1)])
    expected = ((out - target) / anchors.scale.view(1, -1, 1, 1)).pow(2).flatten(1).mean(dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # zero on an output equal to the class mean
    term = anchors[1]
    assert float(term.value(anchors.means[1][None])) == 0.0


def test_the_model_is_left_as_found():
    model = _model()
    model.train()
    model.features.conv1.weight.requires_grad_(False)
    before = snapshot(model)
    x = torch.rand(6, 1, 32, 32)
    ClassAnchors.from_images(model, LAYER, x, torch.arange(6) % 3)
    assert_unchanged(model, before)


def test_objectives_repr_and_classes_without_images():
    model = _model()
    x = torch.rand(4, 1, 32, 32)
    anchors = ClassAnchors.from_images(model, LAYER, x, torch.tensor([0, 0, 2, 2]))
    assert repr(anchors.objective(2)) == f"ClassLogit(2) - 10 * ClassAnchor('{LAYER}', 2)"
    assert anchors.objective(1) == ClassLogit(1)  # no image of class 1: the logit alone
    assert anchors.objective(2, weight=0) == ClassLogit(2)
    assert 2 in anchors and 1 not in anchors
    # taken again (the next epoch's model): another target, the same name, so FeatureVisualizer
    # continues the image
    again = ClassAnchors.from_images(_model(seed=1), LAYER, x, torch.tensor([0, 0, 2, 2]))
    assert repr(again.objective(2)) == repr(anchors.objective(2))
    assert not torch.equal(again.means[2], anchors.means[2])
    with pytest.raises(NeuronsError, match=r"no anchor for class 1.*anchored classes: \[0, 2\]"):
        anchors[1]
    with pytest.raises(NeuronsError, match="`weight` must be a number >= 0"):
        anchors.objective(0, weight=-1)


def test_errors_name_what_is_wrong():
    model = _model()
    x = torch.rand(4, 1, 32, 32)
    with pytest.raises(NeuronsError, match="one label per image"):
        ClassAnchors.from_images(model, LAYER, x, torch.tensor([0, 1]))
    with pytest.raises(NeuronsError, match="features.relu9"):
        ClassAnchors.from_images(model, "features.relu9", x, torch.arange(4))
    assert count_forward_hooks(model) == 0
    broken = _model()
    with torch.no_grad():
        broken.features.conv3.bias[0] = float("nan")
    with pytest.raises(NeuronsError, match="not finite"):
        ClassAnchors.from_images(broken, LAYER, x, torch.arange(4))
    anchors = ClassAnchors.from_images(model, LAYER, x, torch.arange(4))
    with pytest.raises(NeuronsError, match=r"outputs \[B, 16, 4, 4\].*\[B, 16, 8, 8\]"):
        render(model, [anchors.objective(0)], image_shape=(1, 16, 16), steps=1)


def test_the_deepest_layer_with_positions_is_anchored():
    model = _model()
    x = torch.rand(1, 1, 32, 32)
    layers = ["classifier", "features.relu1", LAYER, "features.relu2"]
    assert deepest_with_positions(model, layers, lambda: model(x)) == LAYER
    assert deepest_with_positions(model, ["classifier"], lambda: model(x)) is None
    assert count_forward_hooks(model) == 0


class Tokens(nn.Module):
    """A tiny transformer-like model: patch tokens [B, N, D], then a head on their mean."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 4, stride=4)
        self.block = nn.Linear(8, 8)
        self.act = nn.GELU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, 16, 8]
        return self.head(self.act(self.block(tokens)).mean(dim=1))


def test_token_outputs_are_anchored_channels_first():
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.rand(6, 1, 16, 16)
    anchors = ClassAnchors.from_images(model, "act", x, torch.arange(6) % 3)
    assert anchors.means[0].shape == (8, 16) and anchors.scale.shape == (8,)  # [D, tokens]
    assert deepest_with_positions(model, ["act", "head"], lambda: model(x[:1])) == "act"
    images = render(model, [anchors.objective(c) for c in range(3)], image_shape=(1, 16, 16),
                    steps=3).images  # fmt: skip
    assert torch.isfinite(images).all()


def test_anchored_objectives_ask_for_their_class_and_are_chosen_by_agreement():
    model = _model()
    x = torch.rand(6, 1, 32, 32)
    anchors = ClassAnchors.from_images(model, LAYER, x, torch.arange(6) % 3)
    assert asked_class(anchors.objective(2)) == 2
    assert asked_class(ClassLogit(2) + Channel(LAYER, 0)) is None
    assert asked_class(-1 * ClassLogit(2)) is None
    # agreement compares candidates by the class they ask for, whatever is subtracted
    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    kw = dict(transforms=robust_transforms((1, 32, 32)), seed=0, select_by="agreement")
    plain = choose_candidates(model, [ClassLogit(c) for c in (0, 0, 1, 1, 2, 2)], images, 2, **kw)
    rows = [anchors.objective(c) for c in (0, 0, 1, 1, 2, 2)]
    assert torch.equal(choose_candidates(model, rows, images, 2, **kw), plain)


@pytest.mark.parametrize("select_by", ["agreement", "value"])
def test_several_views_of_the_candidates_a_pass_score_as_one_view_a_pass(select_by, monkeypatch):
    """On an accelerator the candidates' 16 views go through the model several at a time (as
    many as 512 rows hold); the views are the same draws, added in the same order, so the scores
    are those of one view a pass (the CPU's) up to batched float32 kernels."""
    model = _model().eval()
    images = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    rows = [ClassLogit(c) for c in range(6) for _ in range(2)]
    ascent = Ascent(0.0, robust_transforms((1, 32, 32)), None, 0, Penalties(0.0, 0.0, 0.0))
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    alone = candidate_scores(model, rows, images, ascent, 8, select_by=select_by)
    assert sizes == [8] * 16 + [4] * 16  # chunks of 8 rows, one view a pass
    sizes.clear()
    monkeypatch.setattr(continuation, "_views_a_pass", lambda *args: 5)
    together = candidate_scores(model, rows, images, ascent, 8, select_by=select_by)
    assert sizes == [40, 40, 40, 8, 20, 20, 20, 4]
    # agreement counts exactly; 16 summed float32 values (log-probabilities of order 1, or
    # logits) within 1e-4
    assert torch.equal(together[:, 0], alone[:, 0])
    torch.testing.assert_close(together[:, 1], alone[:, 1], rtol=0, atol=1e-4)


def test_views_a_pass_are_one_on_the_cpu_and_what_memory_allows_elsewhere():
    """On ``meta`` (not a CPU, no memory reported: the 4 GiB budget) the views a pass follow
    the model's largest layer output, kept ``NO_GRAD_OUTPUTS`` times."""
    views_a_pass, meta = continuation._views_a_pass, torch.device("meta")
    model = _model()
    assert views_a_pass(model, torch.rand(1, 1, 32, 32), 64, 16, torch.device("cpu")) == 1
    model = model.to(meta)
    small = torch.empty(1, 1, 32, 32, device=meta)
    assert views_a_pass(model, small, 64, 16, meta) == 8  # 512 rows at most
    assert views_a_pass(model, small, 16, 16, meta) == 16  # every view
    large = torch.empty(1, 1, 2048, 2048, device=meta)  # 4,096 times the outputs
    largest = leaf_output_sizes(model, lambda: model(large)).largest
    rows = 4 * 2**30 // (4 * continuation.NO_GRAD_OUTPUTS * largest)
    assert 4 <= rows < 64  # the budget's rows for this model at 2,048 px (16)
    assert views_a_pass(model, large, 64, 16, meta) == 1
    assert views_a_pass(model, large, 4, 16, meta) == rows // 4


@pytest.mark.slow
def test_anchored_class_images_are_nearer_the_class_features_on_a_trained_model():
    model, val_x, val_y, _ = trained_digits_cnn()
    keep = torch.cat([(val_y == c).nonzero()[:8, 0] for c in range(10)])
    anchors = ClassAnchors.from_images(model, LAYER, val_x[keep], val_y[keep])
    settings = dict(image_shape=(1, 32, 32), steps=48, seed=0)
    plain = render(model, [ClassLogit(c) for c in range(10)], **settings).images
    pulled = render(model, [anchors.objective(c) for c in range(10)], **settings).images
    distances = [evaluate(model, [anchors[c] for c in range(10)], im) for im in (plain, pulled)]
    # the anchor is what the second rendering minimises beside the logit: every class nearer
    # its real images' features, the mean by far (measured: 0.66-1.61 against 1.70-16.6, the
    # mean about 6x nearer)
    assert anchors.scale.numel() == WIDTHS[-1]
    assert (distances[1] < distances[0]).all(), distances
    assert distances[1].mean() < 0.5 * distances[0].mean(), distances
    with torch.no_grad():  # and the model still names them (measured: all 10)
        assert (model(pulled).argmax(dim=1) == torch.arange(10)).float().mean() >= 0.8


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_kept_class_images_are_the_first_of_each_class_that_one_process_sees(world):
    from lightning_neurons.callbacks._anchors import ClassImages
    from lightning_neurons.probes import choose_probes, first_per_class

    gen = torch.Generator().manual_seed(world)
    labels = torch.randint(-1, 7, (90,), generator=gen)  # -1 and 6: labels nobody renders
    labels[:3] = torch.tensor([99, -5, 4])  # out of any range
    images = torch.arange(90.0).view(90, 1, 1, 1)  # image i holds i
    classes, k = [4, 0, 2, 5], 3
    candidates = []
    for rank in range(world):
        kept = ClassImages(classes, k, rank, world)
        mine_x, mine_y = images[rank::world], labels[rank::world]
        # batches of varying size (the rows not kept all go to one scratch row)
        for start, stop in ((0, 2), (2, 9), (9, 12), (12, len(mine_y))):
            kept.update(mine_x[start:stop], mine_y[start:stop])
        got = kept.candidates()
        assert all(int(c.image) == c.order for c in got)  # each image with its place
        assert [c.label for c in got] == sorted((c.label for c in got), key=classes.index)
        candidates += got
    chosen = choose_probes(candidates, k, k * len(classes), by_class=True)
    wanted = [i for i in first_per_class(labels.tolist(), [], k, 90) if int(labels[i]) in classes]
    expected = sorted(wanted, key=lambda i: int(labels[i]))  # the first k of each, by class
    assert [c.order for c in chosen] == expected
    assert len(chosen) == k * len(classes)  # 90 random labels hold 3 of each class


def test_kept_class_images_stop_once_every_class_has_its_own():
    from lightning_neurons.callbacks._anchors import ClassImages

    kept = ClassImages([1], per_class=2)
    kept.update(torch.ones(3, 1, 2, 2), torch.tensor([1, 0, 1]))
    assert not kept.full  # known at the next read, not per batch
    assert [c.order for c in kept.candidates()] == [0, 2] and kept.full
    kept.update(torch.zeros(2, 1, 2, 2), torch.tensor([1, 1]))
    assert [c.order for c in kept.candidates()] == [0, 2]
    other = ClassImages([1], per_class=2)
    other.update(torch.ones(1, 1, 2, 2), torch.tensor([1]))
    other.update(torch.zeros(2, 1, 4, 4), torch.tensor([1, 1]))  # another shape: ignored
    assert [c.order for c in other.candidates()] == [0] and not other.full
    nothing = ClassImages([], per_class=2)
    nothing.update(torch.ones(3, 1, 2, 2), torch.tensor([1, 0, 1]))
    assert nothing.full and nothing.candidates() == []
