"""Reading a run back: the typed results of every analysed epoch, from the files the callbacks
wrote next to the TensorBoard logs.

A live callback holds only its latest epoch in ``results``; the run's folder holds them all
(``<log_dir>/neurons/<stage>/<kind>/epoch=EEE/*.npz``, listed in ``index.jsonl``).
:func:`load_run` reads that index and gives each epoch's results as the dataclasses of
:mod:`lightning_neurons.results`, equal to what the callback held:

    >>> run = load_run("runs/digits/version_0")  # doctest: +SKIP
    >>> run.epochs  # doctest: +SKIP
    [1, 3, 5, 7, 9]
    >>> run.results("ActivationTracker")["backbone.features.relu3"].class_means  # doctest: +SKIP

A fit that validated within epochs (``val_check_interval`` < 1) holds several analyses of an
epoch, each under its step: ``run.steps_of("ActivationTracker")``, ``run.results(...,
step=500)``; an epoch alone names its last.

The category distances come back from the file's float32 (7 significant digits) as float64.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_neurons.ablation import AblationResult
from lightning_neurons.errors import NeuronsError
from lightning_neurons.loggers import ARTIFACT_DIRNAME, INDEX_FILENAME, load_index
from lightning_neurons.results import (
    CategoryClusteringResult,
    ClusterRendering,
    ContributionResult,
    ContributionStats,
    LayerAblation,
    NeuronClusteringResult,
    Probes,
    Rendering,
    SaliencyMaps,
)
from lightning_neurons.stats import LayerStats

__all__ = ["Run", "RunFile", "load_run"]

#: The file kind(s) each callback writes, by class name.
KINDS: dict[str, tuple[str, ...]] = {
    "ActivationTracker": ("activations",),
    "FeatureVisualizer": ("preference", "focus"),
    "CategoryClustering": ("category_clustering",),
    "NeuronClustering": ("neuron_clustering",),
    "NeuronContribution": ("contribution",),
}
#: The attributes of each callback that hold results, the first one ``results``.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "FeatureVisualizer": ("results", "cluster_results", "saliency_results"),
}
#: Which stage :func:`load_run` reads when the run holds several and none is named.
STAGE_PREFERENCE = ("fit", "validate", "test")


@dataclass(frozen=True)
class RunFile:
    """One file of a run, as its index lists it.

    Attributes:
        kind: The analysis (``"activations"``, ``"category_clustering"``...).
        stage: ``"fit"``, ``"validate"`` or ``"test"``.
        name: The layer, view or other name it was saved under.
        epoch: The epoch it is from.
        step: The global step it was logged at.
        path: Where it is.
        meta: What the callback recorded with it.
    """

    kind: str
    stage: str
    name: str
    epoch: int
    step: int
    path: Path
    meta: Mapping[str, Any]

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``.npz`` file's arrays by name."""
        with np.load(self.path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def _callback_name(callback: str | type) -> str:
    """The name of one of the package's callbacks, from a name or a class (or subclass)."""
    if isinstance(callback, str):
        if callback in KINDS:
            return callback
    else:
        for cls in getattr(callback, "__mro__", ()):
            if cls.__name__ in KINDS and cls.__module__.startswith("lightning_neurons"):
                return cls.__name__
    raise NeuronsError(
        f"callback {callback!r} is not one of lightning-neurons' callbacks; use one of "
        f"{', '.join(KINDS)} (a name or the class)"
    )


class Run:
    """The analyses of one run, epoch by epoch (see :func:`load_run`).

    Attributes:
        root: The run's artifact folder (``<log_dir>/neurons``).
        stage: The stage whose files are read.
        files: Every file of that stage, in the order they were written.
    """

    def __init__(self, root: Path, stage: str, files: list[RunFile]) -> None:
        self.root = root
        self.stage = stage
        self.files = files

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r}, stage={self.stage!r}, epochs={self.epochs})"

    @property
    def log_dir(self) -> Path:
        """The folder above :attr:`root` (TensorBoard's ``version_N``)."""
        return self.root.parent

    @property
    def epochs(self) -> list[int]:
        """The analysed epochs, sorted."""
        return sorted({f.epoch for f in self.files})

    @property
    def steps(self) -> dict[int, int]:
        """The global step each epoch was logged at (of an epoch analysed several times, as
        ``val_check_interval`` < 1 validates, its last)."""
        steps: dict[int, int] = {}
        for f in self.files:
            steps[f.epoch] = max(f.step, steps.get(f.epoch, f.step))
        return steps

    def callbacks(self) -> list[str]:
        """The callbacks whose results the run holds."""
        kinds = {f.kind for f in self.files}
        return [name for name, own in KINDS.items() if kinds & set(own)]

    def epochs_of(self, callback: str | type) -> list[int]:
        """The epochs that ``callback`` analysed, sorted."""
        kinds = KINDS[_callback_name(callback)]
        return sorted({f.epoch for f in self.files if f.kind in kinds})

    def steps_of(self, callback: str | type) -> list[int]:
        """The global steps at which ``callback`` analysed, sorted: one an epoch, or several
        when the fit validated within epochs (``val_check_interval`` < 1, or by training
        batches); ``results(callback, step=...)`` reads any of them."""
        kinds = KINDS[_callback_name(callback)]
        return sorted({f.step for f in self.files if f.kind in kinds})

    def _files(self, kind: str, point: tuple[int, int]) -> list[RunFile]:
        return [f for f in self.files if f.kind == kind and (f.epoch, f.step) == point]

    def _point(self, name: str, epoch: int | None, step: int | None) -> tuple[int, int]:
        """The (epoch, step) of ``name``'s analysis to read: at ``step``, else the last of
        ``epoch``, else the last of all."""
        kinds = KINDS[name]
        points = sorted({(f.epoch, f.step) for f in self.files if f.kind in kinds})
        if not points:
            held = ", ".join(self.callbacks()) or "none"
            raise NeuronsError(
                f"the run {str(self.log_dir)!r} (stage {self.stage!r}) holds no {name} results; "
                f"it holds those of: {held}"
            )
        chosen = [
            p for p in points if (epoch is None or p[0] == epoch) and (step is None or p[1] == step)
        ]
        if not chosen:
            asked = " and ".join(
                f"{what} {value}"
                for what, value in (("epoch", epoch), ("step", step))
                if value is not None
            )
            epochs = ", ".join(map(str, sorted({e for e, _ in points})))
            analysed = f"epochs {epochs} (at steps {', '.join(str(s) for _, s in points)})"
            raise NeuronsError(
                f"{name} did not analyse {asked} in this run; it analysed {analysed}"
            )
        return chosen[-1]

    def results(
        self,
        callback: str | type,
        epoch: int | None = None,
        *,
        step: int | None = None,
        attribute: str = "results",
    ) -> Any:
        """What ``callback``'s ``attribute`` held after ``epoch`` (or at ``step``).

        Args:
            callback: A callback class or its name (``"ActivationTracker"``).
            epoch: The epoch; default: the latest that the callback analysed. Of an epoch
                analysed several times (validations within it), its last analysis.
            step: The global step of the analysis (:meth:`steps_of`), for one within an epoch.
            attribute: FeatureVisualizer's ``"cluster_results"`` or ``"saliency_results"``;
                ``"results"`` for every callback.

        Returns:
            The same typed results: ``{layer: LayerStats}`` for ActivationTracker, ``{layer:
            Rendering}`` for FeatureVisualizer, ``{view: CategoryClusteringResult}``, ``{layer:
            NeuronClusteringResult}``, ``{layer: ContributionResult}``; ``saliency_results`` is
            one :class:`SaliencyMaps` or ``None``.

        Raises:
            NeuronsError: For an unknown callback or attribute, or an epoch or step it did not
                analyse.
        """
        name = _callback_name(callback)
        allowed = ATTRIBUTES.get(name, ("results",))
        if attribute not in allowed:
            raise NeuronsError(
                f"{name} has no results attribute {attribute!r}; use one of {', '.join(allowed)}"
            )
        point = self._point(name, epoch, step)
        if name == "FeatureVisualizer":
            return _visualizer(self, point, attribute)
        kind = KINDS[name][0]
        read = _READERS[name]
        files = self._files(kind, point)
        return read(files)


