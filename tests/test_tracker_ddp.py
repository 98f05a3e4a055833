"""DDP (two CPU processes, gloo) gives the same statistics as one process (every statistic: counts,
means, std, maxima, firing rates, NaN counts, selectivity, dominant neurons), every image counted
once although DistributedSampler pads the odd validation set; only rank zero writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_neurons.loggers import load_index

SCRIPT = Path(__file__).with_name("_ddp_tracker.py")


def _run(out: Path, devices: int) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_ddp_matches_one_process(tmp_path):
    _run(tmp_path / "one", 1)
    _run(tmp_path / "two", 2)
    single = torch.load(tmp_path / "one" / "stats.pt")
    double = torch.load(tmp_path / "two" / "stats.pt")
    confusion_1, confusion_2 = single.pop("confusion"), double.pop("confusion")
    assert confusion_1.sum() == confusion_2.sum() == 359  # the repeated image is not counted
    assert torch.equal(confusion_1, confusion_2)
    layers = {"backbone.features.relu1", "backbone.features.relu2", "marker"}
    assert single.keys() == double.keys() == layers
    # some images are NaN in the marker branch, so the NaN counts are compared on real numbers
    assert 0 < int(single["marker"]["nan_counts"][0]) < 359
    for layer in layers:
        one, two = single[layer], double[layer]
        assert one.keys() == two.keys() and len(one) == 11, sorted(one)
        assert one["counts"].sum() == 359
        # counts, maxima, NaN counts, firing rates (ratios of integer counts), dead neurons:
        # sums of integers and maxima do not depend on the order of the reduction, so exact
        for key in ("counts", "class_max", "nan_counts", "firing_rate", "dead"):
            assert torch.equal(one[key], two[key]), (layer, key)
        # float64 sums of a few hundred values in another order differ by ~1e-13 relatively;
        # std = sqrt(E[x^2] - mean^2) turns an absolute error e of the variance into at most
        # sqrt(e) ~ 1e-6 where the variance is near 0
        for key in ("class_means", "selectivity", "domination"):
            torch.testing.assert_close(two[key], one[key], atol=1e-9, rtol=1e-9, equal_nan=True)
        torch.testing.assert_close(
            two["class_std"], one["class_std"], atol=1e-5, rtol=0, equal_nan=True
        )
        for key in ("dominant", "preferred_class"):  # ranks of means that agree to 1e-9
            assert torch.equal(one[key], two[key]), (layer, key)
    rank0 = json.loads((tmp_path / "two" / "rank0.json").read_text())["written"]
    rank1 = json.loads((tmp_path / "two" / "rank1.json").read_text())["written"]
    assert len(rank0) == 3 and rank1 == []
    index = load_index(tmp_path / "two" / "tb" / "version_0")
    assert len(index) == 3
