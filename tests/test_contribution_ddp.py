"""NeuronContribution under DDP (two CPU processes, gloo): each rank analyses its share of the
kept batches and the sums are added up, so the contribution matrices, the ablation accuracy drops
(neuron clusters from rank zero included) and the probes equal one process's with the same
images; every rank has the results, only rank zero writes; a failure on one rank is reported on
both ranks, and nothing hangs.

The validation set has an odd size (359), so under DDP the sampler pads it with a repeat; with
``max_batches=12`` one process keeps all 12 batches of 32 and each of two ranks keeps the 6
batches of its shard (the repeat left out): the same 359 images. A NeuronClustering (k-means on
the tracker's class means, which DDP syncs) provides cluster sets, which exist on rank zero only.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from ddp import run_ranks
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_neurons.callbacks._contribution_ablation as contribution_module
from lightning_neurons import ActivationTracker, NeuronClustering, NeuronContribution
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.models import ImageClassifier, SmallCNN

LAYERS = ["backbone.features.relu1", "backbone.features.relu2"]


def _numbers(results: dict) -> dict:
    """Every number of the contribution results, by layer."""
    numbers = {}
    for layer, res in results.items():
        entry = {f"stats_{k}": v for k, v in res.stats.as_arrays().items()}
        entry["top_example_index"] = res.top_example_index
        if res.ablation is not None:
            entry["ablation_sets"] = res.ablation.sets
            entry["accuracy_drop"] = res.ablation.accuracy_drop
            entry["logit_drop"] = res.ablation.logit_drop
            entry["baseline_accuracy"] = res.ablation.baseline_accuracy
        probes = res.probes
        for key in ("index", "labels", "predictions", "contribution", "top_neurons", "images"):
            entry[f"probe_{key}"] = getattr(probes, key)
        entry["probe_preferred"] = torch.stack([torch.stack(row) for row in probes.preferred])
        numbers[layer] = entry
    return numbers


def _validate(rank: int, world_size: int, out: Path, fail_rank: int | None = None) -> dict:
    """NeuronContribution on a fixed model and digits; with ``fail_rank``, the ablation fails on
    that rank alone (``on_error="warn"``)."""
    written: list[str] = []
    save, sums = AnalysisLogger.save_arrays, contribution_module.ablation_sums

    def counting_save(self, *args, **kwargs):
        path = save(self, *args, **kwargs)
        if path is not None:
            written.append(str(path))
        return path

    def failing_sums(*args, **kwargs):
        if dist.get_rank() == fail_rank:
            raise RuntimeError("out of memory (simulated)")
        return sums(*args, **kwargs)

    torch.manual_seed(0)
    model = ImageClassifier(SmallCNN(widths=(8, 16)), num_classes=10)
    contribution = NeuronContribution(
        max_batches=12, ablation_layers=LAYERS, on_error="raise" if fail_rank is None else "warn"
    )
    clusters = NeuronClustering(
        method="kmeans", n_clusters=3, embedding=False, enable_logging=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        logger=TensorBoardLogger(str(out), name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ActivationTracker(layers=LAYERS), clusters, contribution],
    )
    data = DigitsDataModule(batch_size=32, val_fraction=0.1997)  # 359 validation images
    with (
        mock.patch.object(AnalysisLogger, "save_arrays", counting_save),
        mock.patch.object(contribution_module, "ablation_sums", failing_sums),
    ):
        trainer.validate(model, datamodule=data, verbose=False)
    return {
        "numbers": _numbers(contribution.results),
        "failures": list(contribution.failures),
        "written": written,
    }


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    (alone,) = run_ranks(_validate, 1, tmp_path / "one")
    ranks = run_ranks(_validate, 2, tmp_path / "two")
    single = alone["numbers"]
    double = [r["numbers"] for r in ranks]
    assert sorted(single) == sorted(double[0]) == sorted(double[1]) == LAYERS
    for layer in LAYERS:
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
    assert single[LAYERS[1]]["accuracy_drop"].abs().max() > 0
    assert ranks[0]["failures"] == ranks[1]["failures"] == []
    contribution_files = [p for p in ranks[0]["written"] if "/contribution/" in p]
    assert len(contribution_files) == 2 and ranks[1]["written"] == []  # rank zero writes


@pytest.mark.slow
def test_a_failure_on_one_rank_is_reported_on_every_rank_without_hanging(tmp_path):
    ranks = run_ranks(_validate, 2, tmp_path, 1, timeout=180)  # the ablation raises on rank 1
    for rank in (0, 1):
        assert ranks[rank]["numbers"] == {}  # the analysis was skipped on both ranks
        (failure,) = ranks[rank]["failures"]
        assert "failed on rank 1: RuntimeError: out of memory (simulated)" in failure
    assert not [p for p in ranks[0]["written"] if "/contribution/" in p]
