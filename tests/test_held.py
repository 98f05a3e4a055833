"""Batches held per layer and per group of layers, and added to their statistics together
(lightning_neurons.held)."""

import pytest
import torch
from _operations import Operations

from lightning_neurons.held import (
    FLUSH_ROWS,
    FLUSH_ROWS_DEVICE,
    FLUSH_VALUES,
    FLUSH_VALUES_DEVICE,
    FLUSH_VALUES_DEVICE_MIN,
    HELD_VALUES_DEVICE,
    HeldBatches,
)
from lightning_neurons.stats import ClassNeuronStats


def test_held_batches_give_the_states_of_batch_by_batch_updates():
    """Batches held and added together: the same counts and maxima, the same float64 sums up to
    the order of their additions (float32 values, so each term is exact in float64; 2^-52
    relative per addition); nothing is added before the flush or the size that forces one."""
    g = torch.Generator().manual_seed(0)
    one, held_stats, held = ClassNeuronStats(4, 6), ClassNeuronStats(4, 6), HeldBatches()
    for _ in range(5):
        values, labels = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        peak = values + torch.rand(16, 6, generator=g)
        one.update(values, labels, peak)
        held.add("layer", held_stats, values, labels, peak)
    assert int(held_stats.compute()["images"].sum()) == 0  # 80 rows: held
    held.flush({"layer": held_stats})
    a, b = one.compute(), held_stats.compute()
    for key in ("images", "fired", "nan", "max"):
        assert torch.equal(a[key], b[key]), key
    for key in ("sum", "sum_sq"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-14, atol=1e-14)
    held.flush({"layer": held_stats})  # nothing held: nothing added twice
    assert int(held_stats.compute()["images"].sum()) == 80


