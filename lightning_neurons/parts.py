"""A procedurally generated data set whose classes are built from known parts.

Twelve grayscale classes in four groups. Every class is drawn from three parts: the two large
*base* parts of its group and one small *mark* in a random corner:

====== ======================= ==========================================
group  base parts              marks (one per class)
====== ======================= ==========================================
wheel  ring, hbar              dot, plus, dash
box    square, vbar            dot, pipe, small_ring
tent   triangle, diag          plus, pipe, small_x
star   x, wave                 dash, small_ring, small_x
====== ======================= ==========================================

So two classes of a group share two of their three parts (the large ones) and differ in one,
while two classes of different groups share at most one small mark. The marks follow the edges
of a complete graph on the four groups: every mark is used by exactly two groups and every pair
of groups shares exactly one mark, so the cross-group overlap is the same for every pair and the
only coherent grouping is :data:`CLASS_GROUPS`. That is the structure category clustering should
find (compare with :func:`sklearn.metrics.adjusted_rand_score`).

A second, harder structure (``structure="one_shared"``, :data:`ONE_SHARED`) has classes made of
two equally large parts and no mark: the *shared* part of their group and a part of their own,
used by no other class:

====== ================ ======================================
group  shared part      own part of each class
====== ================ ======================================
wheel  ring             s_curve, chevron, ell
box    square           wave, arrow, disk
tent   triangle         vbar, zigzag, arc
star   x                hbar, dots, tee
====== ================ ======================================

Two classes of a group share one of their two parts, classes of different groups none (no own
part is another class's part, nor a rotation of a shared part as a diamond is of ``square``, nor
made of other own parts as a plus is of ``hbar`` and ``vbar``; strokes still resemble each other:
``hbar`` is as straight as a side of ``square``). The own part alone tells every class from every
other: a network can classify without ever looking at the shared part, so the groups are visible
only in what it represents along the way.

Every part is drawn with random position, scale, rotation, stroke width and brightness, and the
image gets Gaussian pixel noise, all from the caller's seed (a private ``torch.Generator``; the
global random state is never touched).

Example:
    >>> x, y = make_parts(n_per_class=10, seed=0)
    >>> x.shape, y.shape, CLASS_NAMES[int(y[0])] in CLASS_NAMES
    (torch.Size([120, 1, 32, 32]), torch.Size([120]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_neurons.data import InMemoryDataModule
from lightning_neurons.errors import NeuronsError

#: Names of the four groups of classes.
GROUP_NAMES: list[str] = ["wheel", "box", "tent", "star"]

#: The two large parts shared by every class of a group.
GROUP_BASE_PARTS: list[tuple[str, str]] = [
    ("ring", "hbar"),
    ("square", "vbar"),
    ("triangle", "diag"),
    ("x", "wave"),
]

#: The small mark of each class, per group (marks are the edges of K4 over the groups).
GROUP_MARKS: list[tuple[str, str, str]] = [
    ("dot", "plus", "dash"),
    ("dot", "pipe", "small_ring"),
    ("plus", "pipe", "small_x"),
    ("dash", "small_ring", "small_x"),
]

#: The part shared by the classes of each group in the ``"one_shared"`` structure.
ONE_SHARED_GROUP_PARTS: list[str] = ["ring", "square", "triangle", "x"]

#: The own part of each class, per group, in the ``"one_shared"`` structure.
ONE_SHARED_OWN_PARTS: list[tuple[str, str, str]] = [
    ("s_curve", "chevron", "ell"),
    ("wave", "arrow", "disk"),
    ("vbar", "zigzag", "arc"),
    ("hbar", "dots", "tee"),
]

#: Every part, large ones first.
PART_NAMES: list[str] = [
    "ring",
    "hbar",
    "square",
    "vbar",
    "triangle",
    "diag",
    "x",
    "wave",
    "dot",
    "plus",
    "dash",
    "pipe",
    "small_ring",
    "small_x",
]

#: The parts each class is made of: ``(base part, base part, mark)``.
CLASS_PARTS: list[tuple[str, ...]] = [
    (*base, mark)
    for base, marks in zip(GROUP_BASE_PARTS, GROUP_MARKS, strict=True)
    for mark in marks
]

#: The group of each class (classes of a group share both large parts).
CLASS_GROUPS: list[int] = [g for g, marks in enumerate(GROUP_MARKS) for _ in marks]

#: ``"<group>-<mark>"`` for each class, e.g. ``"wheel-dot"``.
CLASS_NAMES: list[str] = [
    f"{GROUP_NAMES[g]}-{parts[2]}" for g, parts in zip(CLASS_GROUPS, CLASS_PARTS, strict=True)
]

NUM_CLASSES = len(CLASS_NAMES)


@dataclass(frozen=True)
class PartsStructure:
    """How the classes of a parts data set are built.

    Attributes:
        name: ``"marks"`` or ``"one_shared"``.
        class_parts: The parts of each class (large parts first; a third part is a small mark).
        class_groups: The group of each class: the grouping category clustering should find.
        class_names: ``"<group>-<distinguishing part>"`` for each class.
    """

    name: str
    class_parts: list[tuple[str, ...]]
    class_groups: list[int]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_parts)


#: The default structure: groups share two large parts of three (see the module docstring).
MARKS = PartsStructure("marks", list(CLASS_PARTS), list(CLASS_GROUPS), list(CLASS_NAMES))

#: The harder structure: groups share one of two equally large parts (see the module docstring).
ONE_SHARED = PartsStructure(
    "one_shared",
    [
        (shared, own)
        for shared, owns in zip(ONE_SHARED_GROUP_PARTS, ONE_SHARED_OWN_PARTS, strict=True)
        for own in owns
    ],
    [g for g, owns in enumerate(ONE_SHARED_OWN_PARTS) for _ in owns],
    [f"{GROUP_NAMES[g]}-{own}" for g, owns in enumerate(ONE_SHARED_OWN_PARTS) for own in owns],
)

#: The structures by name.
STRUCTURES: dict[str, PartsStructure] = {"marks": MARKS, "one_shared": ONE_SHARED}
Structure = Literal["marks", "one_shared"]


def get_structure(structure: str) -> PartsStructure:
    """The :class:`PartsStructure` called ``structure``.

    Raises:
        NeuronsError: For an unknown name.
    """
    if structure not in STRUCTURES:
        raise NeuronsError(
            f"`structure` must be one of {', '.join(map(repr, STRUCTURES))}; got {structure!r}"
        )
    return STRUCTURES[structure]


# Geometry, in image coordinates scaled to [-1, 1].
_BASE_SCALE = 0.52  # radius of the large parts
_MARK_SCALE = 0.15  # radius of the marks
_MARK_OFFSET = 0.74  # distance of a mark's centre from the image centre along each axis


def _segment(u: Tensor, v: Tensor, a: tuple[float, float], b: tuple[float, float]) -> Tensor:
    """Distance from points ``(u, v)`` to the segment ``a``-``b``."""
    bx, by = b[0] - a[0], b[1] - a[1]
    pu, pv = u - a[0], v - a[1]
    h = ((pu * bx + pv * by) / (bx * bx + by * by)).clamp(0.0, 1.0)
    return torch.hypot(pu - h * bx, pv - h * by)


def _ring(radius: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda u, v: (torch.hypot(u, v) - radius).abs()


def _disk(radius: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda u, v: (torch.hypot(u, v) - radius).clamp_min(0.0)


def _square(u: Tensor, v: Tensor) -> Tensor:
    return (torch.maximum(u.abs(), v.abs()) - 0.85).abs()


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    # Equilateral, circumradius 1, apex up (v grows downwards in images, so the apex is at -v).
    normals = [
        (math.cos(a), math.sin(a))
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 - 2 * math.pi / 3)
    ]
    d = torch.stack([u * nx + v * ny for nx, ny in normals]).amax(dim=0) - 0.5
    return d.abs()


def _cross(arm: float, diagonal: bool) -> Callable[[Tensor, Tensor], Tensor]:
    if diagonal:
        a, b, c, d = (-arm, -arm), (arm, arm), (-arm, arm), (arm, -arm)
    else:
        a, b, c, d = (-arm, 0.0), (arm, 0.0), (0.0, -arm), (0.0, arm)
    return lambda u, v: torch.minimum(_segment(u, v, a, b), _segment(u, v, c, d))


def _polyline(*points: tuple[float, float]) -> Callable[[Tensor, Tensor], Tensor]:
    def dist(u: Tensor, v: Tensor) -> Tensor:
        parts = [_segment(u, v, a, b) for a, b in zip(points[:-1], points[1:], strict=True)]
        return torch.stack(parts).amin(dim=0)

    return dist


def _arc(u: Tensor, v: Tensor) -> Tensor:
    # The upper half of a ring of radius 0.9 (v grows downwards), with round ends.
    on_ring = (torch.hypot(u, v) - 0.9).abs()
    ends = torch.minimum(torch.hypot(u - 0.9, v), torch.hypot(u + 0.9, v))
    return torch.where(v <= 0, on_ring, ends)


def _wave(u: Tensor, v: Tensor) -> Tensor:
    inside = (v - 0.3 * torch.sin(3.0 * u)).abs()
    beyond = (u.abs() - 1.0).clamp_min(0.0)
    return torch.hypot(inside, beyond)


#: Distance functions of the parts in local units (a part's radius is 1).
_PARTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ring": _ring(1.0),
    "hbar": lambda u, v: _segment(u, v, (-1.15, 0.0), (1.15, 0.0)),
    "square": _square,
    "vbar": lambda u, v: _segment(u, v, (0.0, -1.15), (0.0, 1.15)),
    "triangle": _triangle,
    "diag": lambda u, v: _segment(u, v, (-0.95, 0.95), (0.95, -0.95)),
    "x": _cross(0.8, diagonal=True),
    "wave": _wave,
    "dot": _disk(0.55),
    "plus": _cross(1.0, diagonal=False),
    "dash": lambda u, v: _segment(u, v, (-1.0, 0.0), (1.0, 0.0)),
    "pipe": lambda u, v: _segment(u, v, (0.0, -1.0), (0.0, 1.0)),
    "small_ring": _ring(0.8),
    "small_x": _cross(0.75, diagonal=True),
    # large parts of the "one_shared" structure only
    "chevron": _polyline((-0.95, -0.6), (0.0, 0.6), (0.95, -0.6)),
    "ell": _polyline((-0.7, -0.95), (-0.7, 0.8), (0.85, 0.8)),
    "disk": _disk(0.6),
    "zigzag": _polyline((-1.0, 0.5), (-0.33, -0.5), (0.33, 0.5), (1.0, -0.5)),
    "arc": _arc,
    "arrow": _polyline((-0.6, -0.95), (0.6, 0.0), (-0.6, 0.95)),
    "s_curve": lambda u, v: _wave(v, u),
    "dots": lambda u, v: torch.minimum(_disk(0.3)(u - 0.55, v), _disk(0.3)(u + 0.55, v)),
    "tee": lambda u, v: torch.minimum(
        _segment(u, v, (-0.95, -0.8), (0.95, -0.8)), _segment(u, v, (0.0, -0.8), (0.0, 0.95))
    ),
}


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _draw(
    part: str,
    grid_u: Tensor,
    grid_v: Tensor,
    centre: tuple[Tensor, Tensor],
    scale: Tensor,
    angle: Tensor,
    half_width: Tensor,
    pixel: float,
) -> Tensor:
    """Render one part on ``n`` images at once: ``[n, S, S]`` intensities in [0, 1]."""
    cu, cv = (c.view(-1, 1, 1) for c in centre)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    du, dv = grid_u - cu, grid_v - cv
    s = scale.view(-1, 1, 1)
    u = (cos * du + sin * dv) / s
    v = (-sin * du + cos * dv) / s
    dist = _PARTS[part](u, v) * s  # back to image units
    # Anti-aliased stroke: a linear ramp one pixel wide around the stroke's edge.
    return ((half_width.view(-1, 1, 1) - dist) / pixel + 0.5).clamp(0.0, 1.0)


def _draw_class(
    parts: tuple[str, ...],
    n: int,
    grid_u: Tensor,
    grid_v: Tensor,
    pixel: float,
    gen: torch.Generator,
) -> Tensor:
    base_a, base_b, *marks = parts
    centre = (_uniform(n, -0.12, 0.12, gen), _uniform(n, -0.12, 0.12, gen))
    scale = _BASE_SCALE * _uniform(n, 0.85, 1.15, gen)
    angle = _uniform(n, -0.2, 0.2, gen)  # about +-11 degrees
    # A stroke at least about one pixel wide (at 32 pixels, 1.3 to 2 pixels).
    width = torch.clamp(_uniform(n, 0.04, 0.065, gen), min=0.6 * pixel)
    images = _draw(base_a, grid_u, grid_v, centre, scale, angle, width, pixel) * _uniform(
        n, 0.7, 1.0, gen
    ).view(-1, 1, 1)
    shifted = (centre[0] + _uniform(n, -0.05, 0.05, gen), centre[1] + _uniform(n, -0.05, 0.05, gen))
    second = _draw(
        base_b,
        grid_u,
        grid_v,
        shifted,
        scale * _uniform(n, 0.9, 1.1, gen),
        angle + _uniform(n, -0.1, 0.1, gen),
        width,
        pixel,
    )
    images = torch.maximum(images, second * _uniform(n, 0.7, 1.0, gen).view(-1, 1, 1))
    if not marks:
        return images
    (mark,) = marks
    corner = torch.randint(0, 4, (n,), generator=gen)
    sign_u = (corner % 2).float() * 2 - 1
    sign_v = (corner // 2).float() * 2 - 1
    mark_centre = (
        sign_u * _MARK_OFFSET + _uniform(n, -0.07, 0.07, gen),
        sign_v * _MARK_OFFSET + _uniform(n, -0.07, 0.07, gen),
    )
    mark_scale = _MARK_SCALE * _uniform(n, 0.85, 1.2, gen)
    marked = _draw(
        mark, grid_u, grid_v, mark_centre, mark_scale, _uniform(n, -0.25, 0.25, gen), width, pixel
    )
    return torch.maximum(images, marked * _uniform(n, 0.75, 1.0, gen).view(-1, 1, 1))


def make_parts(
    n_per_class: int = 200, image_size: int = 32, seed: int = 0, structure: Structure = "marks"
) -> tuple[Tensor, Tensor]:
    """Generate the parts data set (see the module docstring for its design).

    Args:
        n_per_class: Images per class.
        image_size: Side of the square images (at least 16 pixels, so the marks stay readable).
        seed: Seed of the private random generator; the same seed gives the same images.
        structure: ``"marks"`` (groups share two large parts of three) or ``"one_shared"``
            (groups share one of two equally large parts; harder).

    Returns:
        ``(x, y)``: ``x`` float32 ``[N, 1, image_size, image_size]`` in [0, 1], ``y`` int64
        ``[N]`` class indices (``N = 12 * n_per_class``), in a random order.

    Raises:
        NeuronsError: If ``n_per_class < 1``, ``image_size < 16`` or ``structure`` is unknown.

    Example:
        >>> x, y = make_parts(n_per_class=5, image_size=24, seed=1)
        >>> x.shape, float(x.min()) >= 0.0, float(x.max()) <= 1.0
        (torch.Size([60, 1, 24, 24]), True, True)
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise NeuronsError(f"`n_per_class` must be a positive integer, got {n_per_class!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise NeuronsError(
            f"`image_size` must be an integer >= 16 (smaller images cannot show the marks), got {image_size!r}"
        )
    design = get_structure(structure)
    gen = torch.Generator().manual_seed(int(seed))
    pixel = 2.0 / image_size
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) * pixel - 1.0
    grid_v, grid_u = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.cat(
        [
            _draw_class(parts, n_per_class, grid_u, grid_v, pixel, gen)
            for parts in design.class_parts
        ]
    )
    images = images + 0.06 * torch.randn(images.shape, generator=gen)
    labels = torch.arange(design.num_classes).repeat_interleave(n_per_class)
    order = torch.randperm(labels.numel(), generator=gen)
    return images[order].clamp(0.0, 1.0).unsqueeze(1).contiguous(), labels[order].contiguous()


