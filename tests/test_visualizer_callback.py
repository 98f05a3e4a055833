"""FeatureVisualizer: what it renders and logs, its defaults, errors, and that training does not
notice it (bitwise-identical weights)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _vis_helpers import BNNet
from conftest import TinyData, fast_trainer
from ddp import run_ranks
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_neurons.callbacks._visualizer_results as results_module
import lightning_neurons.callbacks.visualizer as visualizer_module
from lightning_neurons import ActivationTracker, NeuronClustering, NeuronsError, RenderOptions
from lightning_neurons.callbacks.visualizer import FeatureVisualizer
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.loggers import artifact_root, load_index
from lightning_neurons.models import ImageClassifier, SmallCNN
from lightning_neurons.visualize.render import prepare_render, run_renders

FAST = dict(render=RenderOptions(steps=3), smoothgrad_samples=2)


def _module(seed: int = 0) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(BNNet(), num_classes=3, lr=1e-2)


class CountingTransform:
    """An input transform (display -> model input) that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x - 0.5) / 0.25


class ShapedData(TinyData):
    """TinyData that, like the package's data modules, tells its image shape and transform."""

    def __init__(self) -> None:
        super().__init__()
        self.image_shape = (1, 8, 8)
        self.input_transform = CountingTransform()
        self.class_names = ["dark", "mid", "bright"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_channels": 0}, "`max_channels` must be an integer >= 1"),
        ({"saliency": ["gradient", "lime"]}, "`saliency` must be one of"),
        ({"classes": [0, -1]}, "`classes` must be a list of non-negative integers"),
        ({"channels": [0, 1]}, "`channels` must be a mapping of layer names"),
        ({"channels": {"conv1": [1, "a"]}}, r"`channels` must be a mapping.*'a'"),
        ({"image_shape": [8, 8]}, "`image_shape` must be"),
        ({"max_probes": 0}, "`max_probes` must be an integer >= 1"),
        ({"every_n_epochs": 0}, "`every_n_epochs` must be an integer >= 1"),
        ({"on_error": "ignore"}, "`on_error` must be one of"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        FeatureVisualizer(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "`steps` must be a positive integer"),
        ({"lr": 0}, "`lr` must be a number > 0"),
        ({"tv": -1}, "`tv` must be a number >= 0"),
        ({"param": "cppn"}, "`param` must be one of 'fft', 'pixel'"),
        ({"transforms": "heavy"}, "`transforms` must be one of"),
        ({"class_select_after": 0}, "`class_select_after` must be a positive integer"),
        ({"class_continue": "last"}, "`class_continue` must be one of 'best', 'all'"),
        (
            {"class_continue": "all", "class_select_after": 4},
            "`class_continue='all'` continues every candidate: leave `class_select_after` unset",
        ),
        ({"continue_steps": 0}, "`continue_steps` must be a positive integer"),
        ({"converge_tol": -0.01}, "`converge_tol` must be a number >= 0"),
        ({"converge_window": 0}, "`converge_window` must be a positive integer"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer"),
        ({"class_anchor": -1}, "`class_anchor` must be a number >= 0"),
        ({"class_anchor_images": 0}, "`class_anchor_images` must be a positive integer"),
        ({"class_anchor_layer": ""}, "`class_anchor_layer` must be a layer name or None"),
    ],
)
def test_render_option_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        RenderOptions(**kwargs)
    with pytest.raises(NeuronsError, match="`render` must be a RenderOptions"):
        FeatureVisualizer(render=kwargs)  # type: ignore[arg-type]


def test_renders_logs_and_writes_files(tmp_path):
    tracker = ActivationTracker(layers=["backbone.conv1", "backbone.conv2"])
    vis = FeatureVisualizer(max_channels=3, on_error="raise", **FAST)
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=[vis, tracker])  # order does not matter
    trainer.fit(module, datamodule=TinyData())

    # layers default to the tracker's; the first max_channels channels of each
    assert vis.layers == ["backbone.conv1", "backbone.conv2"]
    assert set(vis.results) == {"backbone.conv1", "backbone.conv2", "classes"}
    for layer in vis.layers:
        res = vis.results[layer]
        assert res.channels.tolist() == [0, 1, 2]
        assert res.images.shape == (3, 1, 8, 8) and res.epoch == 1
        assert float(res.images.min()) >= 0 and float(res.images.max()) <= 1
        reference = tracker.results[layer].max_activation[:3].float()
        assert torch.allclose(res.reference, reference)
        positive = reference > 0
        expected = res.activation[positive] / reference[positive]
        assert torch.allclose(res.strength[positive], expected)
        assert torch.isnan(res.strength[~positive]).all()
    classes = vis.results["classes"]
    assert classes.channels.tolist() == [0, 1, 2] and classes.images.shape == (3, 1, 8, 8)
    assert classes.probability.shape == (3,) and classes.strength is None
    # the second round continued the images: continue_steps=16 at most, two windows (8) at least
    assert all(((r.steps >= 8) & (r.steps <= 16)).all() for r in vis.results.values())

    # probes: the first validation image of each class, with saliency maps of every method
    sal = vis.saliency_results
    val = TinyData()
    first = [int(torch.nonzero(val.vy == c)[0]) for c in range(3)]
    assert sal.labels.tolist() == [0, 1, 2]
    assert torch.equal(sal.images, val.vx[first])
    assert set(sal.maps) == {"gradient", "smoothgrad", "gradcam"}
    assert all(m.shape == (3, 8, 8) for m in sal.maps.values())

    # TensorBoard: stable tags, one image per epoch each (the step slider); scalars
    log_dir = Path(trainer.logger.log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    expected_images = {
        "preference/backbone.conv1",
        "preference/backbone.conv2",
        "preference/classes",
        "focus/gradient",
        "focus/smoothgrad",
        "focus/gradcam",
    }
    assert expected_images <= set(tags["images"])
    for tag in expected_images:
        assert [e.step for e in events.Images(tag)] == [
            trainer.global_step // 2,
            trainer.global_step,
        ]
    assert "neurons/preference/backbone.conv2/above_max_fraction" in tags["scalars"]
    # the first round from noise: FAST's 3 steps, fewer than a window, all run
    logged = [e.value for e in events.Scalars("neurons/preference/classes/steps")]
    assert logged == [3.0, pytest.approx(float(classes.steps.double().mean()))]

    # files for other analyses
    root = artifact_root(trainer)
    assert root.parent == log_dir
    index = load_index(root)
    files = {r["file"] for r in index if r["kind"] in ("preference", "focus")}
    assert "fit/preference/epoch=001/backbone.conv2.npz" in files
    assert "fit/preference/epoch=001/classes.npz" in files
    assert "fit/focus/epoch=001/saliency.npz" in files
    with np.load(root / "fit/preference/epoch=001/backbone.conv2.npz") as data:
        assert data["images"].shape == (3, 1, 8, 8)
        assert np.array_equal(data["channels"], [0, 1, 2])
    assert count_forward_hooks(module) == 0 and not vis.failures


def _steps(vis: FeatureVisualizer) -> dict[str, list[int]]:
    return {key: res.steps.tolist() for key, res in vis.results.items()}


def test_a_test_run_renders_and_maps_its_test_images(tmp_path):
    """``trainer.test`` with the tracker on the test set (as ``analyze`` runs it): the round runs
    at the test stage's end, its probes are the test set's, its files under ``neurons/test``."""
    tracker = ActivationTracker(layers=["backbone.conv2"], stage="test")
    vis = FeatureVisualizer(max_channels=2, on_error="raise", **FAST)
    data = TinyData()
    trainer = fast_trainer(tmp_path, callbacks=[tracker, vis])
    trainer.test(_module(), datamodule=data)
    assert set(vis.results) == {"backbone.conv2", "classes"}
    sal = vis.saliency_results
    assert sal is not None and sal.labels.tolist() == [0, 1, 2]
    # TinyData's test loader is its validation loader: the first image of each class in it
    first = [int((data.vy == c).nonzero()[0, 0]) for c in range(3)]
    torch.testing.assert_close(sal.inputs, data.vx[first], rtol=0, atol=0)
    assert list((artifact_root(trainer) / "test").rglob("classes.npz"))


def test_later_rounds_continue_the_images_and_a_resumed_run_continues_too(tmp_path):
    # no convergence test: every image runs all its steps, so the steps say where it started
    options = RenderOptions(steps=6, continue_steps=2, converge_tol=None, class_select_after=3)
    tracker = ActivationTracker(layers=["backbone.conv2"])
    vis = FeatureVisualizer(max_channels=2, saliency=[], render=options, on_error="raise")
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=[tracker, vis], max_epochs=2)
    seen = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append(_steps(vis))

    trainer.callbacks.append(Record())
    trainer.fit(module, datamodule=TinyData())
    # two rounds of (conv2 channels, class images): from noise with `steps`, then continued
    assert seen[-2:] == [
        {"backbone.conv2": [6, 6], "classes": [6, 6, 6]},
        {"backbone.conv2": [2, 2], "classes": [2, 2, 2]},
    ]
    state = vis.state_dict()
    assert set(state["params"]) == {"backbone.conv2", "classes"}
    assert state["params"]["classes"]["params"].shape[0] == 3  # the kept candidate of each class

    # the state survives a round trip through a checkpoint-like copy
    copy = FeatureVisualizer(max_channels=2, saliency=[], render=options, on_error="raise")
    copy.load_state_dict(state)
    again = copy.state_dict()
    assert again.keys() == state.keys() and again["params"].keys() == state["params"].keys()
    for key, entry in state["params"].items():
        assert tuple(again["params"][key]["signature"]) == tuple(entry["signature"])
        assert torch.equal(again["params"][key]["params"], entry["params"])

    # a new callback loading the state continues its images exactly as the first one does;
    # another seed does not continue them (they were rendered for seed 0)
    other_seed = FeatureVisualizer(
        max_channels=2, saliency=[], render=dataclasses.replace(options, seed=1)
    )
    other_seed.load_state_dict(state)
    for cb in (vis, copy, other_seed):
        t = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=["backbone.conv2"]), cb])
        t.validate(module, datamodule=TinyData(), verbose=False)
    assert _steps(vis) == _steps(copy) == {"backbone.conv2": [2, 2], "classes": [2, 2, 2]}
    for key in vis.results:
        assert torch.equal(copy.results[key].images, vis.results[key].images), key
    assert _steps(other_seed) == {"backbone.conv2": [6, 6], "classes": [6, 6, 6]}


