"""CategoryClustering's seconds per analysed epoch at ImageNet scale, on 2 CPU threads.

The callback's whole epoch work (``_analyse``: the views' profiles, distances, linkage, the choice
of the cluster count, the distance/confusion agreement, the dendrogram, distance-vs-confusion and
evolution figures, TensorBoard scalars and text, the ``.npz`` and JSON files, waited for) runs on
a synthetic tracker result shaped like ResNet-50's 17 default layers at 1,000 classes: the stem
(64 channels) and the 16 bottleneck blocks (256, 512, 1024, 2048 channels), 15,168 neurons in
all. Each layer's class means are the synthetic post-ReLU profile of ``clustering_scale.py``
(40 planted groups of categories, 10% unselective neurons; a different seed per layer, the same
groups), and the confusion matrix counts 50 images per class, mostly right, the mistakes within
a class's group.

Two analysed epochs run (the second one adds the evolution figures and ``stability``); both are
timed, each configuration in a fresh process limited to 2 threads (and 2 cores): the seconds the
training thread spends in the callback ("held"), the seconds until every figure and file of the
epoch is written ("done": figures may be drawn by worker processes), the training process's CPU
seconds, and the seconds of the main steps. The configurations:

* before: ``views="all"`` (every layer and the combined view: 18 views) with the previous count
  choice, reproduced here: scikit-learn's ``silhouette_score`` once per candidate cut;
* ``views="all"`` with the count choice of the library now;
* the defaults (``CategoryClustering()``: the deepest layer and the combined view).

The library imported is the one on ``PYTHONPATH``: ``--runs defaults`` on an older checkout
measures its defaults. Goal: <= 2 s per epoch.

Run: ``python benchmarks/category_clustering_epoch.py [--classes 1000] [--runs before,all,defaults]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "2"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clustering_scale import GROUPS, in_fresh_process, synthetic_profile  # noqa: E402

#: ResNet-50's default tracked layers: the stem's ReLU and the 16 bottleneck blocks.
RESNET50_LAYERS = [("relu", 64)] + [
    (f"layer{stage}.{block}", width)
    for stage, (blocks, width) in enumerate(((3, 256), (4, 512), (6, 1024), (3, 2048)), start=1)
    for block in range(blocks)
]
GOAL_S = 2.0


def _stats(classes: int, epoch: int) -> dict:
    import torch

    from lightning_neurons.stats import LayerStats

    groups = synthetic_profile(classes, 1)[1]
    out = {}
    for i, (name, width) in enumerate(RESNET50_LAYERS):
        profile, _ = synthetic_profile(classes, width, seed=i, groups=groups)
        means = torch.from_numpy(profile)
        zeros = torch.zeros(width)
        out[name] = LayerStats(
            layer=name,
            epoch=epoch,
            reduction="mean",
            counts=torch.full((classes,), 50),
            class_means=means,
            class_std=torch.ones_like(means),
            class_max=means,
            firing_rate=torch.ones_like(means),
            nan_counts=zeros.long(),
            selectivity=zeros,
            dead=zeros.bool(),
            dominant=torch.zeros(classes, 5, dtype=torch.long),
            domination=torch.zeros(classes),
            preferred_class=zeros.long(),
        )
    return out


def _confusion(classes: int):
    import torch

    rng = np.random.default_rng(0)
    groups = synthetic_profile(classes, 1)[1]
    counts = np.zeros((classes, classes), dtype=np.int64)
    for c in range(classes):
        mates = np.flatnonzero(groups == groups[c])
        wrong = rng.choice(mates, size=10)
        counts[c, c] += 40
        np.add.at(counts[c], wrong, 1)
    return torch.from_numpy(counts).double()


def _old_count_choice() -> None:
    """The count choice before: scikit-learn's silhouette once per candidate cut."""
    from sklearn.metrics import silhouette_score

    from lightning_neurons.clustering import category

    def choose(self, candidates, labels_for):
        def score(labels):
            if np.unique(labels).size < 2 or np.unique(labels).size >= labels.size:
                return float("nan")
            return float(silhouette_score(self.distances_, labels, metric="precomputed"))

        return category.best_by_silhouette(candidates, labels_for, score, self.scores_)

    category.CategoryClusterer._choose = choose


#: The steps timed apart: (module, class or "", function, label).
STEPS = [
    ("lightning_neurons.clustering", "", "standardize_columns", "z-score"),
    ("lightning_neurons.clustering.category", "", "standardize_columns", "z-score"),
    ("lightning_neurons.clustering.category", "", "category_distances", "distances"),
    ("lightning_neurons.clustering.category", "CategoryClusterer", "fit", "fit"),
    ("lightning_neurons.callbacks.category_clustering", "", "_confusion_ranks", "agreement"),
    ("lightning_neurons.callbacks.category_clustering", "", "_agreement", "agreement"),
    # Not the plot functions: wrapped, they could not be pickled for the figure workers.
]


