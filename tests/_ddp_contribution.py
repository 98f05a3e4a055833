"""Run by test_contribution_ddp.py: NeuronContribution on a fixed model, digits, 1 or 2 CPU processes.

The validation set has an odd size (359), so under DDP the sampler pads it with a repeat; with
``max_batches=12`` one process keeps all 12 batches of 32 and each of two ranks keeps the 6
batches of its shard (the repeat left out): the same 359 images. A NeuronClustering (k-means on
the tracker's class means, which DDP syncs) provides cluster sets, which exist on rank zero only.

Usage: python _ddp_contribution.py OUT_DIR DEVICES [FAIL_RANK]
Writes OUT_DIR/results.pt (rank zero), OUT_DIR/rank<r>.pt (every rank: its results' numbers) and
OUT_DIR/rank<r>.json (the layers analysed, the failures recorded, the files written). With
FAIL_RANK, the ablation fails on that rank alone (on_error="warn").
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_neurons.callbacks._contribution_ablation as contribution_module
from lightning_neurons import ActivationTracker, NeuronClustering, NeuronContribution
from lightning_neurons.data import DigitsDataModule
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.models import ImageClassifier, SmallCNN

out, devices = Path(sys.argv[1]), int(sys.argv[2])
fail_rank = int(sys.argv[3]) if len(sys.argv) > 3 else None
written: list[str] = []
_save = AnalysisLogger.save_arrays


def counting_save(self, *args, **kwargs):
    path = _save(self, *args, **kwargs)
    if path is not None:
        written.append(str(path))
    return path


AnalysisLogger.save_arrays = counting_save

if fail_rank is not None:
    _sums = contribution_module.ablation_sums

    def failing_sums(*args, **kwargs):
        import torch.distributed as dist

        if dist.get_rank() == fail_rank:
            raise RuntimeError("out of memory (simulated)")
        return _sums(*args, **kwargs)

    contribution_module.ablation_sums = failing_sums

torch.manual_seed(0)
model = ImageClassifier(SmallCNN(widths=(8, 16)), num_classes=10)
layers = ["backbone.features.relu1", "backbone.features.relu2"]
contribution = NeuronContribution(
    max_batches=12,
    ablation_layers=layers,
    on_error="raise" if fail_rank is None else "warn",
)
trainer = pl.Trainer(
    accelerator="cpu",
    devices=devices,
    strategy="ddp" if devices > 1 else "auto",
    logger=TensorBoardLogger(str(out), name="tb"),
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[
        ActivationTracker(layers=layers),
        NeuronClustering(method="kmeans", n_clusters=3, embedding=False, enable_logging=False),
        contribution,
    ],
)
data = DigitsDataModule(batch_size=32, val_fraction=0.1997)  # 359 validation images
trainer.validate(model, datamodule=data, verbose=False)
numbers = {}
for layer, res in contribution.results.items():
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
torch.save(numbers, out / f"rank{trainer.global_rank}.pt")
summary = {
    "layers": sorted(contribution.results),
    "failures": contribution.failures,
    "written": written,
}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(summary))
# Close the gloo process group before exit: otherwise its threads may still be joinable when the
# C++ statics are destroyed (SIGABRT, "terminate called without an active exception").
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