def test_by_default_the_first_rounds_best_class_candidate_is_continued_alone(tmp_path):
    from lightning_neurons.callbacks import _rendering

    calls: list[tuple[int, int, int]] = []  # class renderings: (rows, restarts, views)
    real = _rendering.prepare_render

    def spy(model, objectives, **kwargs):
        if all(objective.needs_logits for objective in objectives):
            calls.append((len(objectives), kwargs["restarts"], kwargs["views"]))
        return real(model, objectives, **kwargs)

    options = RenderOptions(steps=6, continue_steps=2, converge_tol=None, class_restarts=2)
    assert options.class_continue == "best" and options.class_views == 2
    vis = FeatureVisualizer(max_channels=1, saliency=[], render=options, on_error="raise")
    trainer = fast_trainer(
        tmp_path, callbacks=[ActivationTracker(layers=["backbone.conv2"]), vis], max_epochs=2
    )
    with mock.patch.object(_rendering, "prepare_render", spy):
        trainer.fit(_module(), datamodule=TinyData())
    # the first round: 2 candidates of each of the 3 classes, 2 views each; the later round:
    # the kept candidate of each class alone, with both views
    assert calls[-2:] == [(3, 2, 2), (3, 1, 2)]
    assert _steps(vis)["classes"] == [2, 2, 2]  # continued
    assert vis.state_dict()["params"]["classes"]["params"].shape[0] == 3  # one per class