def _timed_steps() -> dict[str, float]:
    """Wrap :data:`STEPS` so that their seconds add up in the returned dict (``fit`` includes
    its own z-score and distances)."""
    import functools
    import importlib

    spent: dict[str, float] = {}
    for module, cls, name, label in STEPS:
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        original = getattr(owner, name, None)
        if original is None:  # another version of the library
            continue

        def timed(*args, _f=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - start

        setattr(owner, name, functools.wraps(original)(timed))
    return spent


def _run(options: dict, old_choice: bool, classes: int, queue: mp.Queue) -> None:
    with contextlib.suppress(AttributeError, OSError):  # not every platform pins threads
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.trainer.states import TrainerFn
    from sklearn.metrics import adjusted_rand_score

    from lightning_neurons import CategoryClustering, loggers

    # waits for the files and the figures drawn off the training thread (or only the files)
    wait = getattr(loggers, "wait_for_output", loggers.background_writes.wait)

    torch.set_num_threads(2)
    if old_choice:
        _old_count_choice()
    confusion = _confusion(classes)
    groups = synthetic_profile(classes, 1)[1]
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            logger=TensorBoardLogger(root, name="bench"),
            default_root_dir=root,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.state.fn = TrainerFn.FITTING
        callback = CategoryClustering(**options, on_error="raise")
        seconds = []
        spent = _timed_steps()
        for epoch in range(2):
            spent.clear()
            trainer.fit_loop.epoch_progress.current.completed = epoch
            stats = _stats(classes, epoch)
            start, cpu = time.perf_counter(), time.process_time()
            callback._analyse(trainer, stats, confusion)
            held, cpu = time.perf_counter() - start, time.process_time() - cpu
            errors = wait(callback)
            seconds.append((held, time.perf_counter() - start, cpu))
            if errors:
                raise errors[0]
        trainer.logger.experiment.flush()
        head = callback.result
        ari = adjusted_rand_score(groups, head.labels.numpy())
        summary = (
            f"{len(callback.results)} views; headline {callback.main_view}: {head.n_clusters} "
            f"clusters, ARI vs planted {ari:.3f}"
        )
    queue.put((seconds, summary, dict(spent)))


def measure(
    options: dict, old_choice: bool, classes: int
) -> tuple[list[float], str, dict[str, float]]:
    return in_fresh_process(_run, options, old_choice, classes)


def main() -> None:
    parser = argparse.ArgumentParser(description="CategoryClustering's seconds per epoch.")
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument(
        "--runs",
        default="before,all,defaults",
        help="comma-separated: before, all, defaults (only 'defaults' runs on an older library)",
    )
    args = parser.parse_args()
    neurons = sum(w for _, w in RESNET50_LAYERS)
    print(
        f"CategoryClustering, {args.classes} classes x {len(RESNET50_LAYERS)} layers "
        f"(ResNet-50 widths, {neurons} neurons, {GROUPS} planted groups), 2 threads; "
        f"load average before: {os.getloadavg()[0]:.1f}\n"
    )
    header = (
        f"{'configuration':<42} {'epoch 1 held / done (s)':>24} {'epoch 2 held / done (s)':>24} "
        f"{'epoch 2 CPU (s)':>15}  goal        result"
    )
    print(header)
    print("-" * (len(header) + 50))
    runs = {
        "before": ('views="all", silhouette per cut (before)', {"views": "all"}, True),
        "all": ('views="all"', {"views": "all"}, False),
        "defaults": ("defaults", {}, False),
    }
    for label, options, old in (runs[name] for name in args.runs.split(",")):
        seconds, summary, spent = measure(options, old, args.classes)
        (held1, done1, _), (held2, done2, cpu2) = seconds
        verdict = "ok" if max(done1, done2) <= GOAL_S else "OVER"
        print(
            f"{label:<42} {held1:>11.2f} / {done1:<10.2f} {held2:>11.2f} / {done2:<10.2f} "
            f"{cpu2:>15.2f}  <= {GOAL_S:.0f} s {verdict:<4}  {summary}"
        )
        print(f"{'':<4}epoch 2 steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in spent.items()))
    print(
        "\nheld: the training thread's seconds in the callback's epoch work; done: until its "
        "figures and files are written (the goal's measure). epoch 1: the first analysis; epoch 2:"
        " the next one (adds the evolution figures). CPU: the training process's CPU seconds on "
        "its threads (BLAS, file writers), not the figure workers'."
    )


if __name__ == "__main__":
    main()
