"""TensorBoard's embedding projector for neuron clusterings: one embedding per layer, the latest.

Every point is one neuron, labelled ``relu3/4`` (layer, neuron), with a layer-qualified cluster
(``relu3 c1``; ``relu3 unclustered``), its preferred class and selectivity, and as its image the
crop of the validation image that activates it most, centred where it responds most (dead
neurons get a crossed-out tile). The files of every analysed epoch are written next to the
event files; ``projector_config.pbtxt`` lists the latest epoch of each layer (``relu3, epoch 9``),
so that its list has one entry per layer and opens on the latest epoch (the projector sorts its
list by number of points, then by name, whatever the file's order; an older epoch can be opened
with its folder's files and the "Load" button).

Example:
    >>> from lightning_neurons.models import SmallCNN
    >>> model = SmallCNN(widths=(8, 16, 32)).eval()  # trained, in practice
    >>> batches = [torch.rand(16, 1, 28, 28)]  # the validation images
    >>> crops = top_activating_crops(model, ["features.relu3"], batches)
    >>> crops["features.relu3"].shape  # a crop per neuron, on 32 px tiles
    torch.Size([32, 1, 32, 32])
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lightning_neurons.bands import display_channels_of, shown_channels
from lightning_neurons.batch import (
    BatchReader,
    InputTransform,
    as_model_input,
    input_transform_of,
    to_display,
)
from lightning_neurons.hooks import hooked
from lightning_neurons.loaders import stage_loaders
from lightning_neurons.outputs import first_tensor
from lightning_neurons.plots.images import rgb_channels
from lightning_neurons.schedule import epoch_folder, within_epoch
from lightning_neurons.state import analysis_mode, preserved_rng

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from lightning_neurons.results import NeuronClusteringResult, TrackerSpec

#: Metadata columns of every embedding; the first is the projector's default label.
HEADER = ("neuron", "cluster", "preferred class", "selectivity")
#: Side of a sprite tile in pixels (the projector shows them at about this size).
TILE = 32
#: Images searched for each neuron's strongest response (the first rows of the analysed loader).
MAX_IMAGES = 512
#: The file the projector reads, in the TensorBoard run directory.
CONFIG = "projector_config.pbtxt"


def short_names(layers: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each layer name that tells it from the others.

    Example:
        >>> short_names(["backbone.features.relu1", "backbone.features.relu2"])
        {'backbone.features.relu1': 'relu1', 'backbone.features.relu2': 'relu2'}
        >>> short_names(["layer1.0.relu", "layer2.0.relu"])
        {'layer1.0.relu': 'layer1.0.relu', 'layer2.0.relu': 'layer2.0.relu'}
    """
    parts = {name: name.split(".") for name in layers}
    out: dict[str, str] = {}
    for name, split in parts.items():
        for k in range(1, len(split) + 1):
            candidate = ".".join(split[-k:])
            others = [".".join(p[-k:]) for n, p in parts.items() if n != name]
            if candidate not in others:
                out[name] = candidate
                break
        else:
            out[name] = name
    return out


def neuron_metadata(
    short: str, res: NeuronClusteringResult, neurons: Sequence[int], class_names: Sequence[str]
) -> list[list[str]]:
    """Rows of :data:`HEADER` for ``neurons`` of one layer: ``relu3/4``, ``relu3 c1``, ...

    Cluster ids are qualified by the layer: cluster 1 of ``relu2`` and of ``relu3`` are unrelated.
    """
    index = torch.as_tensor(list(neurons), dtype=torch.long)
    columns = (res.labels[index], res.preferred_class[index], res.selectivity[index].float())
    rows = []
    for k, cluster, pref, selectivity in zip(neurons, *(c.tolist() for c in columns), strict=True):
        rows.append(
            [
                f"{short}/{k}",
                f"{short} c{cluster}" if cluster >= 0 else f"{short} unclustered",
                class_names[pref] if 0 <= pref < len(class_names) else str(pref),
                f"{selectivity:.3f}",
            ]
        )
    return rows