def test_every_class_candidate_is_continued_and_the_best_of_each_round_shown(tmp_path):
    options = RenderOptions(
        steps=6, continue_steps=2, converge_tol=None, class_restarts=2, class_continue="all"
    )
    module = _module()

    def visualizer(render: RenderOptions = options) -> FeatureVisualizer:
        return FeatureVisualizer(max_channels=1, saliency=[], render=render, on_error="raise")

    vis = visualizer()
    tracker = ActivationTracker(layers=["backbone.conv2"])
    trainer = fast_trainer(tmp_path, callbacks=[tracker, vis], max_epochs=2)
    trainer.fit(module, datamodule=TinyData())
    assert _steps(vis)["classes"] == [2, 2, 2]  # continued in the second round
    kept = vis.state_dict()["params"]["classes"]
    assert kept["params"].shape[0] == 6  # both candidates of each of the 3 classes
    shown = vis.results["classes"].images
    assert shown.shape[0] == 3

    # the shown image of each class is the best of its candidates on the model: a callback that
    # loads the state renders the same candidates and shows the same images
    again = visualizer()
    again.load_state_dict(vis.state_dict())
    twin = visualizer()
    twin.load_state_dict(vis.state_dict())
    for cb in (again, twin):
        t = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=["backbone.conv2"]), cb])
        t.validate(module, datamodule=TinyData(), verbose=False)
    assert _steps(again)["classes"] == [2, 2, 2]
    assert torch.equal(again.results["classes"].images, twin.results["classes"].images)

    # the state of a run that kept one candidate per class is not continued as if it held both
    one = dataclasses.replace(options, class_continue="best")
    single = visualizer(one)
    t = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=["backbone.conv2"]), single])
    t.validate(module, datamodule=TinyData(), verbose=False)
    assert single.state_dict()["params"]["classes"]["params"].shape[0] == 3
    mixed = visualizer()
    mixed.load_state_dict(single.state_dict())
    t = fast_trainer(tmp_path, callbacks=[ActivationTracker(layers=["backbone.conv2"]), mixed])
    t.validate(module, datamodule=TinyData(), verbose=False)
    assert _steps(mixed)["classes"] == [6, 6, 6]  # from noise


@pytest.mark.parametrize("weight", [10.0, 0.0])
def test_class_images_are_anchored_on_the_first_validation_images_of_each_class(tmp_path, weight):
    from lightning_neurons.callbacks._rendering import Renderer
    from lightning_neurons.probes import first_per_class

    rendered: list[list[str]] = []
    real = Renderer.round

    def spy(self, model, objectives, members=None, classes=None):
        if classes:
            rendered.append([repr(o) for o in classes])
        return real(self, model, objectives, members, classes)

    options = RenderOptions(steps=3, converge_tol=None, class_anchor=weight, class_anchor_images=2)
    vis = FeatureVisualizer(max_channels=1, saliency=[], render=options, on_error="raise")
    tracker = ActivationTracker(layers=["backbone.conv1", "backbone.conv2"])
    data = TinyData()
    trainer = fast_trainer(tmp_path, callbacks=[tracker, vis], max_epochs=2)
    with mock.patch.object(Renderer, "round", spy):
        trainer.fit(_module(), datamodule=data)
    kept = vis._anchors.chosen
    if weight == 0:  # the logit alone, and no image kept for it
        assert rendered == [[f"ClassLogit({c})" for c in range(3)]] * 2
        assert kept is None and vis._anchors.kept.images is None
        return
    assert kept is not None and vis._anchors.kept.images is None  # chosen once, buffers freed
    # the deepest visualized layer with positions; the same objectives every round (continued)
    anchor = "ClassAnchor('backbone.conv2', {})"
    assert rendered == [[f"ClassLogit({c}) - 10 * {anchor.format(c)}" for c in range(3)]] * 2
    assert _steps(vis)["classes"] == [16] * 3  # the second round continued the images
    # the first 2 validation images of each class, in the validation order (class by class)
    first = sorted(first_per_class(data.vy.tolist(), [], 2, 6), key=lambda i: int(data.vy[i]))
    assert [c.order for c in kept] == first
    assert torch.equal(torch.stack([c.image for c in kept]), data.vx[first])


