"""Data priors as penalties on the demo's class images: do they make other models recognise them?

The class images of ``benchmarks/class_image_schedule.py`` (FeatureVisualizer's schedule
replayed on the demo model's analysed epochs, judged by a twin, a LeNet and a logistic
regression on pixels) miss the goals for render seed 0 whatever the render settings. This script
replays the same schedule with each class's objective ``ClassLogit(c) - weight * penalty``, for
penalties that pull the image towards the data without any judge:

- ``subspace``: the mean squared distance of the display image from the span of the first
  ``--components`` principal components of the 512 validation images (around their mean): what
  no digit has;
- ``gaussian``: the same plus 0.01 times the mean squared principal coefficient in units of its
  standard deviation (a Gaussian of the data's mean and covariance in that span);
- ``batchnorm``: as in DeepInversion (Yin et al., 2020), each image's per-channel mean and
  variance at ``conv1``-``conv3`` (the view the model sees) against the BatchNorm layers'
  running statistics of that epoch, both normalised by them: ``|mean| / sqrt(C) + |var - 1| /
  sqrt(C)`` summed over the layers;
- ``classmap``: the mean squared distance of ``--layer``'s output from the mean output of the
  class's validation images (the first ``--per-class`` of each class; default all 512 images'),
  each channel in units of its spread over them: FeatureVisualizer's class anchor
  (:class:`~lightning_neurons.visualize.ClassAnchors`), which came from here;
- ``classmean``: the same on the channels' spatial means (the tracker's class profile).

Prints the counts per analysed epoch as ``class_image_schedule.py`` does, for every weight.

Run:  python benchmarks/class_image_priors.py --prior subspace|gaussian|batchnorm|classmap|classmean
          [--weights 10,30,100] [--components 32] [--layer features.relu3] [--per-class N]
          [--seeds 0,1,2] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from class_image_schedule import digits_setup, replay

from lightning_neurons import RenderOptions
from lightning_neurons.visualize import ClassAnchors, ClassLogit, Objective
from lightning_neurons.visualize.objectives import IMAGE, BatchedFn, Term


class Subspace(Term):
    """Squared distance from the data's principal span (and, with ``coefficients``, the squared
    standardised coefficients in it), per pixel: ``[B, C, H, W] -> [B]``."""

    def __init__(
        self, mean: torch.Tensor, basis: torch.Tensor, sd: torch.Tensor, coefficients: float
    ) -> None:
        self.layer = IMAGE
        self.mean, self.basis, self.sd, self.coefficients = mean, basis, sd, coefficients

    def _key(self) -> tuple:
        return (self.basis.shape[1], self.coefficients)

    def value(self, output: torch.Tensor) -> torch.Tensor:
        x = output.flatten(1) - self.mean
        z = x @ self.basis
        off = (x - z @ self.basis.T).pow(2).mean(dim=1)
        return off + self.coefficients * (z / self.sd).pow(2).mean(dim=1)

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        return terms[0].value  # every row's term is the same


class NormStats(Term):
    """A conv layer's per-image channel statistics against its BatchNorm's running ones."""

    def __init__(self, layer: str, bn: torch.nn.BatchNorm2d) -> None:
        self.layer = layer
        self.mean = bn.running_mean.detach().clone().view(1, -1, 1, 1)
        self.scale = (bn.running_var.detach() + bn.eps).sqrt().view(1, -1, 1, 1)

    def _key(self) -> tuple:
        return (self.layer,)

    def value(self, output: torch.Tensor) -> torch.Tensor:
        x = (output - self.mean) / self.scale
        root = x.shape[1] ** 0.5
        mean, var = x.mean(dim=(2, 3)), x.var(dim=(2, 3))
        return mean.norm(dim=1) / root + (var - 1).norm(dim=1) / root

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        return terms[0].value


class ClassMean(Term):
    """A layer's channel means against their mean over the class's validation images, in units
    of each channel's spread over the images: the mean squared difference."""

    def __init__(self, layer: str, target: torch.Tensor, sd: torch.Tensor) -> None:
        self.layer, self.target, self.sd = layer, target, sd

    def _key(self) -> tuple:
        return (self.layer, id(self.target))

    def value(self, output: torch.Tensor) -> torch.Tensor:
        return type(self).batched([self] * len(output))(output)

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        target = torch.stack([t.target for t in terms])  # type: ignore[attr-defined]
        sd = terms[0].sd  # type: ignore[attr-defined]

        def score(output: torch.Tensor) -> torch.Tensor:
            out = output.mean(dim=(2, 3))
            return ((out - target.to(out)) / sd.to(out)).pow(2).mean(dim=1)

        return score