def top_activating_crops(
    model: nn.Module,
    layers: Sequence[str],
    batches: Iterable[torch.Tensor],
    transform: InputTransform | None = None,
    size: int = TILE,
) -> dict[str, torch.Tensor]:
    """For each neuron of each layer: the crop of the input that activates it most.

    One forward pass per batch (eval mode, no gradients, the model left as it was). For a conv
    layer the crop is a square of half the image's side, but at least three strides of the layer,
    centred on the position of the strongest response; for a ``[B, K]`` layer it is the whole
    image. A neuron that is never positive (dead after a ReLU) gets a crossed-out grey tile.

    Args:
        model: The model.
        layers: Call sites to look at (as in :func:`~lightning_neurons.hooks.hooked`).
        batches: Model inputs ``[B, C, H, W]``.
        transform: The display -> input mapping of the data (see
            :func:`~lightning_neurons.batch.to_display`); ``None``: the inputs are display images
            (if they are not within [0, 1], all are rescaled by their common minimum and maximum).
        size: Side of the returned tiles.

    Returns:
        ``{layer: [K, C, size, size]}`` display tiles in [0, 1].
    """
    search = CropSearch()
    with analysis_mode(model), torch.no_grad(), hooked(model, layers, search.update):
        for x in batches:
            search.add_batch(x)
            model(as_model_input(x, model))
    return search.tiles(transform, size)


