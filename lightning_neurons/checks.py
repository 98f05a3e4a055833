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


def check_constraints(params: Mapping[str, Any], constraints: Mapping[str, list[Any]]) -> None:
    """Check parameters against scikit-learn style declarative constraints.

    Each entry of ``constraints`` lists what a parameter may be, as in scikit-learn's
    ``_parameter_constraints``: ``None``, ``StrOptions({...})``, ``Interval(Integral, ...)``, a
    type. ``bool`` does not count as an integer here.

    Args:
        params: Parameter values by name (``estimator.get_params(deep=False)``).
        constraints: Allowed values by name.

    Raises:
        NeuronsError: For the first parameter that none of its constraints allows.

    Example:
        >>> check_constraints({"k": 0}, {"k": [Interval(Integral, 1, None, closed="left")]})
        Traceback (most recent call last):
        NeuronsError: `k` must be an integer >= 1; got 0
    """
    from sklearn.utils._param_validation import make_constraint

    for name, allowed in constraints.items():
        value = params[name]
        if any(_allows(make_constraint(c), value) for c in allowed):
            continue
        described = " or ".join(_describe(make_constraint(c)) for c in allowed)
        raise NeuronsError(f"`{name}` must be {described}; got {value!r}")


def _allows(constraint: Any, value: Any) -> bool:
    from numbers import Integral

    from sklearn.utils._param_validation import Interval

    if isinstance(value, bool) and isinstance(constraint, Interval):
        return constraint.type is not Integral and constraint.is_satisfied_by(value)
    return bool(constraint.is_satisfied_by(value))


def _describe(constraint: Any) -> str:
    from numbers import Integral

    from sklearn.utils._param_validation import Interval, StrOptions, _NoneConstraint

    if isinstance(constraint, _NoneConstraint):
        return "None"
    if isinstance(constraint, StrOptions):
        return "one of " + ", ".join(map(repr, sorted(constraint.options)))
    if (
        isinstance(constraint, Interval)
        and constraint.type is Integral
        and constraint.right is None
    ):
        low = constraint.left if constraint.closed in ("left", "both") else constraint.left + 1
        return f"an integer >= {low}"
    return str(constraint)
