"""Prints the table of default layers in docs/layers_models.md (random weights, 32x32 inputs).

PYTHONPATH=. python docs/layers_models_table.py
"""

from __future__ import annotations

import timm
import torch

from lightning_neurons.defaults import default_cam_layer
from lightning_neurons.hooks import default_layers, hooked

MODELS = {
    "resnet18": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "regnetx_002": {},
    "mobilenetv3_small_050": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 4},
}


def _short(layers: list[str]) -> str:
    if len(layers) <= 6:
        return ", ".join(f"`{n}`" for n in layers)
    head = ", ".join(f"`{n}`" for n in layers[:3])
    return f"{head}, ... ({len(layers) - 5} more), `{layers[-2]}`, `{layers[-1]}`"


def _last_shape(model: torch.nn.Module, layer: str) -> tuple[int, ...]:
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad(), hooked(model, [layer], lambda n, t: shapes.append(tuple(t.shape))):
        model(torch.rand(1, 3, 32, 32))
    return shapes[0]


def main() -> None:
    print("| timm model | default layers | count | last layer's output | Grad-CAM layer |")
    print("|---|---|---|---|---|")
    for name, options in MODELS.items():
        model = timm.create_model(name, pretrained=False, num_classes=10, **options).eval()
        layers = default_layers(model)
        shape = _last_shape(model, layers[-1])
        cam = default_cam_layer(model) or "last Conv2d"
        described = f"[B, {', '.join(map(str, shape[1:]))}] (channels first)"
        print(f"| `{name}` | {_short(layers)} | {len(layers)} | {described} | `{cam}` |")


if __name__ == "__main__":
    main()
