"""A rendering step copies nothing from the host to the model's device after its first step.

On a GPU a copy from ordinary host memory (``t.to(device)``) waits for everything queued on the
device, so a small index moved at every step and layer serialises the host and the device. On the
CPU such a copy returns its input and cannot be seen; on the ``meta`` device it is an operation
(``aten._to_copy`` from a CPU tensor), and nothing is computed. These tests score batches of meta
outputs and warp meta images as a rendering step does, and count the copies.
"""

from __future__ import annotations

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
from lightning_neurons.visualize.objectives import IMAGE, LOGITS
from lightning_neurons.visualize.param import decorrelate_colors
from lightning_neurons.visualize.scoring import Scoring
from lightning_neurons.visualize.transforms import RandomAffine, RandomRotate, RandomScale

META = torch.device("meta")


class HostToDevice(TorchDispatchMode):
    """Counts the copies of CPU tensors to another device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        source = args[0] if name == "_to_copy" else args[1] if name == "copy_" else None
        moved = isinstance(out, torch.Tensor) and out.device.type != "cpu"
        if moved and isinstance(source, torch.Tensor) and source.device.type == "cpu":
            self.copies += 1
        return out


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
    counts = []
    for _ in range(calls):
        with HostToDevice() as mode:
            fn()
        counts.append(mode.copies)
    return counts


def test_scoring_a_step_copies_its_indices_to_the_device_once():
    objectives = [
        Channel("a", 3),
        Neuron("a", 1, y=0, x=2) - 0.5 * ClassLogit(2),
        ChannelGroup("a", [0, 1, 3]) + 2 * Channel("c", 5),
        ClassLogit(0) - 0.1 * TotalVariation() - 0.2 * L2(),
        Neuron("b", 4, x=3) + Channel("a", 0),
        Neuron("c", 7) - L2(centre=0.4),
    ]
    scoring = Scoring(objectives, gram_layers={"a": [0, 2]})
    outputs = _outputs()

    def step() -> None:
        scoring.reset()
        for name, out in outputs.items():
            scoring.add(name, out)
            if name == "a":
                scoring("a", out)  # the hook: with the Gram matrices of rows 0 and 2

    counts = _copies_per_call(4, step)
    assert counts[0] > 0  # the indices, weights and positions went to the device
    assert counts[1:] == [0, 0, 0]
    assert scoring.total.device == META and scoring.total.shape == (6,)


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
