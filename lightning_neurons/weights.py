"""The model weights in a checkpoint file, Lightning's or not, fitted to the config's model.

``lightning-neurons analyze`` reads checkpoints that Lightning saved and weights saved by a plain
PyTorch loop: a state dict (``torch.save(model.state_dict(), "epoch_3.pt")``), PyTorch's
"general checkpoint" (``{"epoch": 3, "model_state_dict": ..., "optimizer_state_dict": ...}``),
torchvision's reference scripts (``{"model": ..., "epoch": ...}``) and timm's train script
(``{"state_dict": ..., "epoch": ...}``). The weights of a backbone trained alone are fitted to the
LightningModule that holds it (``conv1.weight`` -> ``backbone.conv1.weight``), and the prefixes
that ``DataParallel``/DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) add are dropped.

``.safetensors`` files (Hugging Face's and timm's ``save_pretrained``) are read with the
``safetensors`` package when it is installed. Hugging Face's Trainer saves ``checkpoint-<step>/``
folders: their ``model.safetensors`` (or ``pytorch_model.bin``, or the shards an
``*.index.json`` lists) is read, and their ``trainer_state.json`` gives the epoch and step.

A file that does not say its epoch takes it from its path when the files' paths differ only by
a number (``epoch_2.pt``, ``epoch_10.pt``: epochs 2 and 10; ``checkpoint-500/model.safetensors``:
500), else from its place in the paths' natural order (0, 1, 2, ...); its step is its epoch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_neurons.errors import NeuronsError

#: Where a dict saved by a plain training loop keeps the model's state dict, in the order tried.
STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")

#: The weights files of a Hugging Face ``save_pretrained`` folder (and a Trainer's
#: ``checkpoint-<step>/``), in the order looked for; ``*.index.json`` lists a sharded one's files.
HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

#: Prefixes that wrappers add to every key: ``DataParallel``/DDP, ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Weights:
    """What a checkpoint file holds of the model.

    Attributes:
        state: The state dict as saved (parameter and buffer names to tensors).
        epoch: The epoch it says it was saved in (``None``: it does not say).
        global_step: The optimizer steps it says were taken (``None``: it does not say).
        lightning: Whether Lightning saved it (its hooks, loops and clock are then read).
    """

    state: dict[str, torch.Tensor]
    epoch: int | None
    global_step: int | None
    lightning: bool


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors, on the CPU.

    Raises:
        NeuronsError: When the ``safetensors`` package is not installed.
    """
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise NeuronsError(
            f"{str(path)!r} is a .safetensors file: reading it needs the safetensors package "
            "(pip install safetensors)"
        ) from err
    return load_file(str(path), device="cpu")


def hf_weights(folder: Path) -> Path | None:
    """The weights file of a Hugging Face ``save_pretrained`` folder (a Trainer's
    ``checkpoint-<step>/``), or ``None`` when it holds none of :data:`HF_WEIGHTS`."""
    for name in HF_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def load_sharded(index: Path, load: Any) -> dict[str, torch.Tensor]:
    """The state dict of the shards that a Hugging Face ``*.index.json`` lists (its
    ``weight_map``), each read by ``load(path)``.

    Raises:
        NeuronsError: When the index is not one, or a shard is missing.
    """
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise NeuronsError(
            f"{str(index)!r} is not a Hugging Face weights index (a JSON object with a "
            f"'weight_map' of tensor names to shard files): {err}"
        ) from err
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise NeuronsError(f"{str(index)!r} lists the shard {shard!r}, which is missing")
        state.update(load(index.parent / shard))
    return state


