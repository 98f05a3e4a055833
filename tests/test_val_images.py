"""FeatureVisualizer's validation images: probe candidates and anchor images streamed from
validation batches, and one warning for batches that cannot give them."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_neurons.batch import BatchReader
from lightning_neurons.callbacks._val_images import ValidationImages
from lightning_neurons.loaders import LoaderRows


def _batch(ids: list[int], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[B, 1, 2, 2]`` whose pixels hold their id, and their labels."""
    images = torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return images, torch.tensor(labels)


def test_the_first_image_of_each_class_is_kept_and_the_repeated_rows_are_not():
    kept = ValidationImages(per_class=1, limit=16)
    # 5 real images, then DistributedSampler's repeats: batch 1 holds 1 real row of 3
    kept.rows = LoaderRows(real=4, padded=2, batch_size=3)
    asked: list[int] = []

    def count() -> int:
        asked.append(1)
        return 3

    batches = [_batch([0, 1, 2], [0, 0, 1]), _batch([3, 4, 5], [0, 1, 2])]
    for i, batch in enumerate(batches):
        assert kept.wanted(saliency=True, anchors=None)
        kept.add(batch, i, BatchReader(), None, None, True, (0, 1), count)
    # class 2 came only in a repeated row: it is not a candidate, and the collector is not full
    assert [(c.order, c.label) for c in kept.probes.candidates] == [(0, 0), (2, 1)]
    assert [int(c.image[0, 0, 0]) for c in kept.probes.candidates] == [0, 2]
    assert not kept.probes.full and len(asked) == 2
    kept.add(_batch([6], [2]), 0, BatchReader(), None, None, True, (0, 1), count)
    assert kept.probes.full and not kept.wanted(saliency=True, anchors=None)
    kept.reset()
    assert kept.probes.candidates == [] and kept.wanted(saliency=True, anchors=None)


def test_without_saliency_no_candidate_is_kept():
    kept = ValidationImages(per_class=1, limit=16)
    assert not kept.wanted(saliency=False, anchors=None)
    kept.add(_batch([0], [0]), 0, BatchReader(), None, None, False, (0, 1), lambda: 1)
    assert kept.probes.candidates == []


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (torch.zeros(4, 1, 2, 2), "cannot be read"),  # no labels
        ((torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)), r"\[4, 8\] batches, not images"),
    ],
    ids=["no labels", "not images"],
)
def test_batches_that_give_no_images_end_the_collection_with_one_warning(batch, message):
    kept = ValidationImages(per_class=1, limit=16)
    with pytest.warns(UserWarning, match=message) as record:
        for i in range(3):
            kept.add(batch, i, BatchReader(), None, None, True, (0, 1), lambda: 2)
    assert len([w for w in record if "FeatureVisualizer" in str(w.message)]) == 1
    assert kept.probes.full and kept.probes.candidates == []
    assert not kept.wanted(saliency=True, anchors=None)
    kept.reset()  # a new fit: its data may be read, and a failure is said again
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        kept.add(batch, 0, BatchReader(), None, None, True, (0, 1), lambda: 2)
    assert len([w for w in again if "FeatureVisualizer" in str(w.message)]) == 1
