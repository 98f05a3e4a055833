"""A rendering step copies nothing from the host to the model's device after its first step.

On a GPU a copy from ordinary host memory (``t.to(device)``) waits for everything queued on the
device, so a small index moved at every step and layer serialises the host and the device. On the
CPU such a copy returns its input and cannot be seen; on the ``meta`` device it is an operation
(``aten._to_copy`` from a CPU tensor), and nothing is computed. These tests score batches of meta
outputs, warp meta images and run whole rendering steps of a model moved to the meta device, and
count the copies, those that Python makes inside an indexing with a list too.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_neurons.device_copies import DeviceCopies
from lightning_neurons.visualize import (
    L2,
    Channel,
    ChannelGroup,
    ClassLogit,
    Neuron,
    TotalVariation,
)
from lightning_neurons.visualize.anchors import ClassAnchor
from lightning_neurons.visualize.objectives import IMAGE, LOGITS
from lightning_neurons.visualize.param import decorrelate_colors
from lightning_neurons.visualize.scoring import Scoring
from lightning_neurons.visualize.transforms import RandomAffine, RandomRotate, RandomScale

META = torch.device("meta")


class HostToDevice(TorchDispatchMode):
    """Counts the copies of CPU tensors to another device: ``.to()`` and ``copy_``, and CPU
    tensors (not 0-dim ones, which go as numbers) given to an operation on another device, which
    copies them itself (``t[[0, 2]]`` indexes ``t`` with a CPU tensor made from the list)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in outs):
            self.copies += sum(1 for t in _tensors((args, kwargs)) if _on_host(t))
        return out


