"""Which representation lets category clustering find the real structure of the parts data set?

Trains ``SmallCNN`` (in ``ImageClassifier``) on :mod:`lightning_neurons.parts` with a few seeds,
then, for every combination of

* representation: activation reduced over space by ``mean`` or ``max``, or first-order
  contribution (activation x gradient of the true class's logit, summed over space),
* layers: each conv / ReLU output alone, or several side by side,
* profile normalisation: ``none`` (raw class means) or ``zscore`` (each neuron standardised
  across the classes; the clusterer runs with ``normalize="none"``, so this is the only one),
* distance: ``correlation`` or ``cosine`` (average linkage),

builds the class profile on the validation images and clusters the 12 classes with
:class:`~lightning_neurons.clustering.CategoryClusterer`. It prints the adjusted Rand index (ARI)
against the known grouping (:data:`~lightning_neurons.parts.CLASS_GROUPS`: 4 groups of 3 classes
sharing two large parts) with the number of clusters given (k=4) and chosen by silhouette
(auto), averaged over the seeds, then each factor's mean over all the others.

It does this for both structures of the parts data (``--structures``): ``marks`` (groups share
two large parts of three) and the harder ``one_shared`` (groups share one of two equally large
parts; the network can classify without the shared one). For each it then prints a per-seed
table of what the **defaults** find: ``ActivationTracker()`` and
``CategoryClustering(n_clusters=4)`` attached to a ``Trainer.validate`` of the trained model,
the ARI of their headline view (``category.result``: the deepest default layer, neurons
z-scored), of the combined view, and of the previous defaults (every Conv2d, unnormalised
profiles, combined view) for comparison.

Run: ``python benchmarks/representation_study.py [--seeds 3] [--epochs 10] [--lr 0.002]
[--structures marks one_shared]`` (about 6 minutes per structure on 2 idle CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from lightning_neurons import ActivationTracker, CategoryClustering
from lightning_neurons.clustering import CategoryClusterer
from lightning_neurons.hooks import hooked
from lightning_neurons.layouts import reduce_activation
from lightning_neurons.models import ImageClassifier, SmallCNN
from lightning_neurons.parts import NUM_CLASSES, PartsDataModule
from lightning_neurons.state import untouched

PREFIX = "backbone.features."
LAYER_SETS: dict[str, list[str]] = {
    "conv1": ["conv1"],
    "conv2": ["conv2"],
    "conv3": ["conv3"],
    "relu2": ["relu2"],
    "relu3": ["relu3"],
    "conv2+conv3": ["conv2", "conv3"],
    "relu2+relu3": ["relu2", "relu3"],
    "all conv": ["conv1", "conv2", "conv3"],
}
ALL_LAYERS = sorted({PREFIX + n for names in LAYER_SETS.values() for n in names})


class Snapshot(pl.Callback):
    """Class profiles of the model after its first training epoch."""

    def __init__(self, dm: PartsDataModule) -> None:
        self.dm = dm
        self.profiles: dict = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            with untouched(pl_module):
                pl_module.eval()
                self.profiles = class_profiles(pl_module, self.dm)[0]


def train(
    seed: int, epochs: int, lr: float, dm: PartsDataModule
) -> tuple[dict, dict, dict, float, ImageClassifier]:
    """Profiles of the untrained model, after one epoch and after ``epochs``; final accuracy;
    the trained model."""
    pl.seed_everything(seed, workers=True)
    model = ImageClassifier(SmallCNN(num_classes=NUM_CLASSES), num_classes=NUM_CLASSES, lr=lr)
    untrained = class_profiles(model.eval(), dm)[0]
    model.train()
    snapshot = Snapshot(dm)
    trainer = pl.Trainer(
        callbacks=[snapshot],
        max_epochs=epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    trained, accuracy = class_profiles(model.eval(), dm)
    return untrained, snapshot.profiles, trained, accuracy, model


def class_profiles(model: ImageClassifier, dm: PartsDataModule) -> tuple[dict, float]:
    """``{(representation, layer): [C, K] class profile}`` on the validation images, and the
    validation accuracy."""
    sums: dict[tuple[str, str], torch.Tensor] = defaultdict(lambda: 0)
    counts = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    correct = total = 0
    acts: dict[str, torch.Tensor] = {}
    for x, y in dm.val_dataloader():
        acts.clear()
        # Gradients flow from the input, so this works with frozen parameters (`untouched`).
        with hooked(model, ALL_LAYERS, acts.__setitem__), torch.enable_grad():
            logits = model(x.clone().requires_grad_(True))
        chosen = logits.gather(1, y[:, None]).sum()
        grads = torch.autograd.grad(chosen, [acts[n] for n in ALL_LAYERS])
        onehot = torch.nn.functional.one_hot(y, NUM_CLASSES).double().T
        counts += onehot.sum(dim=1)
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
        for name, grad in zip(ALL_LAYERS, grads, strict=True):
            a = acts[name].detach()
            values = {
                "act mean": reduce_activation(a, "mean", name),
                "act max": reduce_activation(a, "max", name),
                "contribution": (a * grad).sum(dim=(2, 3)),
            }
            for rep, v in values.items():
                sums[(rep, name)] = sums[(rep, name)] + onehot @ v.double()
    return {k: (v / counts[:, None]).numpy() for k, v in sums.items()}, correct / total


def defaults_ari(model: ImageClassifier, dm: PartsDataModule) -> dict[str, float]:
    """ARI of what the callbacks' defaults find on the validation images, and of the previous
    defaults (every Conv2d, unnormalised profiles, combined view) for comparison."""
    groups = dm.class_groups
    out: dict[str, float] = {}
    previous = [PREFIX + n for n in ("conv1", "conv2", "conv3")]
    runs = {
        "default": (ActivationTracker(enable_logging=False), {}),
        "previous": (
            ActivationTracker(layers=previous, enable_logging=False),
            {"normalize": "none"},
        ),
    }
    for name, (tracker, options) in runs.items():
        category = CategoryClustering(
            n_clusters=4, enable_logging=False, on_error="raise", **options
        )
        trainer = pl.Trainer(
            callbacks=[tracker, category],
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.validate(model, datamodule=dm, verbose=False)
        if name == "default":
            out["headline"] = adjusted_rand_score(groups, category.result.labels)
            out["headline view"] = category.main_view
        out[f"{name} combined"] = adjusted_rand_score(groups, category.results["combined"].labels)
    return out


def features(profiles: dict, rep: str, layers: list[str], normalize: str) -> np.ndarray:
    blocks = [profiles[(rep, PREFIX + n)] for n in layers]
    if normalize == "zscore":
        blocks = [(b - b.mean(0)) / np.where(b.std(0) > 1e-12, b.std(0), 1.0) for b in blocks]
    return np.concatenate(blocks, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--n-per-class", type=int, default=200)
    parser.add_argument(
        "--structures", nargs="+", default=["marks", "one_shared"], choices=["marks", "one_shared"]
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    for structure in args.structures:
        study(structure, args)


def study(structure: str, args: argparse.Namespace) -> None:
    """The grid and the defaults table for one structure of the parts data."""
    print(f"\n===== structure {structure!r} =====")
    dm = PartsDataModule(n_per_class=args.n_per_class, batch_size=64, seed=0, structure=structure)
    dm.setup("fit")
    groups = np.array(dm.class_groups)
    reps = ("act mean", "act max", "contribution")
    grid = list(itertools.product(reps, LAYER_SETS, ("none", "zscore"), ("correlation", "cosine")))
    stages = ("untrained", "epoch 1", "trained")
    ari: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    chosen_k: dict[tuple, list[int]] = defaultdict(list)
    start = time.perf_counter()
    table: list[tuple[int, float, dict[str, float]]] = []
    for seed in range(args.seeds):
        *by_stage, acc, model = train(seed, args.epochs, args.lr, dm)
        print(f"seed {seed}: validation accuracy {acc:.3f} ({time.perf_counter() - start:.0f} s)")
        table.append((seed, acc, defaults_ari(model, dm)))
        for key in grid:
            rep, layer_set, normalize, metric = key
            for stage, profiles in zip(stages, by_stage, strict=True):
                x = features(profiles, rep, LAYER_SETS[layer_set], normalize)
                fixed = CategoryClusterer(n_clusters=4, metric=metric, normalize="none").fit(x)
                ari[key][stage].append(adjusted_rand_score(groups, fixed.labels_))
            auto = CategoryClusterer(n_clusters=None, metric=metric, normalize="none").fit(x)
            ari[key]["auto"].append(adjusted_rand_score(groups, auto.labels_))
            chosen_k[key].append(auto.n_clusters_)

    columns = (*stages, "auto")
    print(
        f"\nCategory clustering of the 12 parts classes vs the 4 known groups: adjusted Rand index, "
        f"mean over {args.seeds} seeds (worst seed in brackets). Average linkage. Columns: "
        f"n_clusters=4 on the untrained model, after 1 epoch, after {args.epochs} epochs; 'auto': "
        "trained, count chosen by silhouette (chosen counts at right).\n"
    )
    header = f"{'representation':<13} {'layers':<12} {'profile':<7} {'distance':<11}" + "".join(
        f"{c:>15}" for c in columns
    )
    print(header + "  k")
    print("-" * (len(header) + 8))
    for key in grid:
        cells = "".join(
            f"{np.mean(ari[key][c]):>8.3f} ({np.min(ari[key][c]):>4.2f})" for c in columns
        )
        print(
            f"{key[0]:<13} {key[1]:<12} {key[2]:<7} {key[3]:<11}{cells}  {','.join(map(str, chosen_k[key]))}"
        )
    print("\nMarginal means (each factor averaged over all the others and the seeds)")
    print(f"{'factor':<15} {'level':<13}" + "".join(f"{c:>11}" for c in columns))
    for position, factor in enumerate(("representation", "layers", "profile", "distance")):
        for level in dict.fromkeys(k[position] for k in grid):
            keys = [k for k in grid if k[position] == level]
            means = [np.mean([v for k in keys for v in ari[k][c]]) for c in columns]
            print(f"{factor:<15} {level:<13}" + "".join(f"{m:>11.3f}" for m in means))
    print("\nThe same, for mean-reduced activations only")
    for position, factor in ((1, "layers"), (2, "profile"), (3, "distance")):
        for level in dict.fromkeys(k[position] for k in grid):
            keys = [k for k in grid if k[position] == level and k[0] == "act mean"]
            means = [np.mean([v for k in keys for v in ari[k][c]]) for c in columns]
            print(f"{factor:<15} {level:<13}" + "".join(f"{m:>11.3f}" for m in means))
    print(
        f"\nThe defaults on {structure!r}: ActivationTracker() + CategoryClustering(n_clusters=4), "
        "ARI against the known groups per seed"
    )
    print(
        "| seed | val. accuracy | headline view | ARI headline | ARI combined "
        "| previous defaults (conv, combined) |"
    )
    print("|---|---|---|---|---|---|")
    for seed, acc, row in table:
        print(
            f"| {seed} | {acc:.3f} | {row['headline view']} | {row['headline']:.2f} "
            f"| {row['default combined']:.2f} | {row['previous combined']:.2f} |"
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
