"""Argument checks, in one place: every error is a :class:`NeuronsError` that names the argument,
the value and what is allowed.

Callbacks and the clustering estimators declare their arguments' constraints in one kind of
table, as scikit-learn's estimators do (``_parameter_constraints``), and :func:`validate_params`
checks values against it: a callback's ``__init__`` its ``locals()``, an estimator's ``fit`` its
``get_params()`` (scikit-learn asks estimators to check in ``fit``, not in ``__init__``)::

    class MyCallback(AnalysisCallback):
        _parameter_constraints: ClassVar[Constraints] = {
            **AnalysisCallback._parameter_constraints,
            "top_k": [Interval(int, 1, None)],
            "reduction": [Options(str, ("mean", "max"))],
            "num_classes": [Interval(int, 1, None), None],
        }

        def __init__(self, layers=None, *, top_k=5, reduction="mean", num_classes=None, **kw):
            validate_params(self, locals())
            super().__init__(layers, **kw)

A value is accepted when it satisfies any constraint of its list; ``None`` in a list allows
``None``, a type allows its instances, ``"callable"`` any callable. Checks that one table cannot
say (one argument against another) stay in plain ``check_*`` functions below.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from lightning_neurons.errors import NeuronsError

__all__ = [
    "RANDOM_STATE",
    "Constraint",
    "Constraints",
    "Interval",
    "Options",
    "Satisfies",
    "StrList",
    "validate_params",
]

# ---- declarative constraints ------------------------------------------------------------------


class Constraint(Protocol):
    """What a value must be: ``is_satisfied_by(value)``, and ``str()`` says it in words."""

    def is_satisfied_by(self, value: Any) -> bool: ...


#: A callback's table: argument name -> the constraints, any of which the value may satisfy
#: (``None``, a type and ``"callable"`` are shorthands, see :func:`make_constraint`).
Constraints = Mapping[str, Sequence[Any]]


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return _is_integer(value) or (isinstance(value, (float, np.floating)) and not math.isnan(value))


@dataclass(frozen=True)
class Interval:
    """A number in a range: ``Interval(int, 1, None)`` is an integer >= 1 (``bool`` is not an
    integer here; NumPy's integers are); ``Interval(float, 0, 1, closed="right")`` a real number
    in (0, 1] (integers count, NaN does not).

    Args:
        type: ``int`` or ``float``.
        left: The lower bound, ``None`` for none.
        right: The upper bound, ``None`` for none.
        closed: Which bounds belong to the range: ``"both"``, ``"left"``, ``"right"``,
            ``"neither"``.
    """

    type: type
    left: float | None
    right: float | None
    closed: Literal["both", "left", "right", "neither"] = "both"

    def is_satisfied_by(self, value: Any) -> bool:
        if not (_is_integer(value) if self.type is int else _is_real(value)):
            return False
        low_ok = self.left is None or (
            value >= self.left if self.closed in ("both", "left") else value > self.left
        )
        high_ok = self.right is None or (
            value <= self.right if self.closed in ("both", "right") else value < self.right
        )
        return low_ok and high_ok

    def __str__(self) -> str:
        kind = "an integer" if self.type is int else "a number"
        low = ">=" if self.closed in ("both", "left") else ">"
        high = "<=" if self.closed in ("both", "right") else "<"
        left, right = _bound(self.left), _bound(self.right)
        if self.left is not None and self.right is not None:
            return f"{kind} with {left} {low.replace('>', '<')} x {high} {right}"
        if self.left is not None:
            return f"{kind} {low} {left}"
        if self.right is not None:
            return f"{kind} {high} {right}"
        return kind


def _bound(value: float | None) -> str:
    """A bound in words: integers in full (``4294967295``), other numbers short (``0.5``)."""
    if value is None:
        return ""
    return str(int(value)) if _is_integer(value) else f"{value:g}"


@dataclass(frozen=True)
class Options:
    """One of a few values: ``Options(str, ("mean", "max"))``; :meth:`of` reads them from a
    ``Literal`` type, so that the type hint LightningCLI checks and this check agree."""

    type: type
    options: tuple[Any, ...]

    @classmethod
    def of(cls, literal: Any) -> Options:
        """The options of a ``Literal[...]`` type: ``Options.of(Literal["mean", "max"])``."""
        values = typing.get_args(literal)
        return cls(type(values[0]), tuple(values))

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, self.type) and value in self.options

    def __str__(self) -> str:
        return f"one of {', '.join(map(repr, self.options))}"


@dataclass(frozen=True)
class Satisfies:
    """Any rule in a function: ``Satisfies(lambda v: isinstance(v, str) and bool(v),
    "a non-empty string")``."""

    predicate: Callable[[Any], bool]
    description: str

    def is_satisfied_by(self, value: Any) -> bool:
        return bool(self.predicate(value))

    def __str__(self) -> str:
        return self.description


@dataclass(frozen=True)
class StrList:
    """One string or a list (tuple) of strings, e.g. layer names or glob patterns."""

    description: str = "a layer name or a list of layer names"

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, str):
            return True
        return isinstance(value, Sequence) and all(isinstance(v, str) for v in value)

    def __str__(self) -> str:
        return self.description


@dataclass(frozen=True)
class _InstanceOf:
    type: type

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, self.type)

    def __str__(self) -> str:
        name = self.type.__name__
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


#: What a ``random_state`` may be, as in scikit-learn: a seed, a ``RandomState`` or ``None``.
RANDOM_STATE: tuple[Any, ...] = (Interval(int, 0, 2**32 - 1), np.random.RandomState, None)


class _NoneConstraint:
    def is_satisfied_by(self, value: Any) -> bool:
        return value is None

    def __str__(self) -> str:
        return "None"


class _CallableConstraint:
    def is_satisfied_by(self, value: Any) -> bool:
        return callable(value)

    def __str__(self) -> str:
        return "a callable"


def make_constraint(spec: Any) -> Constraint:
    """A constraint object from a table entry: ``None``, a type, ``"callable"`` or a constraint."""
    if spec is None:
        return _NoneConstraint()
    if spec == "callable":
        return _CallableConstraint()
    if isinstance(spec, type):
        return _InstanceOf(spec)
    if hasattr(spec, "is_satisfied_by"):
        return spec
    raise TypeError(f"not a constraint: {spec!r}")


def _allowed(constraints: Sequence[Any]) -> str:
    """The constraints in words, ``None`` last: ``"an integer >= 1 or None"``."""
    words = [str(make_constraint(c)) for c in constraints if c is not None]
    words += ["None"] if any(c is None for c in constraints) else []
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def validate_params(
    owner: object, params: Mapping[str, Any], constraints: Constraints | None = None
) -> None:
    """Check arguments against a constraint table.

    Only the arguments that the table names are checked (``locals()`` of an ``__init__`` may be
    passed as it is).

    Args:
        owner: Who takes the arguments: its class name starts the message; its class's
            ``_parameter_constraints`` is the table unless ``constraints`` is given. A string
            names the owner itself.
        params: Argument name -> value.
        constraints: The table; default: ``owner``'s ``_parameter_constraints``.

    Raises:
        NeuronsError: For the first argument that satisfies none of its constraints, e.g.
            ``ActivationTracker: `top_k` must be an integer >= 1; got 0``.

    Example:
        >>> validate_params("f", {"k": 3}, {"k": [Interval(int, 1, None)]})
        >>> validate_params("f", {"k": 0}, {"k": [Interval(int, 1, None), None]})
        Traceback (most recent call last):
        ...
        lightning_neurons.errors.NeuronsError: f: `k` must be an integer >= 1 or None; got 0
    """
    if constraints is None:
        constraints = getattr(owner, "_parameter_constraints", {})
    name = owner if isinstance(owner, str) else type(owner).__name__
    for param, allowed in constraints.items():
        if param not in params:
            continue
        value = params[param]
        if any(make_constraint(c).is_satisfied_by(value) for c in allowed):
            continue
        raise NeuronsError(f"{name}: `{param}` must be {_allowed(allowed)}; got {value!r}")


# ---- plain checks -----------------------------------------------------------------------------


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