class UnmadeIndices(TorchDispatchMode):
    """Counts integer tensors on the device that no operation made, each the first time it is
    used: Python turns a list index (``t[[0, 2]]``) into a new tensor on ``t``'s device by a copy
    from the host inside the indexing, which no dispatched operation shows (as
    ``torch.tensor(..., device=)`` does: kept and used again, such a tensor counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []  # kept alive, so that their ids stay theirs
        self.known: set[int] = set()
        self.unmade = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in _tensors((args, kwargs)):
            if t.device.type != "cpu" and not t.is_floating_point() and id(t) not in self.known:
                self.unmade += 1
                self._know(t)
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            self._know(t)
        return out

    def _know(self, t: torch.Tensor) -> None:
        self.seen.append(t)
        self.known.add(id(t))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() > 0


def _outputs() -> dict[str, torch.Tensor]:
    """A batch of 6 rows of three layers, the logits and the image, on the meta device."""
    return {
        "a": torch.empty(6, 4, 3, 3, device=META),
        "b": torch.empty(6, 6, 5, device=META),  # tokens, channels first
        "c": torch.empty(6, 8, device=META),
        LOGITS: torch.empty(6, 3, device=META),
        IMAGE: torch.empty(6, 3, 6, 6, device=META),
    }


def _copies_per_call(calls: int, fn) -> list[int]:
    """The copies to the device at each of ``calls`` calls of ``fn``, those made inside the
    indexing too (:class:`UnmadeIndices`)."""
    counts = []
    with UnmadeIndices() as made:
        for _ in range(calls):
            before = made.unmade
            with HostToDevice() as mode:
                fn()
            counts.append(mode.copies + made.unmade - before)
    return counts


def test_scoring_a_step_copies_its_indices_to_the_device_once():
    objectives = [
        Channel("a", 3),
        Neuron("a", 1, y=0, x=2) - 0.5 * ClassLogit(2),
        ChannelGroup("a", [0, 1, 3]) + 2 * Channel("c", 5),
        ClassLogit(0) - 0.1 * TotalVariation() - 0.2 * L2(),
        Neuron("b", 4, x=3) + Channel("a", 0),
        Neuron("c", 7) - L2(centre=0.4) - ClassAnchor("a", 1, torch.rand(4, 3, 3), torch.ones(4)),
    ]
    scoring = Scoring(objectives, gram_layers={"a": [0, 2]})
    outputs = _outputs()

    totals = []

    def step() -> None:
        scoring.reset()
        for name, out in outputs.items():
            scoring.add(name, out)
            if name == "a":
                scoring("a", out)  # the hook: with the Gram matrices of rows 0 and 2
        totals.append(scoring.scorer.total(scoring.found))  # the rows' values put together

    counts = _copies_per_call(4, step)
    assert counts[0] > 0  # the indices, weights and positions went to the device
    assert counts[1:] == [0, 0, 0]
    assert totals[-1].device == META and totals[-1].shape == (6,)


def test_the_colour_mix_goes_to_each_device_and_type_once():
    images = torch.empty(2, 3, 4, 4, device=META)
    assert _copies_per_call(3, lambda: decorrelate_colors(images)) == [1, 0, 0]
    halves = images.half()
    assert _copies_per_call(2, lambda: decorrelate_colors(halves)) == [1, 0]


def test_device_copies_are_the_tensor_on_the_device_and_in_the_type_asked_for():
    copies = DeviceCopies(torch.tensor([1.5, -2.0]))
    like = torch.zeros(1, dtype=torch.float64)
    assert copies.like(like).dtype == torch.float64
    assert copies.like(like).tolist() == [1.5, -2.0]
    assert copies.like(like) is copies.like(like)  # kept, not made again
    assert copies.on(torch.device("cpu")) is copies.tensor  # on its own device: itself
    assert copies.on(META).device == META and copies.on(META).dtype == torch.float32


def test_the_standard_warp_builds_its_grid_on_the_device(monkeypatch):
    """torchvision's ``affine`` makes its matrix with ``torch.tensor(..., device=)`` (a copy to a
    GPU at every step); the rendering's warp computes its grid on the images' device."""
    made_on_device = []
    tensor = torch.tensor

    def spied(*args, **kwargs):
        out = tensor(*args, **kwargs)
        if out.device.type != "cpu":
            made_on_device.append(out.shape)
        return out

    monkeypatch.setattr(torch, "tensor", spied)
    images = torch.empty(4, 3, 16, 16, device=META)
    generator = torch.Generator().manual_seed(0)
    warps = [RandomAffine(shift=2), RandomRotate(10.0), RandomScale(0.9, 1.1)]
    for warp in warps:
        with HostToDevice() as mode:
            out = warp(images, generator)
        assert out.shape == images.shape and out.device == META
        assert mode.copies == 0
    assert made_on_device == []
    assert RandomAffine()(images[0], generator).shape == images.shape[1:]  # one [C, H, W] image


def test_the_convergence_checks_reuse_their_scoring_until_a_row_freezes(monkeypatch):
    """Each check (every 4 steps) scores the running rows; its scoring, and so its indices'
    copies on the device, is made again only when the running rows change."""
    from conftest import TinyNet

    from lightning_neurons.visualize import optimise, render

    made: list[int] = []

    class Counted(Scoring):
        def __init__(self, objectives, *args, **kwargs):
            made.append(len(objectives))
            super().__init__(objectives, *args, **kwargs)

    monkeypatch.setattr(optimise, "Scoring", Counted)
    objectives = [Channel("conv1", 1), Channel("conv2", 2)]
    counts = []
    for steps in (24, 48):  # 6 and 12 checks; a tolerance of 1e-9: no row converges
        made.clear()
        render(TinyNet().eval(), objectives, image_shape=(1, 8, 8), steps=steps, converge_tol=1e-9)
        counts.append(len(made))
    # each chunk's scoring for the steps and one for its checks, however many checks
    assert counts[0] == counts[1] and sum(made) == 2 * len(objectives)


@pytest.mark.parametrize("param", ["pixel", "fft", "maco"])
def test_a_renderings_later_steps_copy_nothing_to_the_device(param):
    """Whole steps of a rendering on the meta device (TinyNet moved there): two views, two images
    an objective kept apart on Gram matrices or on pixels, the L2 and TV penalties and the
    transparency mask. Everything a step copies is copied at the first step (the convergence
    checks, which read values back by design, are off)."""
    from conftest import TinyNet

    from lightning_neurons.visualize.optimise import Ascent, ChunkSettings, chunks_of, optimise
    from lightning_neurons.visualize.penalties import Penalties
    from lightning_neurons.visualize.prior import DataPrior
    from lightning_neurons.visualize.transforms import resolve_transforms

    model = TinyNet().to(META).eval()
    objectives = [Channel("conv1", 1), Neuron("conv2", 0, y=1, x=1), ClassLogit(2)]
    objectives += [ChannelGroup("conv2", [0, 3]) - 0.5 * Channel("fc", 2)]
    rows = [objective for objective in objectives for _ in range(2)]  # two images each
    prior = DataPrior.from_images(torch.rand(16, 1, 8, 8)) if param == "maco" else None
    settings = ChunkSettings(
        param=param, image_shape=(1, 8, 8), seed=0, decorrelate=False, device=META, prior=prior,
        contrast=1.0, views=2, n_images=2, spatial=frozenset({"conv1", "conv2"}),
    )  # fmt: skip
    penalties = Penalties(l2=0.1, tv=0.1, diversity=1.0)
    chain = resolve_transforms("standard", (1, 8, 8))
    ascent = Ascent(0.05, chain, None, 0, penalties, convergence=None, track_mask=True)
    copies = {}
    for steps in (1, 4):
        chunks = chunks_of(rows, 8, settings)
        copies[steps] = _copies_per_call(
            1, lambda c=chunks, n=steps: optimise(model, c, n, ascent)
        )[0]
        assert all(chunk.scoring.gram_rows for chunk in chunks)  # the diversity term's Gram rows
    assert copies[1] > 0 and copies[4] == copies[1], copies
