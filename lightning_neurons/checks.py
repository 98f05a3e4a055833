"""Argument checks of the callbacks, in one place: each raises :class:`NeuronsError` with a
message that names the argument, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_neurons.errors import NeuronsError


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an integer >= 1 (``bool`` is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NeuronsError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def check_optional_positive_int(name: str, value: int | None) -> int | None:
    """``None``, or ``value`` checked by :func:`check_positive_int`."""
    return None if value is None else check_positive_int(name, value)


def check_optional_int(name: str, value: Any, minimum: int) -> int | None:
    """``None``, or ``value`` as an ``int`` if it is an integer (NumPy's too) >= ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise NeuronsError(f"`{name}` must be None or an integer >= {minimum}; got {value!r}")
    return int(value)


def check_int(name: str, value: int, *, minimum: int | None = None) -> int:
    """``value`` if it is an integer (>= ``minimum`` when given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise NeuronsError(f"`{name}` must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise NeuronsError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(name: str, value: object, low: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float if it is a number >= ``low`` (> ``low`` when ``strict``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (value <= low if strict else value < low)
    ):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise NeuronsError(f"`{name}` must be a number {bound}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise NeuronsError(
            f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}"
        )
    return value


def check_layers(name: str, layers: str | Sequence[str] | None) -> list[str] | None:
    """Layer names or glob patterns as a list (one name may be given as a string); ``None``
    stays ``None`` (the default layers)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        return [layers]
    if not isinstance(layers, Sequence) or not all(isinstance(n, str) for n in layers):
        raise NeuronsError(f"`{name}` must be a list of layer names, got {layers!r}")
    return list(layers)


def check_indices(name: str, values: Sequence[int]) -> list[int]:
    """Non-negative integers without repeats, in their first order."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise NeuronsError(f"`{name}` must be a list of non-negative integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise NeuronsError(
                f"`{name}` must hold non-negative integers, got {v!r} in {list(values)!r}"
            )
    return list(dict.fromkeys(values))


def check_channels(channels: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """``{layer: channel indices}``; ``None`` gives ``{}``."""
    if channels is None:
        return {}
    if not isinstance(channels, Mapping):
        raise NeuronsError(
            f"`channels` must map layer names to channel lists, e.g. {{'features.conv2': [0, 5]}}; "
            f"got {channels!r}"
        )
    return {str(k): check_indices(f"channels[{k!r}]", v) for k, v in channels.items()}


def check_image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``[channels, height, width]`` of positive integers."""
    if len(shape) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
    ):
        raise NeuronsError(f"`image_shape` must be [channels, height, width], got {shape!r}")
    return tuple(shape)  # type: ignore[return-value]


def check_instance(name: str, value: Any, cls: type, what: str) -> Any:
    """``value`` if it is ``None`` or an instance of ``cls`` (``what`` names it in the error)."""
    if value is not None and not isinstance(value, cls):
        raise NeuronsError(f"`{name}` must be {what} or None, got {type(value).__name__}")
    return value


def check_display_shape(image_shape: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of a display image: a tuple, list or ``torch.Size`` of three
    positive integers (NumPy's too), returned as a tuple of ``int``."""
    import numbers

    shape = tuple(image_shape) if isinstance(image_shape, (tuple, list)) else None
    if (
        shape is None
        or len(shape) != 3
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape)
    ):
        raise NeuronsError(
            f"`image_shape` must be (channels, height, width), e.g. (1, 32, 32) or (3, 224, 224); "
            f"got {image_shape!r}"
        )
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    """Raise unless ``value`` is a positive number (an integer, NumPy's too, with ``integer``)."""
    import numbers

    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise NeuronsError(f"`{name}` must be {what}, got {value!r}")


def check_non_negative(name: str, value: Any, note: str = "") -> float:
    """``value`` as a float if it is a real number >= 0 (``note`` is added to the message)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise NeuronsError(f"`{name}` must be a number >= 0{note}, got {value!r}")
    return float(value)


def check_render_counts(
    counts: Mapping[str, Any], restarts: Any, select_after: Any, mask: bool
) -> None:
    """``render()``'s counts (``{name: value}`` and ``restarts``, all positive integers), and the
    combinations of them that cannot work together."""
    for name, value in {**counts, "restarts": restarts}.items():
        check_positive(name, value, integer=True)
    n_images = counts.get("n_images", 1)
    if select_after is not None:
        check_positive("select_after", select_after, integer=True)
        if mask:
            raise NeuronsError("`select_after` cannot be combined with `mask=True`")
    if restarts > 1 and n_images > 1:
        raise NeuronsError(
            f"`restarts` ({restarts}) keeps the best of several images of an objective; it "
            f"cannot be combined with n_images={n_images} (several images that differ)"
        )


def check_image_batch(images: Any) -> None:
    """Raise unless ``images`` is a ``[N, C, H, W]`` tensor."""
    import torch

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NeuronsError(f"`images` must be a [N, C, H, W] tensor, got {shape}")


def check_index(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is a non-negative integer (NumPy's too)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise NeuronsError(f"`{name}` must be a non-negative integer, got {value!r}")
    return int(value)


def check_layer_name(layer: Any) -> str:
    """``layer`` if it is a non-empty module name."""
    if not isinstance(layer, str) or not layer:
        raise NeuronsError(f"`layer` must be a module name such as 'features.conv2', got {layer!r}")
    return layer


def check_weight(value: Any) -> float:
    """``value`` as a float if it is a real number (a factor of an objective)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NeuronsError(
            f"objectives can be added to objectives and multiplied or divided by numbers; got "
            f"{type(value).__name__} {value!r}"
        )
    return float(value)


def check_scale_range(name: str, value: Any) -> tuple[float, float]:
    """``(low, high)`` as floats if they are numbers with ``0 < low <= high``."""
    import numbers

    pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if (
        len(pair) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
        or not 0 < pair[0] <= pair[1]
    ):
        raise NeuronsError(f"`{name}` must be (low, high) with 0 < low <= high, got {value!r}")
    return float(pair[0]), float(pair[1])


def check_batch_shape(shape: Any, seeds: Any) -> tuple[int, int, int, int]:
    """``[N, C, H, W]`` of positive integers, with one seed per image."""
    if len(shape) != 4 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
    ):
        raise NeuronsError(
            f"image batch shape must be 4 positive integers [N, C, H, W], got {shape!r}"
        )
    if len(seeds) != shape[0]:
        raise NeuronsError(f"need one seed per image: {shape[0]} images but {len(seeds)} seeds")
    return tuple(shape)  # type: ignore[return-value]
