"""The scikit-learn checks that cannot apply to the clusterers, each with its reason."""

from __future__ import annotations

from sklearn.base import BaseEstimator


def expected_failed_checks(estimator: BaseEstimator) -> dict[str, str]:
    """The checks of :func:`sklearn.utils.estimator_checks.check_estimator` that ``estimator``
    is expected to fail, with the reason why each cannot apply to clustering class profiles.

    Pass it on as ``check_estimator(est, expected_failed_checks=expected_failed_checks(est))``
    or ``parametrize_with_checks(estimators, expected_failed_checks=expected_failed_checks)``.

    Args:
        estimator: A :class:`CategoryClusterer` or :class:`NeuronClusterer`, with the parameters
            it is checked with.

    Returns:
        ``{check name: reason}``; empty when every check applies.
    """
    # Imported here: the estimator modules import this package.
    from lightning_neurons.clustering.category import CategoryClusterer
    from lightning_neurons.clustering.neuron import NeuronClusterer

    if isinstance(estimator, CategoryClusterer):
        return _category(estimator)
    if isinstance(estimator, NeuronClusterer):
        return _neuron(estimator)
    return {}


#: Checks that set ``n_clusters`` (to 1, 2 or 3) before fitting.
_SETTING_N_CLUSTERS = (
    "check_clustering",
    "check_dont_overwrite_parameters",
    "check_fit2d_1feature",
    "check_fit2d_1sample",
    "check_fit2d_predict1d",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
)
_HDBSCAN = (
    "the check sets n_clusters, which method='hdbscan' refuses (it finds the number of clusters "
    "itself and says so rather than ignore the setting)"
)
#: Checks that fit data of 2 features.
_TWO_FEATURES = (
    "check_estimators_fit_returns_self",
    "check_estimators_overwrite_params",
    "check_fit_check_is_fitted",
    "check_fit_idempotent",
    "check_n_features_in",
    "check_readonly_memmap_input",
)


def _with_hdbscan(estimator: BaseEstimator, failed: dict[str, str]) -> dict[str, str]:
    if estimator.method == "hdbscan":
        for check in _SETTING_N_CLUSTERS:
            failed[check] = f"{failed[check]}; {_HDBSCAN}" if check in failed else _HDBSCAN
    return failed


def _category(estimator: BaseEstimator) -> dict[str, str]:
    failed = {}
    if estimator.metric != "euclidean" or estimator.normalize != "none":
        failed["check_clustering"] = (
            "the distance compares the shapes of class profiles over many neurons (correlation "
            "or cosine, of z-scored columns by default); the check's blobs have 2 features, too "
            "few for a shape: metric='euclidean', normalize='none' passes this check"
        )
    return _with_hdbscan(estimator, failed)


def _neuron(estimator: BaseEstimator) -> dict[str, str]:
    failed = {
        "check_clustering": (
            "NeuronClusterer clusters the columns (neurons) of a [categories, neurons] profile: "
            "labels_ has one entry per feature, not per sample"
        )
    }
    needed = estimator.needed_neurons
    if needed > 2:
        for check in _TWO_FEATURES:
            failed[check] = (
                f"the neurons (columns) are the points, and clustering them this way needs at "
                f"least {needed} that vary; the check's data has 2 features"
            )
    return _with_hdbscan(estimator, failed)