def test_cluster_images_continue_the_best_matching_cluster_of_the_last_round():
    from lightning_neurons.callbacks._memory import CLUSTER_MATCH, ContinuationMemory

    memory, signature = ContinuationMemory(), ("maco", (1, 8, 8), 2, 0)
    members = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    params = torch.arange(6.0).reshape(6, 1)  # two images per cluster
    memory.keep("clusters/a", signature, params, members)
    # the same clusters under other ids (another order), one neuron moved: each finds its own
    now = [[5, 6, 7], [0, 1, 2], [3, 4, 8]]
    found = memory.match_clusters("clusters/a", signature, now, n_images=2)
    assert [f.flatten().tolist() for f in found] == [[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]
    # [3, 4, 9, 10, 11] shares 2 of its 5 neurons with [3, 4]: below CLUSTER_MATCH, from noise
    assert CLUSTER_MATCH == 0.5
    assert memory.match_clusters("clusters/a", signature, [[3, 4, 9, 10, 11]], 2) == [None]
    # other settings (signature), or a memory that keeps nothing: from noise
    assert memory.match_clusters("clusters/a", ("fft", (1, 8, 8), 2, 0), now, 2) == [None] * 3
    off = ContinuationMemory(enabled=False)
    off.keep("clusters/a", signature, params, members)
    assert off.match_clusters("clusters/a", signature, now, 2) == [None] * 3
    assert off.state_dict() == {}


#: The layers the Renderer tests render: BNNet's ReLU module and its second convolution.
RENDERED = ["backbone.relu1", "backbone.conv2"]
#: What prepares each rendering of a FeatureVisualizer round (spied on to count renderings).
PREPARE = "lightning_neurons.callbacks._rendering.prepare_render"


def _renderer(options: RenderOptions):
    """FeatureVisualizer's Renderer of 12 px grey images of :data:`RENDERED`, one process, with a
    continuation memory of its own."""
    from lightning_neurons.batch import BatchReader
    from lightning_neurons.callbacks._memory import ContinuationMemory
    from lightning_neurons.callbacks._plan import VisualizerPlan
    from lightning_neurons.callbacks._rendering import Renderer

    plan = VisualizerPlan((1, 12, 12), None, RENDERED, {}, [], None, False)
    return Renderer(options, plan, BatchReader(), None, ContinuationMemory())


def test_channel_images_of_every_layer_are_rendered_together_as_layer_by_layer():
    from lightning_neurons.visualize import Channel

    model, layers = _module().eval(), RENDERED
    options = RenderOptions(steps=6, continue_steps=2, converge_tol=None, param="fft", n_images=2)
    renderer, apart = _renderer(options), _renderer(options)
    wanted = {
        layers[0]: [Channel(layers[0], i) for i in (0, 2)],
        layers[1]: [Channel(layers[1], 5)],
    }
    with mock.patch(PREPARE, wraps=prepare_render) as spy:
        done = renderer.round(model, wanted).channels
        assert spy.call_count == 1  # every layer in one rendering
        # the next round: layer 1 asks for other channels, so it starts from noise
        wanted[layers[1]] = [Channel(layers[1], 1), Channel(layers[1], 3)]
        again = renderer.round(model, wanted).channels
        assert spy.call_count == 3  # the continued layer in one rendering, the new one in another
    for layer, objectives in {**wanted, layers[1]: [Channel(layers[1], 5)]}.items():
        images, steps = apart.images(model, layer, objectives)  # each layer alone, from its noise
        torch.testing.assert_close(done[layer][0], images, atol=1e-5, rtol=0)
        assert torch.equal(done[layer][1], steps)
    assert [v[1].tolist() for v in again.values()] == [[2] * 4, [6] * 4]  # continued: 2 steps
    assert [v[0].shape[0] for v in again.values()] == [4, 4]
    state = renderer.memory.state_dict()  # each layer's parameters kept apart, as layer by layer
    assert state[layers[1]]["params"].shape[0] == 4
    assert state.keys() == apart.memory.state_dict().keys()


def test_cluster_images_of_every_layer_are_rendered_together_and_continued_per_layer():
    from lightning_neurons.visualize import render
    from lightning_neurons.visualize.objectives import ChannelGroup

    model, layers = _module().eval(), RENDERED
    options = RenderOptions(steps=6, continue_steps=2, converge_tol=None, param="fft")
    renderer = _renderer(options)
    first = {layers[0]: [[0, 1], [2, 3]], layers[1]: [[3, 4, 5]]}
    with mock.patch(PREPARE, wraps=prepare_render) as spy:
        done = renderer.round(model, {}, first).clusters
        assert spy.call_count == 1  # every layer's clusters in one batch
        # the next round: layer 0's clusters moved a neuron (each still shares at least half of
        # its neurons with one of the last round); layer 1's cluster has another id, next to a
        # new one
        second = {layers[0]: [[0, 1, 3], [2]], layers[1]: [[0], [3, 4, 5]]}
        again = renderer.round(model, {}, second).clusters
        assert spy.call_count == 3  # the continued clusters in one batch, the new ones in another
    # the rows of the one batch went back to their layers and clusters: the images are those of
    # one rendering of the same objectives in the same order
    objectives = [ChannelGroup(layer, group) for layer, groups in first.items() for group in groups]
    alone = render(
        model, objectives, image_shape=(1, 12, 12), steps=6, lr=options.lr, param="fft",
        transforms=options.transforms, seed=0, contrast=options.contrast, views=1,
        converge_tol=0.0, select_by="value",
    )  # fmt: skip
    assert torch.equal(torch.cat([done[layers[0]][0], done[layers[1]][0]]), alone.images)
    assert [v[1].tolist() for v in done.values()] == [[6, 6], [6]]
    assert [v[1].tolist() for v in again.values()] == [[2, 2], [6, 2]]  # continued: 2 steps
    assert [v[0].shape[0] for v in again.values()] == [2, 2]
    # the memory keeps each layer's clusters apart, for the next round to match
    state = renderer.memory.state_dict()
    assert state["clusters/" + layers[1]]["members"] == [[0], [3, 4, 5]]
    assert state["clusters/" + layers[0]]["params"].shape[0] == 2


def test_channels_and_clusters_of_a_round_render_together_as_apart():
    from lightning_neurons.visualize import Channel
    from lightning_neurons.visualize.objectives import ChannelGroup

    model, layers = _module().eval(), RENDERED
    # a convergence test that stops some images before others: each image's steps are its own
    options = RenderOptions(
        steps=8, continue_steps=4, converge_tol=0.05, converge_window=2, param="fft", n_images=2
    )
    together, apart = _renderer(options), _renderer(options)
    wanted = {
        layers[0]: [Channel(layers[0], i) for i in (0, 2)],
        layers[1]: [Channel(layers[1], 5)],
    }
    first = {layers[0]: [[0, 1], [2, 3]], layers[1]: [[3, 4, 5]]}
    second = {layers[0]: [[0, 1, 3], [2]], layers[1]: [[0], [3, 4, 5]]}  # one new cluster
    rounds = []
    with mock.patch(PREPARE, wraps=prepare_render) as spy:
        for members, calls in ((first, 1), (second, 2)):  # from noise; continued + the new one
            before = spy.call_count
            rounds.append(together.round(model, wanted, members))
            assert spy.call_count - before == calls
    for (channels, clusters, _), members in zip(rounds, (first, second), strict=True):
        alone = apart.round(model, wanted).channels, apart.round(model, {}, members).clusters
        for done, solo in zip((channels, clusters), alone, strict=True):
            assert done.keys() == solo.keys()
            for layer, (images, steps) in solo.items():
                # the same rows from the same noise and transforms, batched with other rows:
                # float32 kernels see other batches (~1e-7 relative per value), at most 8 Adam
                # steps of about lr each; images in [0, 1]
                torch.testing.assert_close(done[layer][0], images, atol=1e-4, rtol=0)
                assert torch.equal(done[layer][1], steps), layer
    # and the first round is what renderings of each layer's channels, and of every cluster
    # from its own place in the list, give
    noise = _renderer(options)
    fresh = [ChannelGroup(layer, group) for layer, groups in first.items() for group in groups]
    result = run_renders(model, [noise.job(model, fresh, None, 0, False, 1)])[0]
    images, steps = result.images.cpu(), result.steps
    clustered = [torch.cat(found) for found in zip(*rounds[0].clusters.values(), strict=True)]
    torch.testing.assert_close(clustered[0], images, atol=1e-4, rtol=0)
    assert torch.equal(clustered[1], steps)
    for layer, objectives in wanted.items():
        images, steps = noise.images(model, layer, objectives)
        torch.testing.assert_close(rounds[0].channels[layer][0], images, atol=1e-4, rtol=0)
        assert torch.equal(rounds[0].channels[layer][1], steps)
    ran = torch.cat([steps for part in rounds[0][:2] for _, steps in part.values()])
    assert ran.max() == 8 and ran.min() < 8, ran.tolist()  # both kinds of image were rendered
    assert max(max(s.tolist()) for _, s in rounds[1].channels.values()) <= 4  # continued
    kept, solo = together.memory.state_dict(), apart.memory.state_dict()
    assert kept.keys() == solo.keys() == {*layers, *(f"clusters/{layer}" for layer in layers)}
    for key, entry in solo.items():  # each layer's channels and clusters kept apart
        assert kept[key]["params"].shape == entry["params"].shape
        assert kept[key].get("members") == entry.get("members")


def test_logits_of_many_images_go_through_the_model_in_bounded_passes():
    from lightning_neurons.batch import BatchReader
    from lightning_neurons.callbacks._plan import VisualizerPlan
    from lightning_neurons.callbacks._visualizer_results import logits, rows_at_once

    model = _module().eval()
    plan = VisualizerPlan((1, 12, 12), None, ["backbone.relu1"], {}, [], None, False)
    images = torch.rand(10, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    try:
        apart = logits(model, images, plan, BatchReader(), rows=4)
        whole = logits(model, images, plan, BatchReader())
    finally:
        handle.remove()
    assert sizes == [4, 4, 2, 10]
    # the same images in other batches (eval mode): only how the float32 kernels batch differs
    torch.testing.assert_close(apart, whole, atol=1e-5, rtol=1e-5)
    assert 4 <= rows_at_once(model, plan, 10) <= 10
    assert rows_at_once(model, plan, 3) == 3


@pytest.mark.parametrize(("tol", "first", "later"), [(1e6, 4, 4), (None, 12, 8), (0.0, 12, 8)])
def test_rounds_stop_at_convergence_and_log_the_steps_they_ran(tmp_path, tol, first, later):
    """converge_tol=1e6: every value "rises" by less than a million times itself, so every image
    stops as early as it can, at the second check in a row that found it calm, two windows
    (4 steps) in; None or 0: the full counts."""
    vis = FeatureVisualizer(
        max_channels=2,
        saliency=[],
        render=RenderOptions(steps=12, continue_steps=8, converge_tol=tol, converge_window=2),
        on_error="raise",
    )
    tracker = ActivationTracker(layers=["backbone.conv2"])
    trainer = fast_trainer(tmp_path, callbacks=[tracker, vis], max_epochs=2)
    seen = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append({k: r.steps.tolist() for k, r in vis.results.items()})

    trainer.callbacks.append(Record())
    trainer.fit(_module(), datamodule=TinyData())
    # rounds after each of the two epochs (and none at the sanity check): from noise, continued
    assert seen[-2:] == [
        {"backbone.conv2": [first] * 2, "classes": [first] * 3},
        {"backbone.conv2": [later] * 2, "classes": [later] * 3},
    ]
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("neurons/preference/backbone.conv2/steps")]
    assert logged == [first, later]
    with np.load(artifact_root(trainer) / "fit/preference/epoch=001/classes.npz") as data:
        assert data["steps"].tolist() == [later] * 3


def test_at_many_classes_a_spread_subset_of_classes_is_rendered():
    from lightning_neurons.callbacks._plan import default_classes

    assert default_classes(10, 16) == list(range(10))
    assert default_classes(1000, 16) == [i * 62 + i // 2 for i in range(16)]
    assert default_classes(1000, 16)[-1] == 937 and default_classes(1000, None) == list(range(1000))
    with pytest.raises(NeuronsError, match="`max_classes` must be an integer >= 1"):
        FeatureVisualizer(max_classes=0)


def test_defaults_without_tracker_from_data_module(tmp_path):
    data = ShapedData()
    vis = FeatureVisualizer(
        layers=["backbone.conv*"],
        channels={"backbone.conv2": [5, 1]},
        max_channels=None,
        classes=[2],
        saliency=["gradcam"],
        gradcam_layer="backbone.conv1",
        on_error="raise",
        **FAST,
    )
    trainer = fast_trainer(tmp_path, callbacks=[vis], max_epochs=1)
    trainer.fit(_module(), datamodule=data)
    assert vis.layers == ["backbone.conv1", "backbone.conv2"]
    assert vis.results["backbone.conv1"].channels.tolist() == [0, 1, 2, 3]  # all 4
    assert vis.results["backbone.conv2"].channels.tolist() == [5, 1]
    assert vis.results["backbone.conv2"].strength is None  # no tracker: no reference
    assert vis.results["classes"].channels.tolist() == [2]
    assert list(vis.saliency_results.maps) == ["gradcam"]
    assert data.input_transform.calls > 0  # the data module's transform was used


def test_probes_are_bounded_and_validate_runs_a_round(tmp_path):
    vis = FeatureVisualizer(max_channels=1, probes_per_class=5, max_probes=4, **FAST)
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False)
    trainer.validate(_module(), datamodule=TinyData())
    assert vis.saliency_results.images.shape == (4, 1, 8, 8)
    # default layers: BNNet's ReLU module and its torch.relu call
    assert set(vis.results) == {"backbone.relu1", "backbone.relu()", "classes"}


def test_image_shape_from_the_batches_without_saliency(tmp_path):
    vis = FeatureVisualizer(max_channels=1, classes=[], saliency=[], on_error="raise", **FAST)
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False, max_epochs=1)
    trainer.fit(_module(), datamodule=TinyData())  # no image_shape attribute
    assert set(vis.results) == {"backbone.relu1", "backbone.relu()"}  # classes=[]: none
    assert vis.results["backbone.relu1"].images.shape == (1, 1, 8, 8)
    assert vis.saliency_results is None