def class_terms(
    model: torch.nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor, pooled: bool
) -> list[Term]:
    """Each class's penalty at ``layer`` of ``model`` from the validation images: its
    :class:`~lightning_neurons.visualize.ClassAnchor` (``classmap``), or :class:`ClassMean`."""
    if not pooled:
        anchors = ClassAnchors.from_images(model, layer, images, labels)
        return [anchors[c] for c in range(10)]
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(images)
    handle.remove()
    means = seen[0].mean(dim=(2, 3))
    sd = seen[0].transpose(0, 1).flatten(1).std(dim=1).clamp_min(1e-6)
    return [ClassMean(layer, means[labels == c].mean(dim=0), sd) for c in range(10)]


def subspace(images: torch.Tensor, components: int, coefficients: float) -> Subspace:
    """The :class:`Subspace` penalty of ``images`` ``[N, C, H, W]``."""
    flat = images.flatten(1).double()
    mean = flat.mean(dim=0)
    _, s, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    share = float((s[:components] ** 2).sum() / (s**2).sum())
    print(f"{components} principal components: {share:.3f} of the validation images' variance")
    sd = s[:components] / (len(flat) - 1) ** 0.5
    return Subspace(mean.float(), vh[:components].T.float().contiguous(), sd.float(), coefficients)


def penalised(
    prior: str,
    weight: float,
    images: torch.Tensor,
    components: int,
    labels: torch.Tensor,
    layer: str,
) -> Callable:
    """``objectives(model)(c)``: class ``c``'s logit minus ``weight`` times the penalty."""
    fixed = None
    if prior in ("subspace", "gaussian"):
        fixed = subspace(images, components, 0.01 if prior == "gaussian" else 0.0)

    def objectives(model: torch.nn.Module) -> Callable[[int], Objective]:
        per_class = None
        if fixed is not None:
            terms = [fixed]
        elif prior in ("classmap", "classmean"):
            terms, per_class = [], class_terms(model, layer, images, labels, prior == "classmean")
        else:
            feats = model.features
            terms = [NormStats(f"features.conv{i}", getattr(feats, f"bn{i}")) for i in (1, 2, 3)]

        def objective(c: int) -> Objective:
            out: Objective = ClassLogit(c)
            for term in terms + ([per_class[c]] if per_class else []):
                out = out - weight * term
            return out

        return objective

    return objectives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prior",
        choices=("subspace", "gaussian", "batchnorm", "classmap", "classmean"),
        required=True,
    )
    parser.add_argument("--weights", default="10,30,100", help="penalty weights, comma-separated")
    parser.add_argument("--components", type=int, default=32)
    parser.add_argument("--layer", default="features.relu3", help="the class priors' layer")
    parser.add_argument(
        "--per-class", type=int, default=None, help="the class priors' images per class (first)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="render seeds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prior, judged, images, labels = digits_setup()
    if args.per_class is not None:
        keep = torch.cat([(labels == c).nonzero()[: args.per_class, 0] for c in range(10)])
        images, labels = images[keep.sort().values], labels[keep.sort().values]
    print("class images recognised (twin/LeNet/linear of 10) and seconds, per analysed epoch")
    for weight in (float(w) for w in args.weights.split(",")):
        objectives = penalised(args.prior, weight, images, args.components, labels, args.layer)
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{args.prior} x {weight:g}"
            replay(name, RenderOptions(seed=seed), prior, judged, {"steps": 32}, True, objectives)


if __name__ == "__main__":
    main()
