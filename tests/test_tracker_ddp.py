"""DDP (two CPU processes, gloo) gives the same statistics as one process, every image counted
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
    single = torch.load(tmp_path / "one" / "means.pt")
    double = torch.load(tmp_path / "two" / "means.pt")
    confusion_1, confusion_2 = single.pop("confusion"), double.pop("confusion")
    assert confusion_1.sum() == confusion_2.sum() == 359  # the repeated image is not counted
    assert torch.equal(confusion_1, confusion_2)
    assert single.keys() == double.keys() == {"backbone.features.relu1", "backbone.features.relu2"}
    for layer in single:
        means_1, counts_1, dead_1 = single[layer]
        means_2, counts_2, dead_2 = double[layer]
        assert counts_1.sum() == counts_2.sum() == 359
        torch.testing.assert_close(counts_2, counts_1)
        torch.testing.assert_close(means_2, means_1, atol=1e-6, rtol=1e-6)
        assert torch.equal(dead_1, dead_2)
    rank0 = json.loads((tmp_path / "two" / "rank0.json").read_text())["written"]
    rank1 = json.loads((tmp_path / "two" / "rank1.json").read_text())["written"]
    assert len(rank0) == 2 and rank1 == []
    index = load_index(tmp_path / "two" / "tb" / "version_0")
    assert len(index) == 2