def test_seeded_fit_is_bitwise_identical_with_and_without_visualizer(tmp_path):
    def fit(callbacks):
        module = _module(seed=3)
        trainer = fast_trainer(tmp_path, callbacks=callbacks, logger=False, max_epochs=2)
        trainer.fit(module, datamodule=TinyData())
        return {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state()

    plain, plain_rng = fit([])
    vis = FeatureVisualizer(max_channels=2, on_error="raise", **FAST)
    seen, seen_rng = fit([ActivationTracker(), vis])
    assert vis.results  # it did run
    assert plain.keys() == seen.keys()
    for key in plain:
        assert torch.equal(plain[key], seen[key]), key
    assert torch.equal(plain_rng, seen_rng)


def test_configuration_errors_raise_even_with_on_error_warn(tmp_path):
    trainer = fast_trainer(
        tmp_path, callbacks=[FeatureVisualizer(layers=["backbone.conv9"])], logger=False
    )
    with pytest.raises(NeuronsError, match="layer 'backbone.conv9' not found"):
        trainer.fit(_module(), datamodule=TinyData())
    vis = FeatureVisualizer(
        layers=["backbone.conv*"], channels={"backbone.conv1": [0, 4]}, on_error="warn", **FAST
    )
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False)
    with pytest.raises(
        NeuronsError, match="channel 4 is out of range; layer 'backbone.conv1' has 4"
    ):
        trainer.fit(module, datamodule=TinyData())
    assert count_forward_hooks(module) == 0
    trainer = fast_trainer(
        tmp_path, callbacks=[FeatureVisualizer(classes=[3], **FAST)], logger=False
    )
    with pytest.raises(NeuronsError, match="class 3 is out of range"):
        trainer.fit(_module(), datamodule=TinyData())
    vis = FeatureVisualizer(channels={"backbone.fc": [0]}, layers=["backbone.conv1"])
    trainer = fast_trainer(tmp_path, callbacks=[vis], logger=False)
    with pytest.raises(NeuronsError, match="`channels` names layers"):
        trainer.fit(_module(), datamodule=TinyData())


