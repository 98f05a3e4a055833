"""checks.validate_params and its constraints, the one mechanism of the callbacks and the
clusterers: what passes, what fails, and what the message says (the argument, the value and
what is allowed)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from lightning_neurons import NeuronsError
from lightning_neurons.checks import (
    RANDOM_STATE,
    Interval,
    Options,
    Satisfies,
    StrList,
    validate_params,
)
from lightning_neurons.clustering import CategoryClusterer, NeuronClusterer

TABLE = {
    "count": [Interval(int, 1, None)],
    "share": [Interval(float, 0, 1, closed="right")],
    "limit": [Interval(int, None, 10, closed="neither"), None],
    "mode": [Options.of(Literal["mean", "max"])],
    "layers": [StrList(), None],
    "fn": ["callable", None],
    "flag": [bool],
    "name": [Satisfies(lambda v: isinstance(v, str) and bool(v), "a non-empty string")],
}


@pytest.mark.parametrize(
    "params",
    [
        {"count": 1},
        {"count": np.int64(3)},  # NumPy's integers are integers
        {"share": 1},
        {"share": 0.5},
        {"limit": -5},
        {"limit": None},
        {"mode": "max"},
        {"layers": "relu1"},
        {"layers": ("relu1", "relu2")},
        {"fn": len},
        {"flag": False},
        {"name": "x"},
        {"unknown": object()},  # arguments outside the table are not checked
    ],
)
def test_allowed_values_pass(params):
    validate_params("Owner", params, TABLE)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"count": 0}, "`count` must be an integer >= 1; got 0"),
        ({"count": True}, "`count` must be an integer >= 1; got True"),
        ({"count": 2.0}, "`count` must be an integer >= 1; got 2.0"),
        ({"share": 0}, "`share` must be a number with 0 < x <= 1; got 0"),
        ({"share": float("nan")}, "`share` must be a number with 0 < x <= 1; got nan"),
        ({"limit": 10}, "`limit` must be an integer < 10 or None; got 10"),
        ({"mode": "median"}, "`mode` must be one of 'mean', 'max'; got 'median'"),
        ({"layers": ["a", 1]}, r"`layers` must be a layer name or a list of layer names or None"),
        ({"fn": "len"}, "`fn` must be a callable or None; got 'len'"),
        ({"flag": 0}, "`flag` must be a bool; got 0"),
        ({"name": ""}, "`name` must be a non-empty string; got ''"),
    ],
)
def test_disallowed_values_name_the_argument_the_value_and_what_is_allowed(params, message):
    with pytest.raises(NeuronsError, match="^Owner: " + message):
        validate_params("Owner", params, TABLE)


def test_the_owners_class_table_is_used_by_default():
    class Owner:
        _parameter_constraints = {"count": [Interval(int, 1, None)]}

        def __init__(self, count: int) -> None:
            validate_params(self, locals())

    Owner(2)
    with pytest.raises(NeuronsError, match="^Owner: `count` must be an integer >= 1; got 0$"):
        Owner(0)


def test_a_table_entry_that_is_no_constraint_is_a_programming_error():
    with pytest.raises(TypeError, match="not a constraint: 3"):
        validate_params("Owner", {"x": 1}, {"x": [3]})


def test_integer_bounds_are_written_in_full_and_a_random_state_is_a_seed_a_generator_or_none():
    table = {"random_state": list(RANDOM_STATE)}
    for value in (0, 2**32 - 1, np.random.RandomState(0), None):
        validate_params("Owner", {"random_state": value}, table)
    with pytest.raises(NeuronsError) as err:
        validate_params("Owner", {"random_state": -1}, table)
    assert str(err.value) == (
        "Owner: `random_state` must be an integer with 0 <= x <= 4294967295, a RandomState or "
        "None; got -1"
    )


@pytest.mark.parametrize(
    ("estimator", "message"),
    [
        (CategoryClusterer(method="spectral"), "^CategoryClusterer: `method` must be one of 'agg"),
        (CategoryClusterer(min_cluster_size=1), "^CategoryClusterer: `min_cluster_size` must be"),
        (NeuronClusterer(n_components=0), "^NeuronClusterer: `n_components` must be an integer"),
        (NeuronClusterer(random_state=1.5), "^NeuronClusterer: `random_state` must be an integer"),
    ],
)
def test_the_clusterers_check_their_parameters_with_the_same_tables(estimator, message):
    with pytest.raises(NeuronsError, match=message):
        estimator.check_params()
