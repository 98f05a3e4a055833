import math

import pytest
import torch

from lightning_neurons.stats import (
    ClassNeuronStats,
    ConfusionCounts,
    LayerStats,
    dead_neurons,
    dominant_neurons,
    finite_counts,
    selectivity_index,
)


def test_streamed_sums_do_not_depend_on_batching():
    g = torch.Generator().manual_seed(0)
    values, labels = torch.randn(100, 6, generator=g), torch.randint(0, 4, (100,), generator=g)
    whole, parts = ClassNeuronStats(4, 6), ClassNeuronStats(4, 6)
    whole.update(values, labels)
    for chunk in range(0, 100, 7):
        parts.update(values[chunk : chunk + 7], labels[chunk : chunk + 7])
    a, b = whole.compute(), parts.compute()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    for c in range(4):
        torch.testing.assert_close(a["sum"][c], values[labels == c].double().sum(0))
        # the largest of float32 values is one of them: kept exactly in float32
        assert torch.equal(a["max"][c], values[labels == c].amax(0))
        assert a["images"][c] == (labels == c).sum()


def test_states_are_counts_float64_sums_and_the_values_own_maximum():
    stats = ClassNeuronStats(1000, 3)
    labels = torch.tensor([999, 0, 999])
    values = torch.tensor([[1.0, -2.0, float("nan")], [0.5, 0.0, 1.0], [3.0, 4.0, 2.0]])
    stats.update(values, labels)
    s = stats.compute()
    assert s["sum"].dtype == s["sum_sq"].dtype == torch.float64
    assert s["fired"].dtype == s["nan"].dtype == torch.int32 and s["images"].dtype == torch.int64
    assert s["max"].dtype == torch.float32
    assert s["images"][[0, 999]].tolist() == [1, 2] and int(s["images"].sum()) == 3
    assert "count" not in s and s["nan"][999].tolist() == [0, 0, 1]
    assert finite_counts(s)[999].tolist() == [2, 2, 1]
    assert s["fired"][999].tolist() == [2, 1, 1] and s["fired"][0].tolist() == [1, 0, 1]
    assert s["sum"][999].tolist() == [4.0, 2.0, 2.0] and s["sum_sq"][999].tolist() == [
        10.0,
        20.0,
        4.0,
    ]
    assert s["max"][999].tolist() == [3.0, 4.0, 2.0] and s["max"][1].tolist() == [-float("inf")] * 3


def _storage_bytes(tensors) -> int:
    return sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
    )


def test_the_metric_keeps_each_state_once():
    """torchmetrics keeps a copy of every state's initial value for ``reset()``, and
    ``compute()`` returns (and caches) a copy of the states: at ResNet-50's shape at 1,000
    classes that was three times the 0.42 GB of statistics. Here the initial values are
    constants broadcast over the shape, and ``summed()`` gives the states themselves."""
    stats = ClassNeuronStats(50, 40)
    states = [stats.sum, stats.sum_sq, stats.fired, stats.nan, stats.max]
    full = _storage_bytes(states)
    assert full == 50 * 40 * (8 + 8 + 4 + 4 + 4)
    assert _storage_bytes(stats._defaults.values()) < 64  # one element per state
    stats.update(torch.rand(8, 40) - 0.5, torch.randint(0, 50, (8,)))
    summed = stats.summed()
    assert summed["sum"] is stats.sum and summed["max"] is stats.max  # no copy
    for key, value in stats.compute().items():
        assert torch.equal(value, summed[key])
    moved = stats._apply(lambda t: t.clone())  # as `.to(device)` does to states and defaults
    assert moved is stats and _storage_bytes(stats._defaults.values()) < 64
    stats.reset()  # the broadcast constants give full states of the initial values
    assert stats.sum.shape == (50, 40) and stats.sum.is_contiguous()
    assert _storage_bytes([stats.sum, stats.sum_sq, stats.fired, stats.nan, stats.max]) == full
    assert int(stats.sum.abs().sum()) == 0 and bool((stats.max == -torch.inf).all())
    stats.update(torch.ones(2, 40), torch.tensor([3, 3]))  # in place on the new states
    assert stats.summed()["sum"][3].tolist() == [2.0] * 40 and stats.images[3] == 2