class BrokenJudge(torch.nn.Module):
    """A judge whose every forward pass fails (as one out of memory would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory")


def test_a_failing_part_warns_the_rest_is_kept_and_training_goes_on(tmp_path):
    """The judge fails the class images: the channel images and saliency maps are kept and
    logged, every epoch."""
    vis = FeatureVisualizer(judge=BrokenJudge(), **FAST)
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=[vis])
    with pytest.warns(UserWarning, match="class images failed and was skipped"):
        trainer.fit(module, datamodule=TinyData())
    assert trainer.current_epoch == 2 and len(vis.failures) == 2
    assert all(f.startswith("class images: RuntimeError: out of memory") for f in vis.failures)
    assert count_forward_hooks(module) == 0
    assert vis.results and "classes" not in vis.results and vis.saliency_results is not None
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0})
    images = set(events.Reload().Tags()["images"])
    assert {"preference/backbone.relu1", "focus/gradient", "focus/gradcam"} <= images
    assert "preference/classes" not in images
    vis = FeatureVisualizer(judge=BrokenJudge(), on_error="raise", **FAST)
    with pytest.raises(RuntimeError, match="out of memory"):
        fast_trainer(tmp_path, callbacks=[vis], logger=False).fit(_module(), datamodule=TinyData())


def _validate_visualizer(rank: int, world_size: int, out: Path) -> dict:
    """FeatureVisualizer's round after one validation of a fixed, untrained model on digits:
    one process sees 6 batches of 32, each of two ranks the 3 of its shard (the same 192
    images), so the two runs must find the same probes, prior and images."""
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(widths=(4, 8)), num_classes=10)
    # a convergence test that stops some images early and not others (decided per image: the
    # DDP split does not change an image's steps)
    options = RenderOptions(steps=8, converge_tol=0.05, converge_window=2)
    vis = FeatureVisualizer(
        max_channels=2, smoothgrad_samples=2, prior_images=64, on_error="raise", render=options
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        limit_val_batches=6 // world_size,
        logger=TensorBoardLogger(str(out / f"world{world_size}"), name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ActivationTracker(), NeuronClustering(method="kmeans", n_clusters=2), vis],
    )
    trainer.validate(model, datamodule=DigitsDataModule(batch_size=32), verbose=False)
    sal = vis.saliency_results
    prior = vis.estimated_prior
    return {
        "images": {k: v.images for k, v in vis.results.items()},
        "steps": {k: v.steps for k, v in vis.results.items()},
        "strength": {k: v.strength for k, v in vis.results.items() if k != "classes"},
        "params": {k: e["params"].shape[0] for k, e in vis.state_dict()["params"].items()},
        "clusters": {k: (v.images, v.steps) for k, v in vis.cluster_results.items()},
        "probes": (sal.inputs, sal.labels, sal.predicted),
        "maps": sal.maps,
        "prior": (prior.magnitude, prior.mean, prior.std, prior.count),
        "anchors": vis._anchors.chosen,
    }


@pytest.mark.slow
def test_two_process_ddp_shares_the_rendering_and_gives_the_images_of_one_process(tmp_path):
    (one,) = run_ranks(_validate_visualizer, 1, tmp_path)
    two = run_ranks(_validate_visualizer, 2, tmp_path)
    assert set(one["images"]) == {
        "backbone.features.relu1",
        "backbone.features.relu2",
        "classes",
    }
    for got in two:  # every rank has every image, map and the prior
        assert got["images"].keys() == one["images"].keys()
        for key, solo in one["images"].items():
            # the same rows from the same noise and transforms, in other batches: float32
            # kernels batched differently, at most 8 Adam steps (each about lr x sign(gradient));
            # images in [0, 1]
            torch.testing.assert_close(got["images"][key], solo, atol=1e-4, rtol=0)
            assert torch.equal(got["steps"][key], one["steps"][key]), key
        for key, solo in one["strength"].items():  # the tracker's maxima synced over the ranks
            # (NaN: a channel no validation image activates; images within 1e-4 above)
            torch.testing.assert_close(
                got["strength"][key], solo, atol=1e-3, rtol=1e-3, equal_nan=True
            )
        # one set of parameters per kept image, the clusters' on every rank (they share the
        # rendering)
        assert got["params"] == one["params"]
        # the probes: the first validation image of each class, in the validation order
        for mine, solo in zip(got["probes"], one["probes"], strict=True):
            assert torch.equal(mine, solo)
        for method, solo in one["maps"].items():
            # each rank mapped 5 of the 10 probes, one process all 10 in one batch: every map is
            # the image's own gradient (eval mode) and SmoothGrad's noise is drawn per probe
            # index, so only the batch the float32 kernels see differs (~1e-7 relative per
            # value, a few layers deep): 1e-5 relative to the maps' scale
            scale = float(solo.abs().max())
            torch.testing.assert_close(got["maps"][method], solo, rtol=1e-5, atol=1e-5 * scale)
        # the data prior: each rank streamed 32 images of its shard, the shards interleave the
        # validation set: the first 64 images, summed in float64 (equal up to the float32
        # result's rounding, ~1e-7 relative)
        assert got["prior"][3] == one["prior"][3] == 64
        for mine, solo in zip(got["prior"][:3], one["prior"][:3], strict=True):
            torch.testing.assert_close(mine, solo, atol=1e-6, rtol=1e-6)
    # the class anchors' images: those one process keeps (the first 8 of each class) from the
    # ranks' candidates

    assert len(one["anchors"]) == 80
    for got in two:  # every rank chose, from both ranks' images, those one process keeps
        both = got["anchors"]
        assert [(c.order, c.label) for c in both] == [(c.order, c.label) for c in one["anchors"]]
        for mine, solo in zip(both, one["anchors"], strict=True):
            assert torch.equal(mine.image, solo.image)
    ran = torch.cat(list(one["steps"].values()))
    assert ran.max() == 8 and ran.min() < 8, ran.tolist()  # both kinds of image were rendered
    # NeuronClustering's clusters are on rank zero: it chose them, the ranks rendered them
    # together with the channels, and it shows those of one process (tolerance as above)
    layers = {"backbone.features.relu1", "backbone.features.relu2"}
    assert one["clusters"].keys() == two[0]["clusters"].keys() == layers
    assert two[1]["clusters"] == {}
    assert {f"clusters/{layer}" for layer in layers} <= one["params"].keys()
    for layer, (images, steps) in one["clusters"].items():
        assert images.shape[0] == 2  # n_clusters
        torch.testing.assert_close(two[0]["clusters"][layer][0], images, atol=1e-4, rtol=0)
        assert torch.equal(two[0]["clusters"][layer][1], steps)
    # the probes are the first validation image of each class, in the validation order
    data = DigitsDataModule(batch_size=32)
    data.setup()
    val_x, val_y = data.val_set.tensors[:2]
    first = sorted(int(torch.nonzero(val_y == c)[0, 0]) for c in range(10))
    assert torch.equal(one["probes"][0], val_x[first])
    assert one["probes"][1].tolist() == val_y[first].tolist()
    records = [
        r
        for r in load_index(tmp_path / "world2" / "tb" / "version_0")
        if r["kind"] in ("preference", "focus")
    ]
    assert sorted(r["name"] for r in records) == [  # written once, by rank zero
        "backbone.features.relu1",
        "backbone.features.relu2",
        "classes",
        "clusters_backbone.features.relu1",
        "clusters_backbone.features.relu2",
        "saliency",
    ]


#: What fails in ``_failing_round``: the module and function patched, on which rank.
FAILING = {
    "saliency": (results_module, "saliency", 1),
    "clusters": (visualizer_module, "choose_clusters", 0),
}


def _failing_round(rank: int, world_size: int, where: str) -> dict:
    """A round whose saliency fails on rank 1 alone, or whose choice of the clusters to render
    (on rank zero, which holds NeuronClustering's results) fails (``on_error="warn"``)."""
    module, name, failing_rank = FAILING[where]
    real = getattr(module, name)

    def failing(*args, **kwargs):
        if rank == failing_rank:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(SmallCNN(widths=(4, 8)), num_classes=10)
    vis = FeatureVisualizer(
        max_channels=1,
        classes=[],
        saliency=["gradient"],
        enable_logging=False,
        render=RenderOptions(steps=1, param="fft"),
    )
    clustering = [ActivationTracker(), NeuronClustering(method="kmeans", n_clusters=2)]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp",
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*(clustering if where == "clusters" else []), vis],
    )
    with mock.patch.object(module, name, failing):
        trainer.validate(model, datamodule=DigitsDataModule(batch_size=32), verbose=False)
    kept = vis.saliency_results is not None, bool(vis.results), bool(vis.cluster_results)
    return {"failures": vis.failures, "kept": kept}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("saliency", "saliency failed on rank 1: RuntimeError: out of memory (simulated)"),
        (
            "clusters",
            "reading NeuronClustering's clusters failed on rank 0: RuntimeError: out of memory",
        ),
    ],
)
def test_two_process_ddp_a_step_failing_on_one_rank_is_reported_on_both(where, message):
    # a rank left waiting in a collective would end at the harness's timeout
    for summary in run_ranks(_failing_round, 2, where, timeout=180):
        (failure,) = summary["failures"]
        assert message in failure
        # the failing part's results were not kept, on either rank; the renderings were
        saliency = where != "saliency"
        assert summary["kept"] == (saliency, True, False)


