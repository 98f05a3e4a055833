"""Clustering at ImageNet scale on 2 CPU cores: time and peak memory.

* neuron clustering: 20,000 neurons x 1,000 categories (``NeuronClusterer()`` defaults:
  z-score, PCA to 48 dimensions, HDBSCAN with min_cluster_size 70);
* category clustering: 1,000 categories x 20,000 neurons (``CategoryClusterer()`` defaults:
  correlation distance through one matrix product, average linkage, the number of clusters
  chosen by silhouette over 39 candidate cuts).

The profile is synthetic but shaped like a real one: non-negative (post-ReLU) float32 class
means, neurons tuned to one of 40 groups of categories with random gains, plus 10% unselective
neurons. Each task runs in a fresh process limited to 2 threads; peak memory is that process's
peak resident set size (``ru_maxrss``), with the part taken by the input profile itself
reported separately, and the peak of the arrays the fit itself allocates (``tracemalloc``:
NumPy, SciPy, scikit-learn and hdbscan arrays; not BLAS scratch space). "RSS before fit" is
mostly the imported libraries (torch, Lightning) and generating the profile. Goal: each under
60 s and 4 GB.

Run: ``python benchmarks/clustering_scale.py [--neurons 20000] [--categories 1000]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "2"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import multiprocessing as mp  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402

GROUPS = 40


def synthetic_profile(
    categories: int, neurons: int, seed: int = 0, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``[categories, neurons]`` float32 class profile and each category's planted group
    (``groups`` when given: several layers' profiles of the same categories)."""
    rng = np.random.default_rng(seed)
    category_group = rng.integers(0, GROUPS, size=categories)
    if groups is not None:
        category_group = groups
    neuron_group = rng.integers(0, GROUPS, size=neurons)
    gain = rng.gamma(2.0, 0.5, size=neurons).astype(np.float32)
    profile = rng.gamma(1.0, 0.3, size=(categories, neurons)).astype(np.float32)
    tuned = (category_group[:, None] == neuron_group[None, :]).astype(np.float32)
    profile += 2.0 * tuned * gain[None, :]
    unselective = rng.random(neurons) < 0.1
    profile[:, unselective] = rng.gamma(1.0, 0.3, size=(categories, int(unselective.sum()))).astype(
        np.float32
    )
    return profile, category_group


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _run(task: str, categories: int, neurons: int, queue: mp.Queue) -> None:
    with contextlib.suppress(AttributeError, OSError):  # not every platform pins threads
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
    import torch

    torch.set_num_threads(2)
    from sklearn.metrics import adjusted_rand_score

    from lightning_neurons.clustering import CategoryClusterer, NeuronClusterer

    profile, groups = synthetic_profile(categories, neurons)
    before = _peak_mb()
    tracemalloc.start()  # numpy's and the extensions' array allocations, not BLAS scratch
    start = time.perf_counter()
    if task == "neurons":
        model = NeuronClusterer().fit(profile)
        summary = f"{model.n_clusters_} clusters, {np.mean(model.labels_ < 0):.1%} noise"
    else:
        model = CategoryClusterer().fit(profile)
        summary = f"{model.n_clusters_} clusters, ARI vs planted groups {adjusted_rand_score(groups, model.labels_):.3f}"
    seconds = time.perf_counter() - start
    allocated = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    queue.put((seconds, _peak_mb(), before, allocated, profile.nbytes / 2**20, summary))


def in_fresh_process(target, *args):
    """``target(*args, queue)`` in a spawned process; what it puts on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def measure(
    task: str, categories: int, neurons: int
) -> tuple[float, float, float, float, float, str]:
    return in_fresh_process(_run, task, categories, neurons)


def main() -> None:
    parser = argparse.ArgumentParser(description="Clustering time and peak memory at scale.")
    parser.add_argument("--neurons", type=int, default=20_000)
    parser.add_argument("--categories", type=int, default=1_000)
    args = parser.parse_args()
    print(f"{args.neurons} neurons x {args.categories} categories, 2 threads, float32 profile\n")
    header = (
        f"{'task':<44} {'time (s)':>9} {'peak RSS (MB)':>14} {'RSS before fit':>15} "
        f"{'fit allocs (MB)':>16} {'profile (MB)':>13}  result"
    )
    print(header)
    print("-" * (len(header) + 30))
    tasks = [
        ("neurons", f"neuron clustering: {args.neurons} neurons (HDBSCAN)"),
        ("categories", f"category clustering: {args.categories} categories"),
    ]
    for task, label in tasks:
        seconds, peak, before, allocated, data, summary = measure(
            task, args.categories, args.neurons
        )
        verdict = "ok" if seconds < 60 and peak < 4096 else "OVER GOAL"
        print(
            f"{label:<44} {seconds:>9.1f} {peak:>14.0f} {before:>15.0f} {allocated:>16.0f} "
            f"{data:>13.0f}  {summary} [{verdict}]"
        )
    print("\ngoal: each under 60 s and 4096 MB peak")


if __name__ == "__main__":
    main()