def test_the_metric_is_made_where_it_is_asked_for_without_full_size_copies():
    """Made on a device, the states are made there (not on the host and then copied), and no
    state is copied whole to keep its initial value (torchmetrics' ``add_state`` deep-copies
    the value it is given: here one element)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    copied: list[int] = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("clone", "copy_", "_to_copy"):
                copied.append(out.numel())
            return out

    with Copies():
        stats = ClassNeuronStats(50, 40, device="meta")
    assert copied and max(copied) == 1  # the initial values' single elements only
    assert stats.device == torch.device("meta") and stats.sum.device.type == "meta"
    assert stats.sum.shape == (50, 40) and stats.images.shape == (50,)
    assert all(d.device.type == "meta" for d in stats._defaults.values())
    stats.reset()
    assert stats.max.shape == (50, 40) and stats.max.device.type == "meta"
    cpu = ClassNeuronStats(5, 4, device="cpu")
    assert int(cpu.sum.abs().sum()) == 0 and bool((cpu.max == -torch.inf).all())


def test_nan_values_are_counted_and_left_out():
    stats = ClassNeuronStats(2, 2)
    values = torch.tensor([[1.0, float("nan")], [3.0, 2.0], [5.0, 4.0]])
    stats.update(values, torch.tensor([0, 0, 1]))
    res = LayerStats.from_state("l", stats.compute(), epoch=0, reduction="mean", top_k=1)
    assert res.nan_counts.tolist() == [0.0, 1.0]
    assert res.class_means.tolist() == [[2.0, 2.0], [5.0, 4.0]]


def test_the_finite_fast_path_gives_the_states_of_the_masking_path(monkeypatch):
    """A batch without NaN or inf skips the masking (on the CPU, known from its sum); its states
    are exactly those of the masking path."""
    import lightning_neurons.stats as stats_module

    g = torch.Generator().manual_seed(0)
    values, labels = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    fast, masked = ClassNeuronStats(3, 5), ClassNeuronStats(3, 5)
    fast.update(values, labels, peak=values + 0.2)
    monkeypatch.setattr(stats_module, "_all_finite", lambda values: False)
    masked.update(values, labels, peak=values + 0.2)
    a, b = fast.compute(), masked.compute()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["nan"].sum()) == 0 and int(a["images"].sum()) == 64


def test_infinities_and_a_sum_that_overflows():
    """+inf and -inf are counted with NaN and left out of the sums; float16 values whose sum
    overflows are all finite and all counted."""
    stats = ClassNeuronStats(2, 2)
    values = torch.tensor([[1.0, float("inf")], [2.0, -float("inf")], [4.0, 8.0]])
    stats.update(values, torch.tensor([0, 0, 1]))
    s = stats.compute()
    assert s["nan"].tolist() == [[0, 2], [0, 0]]
    assert s["sum"].tolist() == [[3.0, 0.0], [4.0, 8.0]] and s["max"][0].tolist() == [
        2.0,
        -float("inf"),
    ]
    big = ClassNeuronStats(2, 3, max_dtype=torch.float16)
    values = torch.full((4, 3), 60000.0, dtype=torch.float16)  # the sum, 720000, is inf in float16
    assert not values.sum().isfinite()
    big.update(values, torch.tensor([0, 1, 1, 1]))
    s = big.compute()
    assert int(s["nan"].sum()) == 0 and s["images"].tolist() == [1, 3]
    assert s["sum"].tolist() == [[60000.0] * 3, [180000.0] * 3] and s["max"].min() == 60000.0


def test_confusion_counts_match_a_plain_count_and_skip_labels_out_of_range():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g)
    labels = torch.randint(-2, 9, (200,), generator=g)  # some outside [0, 7)
    counts = ConfusionCounts(7)
    for part in range(0, 200, 64):  # batch by batch
        counts.update(logits[part : part + 64], labels[part : part + 64])
    expected = torch.zeros(7, 7, dtype=torch.int64)
    for true, pred in zip(labels.tolist(), logits.argmax(1).tolist(), strict=True):
        if 0 <= true < 7:
            expected[true, pred] += 1
    assert torch.equal(counts.compute(), expected)
    assert int(expected.sum()) < 200  # the test did drop some labels


def test_selectivity_conventions():
    one_class = torch.tensor([[2.0], [0.0], [0.0]])
    uniform = torch.tensor([[1.0], [1.0], [1.0]])
    zero = torch.zeros(3, 1)
    negative = torch.tensor([[-1.0], [-3.0], [-3.0]])  # shifted: [2, 0, 0] -> SI 1
    mixed = torch.tensor([[3.0], [1.0], [1.0]])  # (3 - 1) / (3 + 1)
    missing = torch.tensor([[3.0], [float("nan")], [1.0]])
    si = selectivity_index(torch.cat([one_class, uniform, zero, negative, mixed, missing], dim=1))
    assert si[:5].tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0, 0.5])
    assert si[5].item() == pytest.approx(0.5)
    assert math.isnan(selectivity_index(torch.tensor([[1.0], [float("nan")]]))[0].item())


def test_dead_and_dominant_neurons():
    fired = torch.tensor([[0.0, 3.0, 0.0], [0.0, 1.0, 2.0]])
    count = torch.ones(2, 3)
    assert dead_neurons(fired, count).tolist() == [True, False, False]
    means = torch.tensor([[4.0, 1.0, -2.0], [0.0, 0.0, 0.0]])
    dominant, share = dominant_neurons(means, top_k=1)
    assert dominant[0].tolist() == [0]
    assert share.tolist() == pytest.approx([0.8, 0.0])


def test_layer_stats_equal_numpy_on_all_activations_at_once():
    """Streamed in uneven chunks, the statistics equal NumPy's on the whole array: std (population,
    NaN left out), firing rate (share of a class's images whose peak is positive), max, means and
    NaN counts."""
    import numpy as np

    rng = np.random.default_rng(0)
    values = rng.normal(size=(200, 5))
    values[rng.random(values.shape) < 0.05] = np.nan
    peak = values + rng.normal(0.3, 0.5, size=values.shape)  # e.g. a conv channel's spatial max
    labels = rng.integers(0, 3, size=200)  # class 3 of 4 has no image
    stats = ClassNeuronStats(4, 5, max_dtype=torch.float64)  # the maximum in the values' type
    for start in range(0, 200, 37):
        part = slice(start, start + 37)
        stats.update(
            torch.from_numpy(values[part]),
            torch.from_numpy(labels[part]),
            peak=torch.from_numpy(peak[part]),
        )
    res = LayerStats.from_state("l", stats.compute(), epoch=0, reduction="max", top_k=2)
    for c in range(3):
        rows = values[labels == c]
        # computed in float64, kept in float32: rounding to float32 is within 2^-24 (6e-8) relative
        f32 = {"rtol": 1e-7, "atol": 1e-12}
        np.testing.assert_allclose(res.class_std[c].numpy(), np.nanstd(rows, axis=0), **f32)
        np.testing.assert_allclose(res.class_means[c].numpy(), np.nanmean(rows, axis=0), **f32)
        np.testing.assert_array_equal(res.class_max[c].numpy(), np.nanmax(rows, axis=0))
        fired = np.nan_to_num(peak[labels == c], nan=-1.0) > 0
        np.testing.assert_allclose(res.firing_rate[c].numpy(), fired.mean(axis=0), **f32)
    assert res.counts.tolist() == [*np.bincount(labels, minlength=3).tolist(), 0]
    assert torch.isnan(res.class_std[3]).all() and torch.isnan(res.class_means[3]).all()
    np.testing.assert_array_equal(res.nan_counts.numpy(), np.isnan(values).sum(axis=0))


def test_without_max_the_other_states_are_the_same():
    values, labels = torch.randn(40, 6), torch.randint(0, 4, (40,))
    full, lean = ClassNeuronStats(4, 6), ClassNeuronStats(4, 6, track_max=False)
    full.update(values, labels)
    lean.update(values, labels)
    a, b = full.compute(), lean.compute()
    assert "max" in a and "max" not in b and not hasattr(lean, "max")
    assert all(torch.equal(a[k], b[k]) for k in b)