#: Every FeatureVisualizer option, set to a value other than its default, in a LightningCLI YAML
#: callbacks block (``prior`` holds tensors: it is given in Python, not in YAML).
CLI_CONFIG = """
trainer:
  accelerator: cpu
  logger: false
  callbacks:
    - class_path: lightning_neurons.FeatureVisualizer
      init_args:
        layers: [backbone.features.relu2]
        channels: {backbone.features.relu2: [3, 1]}
        max_channels: 4
        classes: [1, 7]
        max_classes: 5
        saliency: [gradcam]
        gradcam_layer: backbone.features.conv2
        probes_per_class: 2
        max_probes: 6
        image_shape: [1, 32, 32]
        input_transform:
          class_path: lightning_neurons.data.Normalize
          init_args: {mean: [0.5], std: [0.25]}
        render:
          steps: 7
          continue_steps: 3
          converge_tol: 0.01
          converge_window: 5
          lr: 0.05
          param: fft
          transforms: standard
          contrast: 1.5
          class_contrast: 0.7
          views: 2
          class_views: 3
          class_restarts: 2
          class_select_after: 4
          class_select_by: value
          n_images: 2
          diversity: 0.5
          diversity_on: pixels
          l2: 0.01
          tv: 0.02
          seed: 9
          batch_size: 8
        clusters: false
        max_clusters: 3
        prior_images: 100
        judge:
          class_path: lightning_neurons.models.SmallCNN
          init_args: {widths: [4, 8]}
        smoothgrad_samples: 5
        every_n_epochs: 3
        enable_logging: false
        on_error: raise
model:
  class_path: lightning_neurons.models.ImageClassifier
  init_args:
    backbone:
      class_path: lightning_neurons.models.SmallCNN
    num_classes: 10
data:
  class_path: lightning_neurons.data.DigitsDataModule
"""


