"""scikit-learn's own estimator checks on both clusterers.

Every check of ``check_estimator`` runs on each configuration below; the ones that cannot apply
to clustering class profiles are expected to fail, each with its reason, as listed by
:func:`lightning_neurons.clustering.expected_failed_checks` (a check that passes although it is
listed fails this test: the list must not go stale). ``check_array_api_input`` (NumPy inputs
give the same results with scikit-learn's array API dispatch on) needs SciPy's array API mode,
which SciPy reads once, at import: it runs in a process of its own with ``SCIPY_ARRAY_API=1``
(scikit-learn skips it otherwise), so the rest of the suite keeps SciPy as users have it.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import warnings

import pytest
from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks

from lightning_neurons.clustering import CategoryClusterer, NeuronClusterer, expected_failed_checks

ESTIMATORS = [
    CategoryClusterer(),
    CategoryClusterer(metric="euclidean", normalize="none"),
    CategoryClusterer(method="kmeans"),
    CategoryClusterer(method="hdbscan"),
    NeuronClusterer(),
    NeuronClusterer(method="kmeans"),
    NeuronClusterer(method="agglomerative", n_clusters=2),
]
# about a minute of CPU for the checks, twice: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow


#: Runs a pickled ``(estimator, check)`` from stdin, as the test would in this process.
_RUN_CHECK = """
import pickle, sys, warnings
estimator, check = pickle.loads(sys.stdin.buffer.read())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    check(estimator)
"""


def _check_name(check) -> str:
    while isinstance(check, functools.partial):
        check = check.func
    return check.__name__


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    if _check_name(check) == "check_array_api_input":
        env = {**os.environ, "SCIPY_ARRAY_API": "1"}
        payload = pickle.dumps((estimator, check))
        run = [sys.executable, "-c", _RUN_CHECK]
        done = subprocess.run(run, input=payload, env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checks' own data warnings (k-means, HDBSCAN)
        check(estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_every_listed_failure_does_fail(estimator):
    expected = expected_failed_checks(estimator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None, expected_failed_checks=expected)
    statuses = {r["check_name"]: r["status"] for r in results}
    assert set(expected) <= set(statuses)
    assert [name for name, status in statuses.items() if status == "failed"] == []
    assert {name for name in expected if statuses[name] != "xfail"} == set()


def test_the_checks_that_do_not_apply_are_few_outside_hdbscan():
    assert list(expected_failed_checks(CategoryClusterer())) == ["check_clustering"]
    assert list(expected_failed_checks(NeuronClusterer(method="kmeans", n_clusters=2))) == [
        "check_clustering"
    ]
