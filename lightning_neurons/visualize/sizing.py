"""How many rows are rendered at once, measured with one forward pass of one grey image.

:func:`probe` runs the model once: it checks the objectives against the layers' real outputs
and measures the leaf modules' outputs (:func:`leaf_output_sizes`), from
which :func:`auto_batch_size` sizes the chunks. On CPU the chunks fit the caches, which gives the
same images faster than one huge batch; on an accelerator they bound the memory a backward pass
keeps, whatever the number of objectives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_neurons.batch import (
    BatchFn,
    InputTransform,
    as_model_input,
    read_logits,
    to_model_input,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import get_module, hooked
from lightning_neurons.state import analysis_mode, model_device
from lightning_neurons.visualize.objectives import IMAGE, LOGITS, Objective
from lightning_neurons.visualize.penalties import diversity_layer

#: On CPU, rows per chunk are chosen so that the largest layer output of a chunk is about this
#: many bytes: batches far beyond the CPU caches are slower per image.
CPU_CHUNK_BYTES = 2 * 2**20

#: On an accelerator, rows per chunk are chosen so that all the layer outputs of a chunk (what
#: its backward pass keeps, float32) take about this many bytes, and at most
#: :data:`DEVICE_FREE_SHARE` of the device memory free when the chunk is sized.
DEVICE_CHUNK_BYTES = 4 * 2**30
#: The share of the device's free memory (the driver's free memory and what PyTorch's caching
#: allocator holds unused) a chunk's layer outputs may take: the rest is left to what the
#: count does not see (the convolutions' workspaces, the optimiser's and the transforms' buffers).
DEVICE_FREE_SHARE = 0.5
#: On an accelerator, at most this many rows per chunk. A small batch there costs what its
#: kernel launches cost, so the fewer chunks the faster. History: 272 rows of ResNet-50 at 32 px
#: peaked at 27.8 GB of CUDA memory on an H200, 21.9 GB of it the diversity term's Gram
#: matrices, then taken for every row (80 MB a row at its 17 block outputs), and the cap was 64
#: rows; since 6c8001d only the rows of objectives with several images take them, of their own
#: layer, and :func:`chunk_rows` counts them.
DEVICE_CHUNK_ROWS = 512


@dataclass(frozen=True)
class Probe:
    """What one forward pass of one image told about the model.

    Attributes:
        shapes: Output shape (without the batch dimension) of every layer read, and of
            :data:`~lightning_neurons.visualize.objectives.LOGITS` when the output has logits.
        largest: The largest output of any leaf module (elements per image).
        total: The sum of all leaf modules' outputs (elements per image).
        without_gradient: Asked for (``gradients=True``), the layers read (and ``LOGITS``) whose
            outputs carry no gradient from the image: the model computes them under
            ``torch.no_grad()``, in ``torch.utils.checkpoint(..., use_reentrant=True)``, after a
            ``.detach()`` or from parameters and buffers alone.
        grad_mode_off: Those of them computed with the grad mode off (``torch.no_grad()``, a
            reentrant checkpoint); the others are computed with it on.
        graph_on_return: Those of them whose output had a graph when the forward pass returned:
            a block that the model runs in a reentrant checkpoint, whose output gets its graph
            when the checkpoint returns it. Grad-CAM reads it after the forward pass; a
            rendering or a contribution, which read the layer when it runs, cannot.
    """

    shapes: dict[str, tuple[int, ...]]
    largest: int
    total: int
    without_gradient: frozenset[str] = frozenset()
    grad_mode_off: frozenset[str] = frozenset()
    graph_on_return: frozenset[str] = frozenset()

    def spatial(self) -> frozenset[str]:
        """The layers read whose outputs have channels and positions (``[C, ...]``)."""
        return frozenset(
            n for n, shape in self.shapes.items() if n not in (LOGITS, IMAGE) and len(shape) >= 2
        )


def device_free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take: the driver's free memory and what
    PyTorch's caching allocator holds unused (``None`` for a CPU, or a device PyTorch does not
    report on)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, unused))


def auto_batch_size(
    count: int,
    largest_output: int,
    device: torch.device,
    total_output: int | None = None,
    free_bytes: int | None = None,
) -> int:
    """Rows rendered at once when ``batch_size`` is None, at least 4 (or ``count``).

    On CPU, enough rows for their largest layer output (``largest_output`` elements per image,
    float32) to fill about :data:`CPU_CHUNK_BYTES`; on an accelerator, enough for all their layer
    outputs (``total_output`` elements per image, default ``largest_output``) to fill about
    :data:`DEVICE_CHUNK_BYTES`, or :data:`DEVICE_FREE_SHARE` of ``free_bytes`` (default: what
    :func:`device_free_bytes` reports) if that is less, at most :data:`DEVICE_CHUNK_ROWS`:
    memory bounded whatever the number of objectives.

    Example:
        >>> auto_batch_size(1000, largest_output=32 * 32 * 32, device=torch.device("cpu"))
        16
    """
    if device.type == "cpu":
        rows = CPU_CHUNK_BYTES // max(1, 4 * largest_output)
    else:
        free = device_free_bytes(device) if free_bytes is None else free_bytes
        budget = DEVICE_CHUNK_BYTES
        if free is not None:
            budget = min(budget, int(free * DEVICE_FREE_SHARE))
        rows = budget // max(1, 4 * (total_output or largest_output))
        rows = min(rows, DEVICE_CHUNK_ROWS)
    return int(min(count, max(4, rows)))


def chunk_rows(
    probe: Probe,
    rows: int,
    group: int,
    views: int,
    device: torch.device,
    batch_size: int | None,
    gram: int = 0,
) -> int:
    """Rows per chunk of a rendering of ``rows`` rows, ``group`` consecutive rows per objective
    (an objective's rows share a chunk): ``batch_size`` objectives, or :func:`auto_batch_size`
    for ``views`` copies of every row, each also keeping ``gram`` elements of Gram matrices
    (:func:`gram_elements`)."""
    size = (
        batch_size * group
        if batch_size
        else auto_batch_size(rows, probe.largest * views, device, (probe.total + gram) * views)
    )
    return max(group, size - size % group)


def gram_elements(probe: Probe, objectives: Sequence[Objective], group: int) -> int:
    """Elements of the Gram matrix a row of ``objectives`` keeps for the diversity term when
    each objective has ``group`` images compared on their features: the largest ``C x C`` of the
    layers that compare them (0 for a single image per objective)."""
    if group < 2:
        return 0
    spatial = probe.spatial()
    layers = {name for o in objectives if (name := diversity_layer(o, spatial)) is not None}
    return max((probe.shapes[name][0] ** 2 for name in layers), default=0)


def _resolve(model: nn.Module, objectives: Sequence[Objective]) -> list[str]:
    layers: list[str] = []
    for objective in objectives:
        for name in objective.layers:
            if name not in layers:
                get_module(model, name)  # raises with the available names
                layers.append(name)
    return layers


def probe(
    model: nn.Module,
    objectives: Sequence[Objective],
    image_shape: tuple[int, int, int],
    input_transform: InputTransform | None,
    output_fn: BatchFn | None = None,
    gradients: bool = False,
) -> Probe:
    """One forward pass of one grey image: checks the objectives against the layers' outputs
    (with ``gradients``, of an image that requires a gradient: which outputs carry one).

    Raises:
        NeuronsError: For an unknown layer, an index outside a layer's output, a layer that did
            not run, or a model that does not accept the images.
    """
    layers = _resolve(model, objectives)
    shapes: dict[str, tuple[int, ...]] = {}
    without: set[str] = set()
    grad_off: set[str] = set()
    pending: dict[str, torch.Tensor] = {}  # outputs without a graph yet: one may come on return

    def record(name: str, output: torch.Tensor) -> None:
        shapes.setdefault(name, tuple(output.shape[1:]))
        if gradients and output.is_floating_point() and not output.requires_grad:
            without.add(name)
            pending.setdefault(name, output)
            if not torch.is_grad_enabled():
                grad_off.add(name)

    shape = (1, *image_shape)
    outputs: list[object] = []

    def forward() -> None:
        # made here, in the analysis mode: not an inference tensor (Lightning's validation)
        x = torch.full(shape, 0.5, device=model_device(model), requires_grad=gradients)
        try:
            outputs.append(model(as_model_input(to_model_input(x, input_transform), model)))
        except RuntimeError as err:
            raise NeuronsError(
                f"{type(model).__name__} failed on a {shape} image batch ({err}); "
                "check `image_shape` and `input_transform`"
            ) from err

    with analysis_mode(model, grad=gradients), hooked(model, layers, record):
        sizes = leaf_output_sizes(model, forward)
    needs_logits = any(t.layer == LOGITS for o in objectives for _, t in o.terms())
    late = frozenset(name for name, output in pending.items() if output.requires_grad)
    pending.clear()
    try:
        logits = read_logits(outputs[0], output_fn)
        shapes[LOGITS] = tuple(logits.shape[1:])
        if gradients and not logits.requires_grad:
            without.add(LOGITS)
    except NeuronsError:
        if needs_logits:
            raise  # objectives on layers only do not need to read the model's output
    for objective in objectives:
        for _, term in objective.terms():
            if term.layer == IMAGE:
                continue
            if term.layer not in shapes:
                raise NeuronsError(
                    f"{term!r}: layer {term.layer!r} did not run in {type(model).__name__}'s "
                    "forward pass; choose a layer the forward pass uses"
                )
            term.check(shapes[term.layer])
    return Probe(shapes, sizes.largest, sizes.total, frozenset(without), frozenset(grad_off), late)


class OutputSizes:
    """The leaf modules' output sizes (elements) in the forward passes run while it is hooked.

    Attributes:
        largest: The largest output of any leaf module.
        total: The sum of every leaf module's outputs (roughly what a backward pass keeps).
    """

    def __init__(self) -> None:
        self.largest = 0
        self.total = 0

    def __call__(self, _layer: str, output: torch.Tensor) -> None:
        self.largest = max(self.largest, output.numel())
        self.total += output.numel()


def leaf_output_sizes(model: nn.Module, forward: Callable[[], object]) -> OutputSizes:
    """The output sizes of ``model``'s leaf modules in one run of ``forward()``.

    Every call of a leaf module counts (a module run twice counts twice); a model without
    sub-modules counts its own output.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        >>> sizes = leaf_output_sizes(model, lambda: model(torch.rand(2, 1, 8, 8)))
        >>> sizes.largest, sizes.total  # 2 x 4 x 8 x 8 each, three leaves
        (512, 1536)
    """
    sizes = OutputSizes()
    leaves = [name for name, m in model.named_modules() if name and not any(m.children())]
    with hooked(model, leaves, sizes):
        output = forward()
    if not leaves and isinstance(output, torch.Tensor):
        sizes("", output)
    return sizes