class PartsDataModule(InMemoryDataModule):
    """The parts data set (:func:`make_parts`) as a LightningDataModule, generated in memory (no
    download).

    Batches are ``(x, y)`` with ``x`` float in [0, 1] ``[B, 1, S, S]`` and ``y`` int64. The
    train/validation split is stratified and deterministic for a ``seed``; the test loader reuses
    the validation images.

    Args:
        batch_size: Batch size of every loader.
        image_size: Side of the square images (>= 16).
        n_per_class: Images generated per class (before the split).
        val_fraction: Share of the images held out for validation (and test).
        seed: Seed of the images, the split and the training shuffle.
        num_workers: DataLoader workers.
        structure: ``"marks"`` (default) or ``"one_shared"`` (see :func:`make_parts`).

    Attributes:
        num_classes: 12.
        class_names: The structure's class names (:data:`CLASS_NAMES` for ``"marks"``).
        class_groups: The known grouping of the classes (:data:`CLASS_GROUPS` for ``"marks"``).
        class_parts: The parts of each class (:data:`CLASS_PARTS` for ``"marks"``).
        image_shape: ``(1, image_size, image_size)``.
        input_transform: ``None`` (images go to the model as they are).

    Raises:
        NeuronsError: For a non-positive ``batch_size`` or ``n_per_class``, an ``image_size``
            below 16, or a ``val_fraction`` outside (0, 1).

    Example:
        >>> dm = PartsDataModule(batch_size=16, n_per_class=20)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape
        torch.Size([16, 1, 32, 32])
    """

    num_classes = NUM_CLASSES
    class_names = list(CLASS_NAMES)
    class_groups = list(CLASS_GROUPS)
    class_parts = list(CLASS_PARTS)
    input_transform = None

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        n_per_class: int = 200,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        structure: Structure = "marks",
    ) -> None:
        super().__init__(batch_size, val_fraction, seed, num_workers)
        design = get_structure(structure)
        self.structure = structure
        self.class_names = list(design.class_names)
        self.class_groups = list(design.class_groups)
        self.class_parts = list(design.class_parts)
        if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 2:
            raise NeuronsError(
                f"`n_per_class` must be an integer >= 2 (one image to train, one to validate), got {n_per_class!r}"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise NeuronsError(f"`image_size` must be an integer >= 16, got {image_size!r}")
        self.image_size = image_size
        self.n_per_class = n_per_class
        self.image_shape = (1, image_size, image_size)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return make_parts(self.n_per_class, self.image_size, self.seed, self.structure)
