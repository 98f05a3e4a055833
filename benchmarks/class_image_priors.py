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
  sqrt(C)`` summed over the layers.

Prints the counts per analysed epoch as ``class_image_schedule.py`` does, for every weight.

Run:  python benchmarks/class_image_priors.py --prior subspace|gaussian|batchnorm
          [--weights 10,30,100] [--components 32] [--seeds 0,1,2] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from class_image_schedule import digits_setup, replay

from lightning_neurons import RenderOptions
from lightning_neurons.visualize import ClassLogit, Objective
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


def subspace(images: torch.Tensor, components: int, coefficients: float) -> Subspace:
    """The :class:`Subspace` penalty of ``images`` ``[N, C, H, W]``."""
    flat = images.flatten(1).double()
    mean = flat.mean(dim=0)
    _, s, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    share = float((s[:components] ** 2).sum() / (s**2).sum())
    print(f"{components} principal components: {share:.3f} of the validation images' variance")
    sd = s[:components] / (len(flat) - 1) ** 0.5
    return Subspace(mean.float(), vh[:components].T.float().contiguous(), sd.float(), coefficients)


def penalised(prior: str, weight: float, images: torch.Tensor, components: int) -> Callable:
    """``objectives(model)(c)``: class ``c``'s logit minus ``weight`` times the penalty."""
    fixed = None
    if prior != "batchnorm":
        fixed = subspace(images, components, 0.01 if prior == "gaussian" else 0.0)

    def objectives(model: torch.nn.Module) -> Callable[[int], Objective]:
        if fixed is not None:
            terms = [fixed]
        else:
            feats = model.features
            terms = [NormStats(f"features.conv{i}", getattr(feats, f"bn{i}")) for i in (1, 2, 3)]

        def objective(c: int) -> Objective:
            out: Objective = ClassLogit(c)
            for term in terms:
                out = out - weight * term
            return out

        return objective

    return objectives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", choices=("subspace", "gaussian", "batchnorm"), required=True)
    parser.add_argument("--weights", default="10,30,100", help="penalty weights, comma-separated")
    parser.add_argument("--components", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2", help="render seeds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prior, judged, images = digits_setup()
    print("class images recognised (twin/LeNet/linear of 10) and seconds, per analysed epoch")
    for weight in (float(w) for w in args.weights.split(",")):
        objectives = penalised(args.prior, weight, images, args.components)
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{args.prior} x {weight:g}"
            replay(name, RenderOptions(seed=seed), prior, judged, {"steps": 32}, True, objectives)


if __name__ == "__main__":
    main()
