"""Objectives: arithmetic, values, batched scoring, range checks and their errors."""

from __future__ import annotations

import pytest
import torch
from _operations import Operations
from _vis_helpers import assert_unchanged, bn_net, snapshot
from conftest import TinyNet

from lightning_neurons import NeuronsError
from lightning_neurons.visualize import (
    L2,
    Channel,
    ChannelGroup,
    ClassLogit,
    Neuron,
    TotalVariation,
    check_objectives,
    evaluate,
    render,
)
from lightning_neurons.visualize.objectives import IMAGE, LOGITS, Sum
from lightning_neurons.visualize.scoring import BatchScorer


def test_arithmetic_builds_weighted_sums():
    a, b = Channel("conv1", 0), Channel("conv1", 1)
    assert (a + b).terms() == ((1.0, a), (1.0, b))
    assert (a - b).terms() == ((1.0, a), (-1.0, b))
    assert (2 * a).terms() == ((2.0, a),)
    assert (a * 3).terms() == ((3.0, a),)
    assert (a / 4).terms() == ((0.25, a),)
    assert (-a).terms() == ((-1.0, a),)
    assert (a + a - 0.5 * a).terms() == ((1.5, a),)  # equal primitives merge
    assert sum([a, b, 2 * b]).terms() == ((1.0, a), (3.0, b))
    assert (2 * (a - b)).terms() == ((2.0, a), (-2.0, b))
    assert repr(a - 0.5 * ClassLogit(3)) == "Channel('conv1', 0) - 0.5 * ClassLogit(3)"
    assert Channel("conv1", 0) == a and hash(Channel("conv1", 0)) == hash(a)
    assert Channel("conv1", 0) != Neuron("conv1", 0)
    assert (a - b).layers == ("conv1",)
    assert (a + ClassLogit(1)).needs_logits and not a.needs_logits


