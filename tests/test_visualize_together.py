"""Several renderings taking their steps in one batch (``run_renders``, ``optimise_together``):
each image is the one its rendering alone gives."""

from __future__ import annotations

import functools

import pytest
import torch
from _vis_helpers import assert_unchanged, bn_net, snapshot

from lightning_neurons.visualize import Channel, ClassLogit, render
from lightning_neurons.visualize.render import can_run_together, prepare_render, run_renders

SHAPE = (1, 12, 12)


def _renderings(model) -> list[tuple[list, dict]]:
    """Three renderings that differ in all a rendering of its own may: layers, views, seeds,
    learning rates, steps, candidates compared midway, parameters continued."""
    shallow = [Channel("conv1", i) for i in range(3)]
    classes = [ClassLogit(0), ClassLogit(2)]
    deep = [Channel("conv2", i) for i in range(2)]
    common = dict(image_shape=SHAPE, param="fft", converge_tol=0.03, converge_window=2)
    start = render(model, deep, steps=5, seed=7, **common).params
    return [
        (shallow, dict(steps=12, seed=2, **common)),
        (classes, dict(steps=12, seed=5, lr=0.05, views=2, restarts=2, select_after=6, **common)),
        (deep, dict(steps=4, seed=7, init=start, **common)),
    ]


class _BatchSizes:
    """The batch size of every forward pass of ``model`` inside the block."""

    def __init__(self, model) -> None:
        self.model, self.sizes = model, []

    def __enter__(self) -> list[int]:
        hook = lambda module, args: self.sizes.append(len(args[0]))  # noqa: E731
        self.handle = self.model.register_forward_pre_hook(hook)
        return self.sizes

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_renderings_run_together_give_each_its_own_images_and_steps():
    model = bn_net()
    renderings = _renderings(model)
    with _BatchSizes(model) as apart_sizes:
        apart = [render(model, objectives, **kwargs) for objectives, kwargs in renderings]
    jobs = [prepare_render(model, objectives, **kwargs) for objectives, kwargs in renderings]
    before = snapshot(model)
    with _BatchSizes(model) as sizes:
        together = run_renders(model, jobs, together=True)
    assert_unchanged(model, before)
    for alone, joint in zip(apart, together, strict=True):
        assert torch.equal(joint.steps, alone.steps)
        # the same arithmetic in batches of another size: float32 kernels' rounding (as the
        # chunking test of test_visualize_render)
        torch.testing.assert_close(joint.images, alone.images, atol=1e-5, rtol=0)
        torch.testing.assert_close(joint.params, alone.params, atol=1e-5, rtol=0)
    # a step: the 3 shallow rows, 2 x 2 candidates in 2 views each and the 2 deep rows, in one
    # forward pass; a convergence check: every running row once, in one pass too
    assert 3 + 8 + 2 in sizes and 3 + 8 + 2 not in apart_sizes
    assert 3 + 4 + 2 in sizes and 3 + 4 + 2 not in apart_sizes
    assert len(sizes) < len(apart_sizes)


def test_renderings_run_apart_where_they_cannot_share_a_batch():
    model = bn_net()
    shallow = [Channel("conv1", i) for i in range(3)]
    common = dict(image_shape=SHAPE, param="fft", steps=2)
    jobs = [prepare_render(model, shallow, **common) for _ in range(2)]
    for job in jobs:
        job.make_chunks()
    assert can_run_together(jobs) and not can_run_together(jobs[:1])
    masked = prepare_render(model, shallow, mask=True, **common)
    other_shape = prepare_render(model, shallow, **{**common, "image_shape": (1, 10, 10)})
    diverse = prepare_render(model, shallow, n_images=2, diversity=1.0, **common)  # Gram matrices
    other_fn = prepare_render(model, shallow, output_fn=lambda out: out, **common)
    mixed = prepare_render(model, shallow + [ClassLogit(0)], **common)  # on the CPU: 2 chunks
    small = prepare_render(model, shallow, batch_size=2, **common)  # a bound of 2 rows
    for job in (masked, other_shape, diverse, other_fn, mixed, small):
        job.make_chunks()
        assert not can_run_together([jobs[0], job])
    # on the CPU, by default, apart: no pass holds both renderings' rows
    with _BatchSizes(model) as sizes:
        run_renders(model, [prepare_render(model, shallow, **common) for _ in range(2)])
    assert 6 not in sizes and sizes.count(3) == 2 * 2