# ---- reading each callback's files ---------------------------------------------------------------


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(value))


def _typed(cls: type, arrays: Mapping[str, np.ndarray], **given: Any) -> Any:
    """An instance of the results dataclass ``cls`` from a file's arrays: each field from the
    array of its name (a tensor, a number or a list, as its annotation says; a missing optional
    field its default), unless ``given``."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
            continue
        if f.name not in arrays:
            continue  # its default
        kind = str(f.type)
        value = arrays[f.name]
        if "torch.Tensor" in kind:
            values[f.name] = _tensor(value)
        elif kind.startswith("int"):
            values[f.name] = int(value)
        elif kind.startswith("float"):
            values[f.name] = float(value)
        elif kind.startswith("list[int]"):
            values[f.name] = [int(v) for v in value]
        else:
            values[f.name] = [str(v) for v in value]
    return cls(**values)


def _tracker(files: list[RunFile]) -> dict[str, LayerStats]:
    out = {}
    for f in files:
        layer = f.meta.get("layer", f.name)
        out[layer] = _typed(
            LayerStats,
            f.arrays(),
            layer=layer,
            epoch=int(f.meta.get("epoch", f.epoch)),
            reduction=f.meta.get("reduction", "mean"),
        )
    return out


def _category(files: list[RunFile]) -> dict[str, CategoryClusteringResult]:
    out = {}
    for f in files:
        if f.path.suffix != ".npz":
            continue  # the assignments' JSON
        arrays = f.arrays()
        view = f.meta.get("view", f.name)
        confusion, linkage = arrays.get("confusion"), arrays.get("linkage")
        out[view] = _typed(
            CategoryClusteringResult,
            arrays,
            view=view,
            layers=list(f.meta.get("layers", [view])),
            epoch=int(f.meta.get("epoch", f.epoch)),
            distances=_tensor(arrays["distances"]).double(),
            confusion=None if confusion is None else _tensor(confusion).double(),
            linkage=None if linkage is None else _tensor(linkage),
            class_names=[str(n) for n in arrays.get("class_names", _assigned(files, view))],
        )
    return out


def _assigned(files: list[RunFile], view: str) -> list[str]:
    """The class names of ``view`` from the epoch's ``assignments.json`` (files written before
    the ``.npz`` held them), in the order the callback wrote them."""
    for f in files:
        if f.path.suffix == ".json" and f.path.exists():
            return list(json.loads(f.path.read_text()).get(view, {}))
    return []


def _neurons(files: list[RunFile]) -> dict[str, NeuronClusteringResult]:
    out = {}
    for f in files:
        layer = f.meta.get("layer", f.name)
        arrays = f.arrays()
        out[layer] = _typed(
            NeuronClusteringResult,
            arrays,
            layer=layer,
            epoch=int(f.meta.get("epoch", f.epoch)),
            source=f.meta.get("source", "class_means"),
        )
    return out


def _ablation(layer: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Any:
    """The :class:`LayerAblation` of a contribution file (``None`` without one)."""
    if "accuracy_drop" not in arrays:
        return None
    sets = list(meta.get("ablation_sets", []))
    neurons = [_tensor(arrays[f"ablated_neurons_{i}"]) for i in range(len(sets))]
    effects = {}
    if "ablated_accuracy" in arrays:  # files of older versions hold the drops only
        baseline, logit = _tensor(arrays["baseline_accuracy"]), _tensor(arrays["baseline_logit"])
        counts = _tensor(arrays["ablation_counts"])
        for i, name in enumerate(sets):
            effects[name] = AblationResult(
                layer=layer,
                neurons=neurons[i],
                counts=counts,
                accuracy=baseline,
                ablated_accuracy=_tensor(arrays["ablated_accuracy"][i]),
                logit=logit,
                ablated_logit=_tensor(arrays["ablated_logit"][i]),
            )
    selectivity = meta.get("ablation_selectivity")
    return LayerAblation(
        effects=effects,
        sets=sets,
        classes=[int(c) for c in meta.get("ablation_classes", [])],
        neurons=neurons,
        accuracy_drop=_tensor(arrays["accuracy_drop"]),
        logit_drop=_tensor(arrays["logit_drop"]),
        baseline_accuracy=_tensor(arrays["baseline_accuracy"]),
        clusters_epoch=meta.get("clusters_epoch"),
        clusters_step=meta.get("clusters_step"),
        selectivity=None if selectivity is None else {k: float(v) for k, v in selectivity.items()},
    )


def _probes(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Probes | None:
    if "probe_index" not in arrays:
        return None
    probes = {
        f.name: _tensor(arrays[f"probe_{f.name}"])
        for f in fields(Probes)
        if f"probe_{f.name}" in arrays
    }
    sources = [list(s) for s in meta.get("probe_preferred_source", [])]
    preferred = [
        [_tensor(arrays[f"probe_preferred_{p}_{j}"]) for j in range(len(row))]
        for p, row in enumerate(sources)
    ]
    if "images" not in probes:  # files of older versions
        probes["images"] = torch.empty(0)
    return Probes(**probes, preferred=preferred, preferred_source=sources)


def _contribution(files: list[RunFile]) -> dict[str, ContributionResult]:
    out = {}
    for f in files:
        layer = f.meta.get("layer", f.name)
        arrays = f.arrays()
        stats = _typed(ContributionStats, arrays, layer=layer)
        out[layer] = ContributionResult(
            layer=layer,
            epoch=int(f.meta.get("epoch", f.epoch)),
            stats=stats,
            top_example_index=_tensor(arrays["top_example_index"]),
            ablation=_ablation(layer, arrays, f.meta),
            probes=_probes(arrays, f.meta),
        )
    return out


def _visualizer(run: Run, point: tuple[int, int], attribute: str) -> Any:
    epoch = point[0]
    if attribute == "saliency_results":
        found = [f for f in run._files("focus", point) if f.name == "saliency"]
        if not found:
            return None
        f = found[-1]
        arrays = f.arrays()
        methods = f.meta.get("methods") or [k[4:] for k in arrays if k.startswith("map_")]
        maps = {m: _tensor(arrays[f"map_{m}"]) for m in methods}
        epoch_of, layer = int(f.meta.get("epoch", epoch)), f.meta.get("gradcam_layer")
        return _typed(SaliencyMaps, arrays, maps=maps, epoch=epoch_of, gradcam_layer=layer)
    clusters = attribute == "cluster_results"
    out = {}
    for f in run._files("preference", point):
        if ("clusters_epoch" in f.meta) != clusters:
            continue
        key = f.meta.get("layer", f.name)
        epoch_of = int(f.meta.get("epoch", epoch))
        if clusters:
            out[key] = _typed(
                ClusterRendering,
                f.arrays(),
                epoch=epoch_of,
                clusters_epoch=int(f.meta["clusters_epoch"]),
            )
        else:
            out[key] = _typed(Rendering, f.arrays(), epoch=epoch_of)
    return out


_READERS = {
    "ActivationTracker": _tracker,
    "CategoryClustering": _category,
    "NeuronClustering": _neurons,
    "NeuronContribution": _contribution,
}


# ---- finding the run ---------------------------------------------------------------------------


def _artifact_root(log_dir: Path) -> Path:
    for candidate in (log_dir, log_dir / ARTIFACT_DIRNAME):
        if (candidate / INDEX_FILENAME).exists() or (candidate / "index.json").exists():
            return candidate
    raise NeuronsError(
        f"{str(log_dir)!r} holds no lightning-neurons files (no {ARTIFACT_DIRNAME}/"
        f"{INDEX_FILENAME}); give the log folder of a run with the callbacks attached (the "
        "TensorBoard logger's version_N, e.g. runs/digits/version_0) or its neurons/ folder"
    )


def load_run(log_dir: str | os.PathLike[str], stage: str | None = None) -> Run:
    """Read the analyses of a run back, every epoch of them.

    Args:
        log_dir: The run's log folder (TensorBoard's ``version_N``, where ``lightning-neurons
            fit`` or ``analyze`` logged) or the ``neurons`` folder in it.
        stage: ``"fit"``, ``"validate"`` or ``"test"`` (``analyze`` writes ``"validate"``);
            default: the only one there, else the first of ``fit``, ``validate``, ``test`` found.

    Returns:
        A :class:`Run`: ``run.epochs``, ``run.results(callback, epoch)`` (``step=`` for an
        analysis within an epoch).

    Raises:
        NeuronsError: If the folder holds no lightning-neurons files, or none of ``stage``.

    Example:
        >>> run = load_run("runs/digits/version_0")  # doctest: +SKIP
        >>> stats = run.results("ActivationTracker", epoch=run.epochs[-1])  # doctest: +SKIP
    """
    root = _artifact_root(Path(log_dir))
    records = load_index(root)
    stages = sorted({str(r["stage"]) for r in records})
    if stage is None:
        known = [s for s in STAGE_PREFERENCE if s in stages]
        stage = known[0] if known else (stages[0] if stages else "fit")
    elif stage not in stages:
        raise NeuronsError(
            f"the run {str(root.parent)!r} holds no files of stage {stage!r}; it holds "
            f"{', '.join(map(repr, stages)) or 'none'}"
        )
    files = [
        RunFile(
            kind=str(r["kind"]),
            stage=str(r["stage"]),
            name=str(r["name"]),
            epoch=int(r["epoch"]),
            step=int(r["step"]),
            path=root / r["file"],
            meta=dict(r.get("meta") or {}),
        )
        for r in records
        if r["stage"] == stage
    ]
    return Run(root, stage, files)