def _visualizer_from_yaml(config: Path) -> FeatureVisualizer:
    """The FeatureVisualizer a LightningCLI makes of the config file ``config``."""
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(config)],
        run=False,
    )
    (vis,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, FeatureVisualizer)]
    return vis


def test_lightning_cli_configures_every_option_from_yaml(tmp_path, monkeypatch):
    from lightning_neurons.data import Flatten, Normalize
    from lightning_neurons.models import SmallCNN

    monkeypatch.setattr(sys, "argv", ["lightning-neurons"])  # pytest's own are not the CLI's
    config = tmp_path / "config.yaml"
    config.write_text(CLI_CONFIG)
    vis = _visualizer_from_yaml(config)
    assert vis.layer_patterns == ["backbone.features.relu2"]
    assert vis.channels == {"backbone.features.relu2": [3, 1]}
    assert (vis.max_channels, vis.classes, vis.max_classes) == (4, [1, 7], 5)
    assert vis.saliency_methods == ["gradcam"] and vis.gradcam_layer == "backbone.features.conv2"
    assert (vis.probes_per_class, vis.max_probes, vis.image_shape) == (2, 6, (1, 32, 32))
    assert isinstance(vis.input_transform, Normalize)
    assert vis.render == RenderOptions(
        steps=7,
        continue_steps=3,
        converge_tol=0.01,
        converge_window=5,
        lr=0.05,
        param="fft",
        transforms="standard",
        contrast=1.5,
        class_contrast=0.7,
        views=2,
        class_views=3,
        class_restarts=2,
        class_select_after=4,
        class_select_by="value",
        n_images=2,
        diversity=0.5,
        diversity_on="pixels",
        l2=0.01,
        tv=0.02,
        seed=9,
        batch_size=8,
    )
    assert (vis.clusters, vis.max_clusters, vis.prior_images) == (False, 3, 100)
    assert isinstance(vis.judge, SmallCNN) and vis.smoothgrad_samples == 5
    assert (vis.every_n_epochs, vis.enable_logging, vis.on_error) == (3, False, "raise")
    # a render block that sets one option keeps the defaults of the others
    config.write_text(
        CLI_CONFIG.split("        render:")[0] + "        render: {steps: 5}\n" + MODEL
    )
    vis = _visualizer_from_yaml(config)
    assert vis.render == RenderOptions(steps=5)
    # a model on flattened images: Flatten, with its own Normalize, from YAML
    flatten = """        input_transform:
          class_path: lightning_neurons.data.Flatten
          init_args:
            image_shape: [1, 32, 32]
            normalize: {class_path: lightning_neurons.data.Normalize, init_args: {mean: [0.5], std: [0.25]}}
"""
    head = CLI_CONFIG.split("        input_transform:")[0]
    config.write_text(head + flatten + MODEL)
    vis = _visualizer_from_yaml(config)
    transform = vis.input_transform
    assert isinstance(transform, Flatten) and transform.image_shape == (1, 32, 32)
    assert isinstance(transform.normalize, Normalize)
    assert transform(torch.full((1, 1, 32, 32), 0.75)).tolist() == [[1.0] * 1024]


MODEL = CLI_CONFIG[CLI_CONFIG.index("model:") :]


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_the_layers_channel_images_go_through_the_model_together_on_an_accelerator(
    reduction, monkeypatch
):
    """The activations each layer's channel images reach: one forward per layer (the CPU's
    way) or the layers' images together (an accelerator's), in chunks that may split a layer's
    rows; the same values either way (float32 sums over a few hundred terms: 1e-5)."""
    from types import SimpleNamespace

    from conftest import TinyNet

    model = TinyNet().eval()
    g = torch.Generator().manual_seed(0)
    counts = {"conv1": 8, "relu1": 3, "conv2": 12, "fc": 5}
    rendered = {
        layer: (torch.rand(n, 1, 8, 8, generator=g), torch.zeros(n)) for layer, n in counts.items()
    }
    plan = SimpleNamespace(transform=None)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(len(args[0])))
    apart = results_module.channel_activations(model, plan, rendered, reduction, together=False)
    assert forwards == list(counts.values())
    forwards.clear()
    together = results_module.channel_activations(model, plan, rendered, reduction, together=True)
    assert forwards == [1, sum(counts.values())]  # the sizing's probe of one image, then all
    forwards.clear()
    monkeypatch.setattr(results_module, "auto_batch_size", lambda *args, **kwargs: 5)
    chunked = results_module.channel_activations(model, plan, rendered, reduction, together=True)
    assert forwards == [1, 5, 5, 5, 5, 5, 3]  # the chunks cut across the layers' rows
    for layer, n in counts.items():
        width = {"conv1": 4, "relu1": 4, "conv2": 6, "fc": 8}[layer]
        assert apart[layer].shape == (n, width)
        torch.testing.assert_close(together[layer], apart[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked[layer], apart[layer], atol=1e-5, rtol=1e-5)
    assert not torch.equal(apart["conv1"][0], apart["conv1"][1])  # rows are the images' own


def test_channel_activations_of_a_shared_modules_calls_are_each_calls_own(monkeypatch):
    """One ReLU module called twice: each call site reads its own images' outputs, whether the
    layers' images go through the model one layer at a time or together (the hook names every
    call, those not asked for in a forward too)."""
    from types import SimpleNamespace

    from test_call_sites import SharedReLUNet

    model = SharedReLUNet().eval()
    g = torch.Generator().manual_seed(1)
    rendered = {name: (torch.rand(n, 1, 6, 6, generator=g), torch.zeros(n)) for name, n in
                (("relu", 4), ("relu#1", 6))}  # fmt: skip
    plan = SimpleNamespace(transform=None)
    apart = results_module.channel_activations(model, plan, rendered, "mean", together=False)
    monkeypatch.setattr(results_module, "auto_batch_size", lambda *args, **kwargs: 3)
    chunked = results_module.channel_activations(model, plan, rendered, "mean", together=True)
    assert apart["relu"].shape == (4, 4) and apart["relu#1"].shape == (6, 6)
    for name in rendered:
        torch.testing.assert_close(chunked[name], apart[name], atol=1e-5, rtol=1e-5)