class CropSearch:
    """Each neuron's strongest response over a stream of batches, for :func:`top_activating_crops`
    and for NeuronClustering, which searches the batches the tracker's stage already runs through
    the model instead of running them again.

    Call :meth:`add_batch` with a batch's model inputs before it goes through the model and
    :meth:`update` with each layer's output (``[B, K, ...]``, channels first) as it comes; the
    first ``max_images`` rows are searched, and their inputs kept (on the CPU) for the crops;
    outputs that come when no batch is open (:meth:`end_batch`) are ignored.

    Args:
        max_images: Rows searched (the first ones given).
    """

    def __init__(self, max_images: int | None = None) -> None:
        self.max_images = max_images
        self.rows = 0  # images kept
        self._best: dict[str, _Best] = {}
        self._images: list[torch.Tensor] = []
        self._open = 0  # rows of the batch going through the model (0: none)

    @property
    def full(self) -> bool:
        """Whether ``max_images`` rows have been searched."""
        return self.max_images is not None and self.rows >= self.max_images

    def add_batch(self, inputs: torch.Tensor) -> None:
        """The batch about to go through the model: its rows that fit are kept and searched."""
        room = inputs.shape[0] if self.max_images is None else self.max_images - self.rows
        kept = inputs[: max(room, 0)].detach().cpu()
        self._open = kept.shape[0]
        if self._open:
            self._images.append(kept)
            self.rows += self._open

    def update(self, name: str, output: torch.Tensor) -> None:
        """Layer ``name``'s output for the open batch."""
        if self._open:
            rows = first_tensor(output, name).detach()[: self._open]
            self._best.setdefault(name, _Best()).update(rows, self.rows - self._open)

    def end_batch(self) -> None:
        """Outputs from now on belong to no searched batch."""
        self._open = 0

    def tiles(
        self,
        transform: InputTransform | None = None,
        size: int = TILE,
        neurons: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{layer: [K, C, size, size]}`` display tiles in [0, 1] (see
        :func:`top_activating_crops`); ``{}`` before any batch and for inputs that are not
        ``[B, C, H, W]`` images. With ``neurons`` (``{layer: indices}``), the tiles of those
        neurons only, in their order (the layers not named: all neurons)."""
        if not self._images:
            return {}
        images, _ = to_display(torch.cat(self._images), transform)
        if images.dim() != 4:  # not images (a model on flat vectors, tokens): no tiles to show
            return {}
        low, high = float(images.min()), float(images.max())
        # not display images: one rescaling for all, so that the tiles stay comparable
        if low < 0 or high > 1:
            images = (images - low) / max(high - low, 1e-12)
        chosen = neurons or {}
        return {name: b.crops(images, size, chosen.get(name)) for name, b in self._best.items()}


@dataclass
class _Best:
    """Running maximum of each neuron over images: its value, image and position."""

    value: torch.Tensor | None = None
    image: torch.Tensor | None = None
    position: torch.Tensor | None = None
    grid: tuple[int, int] = (1, 1)

    def update(self, out: torch.Tensor, offset: int) -> None:
        if out.dim() == 4:
            self.grid = (out.shape[2], out.shape[3])
            v, pos = out.flatten(2).max(dim=2)  # [B, K], on the output's device
        else:  # [B, K]; tokens [B, D, N] (channels first) give whole-image tiles
            v = out.amax(dim=2) if out.dim() == 3 else out.flatten(1)
            pos = torch.zeros_like(v, dtype=torch.long)
        # kept on the output's device: a copy to the host would wait for the device every batch
        top, image = v.float().max(dim=0)  # [K]
        where = pos[image, torch.arange(v.shape[1], device=pos.device)]
        if self.value is None:
            self.value, self.image, self.position = top, image + offset, where
            return
        better = top > self.value
        self.value = torch.where(better, top, self.value)
        self.image = torch.where(better, image + offset, self.image)
        self.position = torch.where(better, where, self.position)

    def crops(
        self, images: torch.Tensor, size: int, neurons: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tiles of every neuron, or of ``neurons`` (indices) in their order."""
        assert self.value is not None and self.image is not None and self.position is not None
        n, c, height, width = images.shape
        h, w = self.grid
        side_y = min(height, max(height // 2, math.ceil(3 * height / h)))
        side_x = min(width, max(width // 2, math.ceil(3 * width / w)))
        if h == w == 1:
            side_y, side_x = height, width
        value, image, position = (t.cpu() for t in (self.value, self.image, self.position))
        if neurons is not None:
            value, image, position = (t[neurons] for t in (value, image, position))
        tiles = _crossed(c, size).expand(value.shape[0], -1, -1, -1).clone()
        fired = torch.nonzero(value > 0).flatten()  # the others keep the crossed tile
        # each crop centred on the strongest position's cell (float64: Python's arithmetic)
        cy = ((position[fired] // w).double() + 0.5) * height / h
        cx = ((position[fired] % w).double() + 0.5) * width / w
        top = (cy.long() - side_y // 2).clamp(0, height - side_y)
        left = (cx.long() - side_x // 2).clamp(0, width - side_x)
        rows = top[:, None] + torch.arange(side_y)  # [F, side_y]
        cols = left[:, None] + torch.arange(side_x)
        for part in torch.split(torch.arange(fired.numel()), 1024):  # bounded memory
            crops = images[
                image[fired[part]][:, None, None], :, rows[part, :, None], cols[part, None]
            ]
            crops = crops.permute(0, 3, 1, 2)  # [F, side_y, side_x, C] -> [F, C, side_y, side_x]
            scaled = F.interpolate(crops, size=(size, size), mode="bilinear", align_corners=False)
            tiles[fired[part]] = scaled.clamp(0, 1)
        return tiles


def _crossed(channels: int, size: int) -> torch.Tensor:
    """A grey tile with a dark cross: a neuron that never fired has no image."""
    tile = torch.full((channels, size, size), 0.6)
    diagonal = torch.arange(size)
    for d in (-1, 0, 1):
        index = (diagonal + d).clamp(0, size - 1)
        tile[:, diagonal, index] = 0.15
        tile[:, diagonal, size - 1 - index] = 0.15
    return tile


def sprite(tiles: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, C, S, S]`` tiles in [0, 1] -> the projector's sprite: a square grid of tiles, row
    by row, as an ``[H, W, 3]`` uint8 array.

    NumPy only: it runs on a writer thread, where a torch operation would start an OpenMP team
    of that thread's own, and two teams on the cores slow every later torch operation of the
    process (FeatureVisualizer's channel renderings took twice as long after one; see
    ``docs/benchmarks.md``)."""
    tiles = np.asarray(tiles, dtype=np.float32)
    n, c, s, _ = tiles.shape
    per_row = max(1, math.ceil(math.sqrt(n)))
    grid = np.zeros((per_row * per_row, 3, s, s), dtype=np.float32)
    grid[:n] = tiles[:, rgb_channels(c)]
    grid = grid.reshape(per_row, per_row, 3, s, s).transpose(0, 3, 1, 4, 2)
    return (grid.reshape(per_row * s, per_row * s, 3) * 255).round().astype(np.uint8)


def write_embedding(
    log_dir: str | Path,
    name: str,
    folder: str,
    features: np.ndarray,
    metadata: Sequence[Sequence[str]],
    tiles: torch.Tensor | np.ndarray | None,
    replaces: str | None = None,
) -> None:
    """Write one embedding's files under ``log_dir/folder`` and list it in the projector's config,
    in place of the entries named ``name`` or starting with ``replaces`` (other entries, e.g. a
    user's ``add_embedding``, are kept after it).

    Raises:
        ValueError: If the features, metadata and tiles disagree on the number of points.
    """
    from PIL import Image

    if len(metadata) != features.shape[0] or (tiles is not None and len(tiles) != len(metadata)):
        raise ValueError(
            f"embedding {name!r}: {features.shape[0]} feature rows, {len(metadata)} metadata "
            f"rows and {None if tiles is None else len(tiles)} images; they must be equal"
        )
    root = Path(log_dir)
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    np.savetxt(path / "tensors.tsv", features, delimiter="\t", fmt="%.6g")
    lines = ["\t".join(HEADER)] + ["\t".join(_clean(v) for v in row) for row in metadata]
    (path / "metadata.tsv").write_text("\n".join(lines) + "\n")
    if tiles is not None:
        Image.fromarray(sprite(tiles)).save(path / "sprite.png")
    _update_config(root, name, folder, tiles, replaces)


def _update_config(
    root: Path,
    name: str,
    folder: str,
    tiles: torch.Tensor | np.ndarray | None,
    replaces: str | None,
) -> None:
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = read_config(root)
    kept = [
        e
        for e in config.embeddings
        if e.tensor_name != name and not (replaces and e.tensor_name.startswith(replaces))
    ]
    new = ProjectorConfig()
    entry = new.embeddings.add()
    entry.tensor_name = name
    entry.tensor_path = f"{folder}/tensors.tsv"
    entry.metadata_path = f"{folder}/metadata.tsv"
    if tiles is not None:
        entry.sprite.image_path = f"{folder}/sprite.png"
        entry.sprite.single_image_dim.extend([tiles.shape[-1], tiles.shape[-2]])
    new.embeddings.extend(kept)
    _write_config(root, new)


def _clean(value: str) -> str:
    return str(value).replace("\t", " ").replace("\n", " ")


def read_config(root: str | Path) -> Any:
    """The projector's config (a ``ProjectorConfig``) in the run directory ``root``; empty when
    there is none."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config, path = ProjectorConfig(), Path(root) / CONFIG
    if path.is_file():
        text_format.Parse(path.read_text(), config)
    return config


def _write_config(root: Path, config: Any) -> None:
    from google.protobuf import text_format

    tmp = root / (CONFIG + ".tmp")
    tmp.write_text(text_format.MessageToString(config))
    tmp.replace(root / CONFIG)


def embedding_name(short: str, epoch: int, step: int | None = None) -> str:
    """``"relu3, epoch 9"``: the tensor's name in the projector's list (``"relu3, epoch 0, step
    500"`` for an analysis within an epoch)."""
    return f"{short}, epoch {epoch}" + ("" if step is None else f", step {step}")


def log_neuron_projector(
    trainer: Trainer,
    log_dir: str | Path,
    kind: str,
    results: Mapping[str, NeuronClusteringResult],
    class_names: Sequence[str],
    *,
    spec: TrackerSpec,
    max_neurons: int,
    max_images: int = MAX_IMAGES,
    tiles: Mapping[str, torch.Tensor] | CropSearch | None = None,
    owner: object | None = None,
) -> None:
    """Write one projector embedding per layer of a NeuronClustering epoch (rank zero only).

    The most selective ``max_neurons // len(results)`` neurons of each layer, their normalised
    class profiles as coordinates, :func:`neuron_metadata` and, as images, their
    :func:`top_activating_crops` on the first ``max_images`` rows of the tracker's analysed loader.

    Args:
        trainer: The running trainer (its model and data loaders are read, not changed).
        log_dir: The TensorBoard run directory.
        kind: Folder of the files under ``log_dir/projector``.
        results: ``{layer: NeuronClusteringResult}`` of one epoch.
        class_names: Names of the classes.
        spec: The tracker's spec: which loader gives the crops and how its batches are read.
        max_neurons: Points over all layers.
        max_images: Images searched for each neuron's strongest response.
        tiles: The crops already found while the tracker's stage ran (``{layer: tiles}``, or the
            :class:`CropSearch` itself, which then crops only the neurons written); ``None``:
            search the loader's first ``max_images`` rows now (one more forward pass over them).
        owner: Write the files on a writer thread
            (:data:`~lightning_neurons.loggers.background_writes`), waited for with this owner's
            files; ``None``: now.
    """
    share = max(1, max_neurons // len(results))
    shorts = short_names(list(results))
    orders = {
        name: torch.sort(
            torch.nan_to_num(res.selectivity, nan=-1.0).argsort(descending=True, stable=True)[
                :share
            ]
        ).values
        for name, res in results.items()
    }
    if tiles is None:
        found = _crops(trainer, list(results), spec, max_images)
        tiles = {name: found[name][order] for name, order in orders.items() if name in found}
    elif isinstance(tiles, CropSearch):
        tiles = tiles.tiles(input_transform_of(trainer), neurons=orders)
    else:
        tiles = {name: tiles[name][order] for name, order in orders.items() if name in tiles}
    bands = display_channels_of(trainer)  # the channels the sprites show
    step = trainer.global_step if within_epoch(trainer) else None
    tiles = {name: shown_channels(t, bands) for name, t in tiles.items()}
    # arrays for the writer thread, which must run no torch operation (see `sprite`)
    sheets = {name: t.detach().to("cpu", torch.float32).numpy() for name, t in tiles.items()}
    writes = [
        functools.partial(
            write_embedding,
            log_dir,
            embedding_name(shorts[name], res.epoch, step),
            f"projector/{kind}/{epoch_folder(trainer)}/{shorts[name]}",
            res.features[orders[name]].numpy(),
            neuron_metadata(shorts[name], res, orders[name].tolist(), class_names),
            sheets.get(name),
            replaces=f"{shorts[name]}, epoch ",
        )
        for name, res in reversed(list(results.items()))  # each goes first: the first ends first
    ]
    if owner is None:
        for write in writes:
            write()
        return
    from lightning_neurons.loggers import background_writes

    nbytes = sum(w.args[3].nbytes + (0 if w.args[5] is None else w.args[5].nbytes) for w in writes)
    turn = _IN_TURN.ticket()
    background_writes.submit(owner, lambda: _IN_TURN.run(turn, writes), nbytes)


class _InTurn:
    """Runs the writes of one epoch after those of the epochs before (the config lists the
    latest epoch of each layer), whichever writer thread gets them."""

    def __init__(self) -> None:
        self._turn = threading.Condition()
        self._issued = self._done = 0

    def ticket(self) -> int:
        with self._turn:
            self._issued += 1
            return self._issued - 1

    def run(self, ticket: int, writes: Sequence[Callable[[], None]]) -> None:
        with self._turn:
            self._turn.wait_for(lambda: self._done >= ticket)
            try:
                for write in writes:
                    write()
            finally:
                self._done = max(self._done, ticket + 1)
                self._turn.notify_all()


_IN_TURN = _InTurn()


def _crops(
    trainer: Trainer, layers: list[str], spec: TrackerSpec, max_images: int
) -> dict[str, torch.Tensor]:
    """:func:`top_activating_crops` on the analysed loader, without touching any random state."""
    loaders = stage_loaders(trainer, spec.stage)
    model = trainer.lightning_module
    if not loaders or spec.dataloader_idx >= len(loaders) or model is None:
        return {}
    transform = input_transform_of(trainer)
    with preserved_rng(model.device):
        return top_activating_crops(
            model,
            layers,
            _first_rows(loaders[spec.dataloader_idx], spec.reader, max_images),
            transform,
        )


def _first_rows(loader: Iterable[Any], reader: BatchReader, limit: int) -> Iterable[torch.Tensor]:
    seen = 0
    for batch in loader:
        x = reader.inputs(batch)[: limit - seen]
        yield x
        seen += x.shape[0]
        if seen >= limit:
            return
