"""Batched feature visualization: how much faster than one image at a time, and how close to the
floor of one bare forward + backward pass per step.

Run:  python benchmarks/visualization.py [--steps 32] [--repeats 3] [--device cpu|cuda] [--quality]

Everything is measured side by side in one run, each timing the best of ``--repeats``
interleaved runs (the machine may be shared). Printed:

1. batched vs one at a time: rendering all 64 channels of ``features.conv2`` of the demo's
   SmallCNN in one call vs 64 calls of one channel each, same settings (FFT parametrization,
   standard transforms, ``--steps`` Adam steps). Goal: >= 5x on CPU. The batched call is shown
   with its default chunking (on CPU, chunks sized to the caches) and as one batch of 64.
2. overhead over the floor: the time per step of rendering 64 images divided by the time of one
   bare forward + backward (to the input, parameters frozen, eval mode) of the same 64 x 1 x 32
   x 32 images, batched the same way (in the default CPU chunks, and as one batch). Goal: <= 1.3x. ``render`` stops the forward pass after the last
   layer it needs, so the 64 ``conv2`` channels are compared with the bare pass cut after
   ``conv2``; 64 class-logit objectives (which need the whole model) with the whole bare pass.
3. with ``--quality``: the two quality figures on the demo model (SmallCNN trained like
   ``configs/digits.yaml``: 10 epochs, Adam lr 0.005, seed 0), with FeatureVisualizer's defaults
   (64 steps, lr 0.1, FFT, standard transforms): the share of each layer's channels (all of them;
   the conv layers and the ReLUs after their BatchNorms, which the demo config tracks)
   whose rendered image drives the channel above its maximum over the validation images, and
   the share of classes whose class image the model classifies as that class.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_neurons.models import SmallCNN
from lightning_neurons.visualize import Channel, ClassLogit, render
from lightning_neurons.visualize.render import _probe, auto_batch_size

LAYER = "features.conv2"
SHAPE = (1, 32, 32)


def best_of(
    fns: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` interleaved rounds."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bare_pass(
    model: nn.Module, batch: torch.Tensor, upto: nn.Module | None, passes: int, chunk: int
) -> Callable[[], None]:
    """``passes`` forward + backward passes of ``batch`` to the input (parameters frozen, eval
    mode), ``chunk`` images at a time."""

    def run() -> None:
        for _ in range(passes):
            for part in batch.split(chunk):
                x = part.clone().requires_grad_(True)
                out = upto(x) if upto is not None else model(x)
                out.float().mean().backward()

    return run


def quality(device: torch.device) -> None:
    """Train the demo model as the demo config does and print the two quality figures."""
    import lightning.pytorch as pl

    from lightning_neurons.data import DigitsDataModule
    from lightning_neurons.hooks import hooked
    from lightning_neurons.models import ImageClassifier
    from lightning_neurons.visualize import evaluate

    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64, image_size=32, val_fraction=0.2, seed=0)
    module = ImageClassifier(SmallCNN(), num_classes=10, lr=0.005)
    trainer = pl.Trainer(
        max_epochs=10, accelerator=device.type, devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    model = module.backbone.eval()
    accuracy = float(trainer.callback_metrics["val/acc"])
    print(
        f"demo model trained in {time.perf_counter() - start:.0f} s, validation accuracy {accuracy:.3f}"
    )
    layers = [f"features.{kind}{i}" for kind in ("conv", "relu") for i in (1, 2, 3)]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, out: torch.Tensor) -> None:
        peak = out.mean(dim=(2, 3)).amax(dim=0)
        seen[name] = torch.maximum(seen[name], peak) if name in seen else peak

    with torch.no_grad(), hooked(model, layers, keep):
        for x, _ in data.val_dataloader():
            model(x.to(device))
    settings = dict(image_shape=SHAPE, steps=64, lr=0.1)
    for layer in layers:
        objectives = [Channel(layer, k) for k in range(seen[layer].numel())]
        start = time.perf_counter()
        images = render(model, objectives, **settings)
        reached = evaluate(model, objectives, images).to(device)
        above = float((reached > seen[layer]).float().mean())
        print(
            f"  {layer}: {above:.1%} of {len(objectives)} channels driven above their validation "
            f"max ({time.perf_counter() - start:.1f} s)"
        )
    images = render(model, [ClassLogit(c) for c in range(10)], **settings)
    with torch.no_grad():
        predicted = model(images).argmax(dim=1).cpu()
    correct = (predicted == torch.arange(10)).float().mean()
    print(
        f"  class images classified as their class: {correct:.0%} (predicted {predicted.tolist()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--quality", action="store_true", help="also train the demo model and print quality figures"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = SmallCNN().to(device).eval()  # the demo model: widths 32, 64, 128
    for p in model.parameters():
        p.requires_grad_(False)
    channels = [Channel(LAYER, k) for k in range(64)]
    logits = [ClassLogit(k % 10) for k in range(64)]
    steps = args.steps
    kwargs = dict(image_shape=SHAPE, steps=steps, param="fft", transforms="standard", seed=0)
    batch = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    upto_conv2 = model.features[: list(dict(model.features.named_children())).index("conv2") + 1]

    def one_at_a_time() -> None:
        for objective in channels:
            render(model, [objective], **kwargs)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, device {name}, {torch.get_num_threads()} threads, {steps} steps, best of {args.repeats}"
    )
    _, largest = _probe(model, channels, SHAPE, None)
    chunk = auto_batch_size(64, largest, device)
    print(f"default chunks: {chunk} images")
    times = best_of(
        {
            "batched, default chunks": lambda: render(model, channels, **kwargs),
            "batched, one batch of 64": lambda: render(model, channels, batch_size=64, **kwargs),
            "one at a time": one_at_a_time,
            "class logits, default chunks": lambda: render(model, logits, **kwargs),
            "class logits, one batch": lambda: render(model, logits, batch_size=64, **kwargs),
            "bare whole model, chunks": bare_pass(model, batch, None, steps, chunk),
            "bare whole model, one batch": bare_pass(model, batch, None, steps, 64),
            "bare to conv2, chunks": bare_pass(model, batch, upto_conv2, steps, chunk),
            "bare to conv2, one batch": bare_pass(model, batch, upto_conv2, steps, 64),
        },
        args.repeats,
        sync,
    )
    for key, value in times.items():
        print(f"  {key:<29} {value:8.3f} s  ({1000 * value / steps:7.2f} ms per step)")
    single = times["one at a time"]
    print(f"batched vs one at a time ({LAYER}, 64 channels; goal >= 5x):")
    print(f"  default chunks:  {single / times['batched, default chunks']:.1f}x faster")
    print(f"  one batch of 64: {single / times['batched, one batch of 64']:.1f}x faster")
    print(
        "time per step / bare forward+backward of the same 64 images, batched the same way "
        "(goal <= 1.3x):"
    )
    for how in ("chunks", "one batch"):
        render_key = "default chunks" if how == "chunks" else "one batch of 64"
        cut = times[f"batched, {render_key}"] / times[f"bare to conv2, {how}"]
        full = times[f"class logits, {'default chunks' if how == 'chunks' else 'one batch'}"]
        full = full / times[f"bare whole model, {how}"]
        print(
            f"  {how:<9}: {LAYER} channels {cut:.2f}x (vs the pass up to {LAYER}), class logits {full:.2f}x (vs the whole pass)"
        )
    if args.quality:
        quality(device)


if __name__ == "__main__":
    main()