def trainer_state(path: Path) -> tuple[int, int] | None:
    """The epoch and step of a Hugging Face Trainer's checkpoint from the ``trainer_state.json``
    beside ``path`` (``None``: there is none). The Trainer counts epochs done, as a fraction
    (``1.0`` after the first, ``0.5`` half-way through it); the epoch here is the one it was
    saved in, counted from 0 as Lightning counts (both: 0), and its step the Trainer's
    ``global_step``."""
    state_file = path.parent / "trainer_state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        done, step = float(state["epoch"]), int(state["global_step"])
    except (ValueError, KeyError, TypeError) as err:
        raise NeuronsError(
            f"{str(state_file)!r} is not a Hugging Face Trainer's state (a JSON object with "
            f"'epoch' and 'global_step'): {err}"
        ) from err
    return max(0, math.ceil(done) - 1), step


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _number(checkpoint: Mapping[str, Any], key: str) -> int | None:
    value = checkpoint.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_weights(checkpoint: Any, path: Path) -> Weights:
    """The weights of a loaded checkpoint file (see the module docstring for the layouts).

    Raises:
        NeuronsError: For a file that holds no state dict where these layouts keep one.
    """
    lightning = isinstance(checkpoint, Mapping) and "pytorch-lightning_version" in checkpoint
    if lightning and isinstance(checkpoint.get("state_dict"), Mapping):
        epoch, step = _number(checkpoint, "epoch"), _number(checkpoint, "global_step")
        return Weights(dict(checkpoint["state_dict"]), epoch, step, lightning=True)
    if _is_state_dict(checkpoint):
        epoch, step = trainer_state(path) or (None, None)
        return Weights(dict(checkpoint), epoch, step, lightning=False)
    if isinstance(checkpoint, Mapping):
        for key in STATE_KEYS:
            if _is_state_dict(checkpoint.get(key)):
                epoch, step = _number(checkpoint, "epoch"), _number(checkpoint, "global_step")
                return Weights(dict(checkpoint[key]), epoch, step, lightning=False)
    held = (
        f"a dict with the keys {', '.join(map(repr, list(checkpoint)[:8]))}"
        if isinstance(checkpoint, Mapping)
        else f"a {type(checkpoint).__name__}"
    )
    raise NeuronsError(
        f"{str(path)!r} holds no model weights that analyze can read: it holds {held}. Give a "
        "Lightning checkpoint, a state dict (`torch.save(model.state_dict(), path)`) or a dict "
        f"that keeps one under {', '.join(map(repr, STATE_KEYS))}"
    )


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def fitted_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its keys as ``model`` names them: as saved, without the wrappers'
    prefixes, or under the name of the module that holds them (a backbone's weights in the
    LightningModule, at any depth: ``backbone.``, ``model.encoder.``). Of these, the one that
    fits the most of the model's keys (ties: the first);
    :func:`~lightning_neurons.analyze.check_state_dict` says what does not fit."""
    own = set(model.state_dict())
    bare = {_strip_wrappers(k): v for k, v in state.items()}
    candidates = [dict(state), bare]
    if bare:
        key = next(iter(bare))  # where the model has it: the prefixes of the module that holds it
        prefixes = {o[: -len(key)] for o in own if o.endswith(f".{key}")}
        candidates += [{f"{p}{k}": v for k, v in bare.items()} for p in sorted(prefixes)]
    return max(candidates, key=lambda c: (len(own & set(c)), -len(set(c) - own)))


#: A file name's stem split at its last number: prefix, number, suffix (no digit).
_NUMBERED = re.compile(r"(.*?)(\d+)(\D*)")


def natural_key(path: Path) -> list[Any]:
    """``checkpoint-1000`` after ``checkpoint-500``: numbers in the path compared as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def epochs_from_names(paths: Sequence[Path]) -> list[int]:
    """Epochs for files that do not say theirs: the last number in their paths (less the
    suffix) when two or more paths differ only by it (``epoch_2.pt``, ``epoch_10.pt`` -> 2, 10;
    ``checkpoint-500/model.safetensors`` -> 500), else their places in the paths' natural
    order.

    Example:
        >>> epochs_from_names([Path("run/epoch_10.pt"), Path("run/epoch_2.pt")])
        [10, 2]
        >>> epochs_from_names([Path("best.pth"), Path("last.pth")])
        [0, 1]
    """
    parts = [_NUMBERED.fullmatch(str(p.with_suffix(""))) for p in paths]
    if len(paths) > 1 and all(parts):
        shapes = {(m.group(1), m.group(3)) for m in parts if m}
        numbers = [int(m.group(2)) for m in parts if m]
        if len(shapes) == 1 and len(set(numbers)) == len(numbers):
            return numbers
    order = sorted(range(len(paths)), key=lambda i: natural_key(paths[i]))
    places = [0] * len(paths)
    for place, index in enumerate(order):
        places[index] = place
    return places
