"""What :class:`~lightning_neurons.ActivationTracker` logs each analysed epoch: per layer the
class profile figure, the selectivity and mean activation histograms, the headline scalars and
the ``.npz`` file of its statistics."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_neurons import progress
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.stats import LayerStats


def log_results(out: AnalysisLogger, results: Mapping[str, LayerStats], stage: str) -> None:
    """Log each layer's statistics of ``results`` (gathered on ``stage``) through ``out``."""
    from lightning_neurons.plots.activation import class_profile, class_profile_image

    scalars: dict[str, float] = {}
    for name, res in results.items():
        progress.advance("layer", len(results))
        # what the figure draws, not the layer's statistics: far less to send to a worker
        out.figure(out.tag(name, "class_profile"), class_profile_image, class_profile(res))
        out.histogram(out.tag(name, "selectivity"), res.selectivity)
        overall = (res.class_means * res.counts.unsqueeze(1)).nansum(dim=0) / res.counts.sum()
        out.histogram(out.tag(name, "mean_activation"), overall)
        scalars[out.tag(name, "dead_fraction")] = float(res.dead.double().mean())
        scalars[out.tag(name, "mean_selectivity")] = float(res.selectivity.nanmean())
        scalars[out.tag(name, "mean_domination")] = float(res.domination.mean())
        scalars[out.tag(name, "nan_count")] = float(res.nan_counts.sum())
        meta = {"layer": name, "reduction": res.reduction, "stage": stage}
        out.save_arrays(name, _file_arrays(res), meta={**meta, "epoch": res.epoch})
    out.scalars(scalars)


def _file_arrays(res: LayerStats) -> dict[str, torch.Tensor]:
    """The arrays written to the ``.npz``: the ``[C, K]`` floating statistics in float32 (7
    significant digits, half the bytes of float64), the rest as they are."""
    arrays = res.as_arrays()
    return {
        k: v.float() if v.is_floating_point() and v.dim() == 2 else v for k, v in arrays.items()
    }
