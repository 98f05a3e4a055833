"""lightning_neurons.batch: reading batches and outputs, display images, DistributedSampler rows."""

from __future__ import annotations

from collections import Counter, namedtuple

import pytest
import torch
from _operations import Operations
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_neurons import NeuronsError
from lightning_neurons.batch import (
    BatchReader,
    LabelRange,
    as_model_input,
    check_targets,
    read_inputs,
    read_labels,
    read_logits,
    to_display,
    to_model_input,
)
from lightning_neurons.data import Normalize
from lightning_neurons.loaders import LoaderRows


def test_read_logits_of_tensors_tuples_named_tuples_and_mappings():
    logits, aux = torch.randn(3, 4), torch.randn(3, 4)
    assert read_logits(logits) is logits
    assert read_logits((logits, aux)) is logits
    assert read_logits([None, logits, aux]) is logits  # the first tensor
    Outputs = namedtuple("Outputs", ["logits", "aux_logits"])  # torchvision's GoogLeNet/Inception
    assert read_logits(Outputs(logits, aux)) is logits
    assert read_logits({"logits": logits, "hidden": aux}) is logits
    assert read_logits({"out": aux, "x": logits}, lambda out: out["x"]) is logits


def test_a_binary_classifiers_one_logit_reads_as_two_classes():
    """``[B, 1]`` or ``[B]`` (sigmoid, BCE): two logits whose softmax is the sigmoid's
    probabilities, differentiable; a convolutional head's ``[B, C, 1, 1]`` is ``[B, C]``."""
    z = torch.tensor([[-2.0], [0.0], [3.0]], requires_grad=True)
    for output in (z, z[:, 0]):
        logits = read_logits(output)
        assert logits.shape == (3, 2)
        # softmax of [-z/2, z/2] is (1 - sigmoid z, sigmoid z): a few float32 ulps apart
        torch.testing.assert_close(logits.softmax(1)[:, 1], torch.sigmoid(z[:, 0]))
    logits[:, 1].sum().backward()
    torch.testing.assert_close(z.grad, torch.full((3, 1), 0.5))
    head = torch.randn(2, 5, 1, 1)
    assert torch.equal(read_logits(head), head[:, :, 0, 0])


def test_read_logits_errors_name_output_fn():
    with pytest.raises(NeuronsError, match=r"mapping with keys \['hidden', 'out'\].*output_fn="):
        read_logits({"out": torch.zeros(2, 3), "hidden": torch.zeros(2, 3)})
    with pytest.raises(NeuronsError, match="returned str.*output_fn"):
        read_logits("logits")
    with pytest.raises(NeuronsError, match=r"shape \(2, 3, 4\).*\[batch, num_classes\]"):
        read_logits(torch.zeros(2, 3, 4))


def test_one_reader_for_inputs_and_labels():
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([1, 0])
    for batch in ((x, y), [x, y, "meta"], {"image": x, "label": y}, {"pixel_values": x, "y": y}):
        assert read_inputs(batch) is x
        assert torch.equal(read_labels(batch), y)
    reader = BatchReader(input_fn=lambda b: b["img"], label_fn=lambda b: b["cls"])
    assert reader.inputs({"img": x, "cls": y}) is x
    assert torch.equal(reader.labels({"img": x, "cls": y}), y)
    with pytest.raises(NeuronsError, match="none of image, images.*input_fn="):
        read_inputs({"img": x})
    with pytest.raises(NeuronsError, match="none of label, labels.*label_fn="):
        read_labels({"img": x})


class TupleOut(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.inner(x), "aux"


def test_model_inputs_take_the_model_dtype_and_the_reader_reads_the_logits():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).to(torch.bfloat16)
    x = torch.rand(2, 1, 2, 2)
    assert as_model_input(x, model).dtype == torch.bfloat16
    assert as_model_input(torch.tensor([1, 2]), model).dtype == torch.int64  # not floating
    logits = BatchReader().forward(TupleOut(model), x)
    assert logits.shape == (2, 3) and logits.dtype == torch.bfloat16


def test_display_images_and_model_inputs_map_both_ways():
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    display = torch.rand(4, 3, 5, 5)
    x = to_model_input(display, norm)
    assert x.min() < 0  # a model input, not a display image
    back, exact = to_display(x, norm)
    assert exact
    # (d - m) / s * s + m in float32: a few ulps of values <= 1
    torch.testing.assert_close(back, display, atol=1e-6, rtol=0)
    same, exact = to_display(display, None)
    assert exact and torch.equal(same, display) and to_model_input(display, None) is display
    rescaled, exact = to_display(x, lambda t: t * 2.0)  # no inverse: each image rescaled
    assert not exact
    assert torch.allclose(rescaled.flatten(1).amin(1), torch.zeros(4))
    assert torch.allclose(rescaled.flatten(1).amax(1), torch.ones(4))
    flat, exact = to_display(x.flatten(1), lambda t: t * 2.0)  # vectors keep their shape
    assert not exact and flat.shape == (4, 75)
    torch.testing.assert_close(flat, rescaled.flatten(1))


