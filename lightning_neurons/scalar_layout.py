"""TensorBoard's Custom Scalars tab, laid out for the analyses: every layer's value of a metric on
one chart.

The Scalars tab draws one chart per tag, so comparing the layers of a model (is the deepest one
dying? which one is most selective?) means paging through a chart per layer. The Custom Scalars
tab draws charts from regular expressions over tags: :class:`ScalarLayout` gives it one
category per analysis (``neurons/activations``, ``neurons/neuron_clustering``...) and one chart
per metric, with a line for each layer or view (``neurons/activations/.*/dead_fraction``). The
layout grows with the tags an analysis logs and is written again when a chart is added;
TensorBoard shows the last layout of each run, merged over the runs under ``--logdir``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import Any

__all__ = ["ScalarLayout", "chart_of", "update_layout"]


def chart_of(tag: str) -> tuple[str, str, str] | None:
    """``(category, the words after it, last word)`` of a scalar tag
    ``group/kind/<layer>/.../metric``; ``None`` for a tag without a layer or view part
    (``group/kind/metric``)."""
    parts = tag.split("/")
    if len(parts) < 4:
        return None
    return "/".join(parts[:2]), "/".join(parts[2:]), parts[-1]


class ScalarLayout:
    """The Custom Scalars layout of one run's analysis scalars.

    A chart gathers the tags of one category that end with the same word; its title is the
    last words that all of them share (``dead_fraction``; ``ablation_selectivity/own_drop``; a
    metric of one layer keeps its layer: ``conv2/mean_selectivity``), and its regular
    expression matches every tag of the category that ends with them, whatever the layer or
    view before.

    Example:
        >>> layout = ScalarLayout()
        >>> layout.add(["neurons/activations/conv1/dead_fraction", "neurons/activations/conv2/dead_fraction"])
        True
        >>> layout.layout()
        {'neurons/activations': {'dead_fraction': ['Multiline', ['^neurons/activations/(.+/)?dead_fraction$']]}}
    """

    def __init__(self) -> None:
        # {category: {last word: the title's words, shared by every tag seen}}, in order seen
        self._charts: dict[str, dict[str, list[str]]] = {}

    def add(self, tags: Iterable[str]) -> bool:
        """Add the charts of ``tags``; whether the layout changed."""
        changed = False
        for tag in tags:
            found = chart_of(tag)
            if found is None:
                continue
            category, title, last = found
            words = title.split("/")
            charts = self._charts.setdefault(category, {})
            shared = charts.get(last)
            if shared is None:
                charts[last], changed = words, True
                continue
            common = _common_suffix(shared, words)
            if common != shared:
                charts[last], changed = common, True
        return changed

    def layout(self) -> dict[str, dict[str, list[Any]]]:
        """The layout, as ``SummaryWriter.add_custom_scalars`` takes it."""
        return {
            category: {
                "/".join(words): ["Multiline", [_pattern(category, words)]]
                for words in charts.values()
            }
            for category, charts in self._charts.items()
        }


def _common_suffix(a: list[str], b: list[str]) -> list[str]:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def _pattern(category: str, words: list[str]) -> str:
    return f"^{re.escape(category)}/(.+/)?{re.escape('/'.join(words))}$"


_layouts: weakref.WeakKeyDictionary[Any, ScalarLayout] = weakref.WeakKeyDictionary()


def update_layout(experiment: Any, tags: Iterable[str]) -> None:
    """Add ``tags`` to the layout of ``experiment`` (a TensorBoard ``SummaryWriter``), and write
    the layout when a chart was added."""
    write = getattr(experiment, "add_custom_scalars", None)
    if write is None:
        return
    layout = _layouts.get(experiment)
    if layout is None:
        layout = _layouts[experiment] = ScalarLayout()
    if layout.add(tags):
        write(layout.layout())
