"""The parts data set: design invariants, determinism, the data module and its errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_neurons import NeuronsError
from lightning_neurons.parts import (
    CLASS_GROUPS,
    CLASS_NAMES,
    CLASS_PARTS,
    PART_NAMES,
    PartsDataModule,
    make_parts,
)


def test_design_classes_of_a_group_share_two_parts_and_other_classes_at_most_one():
    assert len(CLASS_NAMES) == len(CLASS_PARTS) == len(CLASS_GROUPS) == 12
    assert sorted(set(CLASS_GROUPS)) == [0, 1, 2, 3]
    assert all(CLASS_GROUPS.count(g) == 3 for g in range(4))
    assert len(set(CLASS_NAMES)) == 12 and len(set(CLASS_PARTS)) == 12
    assert {p for parts in CLASS_PARTS for p in parts} == set(PART_NAMES)
    for a, b in itertools.combinations(range(12), 2):
        shared = len(set(CLASS_PARTS[a]) & set(CLASS_PARTS[b]))
        if CLASS_GROUPS[a] == CLASS_GROUPS[b]:
            assert shared == 2, (CLASS_NAMES[a], CLASS_NAMES[b])
        else:
            assert shared <= 1, (CLASS_NAMES[a], CLASS_NAMES[b])


def test_make_parts_shapes_range_and_balance():
    x, y = make_parts(n_per_class=7, image_size=20, seed=3)
    assert x.shape == (84, 1, 20, 20) and x.dtype == torch.float32
    assert y.shape == (84,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.bincount(y, minlength=12).tolist() == [7] * 12
    assert not torch.equal(y[:12], torch.arange(12))  # shuffled
    # Every image shows strokes: a clearly brighter part than the noise floor.
    assert bool((x.flatten(1).amax(dim=1) > 0.6).all())


def test_make_parts_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = make_parts(n_per_class=5, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    b = make_parts(n_per_class=5, seed=1)
    c = make_parts(n_per_class=5, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_classes_differ_on_average():
    x, y = make_parts(n_per_class=40, seed=0)
    means = torch.stack([x[y == c].mean(dim=0).flatten() for c in range(12)])
    distances = torch.cdist(means, means)
    off_diagonal = distances[~torch.eye(12, dtype=torch.bool)]
    assert float(off_diagonal.min()) > 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_per_class": 0}, "n_per_class"),
        ({"n_per_class": 2.5}, "n_per_class"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_make_parts_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        make_parts(**kwargs)


def test_data_module_split_and_attributes():
    dm = PartsDataModule(batch_size=16, n_per_class=10, val_fraction=0.2, seed=0)
    assert dm.num_classes == 12 and dm.class_names == CLASS_NAMES
    assert dm.class_groups == CLASS_GROUPS and dm.input_transform is None
    assert dm.image_shape == (1, 32, 32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and y.dtype == torch.int64
    val_labels = torch.cat([b[1] for b in dm.val_dataloader()])
    assert torch.bincount(val_labels, minlength=12).tolist() == [2] * 12  # stratified
    assert len(dm.train_set) == 96
    test_labels = torch.cat([b[1] for b in dm.test_dataloader()])
    assert torch.equal(test_labels, val_labels)
    again = PartsDataModule(batch_size=16, n_per_class=10, seed=0)
    x2, _ = next(iter(again.train_dataloader()))  # setup on demand, same shuffle
    assert torch.equal(x, x2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"n_per_class": 1}, "n_per_class"),
        ({"image_size": 12}, "image_size"),
    ],
)
def test_data_module_errors(kwargs, match):
    with pytest.raises(NeuronsError, match=match):
        PartsDataModule(**kwargs)


def test_one_shared_design_groups_share_one_of_two_parts_and_nothing_else():
    from lightning_neurons.parts import ONE_SHARED, get_structure

    assert get_structure("one_shared") is ONE_SHARED and ONE_SHARED.num_classes == 12
    parts, groups = ONE_SHARED.class_parts, ONE_SHARED.class_groups
    assert all(len(p) == 2 for p in parts) and sorted(set(groups)) == [0, 1, 2, 3]
    own = [p[1] for p in parts]
    assert len(set(own)) == 12  # the own part alone tells every class apart
    assert not set(own) & {p[0] for p in parts}  # no own part is a shared part
    for a, b in itertools.combinations(range(12), 2):
        shared = set(parts[a]) & set(parts[b])
        assert len(shared) == (1 if groups[a] == groups[b] else 0), (a, b)
    x, y = make_parts(n_per_class=3, image_size=24, seed=0, structure="one_shared")
    assert x.shape == (36, 1, 24, 24) and torch.bincount(y).tolist() == [3] * 12
    assert bool((x.flatten(1).amax(dim=1) > 0.6).all())
    dm = PartsDataModule(n_per_class=4, structure="one_shared")
    assert dm.class_groups == groups and dm.class_names == ONE_SHARED.class_names
    with pytest.raises(NeuronsError, match="`structure` must be one of 'marks', 'one_shared'"):
        make_parts(n_per_class=2, structure="three")
