"""Which layer gives the most faithful Grad-CAM maps: a block's last conv, or the block's output?

Grad-CAM's default (:func:`~lightning_neurons.visualize.cam_layers.cam_layer`) was the last
``Conv2d`` with more than one position on the images: for a ResNet the ``conv2`` of the last
block of a stage, before its BatchNorm, the residual sum and the ReLU, at 2 x 2 on 32 px images.
pytorch-grad-cam recommends the block's output (``model.layer4[-1]``). This script measures,
for every stage of a ResNet-18, its last conv and its output, against the saliency maps, by the
deletion and insertion curves of RISE (Petsiuk et al., 2018), which need no annotation:

- deletion: the image's pixels set to the background (0), most salient first, in ``--steps``
  equal shares; the area under the predicted class's softmax probability against the share
  deleted (lower: the map found the evidence sooner);
- insertion: from a background image, the pixels put back most salient first; the area under
  the same curve (higher is better).

Integrated Gradients' baseline is the same black image the curves delete to and insert from,
which favours it on these curves (its attributions explain the change from exactly that image);
``--fill blur`` deletes to (and inserts into) a blurred copy of each image instead (a Gaussian of
sigma 4 px, as RISE's insertion canvas), a background none of the maps was made from but
Integrated Gradients with ``baseline="blur"`` (the same sigma at 32 px), which the black fill
does not favour.

A random map (three seeds, averaged) is the floor every map must beat; a coarse map's own floor
is a random map drawn on its grid and upsampled as Grad-CAM's are (``random at 4x4``): deleting
contiguous regions in a random order leaves an image nearer the data than scattered pixels do,
so a coarse map can lose to the pixel-level random map and still beat chance at its grid.

The model: a torchvision ResNet-18 (``weights=None``, its first conv reading the grey images'
one channel), or with ``--model smallcnn`` the demo's :class:`~lightning_neurons.models.SmallCNN` (VGG-like: conv,
BatchNorm, ReLU, pooling; its three convolutions, BatchNorms and ReLUs compared), or with
``--model tutorial`` PyTorch's CIFAR-10 tutorial model (two convolutions, ``F.relu`` and
``F.max_pool2d`` in ``forward``; each conv against the ``F.relu`` call after it), or with
``--model vit`` a small torchvision ``VisionTransformer`` (4 px patches, 6 blocks of width 64, a
class-token head; each block's output compared, the default being the one before the last;
and attention rollout, gradient-weighted and plain), trained for
``--epochs`` on the parts data (:mod:`lightning_neurons.parts`: twelve classes told apart by a
small mark in a random corner of two large shapes), or with ``--data digits`` on scikit-learn's
handwritten digits (the demo's data: ten classes, the strokes in the middle of the image), at
``--size`` pixels, then mapped on ``--images`` held-out images (the same number of each class).

Run:  python benchmarks/gradcam_layers.py [--model resnet18|smallcnn|tutorial|vit] [--data parts] [--size 32] [--epochs 10]
          [--images 240] [--steps 16] [--fill black|blur] [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from lightning_neurons.data import DigitsDataModule
from lightning_neurons.hooks import hooked
from lightning_neurons.layouts import image_token_grid
from lightning_neurons.models import SmallCNN
from lightning_neurons.parts import make_parts
from lightning_neurons.visualize import (
    attention_rollout,
    grad_cam,
    gradient,
    integrated_gradients,
    smoothgrad,
)
from lightning_neurons.visualize.cam_layers import cam_layer


def resnet18_grey(classes: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def load(data: str, size: int, held: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Training images and labels, then ``held`` held-out ones (the same number of each class),
    and the number of classes."""
    if data == "parts":
        x, y = make_parts(n_per_class=200, image_size=size, seed=seed)
        held_x, held_y = make_parts(n_per_class=held // 12, image_size=size, seed=1000)
        return x, y, held_x, held_y, 12
    x, y = DigitsDataModule(image_size=size).load()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    out = torch.cat([order[y[order] == c][: held // 10] for c in range(10)])
    kept = torch.ones(len(x), dtype=torch.bool)
    kept[out] = False
    return x[kept], y[kept], x[out], y[out], 10


class Tutorial(nn.Module):
    """PyTorch's CIFAR-10 tutorial model, its first conv reading one channel."""

    def __init__(self, classes: int, size: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        side = ((size - 4) // 2 - 4) // 2
        self.fc1, self.fc2 = nn.Linear(16 * side * side, 120), nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))))


def small_vit(classes: int, size: int) -> nn.Module:
    """A torchvision ViT for grey images: 4 px patches, 6 blocks of width 64, 4 heads."""
    model = torchvision.models.VisionTransformer(
        image_size=size,
        patch_size=4,
        num_layers=6,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=classes,
    )
    model.conv_proj = nn.Conv2d(1, 64, kernel_size=4, stride=4)
    return model


def grid(model: nn.Module, layer: str, x: torch.Tensor) -> str:
    """``h x w`` of ``layer``'s output on ``x`` (of its patch tokens, for ``[1, D, T]``)."""
    seen = []
    with torch.no_grad(), hooked(model, [layer], lambda name, out: seen.append(out)):
        model(x[:1])
    shape = seen[0].shape
    cells = image_token_grid(shape[-1], x.shape[-2:]) if len(shape) == 3 else shape[-2:]
    return "x".join(str(d) for d in cells)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: last batch loss {loss.item():.4f}", flush=True)
    model.eval()


@torch.no_grad()
def curves(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    maps: torch.Tensor,
    steps: int,
    fill: str = "black",
) -> tuple[float, float]:
    """Mean deletion and insertion areas (trapezoids over ``steps + 1`` points); removed pixels
    take ``fill``'s value: black (0), or a blurred copy of the image's."""
    background = torch.zeros_like(x)
    if fill == "blur":
        background = torchvision.transforms.functional.gaussian_blur(x, [17, 17], [4.0, 4.0])
    n, pixels = len(x), x[0, 0].numel()
    # ties (a flat map, Grad-CAM's zeros) in a random order, not the pixels' (top rows first)
    flat = maps.flatten(1).double()
    gen = torch.Generator().manual_seed(0)
    spread = flat.amax(dim=1, keepdim=True).clamp_min(1e-30)
    order = flat + 1e-9 * spread * torch.rand(flat.shape, generator=gen, dtype=flat.dtype)
    order = order.argsort(dim=1, descending=True)  # [N, P]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels).expand(n, -1))
    deletion, insertion = [], []
    for k in range(steps + 1):
        shown = (rank < round(k * pixels / steps)).view_as(x[:, 0]).unsqueeze(1)
        for kept, out in ((~shown, deletion), (shown, insertion)):
            probs = model(torch.where(kept, x, background)).softmax(dim=1)
            out.append(probs.gather(1, target.view(-1, 1))[:, 0])

    def area(values: list[torch.Tensor]) -> float:
        v = torch.stack(values)  # [steps + 1, N]
        return float(((v[1:] + v[:-1]) / 2).sum(dim=0).mean() / steps)

    return area(deletion), area(insertion)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", choices=["resnet18", "smallcnn", "tutorial", "vit"], default="resnet18"
    )
    parser.add_argument("--data", choices=["parts", "digits"], default="parts")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--fill", choices=["black", "blur"], default="black")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y, held_x, held_y, classes = load(args.data, args.size, args.images, args.seed)
    models = {"resnet18": lambda: resnet18_grey(classes), "smallcnn": lambda: SmallCNN(1, classes)}
    models["tutorial"] = lambda: Tutorial(classes, args.size)
    models["vit"] = lambda: small_vit(classes, args.size)
    model = models[args.model]()
    start = time.perf_counter()
    train(model, x, y, args.epochs, args.seed)
    with torch.no_grad():
        predicted = model(held_x).argmax(dim=1)
    accuracy = float((predicted == held_y).float().mean())
    print(f"trained in {time.perf_counter() - start:.1f} s; held-out accuracy {accuracy:.4f}")
    default = cam_layer(model, image=held_x[:1])
    methods: dict[str, Callable[[], torch.Tensor]] = {}
    if args.model == "resnet18":  # each stage's last conv, and its output
        layers = [
            name for s in ("layer1", "layer2", "layer3", "layer4") for name in (f"{s}.1.conv2", s)
        ]
    elif args.model == "smallcnn":  # each block's conv, BatchNorm and ReLU (the last: `features`)
        layers = [f"features.{kind}{i}" for i in (1, 2, 3) for kind in ("conv", "bn", "relu")]
    elif args.model == "vit":  # each block's output
        layers = [f"encoder.layers.encoder_layer_{i}" for i in range(6)]
    else:  # each conv, and the F.relu call after it
        layers = ["conv1", "relu()", "conv2", "relu()#1"]
    for layer in layers:
        methods[f"grad-cam {layer}"] = lambda layer=layer: grad_cam(
            model, held_x, predicted, layer=layer
        )
    methods["gradient"] = lambda: gradient(model, held_x, predicted)
    methods["smoothgrad"] = lambda: smoothgrad(model, held_x, predicted)
    methods["integrated gradients"] = lambda: integrated_gradients(model, held_x, predicted)
    methods["integrated gradients (blur)"] = lambda: integrated_gradients(
        model, held_x, predicted, baseline="blur"
    )
    grids = {layer: grid(model, layer, held_x) for layer in layers}
    if args.model == "vit":  # attention rollout, on the patch grid
        for name, weighted in (("rollout (weighted)", True), ("rollout (plain)", False)):
            methods[name] = lambda weighted=weighted: attention_rollout(
                model, held_x, predicted, weighted=weighted
            )
            grids[name] = grids[layers[-1]]
    for where in ["pixels", *sorted(set(grids.values()), key=lambda g: int(g.split("x")[0]))]:
        for seed in range(3):
            methods[f"random {where} {seed}"] = lambda where=where, seed=seed: random_map(
                held_x, where, seed
            )
    print(
        f"{args.data}, size {args.size} px, default Grad-CAM layer {default!r}, {len(held_x)} "
        f"images, removed pixels filled {args.fill}"
    )
    print("| maps | grid | deletion (lower is better) | insertion (higher is better) |")
    print("|---|---|---|---|")
    randoms: dict[str, list[tuple[float, float]]] = {}
    for name, make in methods.items():
        maps = make()
        deleted, inserted = curves(model, held_x, predicted, maps, args.steps, args.fill)
        if name.startswith("random"):
            randoms.setdefault(name.split()[1], []).append((deleted, inserted))
            continue
        layer = name.removeprefix("grad-cam ")
        where = grids.get(layer, "pixels")
        mark = " (default)" if layer == default else ""
        print(f"| {name}{mark} | {where} | {deleted:.4f} | {inserted:.4f} |", flush=True)
    for where, areas in randoms.items():
        deleted = sum(a[0] for a in areas) / len(areas)
        inserted = sum(a[1] for a in areas) / len(areas)
        print(f"| random at {where} (mean of 3) | {where} | {deleted:.4f} | {inserted:.4f} |")


def random_map(x: torch.Tensor, where: str, seed: int) -> torch.Tensor:
    """``[N, H, W]`` random maps of images ``x``: one value a pixel (``where="pixels"``), or one
    a cell of an ``h x w`` grid (``"4x4"``) upsampled as Grad-CAM's maps are (bilinear)."""
    gen = torch.Generator().manual_seed(seed)
    if where == "pixels":
        return torch.rand(x[:, 0].shape, generator=gen)
    h, w = (int(v) for v in where.split("x"))
    cells = torch.rand(len(x), 1, h, w, generator=gen)
    return F.interpolate(cells, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


if __name__ == "__main__":
    main()
