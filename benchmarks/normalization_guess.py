"""How often FeatureVisualizer's guess of the data's normalisation (``known_normalization``) names
the right one, on batches of natural image crops (scikit-learn's two sample photographs, shipped
with it), each normalisation of ``data.NORMALIZATIONS`` for 3-channel images in turn.

    python benchmarks/normalization_guess.py [--trials 50] [--seed 0]

Prints, per crop size and batch size, how many batches of ``--trials`` were named right, named
wrong (another normalisation) and not named (a warning in the callback).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_sample_images

from lightning_neurons.data import NORMALIZATIONS, Normalize, known_normalization


def crops(photos: list[torch.Tensor], size: int, batch: int, g: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(batch):
        photo = photos[int(torch.randint(len(photos), (1,), generator=g))]
        top = int(torch.randint(photo.shape[1] - size, (1,), generator=g))
        left = int(torch.randint(photo.shape[2] - size, (1,), generator=g))
        out.append(photo[:, top : top + size, left : left + size])
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    photos = [
        torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255
        for p in load_sample_images().images
    ]
    print("| normalisation | crop | batch | right | wrong | none |")
    print("|---|---|---|---|---|---|")
    for name, (mean, std) in NORMALIZATIONS.items():
        normalize = Normalize(mean, std)
        for size, batch in [(32, 8), (32, 32), (64, 32), (224, 8)]:
            g = torch.Generator().manual_seed(args.seed)
            counts = {"right": 0, "wrong": 0, "none": 0}
            for _ in range(args.trials):
                found = known_normalization(normalize(crops(photos, size, batch, g)))
                counts["none" if found is None else "right" if found[0] == name else "wrong"] += 1
            print(
                f"| {name} | {size} px | {batch} | {counts['right']} | {counts['wrong']} | "
                f"{counts['none']} |"
            )


if __name__ == "__main__":
    main()
