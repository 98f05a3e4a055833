"""What :class:`~lightning_neurons.ActivationTracker` tells the user, each thing once a fit:
signed layers, modules called several times per forward pass, layers that never ran (or a step
that never ran the model), classes without images, non-finite activations."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_warn

from lightning_neurons.functional import is_function_layer
from lightning_neurons.hooks import call_site, selects
from lightning_neurons.stats import LayerStats

#: What :meth:`TrackerNotes.calls` notes when no tracked layer ran at all.
_NO_FORWARD = ""

#: What :meth:`TrackerNotes.absent_classes` notes once said.
_ABSENT = "<absent classes>"


class TrackerNotes:
    """The tracker's one-time warnings; :attr:`noted` holds what was said (layer or module
    names)."""

    def __init__(self) -> None:
        self.noted: set[str] = set()

    def signed(self, layers: Sequence[str]) -> None:
        """Tracked layers whose outputs are signed (a convolution's, before its nonlinearity)."""
        signed = [name for name in layers if name not in self.noted]
        if not signed:
            return
        self.noted.update(signed)
        rank_zero_warn(
            f"ActivationTracker: {', '.join(signed)} output signed values (convolution, Linear or "
            "normalisation layers, before the nonlinearity). Selectivity is then measured on "
            "each neuron's class means shifted so that the smallest is 0, 'dead' means never "
            "positive and dominance counts positive means only; zeroing such a neuron is not a "
            "knock-out. The default layers (activations and block outputs) are responses."
        )

    def calls(
        self,
        calls: Mapping[str, int],
        layers: Sequence[str],
        gathered: Collection[str],
        batches: int,
        stage: str,
    ) -> None:
        """At an epoch's end: modules that ran several times per forward pass (one layer per
        call), and tracked layers that never ran in its ``batches`` batches of ``stage``
        (``gathered``: the layers that have statistics). When none ran, the step most likely
        never ran the model: one warning says so."""
        for module, runs in calls.items():
            if runs > 1 and module not in self.noted and not is_function_layer(module):
                self.noted.add(module)
                sites = [call_site(module, i) for i in range(runs)]
                tracked = [s for s in sites if selects(layers, s)]
                rank_zero_warn(
                    f"ActivationTracker: module {module!r} runs {runs} times per forward pass; each "
                    f"call is its own layer ({', '.join(sites)}); tracked: {', '.join(tracked)}."
                )
        missing = [spec for spec in layers if not any(selects([spec], n) for n in gathered)]
        if not batches or not missing:
            return
        if len(missing) == len(layers):
            self._no_forward(batches, stage)
            return
        for spec in (s for s in missing if s not in self.noted):
            self.noted.add(spec)
            module = spec.split("#")[0]
            rank_zero_warn(
                f"ActivationTracker: layer {spec!r} did not run in the forward passes of this "
                f"epoch (module {module!r} ran {calls.get(module, 0)} time(s) per pass); it has no "
                "statistics."
            )

    def _no_forward(self, batches: int, stage: str) -> None:
        if _NO_FORWARD in self.noted:
            return
        self.noted.add(_NO_FORWARD)
        step = "training_step" if stage == "train" else f"{stage}_step"
        rank_zero_warn(
            f"ActivationTracker: none of its layers ran in the {batches} {stage} batch(es) of "
            f"this epoch, so there are no statistics: does `{step}` run the model (`self(x)`)? "
            "The tracker reads the layers' outputs in the forward passes made there."
        )

    def absent_classes(self, results: Mapping[str, LayerStats], stage: str) -> None:
        """Classes that had no image in an analysed epoch (once a fit): their class profiles are
        NaN. Labels seen only below some index point at a ``num_classes`` larger than the data's
        (a torchvision model left at 1,000 outputs); gaps, at the data's split."""
        first = next(iter(results.values()), None)
        if first is None or _ABSENT in self.noted:
            return
        absent = (first.counts == 0).nonzero().flatten().tolist()
        if not absent:
            return
        self.noted.add(_ABSENT)
        classes = len(first.counts)
        present = classes - len(absent)
        shown = ", ".join(map(str, absent[:8])) + (", ..." if len(absent) > 8 else "")
        top = int((first.counts > 0).nonzero().max()) + 1
        if absent == list(range(top, classes)):
            hint = (
                f"the labels seen are below {top}: if the data has {top} classes, build the model "
                f"with {top} outputs (or pass `num_classes={top}` to ActivationTracker)"
            )
        else:
            limit = {"validation": "val"}.get(stage, stage)
            hint = (
                f"check that the {stage} batches analysed hold every class (the data's split, "
                f"`limit_{limit}_batches`, `max_batches`)"
            )
        rank_zero_warn(
            f"ActivationTracker: {len(absent)} of the {classes} classes had no image in the "
            f"{stage} batches of epoch {first.epoch} (classes {shown}; {present} had images): their "
            f"class profiles are NaN and the clusterings leave them out; {hint}."
        )

    @staticmethod
    def non_finite(results: Mapping[str, LayerStats]) -> None:
        """Layers that gave NaN or infinite activations this epoch (left out of the statistics)."""
        for name, res in results.items():
            bad = int(res.nan_counts.sum())
            if bad:
                neurons = int((res.nan_counts > 0).sum())
                rank_zero_warn(
                    f"ActivationTracker: layer {name!r} gave {bad} non-finite (NaN/inf) activations "
                    f"in {neurons} of {res.num_neurons} neurons in epoch {res.epoch}; they were left "
                    "out of the statistics (see `results[...].nan_counts`). Check the learning rate "
                    "and the input data."
                )
