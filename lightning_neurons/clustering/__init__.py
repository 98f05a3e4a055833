"""Clustering of image categories and of neurons, scikit-learn shaped (``fit`` / ``labels_``).

* :class:`CategoryClusterer`: the categories are the points and their class profiles (one row of
  ``[num_classes, num_neurons]``) the features. Classes that the network represents alike end up
  together (the paper's first clustering).
* :class:`NeuronClusterer`: the neurons are the points and their normalised response across the
  categories (one column) the features. Neurons tuned alike end up together; density clustering
  (HDBSCAN) leaves unselective neurons as noise, label ``-1`` (the paper's second clustering).
* :class:`ActivationReservoir`: a fixed-size uniform sample of per-image activations, for neuron
  clustering on individual images rather than class means, with bounded memory.

The estimators use scikit-learn, SciPy and ``hdbscan``; what they add is input checking with
clear errors, the distance a profile needs (correlation, cosine), a documented choice of the
number of clusters, deterministic labels for a ``random_state``, and memory-aware shortcuts that
keep ImageNet-sized layers (tens of thousands of neurons, a thousand categories) to seconds. Both
pass scikit-learn's ``check_estimator`` except the checks that cannot apply to class profiles;
:func:`expected_failed_checks` lists those with their reasons.
"""

from lightning_neurons.clustering._common import candidate_cluster_counts
from lightning_neurons.clustering.category import (
    CategoryClusterer,
    CategoryMethod,
    CategoryNormalize,
    Linkage,
    Metric,
    category_distances,
    standardize_columns,
)
from lightning_neurons.clustering.conformance import expected_failed_checks
from lightning_neurons.clustering.neuron import (
    NeuronClusterer,
    NeuronMethod,
    NeuronNormalize,
    default_min_cluster_size,
    normalize_neurons,
)
from lightning_neurons.clustering.reservoir import ActivationReservoir

__all__ = [
    "ActivationReservoir",
    "CategoryClusterer",
    "CategoryMethod",
    "CategoryNormalize",
    "Linkage",
    "Metric",
    "NeuronClusterer",
    "NeuronMethod",
    "NeuronNormalize",
    "candidate_cluster_counts",
    "category_distances",
    "default_min_cluster_size",
    "expected_failed_checks",
    "normalize_neurons",
    "standardize_columns",
]