@pytest.mark.parametrize("together", [True, False])
def test_renderings_run_together_or_apart_leave_the_model_as_found(together):
    model = bn_net()
    model.train()
    jobs = [
        prepare_render(model, objectives, **kwargs) for objectives, kwargs in _renderings(model)
    ]
    before = snapshot(model)
    run_renders(model, jobs, together=together)
    assert_unchanged(model, before)


def _renderer(options):
    """FeatureVisualizer's Renderer of 12 px grey images of BNNet's ``conv2``, one process."""
    from lightning_neurons.batch import BatchReader
    from lightning_neurons.callbacks._memory import ContinuationMemory
    from lightning_neurons.callbacks._plan import VisualizerPlan
    from lightning_neurons.callbacks._rendering import Renderer

    plan = VisualizerPlan(SHAPE, None, ["conv2"], {}, [], None, False)
    return Renderer(options, plan, BatchReader(), None, ContinuationMemory())


@pytest.mark.parametrize("class_continue", ["best", "all"])
def test_a_rounds_channels_clusters_and_classes_run_together_as_apart(monkeypatch, class_continue):
    """FeatureVisualizer's round: the channels, the clusters and the class candidates take their
    steps in one batch, and each image is the one its rendering alone gives, round after round
    (the second round continues every kind); the parameters kept for the next round too."""
    from lightning_neurons import RenderOptions
    from lightning_neurons.callbacks import _rendering

    model = bn_net()
    options = RenderOptions(
        steps=8, continue_steps=4, converge_tol=0.05, converge_window=2, param="fft",
        class_restarts=2, class_views=2, class_continue=class_continue,
    )  # fmt: skip
    together, apart = _renderer(options), _renderer(options)
    wanted = {"conv2": [Channel("conv2", i) for i in (0, 3)]}
    members = {"conv2": [[0, 1], [2, 4, 5]]}
    classes = [ClassLogit(c) for c in range(3)]
    joint = functools.partial(run_renders, together=True)
    # the most rows a pass: first the channels, the clusters and 3 classes' 2 candidates in 2
    # views each; then the continued images (the kept candidates in 2 views, or every candidate
    # in class_views // class_restarts = 1)
    for most in (2 + 2 + 3 * 2 * 2, 2 + 2 + 6):
        monkeypatch.setattr(_rendering, "run_renders", joint)
        with _BatchSizes(model) as sizes:
            done = together.round(model, wanted, members, classes)
        monkeypatch.undo()
        alone = apart.round(model, wanted, members)
        alone_classes = apart.images(model, "classes", classes, True)
        assert max(sizes) == most
        for kind in ("channels", "clusters"):
            for layer, (images, steps) in getattr(alone, kind).items():
                # the same rows, batched with others: float32 kernels' rounding over <= 8 steps
                torch.testing.assert_close(getattr(done, kind)[layer][0], images, atol=1e-4, rtol=0)
                assert torch.equal(getattr(done, kind)[layer][1], steps)
        torch.testing.assert_close(done.classes[0], alone_classes[0], atol=1e-4, rtol=0)
        assert torch.equal(done.classes[1], alone_classes[1])
    kept, solo = together.memory.state_dict(), apart.memory.state_dict()
    assert kept.keys() == solo.keys() == {"conv2", "clusters/conv2", "classes"}
    for key, entry in solo.items():
        torch.testing.assert_close(kept[key]["params"], entry["params"], atol=1e-4, rtol=0)
