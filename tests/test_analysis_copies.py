"""NeuronContribution's passes move data between the host and the model's device once, not at
every pass.

On a GPU a copy from ordinary host memory to the device, a copy back, and a value read on the
host (``int(t)``) each wait for everything queued on the device. On the CPU none of them can be
seen; on the ``meta`` device the copies are operations and a read fails. These tests run the
ablation's passes and the contributions to many logits on a model moved to ``meta``, count the
copies each way (a copy back gives zeros, so the code goes on), and fail on a read.
"""

from __future__ import annotations

import pytest
import torch
from test_device_copies import HostToDevice, UnmadeIndices
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_neurons import contribution
from lightning_neurons.ablation import ablation_sums
from lightning_neurons.batch import BatchReader
from lightning_neurons.contribution import contribution_batch, neuron_contributions

META = torch.device("meta")
LAYERS = ["1", "4"]  # the ReLU's [B, 4, 6, 6] and the logits' [B, 5]


class DeviceToHost(TorchDispatchMode):
    """Counts the copies of meta tensors to the host, and gives zeros of their shape (meta
    tensors hold no values), so that the code after a copy runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args else None
        to_host = func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device(
            "cpu"
        )
        if to_host and isinstance(source, torch.Tensor) and source.device == META:
            self.copies += 1
            return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        return func(*args, **kwargs)


def _model(device: torch.device | str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    return model.to(device)


def _batches(count: int, copies: list[int], mode: HostToDevice, made: UnmadeIndices):
    """``count`` batches of 6 images on the host, noting the copies made to the device so far
    as each is taken."""
    for _ in range(count):
        copies.append(mode.copies + made.unmade)
        yield torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    copies.append(mode.copies + made.unmade)


@pytest.mark.parametrize("sets_per_pass", [1, 2])
def test_the_ablation_copies_each_batch_to_the_device_and_its_sums_back_once(sets_per_pass):
    sets = {"a": [0, 1], "b": [2], "c": [3]}
    seen: list[int] = []
    with DeviceToHost() as back, UnmadeIndices() as made, HostToDevice() as there:
        sums = ablation_sums(
            _model(META),
            "1",
            sets,
            _batches(3, seen, there, made),
            BatchReader(),
            sets_per_pass=sets_per_pass,
            share_prefix=False,
        )
    per_batch = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    # the first batch: its images and labels, and each chunk's mask of the sets; after it the
    # images and labels alone, however many passes the sets take (before: each set's indices,
    # and the rows' list twice, at every pass)
    passes = -(-len(sets) // sets_per_pass)
    assert per_batch == [2 + passes, 2, 2]
    assert back.copies == 3  # counts, correct counts and logit sums, at the end
    assert sums is not None and sums["correct"].shape == (1 + len(sets), 5)


def test_the_ablations_masks_zero_what_each_chunk_asks_on_every_batch():
    """The masks made once give the sums that one set at a time gives, batch after batch."""
    model, sets = _model(), {"a": [0, 1], "b": [2], "c": [3], "d": []}
    batches = [(torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])) for _ in range(3)]
    together = ablation_sums(model, "1", sets, batches, BatchReader(), sets_per_pass=3)
    assert together is not None
    for i, (name, neurons) in enumerate(sets.items()):
        alone = ablation_sums(model, "1", {name: neurons}, batches, BatchReader())
        assert alone is not None
        for key in ("correct", "logit_sum"):
            # the same float32 logits summed in float64 in the same order: equal up to the
            # rounding of sums of 18 logits of order 1 (1e-12)
            torch.testing.assert_close(together[key][[0, 1 + i]], alone[key], rtol=0, atol=1e-12)
        torch.testing.assert_close(together["counts"], alone["counts"], rtol=0, atol=0)


@pytest.mark.parametrize("per_pass", [1, 2])
def test_contributions_to_many_logits_go_to_the_host_once_a_layer(per_pass):
    x, classes = torch.rand(2, 3, 8, 8), torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    with DeviceToHost() as back:
        out = neuron_contributions(
            _model(META), LAYERS, x, classes=classes, chunk_size=2 * per_pass
        )
    # 4 / per_pass backward passes, one copy a layer (before: one a layer at every pass)
    assert back.copies == len(LAYERS)
    assert out["1"].shape == (2, 4, 4) and out["4"].shape == (2, 4, 5)


def test_contributions_held_in_parts_land_in_their_columns(monkeypatch):
    """Copied to the host at every pass (a bound of 1 byte) or all at once, the contributions
    are the same numbers in the same places."""
    model, x = _model(), torch.rand(3, 3, 8, 8)
    classes = torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 1, 2, 2, 3]])
    at_once = neuron_contributions(model, LAYERS, x, classes=classes, chunk_size=6)
    monkeypatch.setattr(contribution, "HELD_BYTES", 1)
    in_parts = neuron_contributions(model, LAYERS, x, classes=classes, chunk_size=6)
    for layer in LAYERS:
        torch.testing.assert_close(in_parts[layer], at_once[layer], rtol=0, atol=0)
        # and each column is its class's own contribution (one target a pass)
        for column in range(classes.shape[1]):
            one = neuron_contributions(model, layer, x, targets=classes[:, column])[layer]
            # the same products summed over the same positions: float32 rounding (1e-6)
            torch.testing.assert_close(in_parts[layer][:, column], one, rtol=1e-5, atol=1e-6)


def test_a_batch_with_host_labels_reads_nothing_back_from_the_device():
    """The labels are checked on the host, where NeuronContribution keeps them, then moved:
    on ``meta`` a read of a device value fails (before: the check read the moved labels)."""
    model, labels = _model(META), torch.tensor([0, 1, 2, 3, 4, 0])
    out = contribution_batch(model, LAYERS, torch.empty(6, 3, 8, 8, device=META), labels)
    assert out.contributions["1"].shape == (6, 4) and out.logits.device == META