@pytest.mark.parametrize(("size", "replicas", "batch_size"), [(9, 2, 2), (10, 4, 3), (8, 2, 3)])
def test_loader_rows_leave_out_exactly_the_repeated_samples(size, replicas, batch_size):
    dataset = TensorDataset(torch.arange(size))
    kept: list[int] = []
    for rank in range(replicas):
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        rows = LoaderRows.of(loader)
        for i, (batch,) in enumerate(loader):
            kept += batch[: rows.rows(i, batch.shape[0])].tolist()
    assert sorted(kept) == list(range(size))  # every sample once, the padding left out


def test_loader_rows_without_distributed_sampler_keep_everything():
    loader = DataLoader(TensorDataset(torch.arange(5)), batch_size=2)
    assert LoaderRows.of(loader).rows(2, 1) == 1 and LoaderRows.of([1, 2]).rows(0, 7) == 7


def test_label_range_checks_each_batch_at_once_where_not_deferred():
    labels = LabelRange(defer=False)
    ok = torch.tensor([0, 2, 1])
    assert labels.check(ok, 3) is ok  # nothing copied or clamped
    with pytest.raises(NeuronsError, match=r"label 3 is outside \[0, 3\)"):
        labels.check(torch.tensor([0, 3]), 3)
    with pytest.raises(NeuronsError, match=r"label -1 is outside \[0, 3\)"):
        labels.check(torch.tensor([-1, 2]), 3)
    assert labels.check(torch.tensor([7]), None).tolist() == [7]  # no class count: no check
    assert labels.check(torch.zeros(0, dtype=torch.long), 3).numel() == 0


def test_label_range_deferred_clamps_now_and_raises_once_the_range_is_read():
    """Deferred (as on a GPU, where reading the range at once would make the host wait for the
    device): a bad batch's labels come back clamped into range, and the error comes once the
    range of its group of batches is read (at the check after the group is queued, or at
    settle() after the last batch); drop() forgets the batches not yet read."""
    labels = LabelRange(defer=True, batches=2)
    assert labels.check(torch.tensor([0, 4, 9]), 5).tolist() == [0, 4, 4]
    assert labels.check(torch.tensor([1, 2]), 5).tolist() == [1, 2]  # the pair's range queued
    with pytest.raises(NeuronsError, match=r"label 9 is outside \[0, 5\)"):
        labels.check(torch.tensor([1, 2]), 5)  # the pair before's
    labels.settle()  # the one batch since was fine
    assert labels.check(torch.tensor([-3, 1]), 5).tolist() == [0, 1]
    with pytest.raises(NeuronsError, match=r"label -3 is outside \[0, 5\)"):
        labels.settle()
    labels.settle()  # read once only
    labels.check(torch.tensor([8]), 5)
    labels.drop()
    labels.settle()  # forgotten: nothing raised
    labels.check(torch.tensor([3]), 5)
    labels.check(torch.tensor([5]), 5)  # queued
    labels.drop()
    labels.settle()  # a queued range is forgotten too


@pytest.mark.parametrize("batches", [1, 3, 16])
def test_label_range_deferred_finds_a_bad_label_in_any_batch_of_a_group(batches):
    for bad in range(batches):
        labels = LabelRange(defer=True, batches=batches)
        with pytest.raises(NeuronsError, match=r"label 6 is outside \[0, 5\)"):
            for i in range(batches):
                labels.check(torch.tensor([6 if i == bad else 1, 0]), 5)
            labels.settle()


def test_label_range_deferred_takes_a_clamp_a_batch_and_three_operations_a_group():
    """Deferred, a batch costs the device one clamp (each a kernel launch on a GPU), and each
    group of batches one concatenation, one range and one copy of it to the host; the range's
    buffers are made once per labels' type."""
    labels = LabelRange(defer=True, batches=3)
    for batch in ([0, 1], [1], [2]):
        labels.check(torch.tensor(batch), 5)
    with Operations() as ops:
        for batch in ([2, 1, 0], [4, 3], [1], [0], [3, 3]):
            labels.check(torch.tensor(batch), 5)
    # besides views, and the reads of the host copy (`_local_scalar_dense` on host memory)
    kernels = Counter(
        s for s in ops.names if s not in ("select", "lift_fresh", "_local_scalar_dense", "view")
    )
    assert kernels == {"clamp": 5, "cat": 1, "aminmax": 1, "copy_": 1}
    with pytest.raises(NeuronsError, match=r"label 7 is outside \[0, 5\)"):
        labels.check(torch.tensor([7], dtype=torch.int32), 5)  # a new type: new buffers
        labels.settle()


@pytest.mark.parametrize(("targets", "bad"), [([0, -1, 2], -1), ([0, 3, 1], 3), ([-2, 5, 1], -2)])
def test_check_targets_names_the_class_outside_the_logits(targets, bad):
    with pytest.raises(NeuronsError, match=rf"holds class {bad}, outside \[0, 3\)"):
        check_targets(torch.tensor(targets), 3, 3)


def test_check_targets_returns_long_class_indices():
    out = check_targets(torch.tensor([2, 0, 1], dtype=torch.int32), 3, 3)
    assert out.dtype == torch.int64 and out.tolist() == [2, 0, 1]
    assert check_targets(torch.zeros(0, dtype=torch.long), 0, 3).numel() == 0
    with pytest.raises(NeuronsError, match="1-D integer tensor"):
        check_targets(torch.tensor([0.0, 1.0, 2.0]), 3, 3)
