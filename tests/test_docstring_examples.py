"""Every docstring example of the package runs and shows what its docstring says.

The ``>>>`` lines of each module's docstrings run with :mod:`doctest` (in the module's own
namespace, as ``python -m doctest`` would); examples that need a trained model, a data loader or
a run on disk say ``# doctest: +SKIP`` and are read, not run.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings

import pytest

import lightning_neurons

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(lightning_neurons.__path__, "lightning_neurons.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_show_what_they_say(name, capsys):
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an example's warnings are not what it shows
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    # doctest prints each failing example, what it expected and what it got
    assert result.failed == 0, capsys.readouterr().out


def test_the_examples_are_found():
    examples = 0
    for name in MODULES:
        for test in doctest.DocTestFinder().find(importlib.import_module(name)):
            examples += len(test.examples)
    assert examples > 150  # 202 when this test was written
