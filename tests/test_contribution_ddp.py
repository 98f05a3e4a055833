"""NeuronContribution under DDP (two CPU processes, gloo): each rank analyses its share of the
kept batches and the sums are added up, so the contribution matrices, the ablation accuracy drops
(neuron clusters from rank zero included) and the probes equal one process's with the same
images; every rank has the results, only rank zero writes; a failure on one rank is reported on
both ranks, and nothing hangs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("_ddp_contribution.py")


def _run(out: Path, devices: int, *extra: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # a rank left waiting in a collective would end here
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_ddp_matches_one_process(tmp_path):
    _run(tmp_path / "one", 1)
    _run(tmp_path / "two", 2)
    single = torch.load(tmp_path / "one" / "rank0.pt")
    double = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    layers = ["backbone.features.relu1", "backbone.features.relu2"]
    assert sorted(single) == sorted(double[0]) == sorted(double[1]) == layers
    for layer in layers:
        one = single[layer]
        # both ranks hold the same results: the sums were added up on every rank
        for key, value in double[0][layer].items():
            other = double[1][layer][key]
            assert value == other if isinstance(value, list) else torch.equal(value, other), key
        two = double[0][layer]
        # every image counted once: 359 (DistributedSampler's repeat left out), kept as 6
        # batches per rank, 12 in one process
        assert int(one["stats_counts"].sum()) == int(two["stats_counts"].sum()) == 359
        # integer counts, rankings of the means, argmax-based counts and index choices: exact
        for key in ("stats_counts", "stats_dominant", "top_example_index", "probe_index"):
            assert torch.equal(one[key], two[key]), (layer, key)
        for key in ("probe_labels", "probe_predictions", "probe_top_neurons"):
            assert torch.equal(one[key], two[key]), (layer, key)
        assert one["probe_labels"].tolist() == list(range(10))
        # the cluster sets came from rank zero (rank 1's NeuronClustering has no results)
        assert one["ablation_sets"] == two["ablation_sets"]
        assert one["ablation_sets"][-3:] == ["cluster 0", "cluster 1", "cluster 2"]
        # accuracies are ratios of the same integer counts: exactly equal
        for key in ("accuracy_drop", "baseline_accuracy"):
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=0, equal_nan=True)
        # Per-image contributions and logits are float32 from batches of other images (each
        # image's own in eval mode; the kernels' batching may change last bits, ~1e-7 relative),
        # summed in float64 in another order (~1e-16): 1e-6 relative is far above both. The std
        # sqrt(E[x^2] - mean^2) turns an absolute error e of the variance into up to sqrt(e).
        for key in ("stats_class_contribution", "stats_class_logit", "stats_domination"):
            torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-9, equal_nan=True)
        for key in ("stats_positive_rate", "logit_drop", "probe_contribution"):
            torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(
            two["stats_class_std"], one["stats_class_std"], rtol=0, atol=1e-7, equal_nan=True
        )
        # the probes' images and their top neurons' top examples came from the rank holding them
        assert torch.equal(one["probe_images"], two["probe_images"])
        assert torch.equal(one["probe_preferred"], two["probe_preferred"])
    # the ablation of the last layer does change some class's accuracy: a comparison of numbers
    # that are not all zero
    assert single[layers[1]]["accuracy_drop"].abs().max() > 0
    summary = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert summary[0]["failures"] == summary[1]["failures"] == []
    contribution_files = [p for p in summary[0]["written"] if "/contribution/" in p]
    assert len(contribution_files) == 2 and summary[1]["written"] == []  # rank zero writes


def test_a_failure_on_one_rank_is_reported_on_every_rank_without_hanging(tmp_path):
    _run(tmp_path, 2, "1")  # the ablation raises on rank 1 alone; on_error="warn"
    summary = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in (0, 1):
        assert summary[rank]["layers"] == []  # the analysis was skipped on both ranks
        (failure,) = summary[rank]["failures"]
        assert "failed on rank 1: RuntimeError: out of memory (simulated)" in failure
    assert not [p for p in summary[0]["written"] if "/contribution/" in p]