def test_held_batches_are_bounded():
    """A layer's batches are added by themselves once they hold FLUSH_ROWS rows, so memory does
    not grow with the number of batches; a dropped layer's batches are never added."""
    stats, held = ClassNeuronStats(2, 3), HeldBatches()
    batch = (torch.rand(64, 3), torch.arange(64) % 2)
    for _ in range(FLUSH_ROWS // 64 - 1):
        held.add("a", stats, *batch)
    assert int(stats.compute()["images"].sum()) == 0
    held.add("a", stats, *batch)
    assert int(stats.compute()["images"].sum()) == FLUSH_ROWS
    held.add("a", stats, *batch)
    held.drop("a")
    held.flush({"a": stats})
    assert int(stats.compute()["images"].sum()) == FLUSH_ROWS


def test_held_batches_count_rows_afresh_after_a_flush_or_a_drop():
    """The rows held per layer are counted as batches come, and the count starts again once the
    layer's batches are added or dropped: the next addition comes a whole FLUSH_ROWS later."""
    stats, held = ClassNeuronStats(2, 3), HeldBatches()
    batch = (torch.rand(64, 3), torch.arange(64) % 2)
    for _ in range(FLUSH_ROWS // 64 - 1):
        held.add("a", stats, *batch)
    held.drop("a")  # FLUSH_ROWS - 64 rows forgotten, and their count
    held.add("b", stats, *batch)  # another layer's rows count for it alone
    for _ in range(FLUSH_ROWS // 64 - 1):
        held.add("a", stats, *batch)
    assert stats.update_count == 0
    held.add("a", stats, *batch)
    assert int(stats.compute()["images"].sum()) == FLUSH_ROWS
    held.drop()
    for _ in range(FLUSH_ROWS // 64 - 1):
        held.add("a", stats, *batch)
    assert int(stats.compute()["images"].sum()) == FLUSH_ROWS


def test_held_batches_hold_more_values_on_an_accelerator():
    """On the CPU a layer is added every FLUSH_VALUES values or FLUSH_ROWS rows; elsewhere (each
    of the update's operations a kernel launch) every FLUSH_VALUES_DEVICE values or
    FLUSH_ROWS_DEVICE rows. The "meta" device stands in for an accelerator: it runs the
    operations without data."""
    rows = 64
    for device, most, most_rows in (
        ("cpu", FLUSH_VALUES, FLUSH_ROWS),
        ("meta", FLUSH_VALUES_DEVICE, FLUSH_ROWS_DEVICE),
    ):
        for width, own_peaks in ((2048, True), (2048, False), (64, True), (64, False)):
            stats, held = ClassNeuronStats(10, width).to(device), HeldBatches()
            batches = 0
            while stats.update_count == 0:
                values = torch.rand(rows, width, device=device)
                peak = torch.rand(rows, width, device=device) if own_peaks else None
                labels = torch.zeros(rows, dtype=torch.long, device=device)
                held.add("a", stats, values, labels, peak)
                batches += 1
            # the bounds count a value with its peak: values whose peaks they are, twice as many
            bound = most // width if own_peaks else 2 * most // width
            assert batches * rows == min(most_rows, bound), (device, width, own_peaks)


def test_held_batches_on_an_accelerator_share_a_bound_among_the_layers():
    """On an accelerator the layers together hold HELD_VALUES_DEVICE values (a layer's share
    within FLUSH_VALUES_DEVICE_MIN and FLUSH_VALUES_DEVICE); the CPU's bound is per layer."""
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert HeldBatches(1).limits(meta) == (FLUSH_VALUES_DEVICE, FLUSH_ROWS_DEVICE)
    assert HeldBatches(17).limits(meta)[0] == HELD_VALUES_DEVICE // 17  # ResNet-50's layers
    assert HeldBatches(17).limits(meta)[0] * 17 <= HELD_VALUES_DEVICE
    assert HeldBatches(94).limits(meta)[0] == FLUSH_VALUES_DEVICE_MIN  # Inception v3's
    assert HeldBatches(94).limits(cpu) == (FLUSH_VALUES, FLUSH_ROWS)
    stats, held = ClassNeuronStats(10, 2048).to("meta"), HeldBatches(17)
    batches = 0
    while stats.update_count == 0:
        held.add("a", stats, torch.rand(64, 2048, device="meta"), torch.zeros(64, device="meta"))
        batches += 1
    # 61 batches of 64 (peaks that are the values take no room: twice the share's values)
    assert batches == -(-2 * (HELD_VALUES_DEVICE // 17) // (64 * 2048)) == 61


@pytest.mark.parametrize("own_peaks", [True, False])
def test_held_batches_copy_peaks_that_are_their_values_once(own_peaks):
    """A flush concatenates the held values, labels and, only where they are tensors of their
    own, the peaks; the states are those of the batches added one by one."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 5, generator=g), torch.arange(8) % 3) for _ in range(3)]
    peaks = [torch.randn(8, 5, generator=g) if own_peaks else None for _ in batches]
    held, stats, alone = HeldBatches(), ClassNeuronStats(3, 5), ClassNeuronStats(3, 5)
    for (values, labels), peak in zip(batches, peaks, strict=True):
        held.add("a", stats, values, labels, peak)
        alone.update(values, labels, peak)
    with Operations() as ops:
        held.flush({"a": stats})
    assert ops.counts["cat"] == (3 if own_peaks else 2)
    for key, state in stats.compute().items():
        # float64 sums of the same values, in another order
        torch.testing.assert_close(state, alone.compute()[key], rtol=1e-12, atol=1e-12)


def test_layers_held_together_are_added_as_each_alone_with_their_preparation_shared():
    """Four layers of 5 neurons held as one ``[B, 4, 5]`` stack, the first two with peaks of
    their own: the flush concatenates each kind once, masks, converts and compares once for all
    four, and adds each layer's states as its own update would."""
    g = torch.Generator().manual_seed(0)
    names = ("a", "b", "c", "d")
    batches = []
    for _ in range(3):
        values = torch.randn(8, 4, 5, generator=g)
        batches.append((values, torch.arange(8) % 3, torch.randn(8, 2, 5, generator=g)))
    batches[1][0][2, 3, 1] = float("nan")  # a non-finite value of layer d
    together = [ClassNeuronStats(3, 5) for _ in names]
    alone = [ClassNeuronStats(3, 5) for _ in names]
    held = HeldBatches()
    for values, labels, peaks in batches:
        held.add_layers(names, together, values, labels, peaks)
        for j, stats in enumerate(alone):
            stats.update(values[:, j], labels, peaks[:, j] if j < 2 else None)
    assert all(stats.update_count == 0 for stats in together)  # held, not yet added
    with Operations() as ops:
        held.flush(dict(zip(names, together, strict=True)))
    for mine, theirs in zip(together, alone, strict=True):
        assert mine.update_count == 1
        for key, state in mine.compute().items():
            # float64 sums of the same values, in another order at most
            torch.testing.assert_close(state, theirs.compute()[key], rtol=1e-12, atol=1e-12)
    assert int(together[3].nan.sum()) == 1 and int(together[2].nan.sum()) == 0
    counts = ops.counts
    # the values, labels and peaks concatenated once (and the fired flags of the layers with and
    # without peaks); the non-finite values masked twice (sums, maxima) and counted once
    assert counts["cat"] == 4 and counts["where"] == 2 and counts["bitwise_not"] == 1
    assert counts["index_add_"] == 2 * 4 and counts["index_put_"] == 3 * 4
    assert counts["scatter_reduce_"] == 4


def test_a_flush_of_one_layer_adds_its_group_and_leaves_the_others_held():
    """``flush(stats, name)`` adds the batches of the groups holding ``name`` (with the layers
    held beside it) and no others; the tracker does so before a layer changes width."""
    names = ("a", "b")
    stats = {name: ClassNeuronStats(2, 3) for name in ("a", "b", "c")}
    held = HeldBatches()
    labels = torch.arange(4) % 2
    held.add_layers(names, [stats["a"], stats["b"]], torch.rand(4, 2, 3), labels)
    held.add("c", stats["c"], torch.rand(4, 3), labels)
    held.flush(stats, "b")
    assert [stats[n].update_count for n in ("a", "b", "c")] == [1, 1, 0]
    assert int(stats["a"].compute()["images"].sum()) == 4
    held.flush(stats, "b")  # nothing held of b's group now: nothing added twice
    assert stats["a"].update_count == 1
    held.flush(stats)
    assert int(stats["c"].compute()["images"].sum()) == 4
