"""DDP (two CPU processes, gloo) gives the same statistics as one process (every statistic: counts,
means, std, maxima, firing rates, NaN counts, selectivity, dominant neurons), every image counted
once although DistributedSampler pads the odd validation set; only rank zero writes."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from ddp import run_ranks
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_neurons import ActivationTracker, CategoryClustering
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.loggers import AnalysisLogger, load_index
from lightning_neurons.models import ImageClassifier, SmallCNN

LAYERS = ["backbone.features.relu1", "backbone.features.relu2", "marker"]


class WithNaNBranch(ImageClassifier):
    """The classifier, plus a tracked side branch (output unused) that is NaN on some images."""

    def __init__(self) -> None:
        super().__init__(SmallCNN(widths=(8, 16)), num_classes=10)
        self.marker = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = x[:, :, :4, :4].clone()
        patch[:, :, 0, 0] = torch.where(x[:, :, 16, 16] > x[:, :, 16, 10], torch.nan, 1.0)
        self.marker(patch)
        return super().forward(x)


def _validate(rank: int, world_size: int, out: Path, compiled: bool = False) -> dict:
    """Validate a fixed model on digits; every statistic of every layer, the files written.
    ``compiled``: its backbone ``torch.compile``d with ``fullgraph=True`` (the ``eager``
    backend), the statistics named as the plain model's layers."""
    written: list[str] = []
    save = AnalysisLogger.save_arrays

    def counting_save(self, *args, **kwargs):
        path = save(self, *args, **kwargs)
        if path is not None:
            written.append(str(path))
        return path

    torch.manual_seed(0)
    model = WithNaNBranch()
    layers = LAYERS
    if compiled:
        model.backbone = torch.compile(model.backbone, backend="eager", fullgraph=True)
        layers = [n.replace("backbone.", "backbone._orig_mod.") for n in LAYERS]
    tracker = ActivationTracker(layers=layers, reduction="max")
    category = CategoryClustering(n_clusters=2, enable_logging=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        logger=TensorBoardLogger(str(out), name="tb"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[tracker, category],
    )
    # 359 validation images: an odd count, so DistributedSampler repeats one image on rank 1
    data = DigitsDataModule(batch_size=64, val_fraction=0.1997)
    with mock.patch.object(AnalysisLogger, "save_arrays", counting_save):
        trainer.validate(model, datamodule=data, verbose=False)
    stats = {k.replace("._orig_mod", ""): v.as_arrays() for k, v in tracker.results.items()}
    if category.results:
        stats["confusion"] = torch.as_tensor(next(iter(category.results.values())).confusion)
    return {"stats": stats, "written": written}


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_two_process_ddp_matches_one_process(tmp_path, compiled):
    """``compiled``: the two processes' backbone is compiled with ``fullgraph=True`` (its hooks
    hand their outputs over at each batch's end), the one process's is not."""
    (alone,) = run_ranks(_validate, 1, tmp_path / "one")
    rank0, rank1 = run_ranks(_validate, 2, tmp_path / "two", compiled)
    single, double = alone["stats"], rank0["stats"]
    confusion_1, confusion_2 = single.pop("confusion"), double.pop("confusion")
    assert confusion_1.sum() == confusion_2.sum() == 359  # the repeated image is not counted
    assert torch.equal(confusion_1, confusion_2)
    assert single.keys() == double.keys() == set(LAYERS)
    # some images are NaN in the marker branch, so the NaN counts are compared on real numbers
    assert 0 < int(single["marker"]["nan_counts"][0]) < 359
    for layer in LAYERS:
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
        # the tracker's statistics are synced: rank 1 holds rank 0's
        for key, value in rank1["stats"][layer].items():
            torch.testing.assert_close(value, two[key], atol=0, rtol=0, equal_nan=True)
    assert len(rank0["written"]) == 3 and rank1["written"] == []  # only rank zero writes
    index = load_index(tmp_path / "two" / "tb" / "version_0")
    assert len(index) == 3
