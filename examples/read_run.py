"""Read a run back and see its neurons change across epochs, notebook-style.

    lightning-neurons fit --config configs/digits.yaml          # the demo run, or
    lightning-neurons analyze --config configs/digits.yaml --ckpt_path "checkpoints/*.ckpt"
    python examples/read_run.py [LOG_DIR] [--save FOLDER]

``LOG_DIR`` is the run's log folder (default: the latest ``runs/digits/version_N``). Each ``# %%``
cell runs on its own in Jupyter or VS Code; there the figures show inline. ``--save`` writes them
as PNG files instead.
"""

# %%
import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from lightning_neurons import load_run
from lightning_neurons.evolution import compare_runs, run_clustering_evolution, run_neuron_evolution
from lightning_neurons.plots.evolution import (
    clustering_evolution_figure,
    comparison_figure,
    neuron_evolution_figure,
)


def latest_demo_run() -> Path:
    runs = sorted(Path("runs/digits").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not runs:
        sys.exit(
            "no demo run under runs/digits: run `lightning-neurons fit --config configs/digits.yaml`"
        )
    return runs[-1]


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("log_dir", nargs="?", type=Path)
parser.add_argument("--save", type=Path, help="write the figures here instead of showing them")
args, _ = parser.parse_known_args()  # a notebook kernel passes arguments of its own
log_dir = args.log_dir or latest_demo_run()

# %% The run: which epochs were analysed, by which callbacks
run = load_run(log_dir)
print(run)
print("callbacks:", ", ".join(run.callbacks()))
last = run.epochs[-1]

# %% The typed results of one epoch, as the live callbacks held them
stats = run.results("ActivationTracker", epoch=last)
layer = list(stats)[-1]  # the deepest tracked layer
layer_stats = stats[layer]
print(f"{layer}, epoch {layer_stats.epoch}: class means {tuple(layer_stats.class_means.shape)}, ")
print(
    f"  mean selectivity {float(layer_stats.selectivity.nanmean()):.2f}, "
    f"{int(layer_stats.dead.sum())} dead neurons"
)
if "CategoryClustering" in run.callbacks():
    clustering = run.results("CategoryClustering")  # its latest epoch
    for view, res in clustering.items():
        print(
            f"  categories by {view} (epoch {res.epoch}): {res.n_clusters} clusters, "
            f"labels {res.labels.tolist()}"
        )

# %% Each neuron's preferred class and selectivity, epoch by epoch
names = None
if "CategoryClustering" in run.callbacks():
    names = next(iter(run.results("CategoryClustering").values())).class_names
figures = {}
evolution = run_neuron_evolution(run)
if layer in evolution and len(evolution[layer].epochs) > 1:
    figures["neurons"] = neuron_evolution_figure(
        evolution[layer], names, figure=plt.figure(figsize=(8, 5))
    )

# %% How far the category clustering moved from epoch to epoch
categories = run_clustering_evolution(run) if "CategoryClustering" in run.callbacks() else {}
for view, moved in categories.items():
    if len(moved.epochs) > 1 and view == layer:
        print(f"{view}: adjusted Rand index with the previous epoch {moved.adjusted_rand.round(2)}")
        figures["categories"] = clustering_evolution_figure(
            moved, figure=plt.figure(figsize=(8, 4))
        )

# %% What changed between the first and the last analysed epoch
if len(run.epochs_of("ActivationTracker")) > 1:
    change = compare_runs(run)  # two runs: compare_runs(load_run(a), load_run(b))
    print(f"{layer}: neurons that changed class: {change.layers[layer].changed.tolist()}")
    figures["comparison"] = comparison_figure(change, layer, figure=plt.figure(figsize=(8, 9)))

# %% Show them (or save them)
if args.save is not None:
    args.save.mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        figure.savefig(args.save / f"{name}.png")
    print(f"saved {', '.join(figures)} to {args.save}")
else:
    plt.show()
