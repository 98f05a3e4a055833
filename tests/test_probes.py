"""The probe chooser: every rank's candidates give the probes one process chooses."""

from __future__ import annotations

import pytest
import torch

from lightning_neurons.distributed import concat, map_shares
from lightning_neurons.probes import ProbeCollector, choose_probes


def _stream(
    collector: ProbeCollector,
    labels: list[int],
    batch: int,
    num_classes: int,
    ids: list[int] | None = None,
) -> None:
    """Feed ``labels`` in batches; image ``i`` holds ``ids[i]`` (default: ``i``)."""
    ids = list(range(len(labels))) if ids is None else ids
    images = torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1)
    y = torch.tensor(labels)
    for start in range(0, len(labels), batch):
        collector.update(images[start : start + batch], y[start : start + batch], num_classes)


@pytest.mark.parametrize(("per_class", "limit"), [(1, 16), (2, 5), (1, 2), (3, 100)])
@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_candidates_give_the_probes_of_one_process(per_class, limit, world):
    gen = torch.Generator().manual_seed(world * 100 + limit)
    labels = torch.randint(0, 4, (60,), generator=gen).tolist()
    alone = ProbeCollector(per_class, limit)
    _stream(alone, labels, batch=7, num_classes=4)
    expected = choose_probes(alone.candidates, per_class, limit)
    # DistributedSampler without shuffling: rank r gets images r, r + W, r + 2W, ...
    candidates = []
    for rank in range(world):
        mine = ProbeCollector(per_class, limit, rank=rank, world=world)
        ids = list(range(len(labels)))[rank::world]
        _stream(mine, labels[rank::world], batch=3, num_classes=4, ids=ids)
        # each candidate's order is its place in the validation order: image `order` holds it
        assert all(int(c.image) == c.order for c in mine.candidates)
        candidates += mine.candidates
    got = choose_probes(reversed(candidates), per_class, limit)
    assert [(c.order, c.label) for c in got] == [(c.order, c.label) for c in expected]
    assert len(got) == min(limit, per_class * len(set(labels)))
    # the first per_class of each class in the validation order
    for c in got:
        assert labels[: c.order].count(c.label) < per_class


def test_limit_below_the_classes_keeps_the_classes_seen_first_and_by_class_sorts():
    collector = ProbeCollector(per_class=1, limit=2)
    _stream(collector, [3, 3, 1, 0, 2], batch=2, num_classes=4)
    assert collector.full and [c.label for c in collector.candidates] == [3, 1]
    chosen = choose_probes(collector.candidates, 1, 2, by_class=True)
    assert [(c.label, c.order) for c in chosen] == [(1, 2), (3, 0)]


def test_a_collector_is_full_once_every_class_has_its_probes():
    collector = ProbeCollector(per_class=2, limit=100)
    _stream(collector, [0, 1, 0, 1, 1, 0], batch=2, num_classes=2)
    assert collector.full and [c.order for c in collector.candidates] == [0, 1, 2, 3]
    assert ProbeCollector(limit=0).full  # max_probes=0: none wanted


def test_map_shares_and_concat_in_one_process():
    parts = map_shares(lambda part: (torch.arange(5)[part], {"a": torch.ones(2)}), 5, 0, 1, "x")
    ids, named = concat(parts)
    assert ids.tolist() == [0, 1, 2, 3, 4] and named["a"].tolist() == [1.0, 1.0]
    assert map_shares(lambda part: 1, 0, 0, 1, "nothing") == []  # an empty share is not run
    with pytest.raises(ValueError, match="boom"):  # one process: the error itself
        map_shares(lambda part: (_ for _ in ()).throw(ValueError("boom")), 3, 0, 1, "x")
