"""Prints the tables of default layers in docs/layers_models.md, of timm's and of torchvision's
models (random weights, 32x32 inputs, 64x64 or 224x224 where the model needs them).

PYTHONPATH=. python docs/layers_models_table.py
"""

from __future__ import annotations

import timm
import torch
import torchvision

from lightning_neurons.hooks import default_layers, hooked
from lightning_neurons.visualize.cam_layers import cam_layer

#: timm models: ``(options, input size)``.
MODELS = {
    "resnet18": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "convnext_atto": ({}, 32),
    "regnetx_002": ({}, 32),
    "mobilenetv3_small_050": ({}, 32),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 4}, 32),
    "swin_tiny_patch4_window7_224": ({"img_size": 32, "window_size": 4}, 32),
    "dla34": ({}, 32),
    "repvgg_a0": ({}, 32),
    "hrnet_w18_small": ({}, 64),
    "mobilevit_xxs": ({}, 64),
    "fastvit_t8": ({}, 64),
    "caformer_s18": ({}, 64),
    "pvt_v2_b0": ({}, 64),
    "coatnet_nano_rw_224": ({"img_size": 64}, 64),
    "levit_128s": ({"img_size": 64}, 64),
    "mixer_s16_224": ({"img_size": 64}, 64),
    "eva02_tiny_patch14_224": ({"img_size": 56}, 56),
    "deit_tiny_distilled_patch16_224": ({"img_size": 32, "patch_size": 4}, 32),
    "xcit_nano_12_p16_224": ({"img_size": 32, "patch_size": 8}, 32),
    "pit_ti_224": ({"img_size": 64}, 64),
    "twins_pcpvt_small": ({}, 64),
    "efficientformer_l1": ({}, 224),
    "vit_small_r26_s32_224": ({}, 224),
    "tnt_s_patch16_224": ({"img_size": 32, "patch_size": 4}, 32),
}


#: torchvision models: ``(options, input size)``.
TORCHVISION = {
    "resnet18": ({}, 32),
    "vgg11_bn": ({}, 32),
    "densenet121": ({}, 32),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 32),
    "mobilenet_v3_small": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "shufflenet_v2_x0_5": ({}, 32),
    "regnet_y_400mf": ({}, 32),
    "squeezenet1_1": ({}, 64),
    "convnext_tiny": ({}, 32),
    "swin_t": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
}


def _short(layers: list[str]) -> str:
    if len(layers) <= 6:
        return ", ".join(f"`{n}`" for n in layers)
    head = ", ".join(f"`{n}`" for n in layers[:3])
    return f"{head}, ... ({len(layers) - 5} more), `{layers[-2]}`, `{layers[-1]}`"


def _last_shape(model: torch.nn.Module, layer: str, size: int = 32) -> tuple[int, ...]:
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad(), hooked(model, [layer], lambda n, t: shapes.append(tuple(t.shape))):
        model(torch.rand(1, 3, size, size))
    return shapes[0]


def _row(name: str, model: torch.nn.Module, size: int = 32) -> str:
    layers = default_layers(model)
    shape = _last_shape(model, layers[-1], size)
    # a transformer's block, else a stage output on a grid of at least 3 x 3 positions
    cam = cam_layer(model, image=torch.rand(1, 3, size, size))
    described = f"[B, {', '.join(map(str, shape[1:]))}] (channels first)"
    return f"| `{name}` | {_short(layers)} | {len(layers)} | {described} | `{cam}` |"


def main() -> None:
    columns = "| default layers | count | last layer's output | Grad-CAM layer |"
    print(f"| timm model {columns}\n|---|---|---|---|---|")
    for name, (options, size) in MODELS.items():
        model = timm.create_model(name, pretrained=False, num_classes=10, **options).eval()
        print(_row(name, model, size))
    print(f"\n| torchvision model {columns}\n|---|---|---|---|---|")
    for name, (options, size) in TORCHVISION.items():
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **options)
        print(_row(name, model.eval(), size))


if __name__ == "__main__":
    main()
