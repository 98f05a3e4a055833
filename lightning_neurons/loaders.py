"""Which batches of which loader the analyses read: the loaders of a stage, the rows of a batch
that are real images under DDP (not the sampler's repeats), the first few batches of a loader."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import DistributedSampler

from lightning_neurons.errors import NeuronsError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["LoaderRows", "analysed_rows", "limited_batches", "stage_loaders"]


def stage_loaders(trainer: Trainer, stage: str) -> list[Any]:
    """The data loaders of ``stage`` (``"train"``, ``"validation"``, ``"test"``) in the order of
    Lightning's ``dataloader_idx``; empty when Lightning has none (yet)."""
    if stage == "train":
        loaders = trainer.train_dataloader
    elif stage == "validation":
        loaders = trainer.val_dataloaders
    else:
        loaders = trainer.test_dataloaders
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


@dataclass(frozen=True)
class LoaderRows:
    """Which rows of a loader's batches are real images on this process.

    Under DDP, Lightning's :class:`~torch.utils.data.DistributedSampler` (``drop_last=False``)
    pads the data set with repeated samples until it divides evenly over the processes; the
    repeats are the last samples that some processes get. Counting them would count those images
    twice, so the analyses leave them out: :meth:`rows` tells how many leading rows of a batch
    are real.

    Attributes:
        real: Real (not repeated) samples this process gets; ``None``: all are real.
        padded: Repeated samples this process gets (left out).
        batch_size: The loader's batch size (``None``: unknown, nothing is left out).
    """

    real: int | None = None
    padded: int = 0
    batch_size: int | None = None

    @classmethod
    def of(cls, loader: Any) -> LoaderRows:
        """The rows of ``loader`` (any iterable; only a DataLoader with a DistributedSampler pads)."""
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler):
            sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        batch_size = getattr(loader, "batch_size", None)
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last or not batch_size:
            return cls()
        size = len(sampler.dataset)  # type: ignore[arg-type]
        # torch pads the (shuffled) index list at its end, then deals it out rank by rank
        positions = range(sampler.rank, sampler.total_size, sampler.num_replicas)
        padded = sum(1 for p in positions if p >= size)
        return cls(real=len(positions) - padded, padded=padded, batch_size=int(batch_size))

    def rows(self, batch_idx: int, size: int) -> int:
        """How many leading rows of batch ``batch_idx`` (of ``size`` rows) are real."""
        if self.real is None or self.batch_size is None or not self.padded:
            return size
        return max(0, min(size, self.real - batch_idx * self.batch_size))


def analysed_rows(trainer: Trainer, stage: str, dataloader_idx: int = 0) -> LoaderRows:
    """The :class:`LoaderRows` of the loader that the analyses read in ``stage`` (loader
    ``dataloader_idx``; for training, the one training loader)."""
    loaders = stage_loaders(trainer, stage)
    if stage == "train":
        return LoaderRows.of(loaders[0]) if len(loaders) == 1 else LoaderRows()
    return LoaderRows.of(loaders[dataloader_idx]) if dataloader_idx < len(loaders) else LoaderRows()


def limited_batches(batches: Iterable[Any], max_batches: int | None) -> Iterator[Any]:
    """The first ``max_batches`` of ``batches`` (all of them for ``None``).

    Raises:
        NeuronsError: If ``max_batches`` is neither a positive integer nor ``None``.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise NeuronsError(f"`max_batches` must be a positive integer or None, got {max_batches!r}")
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield batch