def test_arithmetic_errors():
    a = Channel("conv1", 0)
    with pytest.raises(NeuronsError, match="only be multiplied by numbers"):
        a * Channel("conv1", 1)
    with pytest.raises(NeuronsError, match="multiplied or divided by numbers"):
        a * "2"
    with pytest.raises(NeuronsError, match="divide an objective by zero"):
        a / 0
    with pytest.raises(TypeError):
        a + 1  # only 0 (for sum()) may be added
    with pytest.raises(NeuronsError, match="at least one term"):
        Sum([])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Channel("conv1", -1), "non-negative integer"),
        (lambda: Channel("conv1", 1.5), "non-negative integer"),
        (lambda: Channel("", 0), "module name"),
        (lambda: Neuron("conv1", 0, y=-2), "`y` must be"),
        (lambda: ChannelGroup("conv1", []), "non-empty list"),
        (lambda: ChannelGroup("conv1", [0, -3]), "non-negative integer"),
        (lambda: ClassLogit(True), "non-negative integer"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(NeuronsError, match=match):
        make()


def test_values_on_known_outputs():
    out = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    assert torch.equal(Channel("l", 1).value(out), out[:, 1].mean(dim=(1, 2)))
    assert torch.equal(Neuron("l", 2).value(out), out[:, 2, 2, 2])  # centre of 4x4
    assert torch.equal(Neuron("l", 2, y=0, x=3).value(out), out[:, 2, 0, 3])
    group = ChannelGroup("l", [0, 2]).value(out)
    assert torch.allclose(group, (out[:, 0].mean(dim=(1, 2)) + out[:, 2].mean(dim=(1, 2))) / 2)
    flat = torch.randn(2, 5)
    assert torch.equal(Channel("l", 4).value(flat), flat[:, 4])
    assert torch.equal(ClassLogit(3).value(flat), flat[:, 3])
    image = torch.zeros(1, 1, 4, 4)
    image[..., :, 2:] = 1.0  # one vertical edge
    assert torch.allclose(TotalVariation().value(image), torch.tensor([4 / 12]))
    assert torch.allclose(L2().value(image), torch.tensor([0.25]))
    assert torch.allclose(L2(centre=0.0).value(image), torch.tensor([0.5]))


def test_batch_scorer_matches_row_by_row():
    gen = torch.Generator().manual_seed(0)
    outputs = {
        "a": torch.randn(6, 4, 3, 3, generator=gen),
        "b": torch.randn(6, 6, generator=gen),
        LOGITS: torch.randn(6, 3, generator=gen),
        IMAGE: torch.rand(6, 1, 6, 6, generator=gen),
    }
    objectives = [
        Channel("a", 3),
        Neuron("a", 1, y=0, x=2) - 0.5 * ClassLogit(2),
        ChannelGroup("a", [0, 1, 3]) + 2 * Channel("b", 5),
        ClassLogit(0) - 0.1 * TotalVariation() - 0.2 * L2(),
        Neuron("b", 4) + Channel("a", 0),
        ChannelGroup("a", [2, 2, 0]),  # a channel twice counts twice, as in value()
    ]
    scorer = BatchScorer(objectives)
    batched = scorer.score_all(outputs)
    expected = torch.stack(
        [obj({k: v[i : i + 1] for k, v in outputs.items()})[0] for i, obj in enumerate(objectives)]
    )
    assert torch.allclose(batched, expected, atol=1e-6)
    assert set(scorer.layers) == {"a", "b"} and scorer.needs_logits and scorer.needs_image
    # one term a row, each type's rows consecutive (a cluster rendering): the rows picked as a
    # view of the layer's output, the values side by side
    objectives = [
        ChannelGroup("a", [0, 1]),
        ChannelGroup("a", [2]),
        Channel("b", 1),
        -Neuron("b", 0),
    ]
    outputs = {"a": outputs["a"][:4], "b": outputs["b"][:4]}
    expected = torch.stack(
        [obj({k: v[i : i + 1] for k, v in outputs.items()})[0] for i, obj in enumerate(objectives)]
    )
    assert torch.allclose(BatchScorer(objectives).score_all(outputs), expected, atol=1e-6)


#: Operations that make a view of a tensor: no kernel on a GPU.
VIEWS = frozenset(
    {"view", "narrow", "slice", "expand", "unsqueeze", "detach", "alias", "as_strided"}
)


@pytest.mark.parametrize("views", [1, 2])
def test_channel_rows_cost_a_gather_and_a_mean_per_layer(views):
    # A channel rendering scores each layer's rows at every step: the operations it dispatches
    # per layer are kernel launches on a GPU, where a rendering step of a deep model at a small
    # image size costs what the host spends queuing them. Picking the rows, weighting them by
    # 1 and adding each layer's values into a running total cost 7 operations a layer forward
    # and 7 backward; a gather and a mean cost 2 and 3 (the mean's division, the gather's zeros
    # and scatter), plus putting the layers' values together.
    layers, per_layer = ["a", "b", "c"], 4
    objectives = [Channel(n, k) for n in layers for k in range(per_layer)] * views
    gen = torch.Generator().manual_seed(0)
    rows = len(objectives)
    outputs = {n: torch.randn(rows, 8, 3, 3, generator=gen, requires_grad=True) for n in layers}
    scorer = BatchScorer(objectives)
    with Operations() as forward:
        total = scorer.score_all(outputs)
    with Operations() as backward:
        total.sum().backward()
    cat_or_scatter = 1 if views == 1 else 3  # views: the rows of a layer are not consecutive
    forward_kernels = [name for name in forward.names if name not in VIEWS]
    backward_kernels = [name for name in backward.names if name not in VIEWS]
    assert len(forward_kernels) == 2 * len(layers) + cat_or_scatter, forward_kernels
    assert len(backward_kernels) <= 3 * len(layers) + 3, backward_kernels
    expected = torch.stack(
        [o({n: v[i : i + 1] for n, v in outputs.items()})[0] for i, o in enumerate(objectives)]
    )
    assert torch.allclose(total.detach(), expected.detach(), rtol=0, atol=1e-6)  # means of 9
    grads = [outputs[n].grad for n in layers]
    for row, objective in enumerate(objectives):  # d total / d output: 1/9 at its channel only
        term = objective.terms()[0][1]
        for n, grad in zip(layers, grads, strict=True):
            want = torch.zeros(8, 3, 3)
            if n == term.layer:
                want[term.index] = 1 / 9
            assert torch.allclose(grad[row], want, rtol=0, atol=1e-7)


def test_range_checks_against_real_widths():
    model = TinyNet()  # conv1: 4 channels of 8x8, fc: 8 units, head: 3 classes
    shapes = check_objectives(model, [Channel("conv1", 3), ClassLogit(2)], (1, 8, 8))
    assert shapes["conv1"] == (4, 8, 8) and shapes[LOGITS] == (3,)
    cases = [
        (Channel("conv1", 4), "channel 4 is out of range; layer 'conv1' has 4 channels"),
        (ChannelGroup("conv2", [1, 6]), "channel 6 is out of range; layer 'conv2' has 6"),
        (Neuron("conv1", 0, y=8, x=0), "outside the 8x8 feature map of layer 'conv1'"),
        (Neuron("fc", 0, y=1, x=1), "no spatial positions"),
        (Channel("fc", 8), "layer 'fc' has 8 channels"),
        (ClassLogit(3), "class 3 is out of range; the model outputs 3 logits"),
        (Channel("conv9", 0), "layer 'conv9' not found in TinyNet"),
    ]
    for objective, match in cases:
        with pytest.raises(NeuronsError, match=match):
            check_objectives(model, objective, (1, 8, 8))


@pytest.mark.parametrize(
    ("objective", "match"),
    [
        (Channel("conv1", 4), "out of range"),
        (ClassLogit(7), "class 7 is out of range"),
        (Channel("features.conv1", 0), "not found"),
    ],
)
def test_render_and_evaluate_raise_before_optimising_and_leave_model_clean(objective, match):
    model = bn_net()
    model.train()
    before = snapshot(model)
    with pytest.raises(NeuronsError, match=match):
        render(model, [Channel("conv1", 0), objective], image_shape=(1, 8, 8), steps=2)
    with pytest.raises(NeuronsError, match=match):
        evaluate(model, [Channel("conv1", 0), objective], torch.rand(2, 1, 8, 8))
    assert_unchanged(model, before)


def test_bad_objective_lists():
    model = TinyNet()
    with pytest.raises(NeuronsError, match="is empty"):
        render(model, [], image_shape=(1, 8, 8))
    with pytest.raises(NeuronsError, match="must hold Objective instances"):
        render(model, [Channel("conv1", 0), "conv1"], image_shape=(1, 8, 8))
    with pytest.raises(NeuronsError, match="one objective per image"):
        evaluate(model, [Channel("conv1", 0)] * 2, torch.rand(3, 1, 8, 8))
