"""When an analysis runs and what it is called: its epoch, and its step when it lies within one.

Lightning validates at the end of each training epoch by default, and an analysis is then named
by its epoch (``epoch=007``). It may validate more often: several times an epoch
(``val_check_interval=0.25``), or every N training batches whatever the epochs
(``check_val_every_n_epoch=None``, ``val_check_interval=N``; an endless training set never ends
an epoch). An analysis of a validation before its epoch's last training batch is named by its
epoch and step (``epoch=000-step=0000500``), so that each one's files are kept; ``analyze`` names
a checkpoint the same way when a later checkpoint of the same epoch follows it.

``every_n_epochs`` counts epochs, or validations when Lightning validates across epochs
(``check_val_every_n_epoch=None``, by batches or by time): there, every n-th validation is
analysed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from weakref import WeakKeyDictionary

from lightning.pytorch import Trainer

#: Set by ``analyze`` while it validates a checkpoint: whether that checkpoint lies within its
#: epoch (``None``: not set, the trainer's loop says).
_WITHIN_EPOCH: ContextVar[bool | None] = ContextVar("within_epoch", default=None)

#: A fit that validates across epochs: the training batch (``total_batch_idx``) after which each
#: of its validations so far ran, to count those run by time (Lightning keeps no count). Noted as
#: each validation starts (:func:`note_validation`), kept in checkpoints by the callbacks.
_VALIDATED_AFTER: WeakKeyDictionary[Trainer, list[int]] = WeakKeyDictionary()


@contextlib.contextmanager
def checkpoint_within_epoch(within: bool) -> Iterator[None]:
    """While the block runs, analyses are named as of a checkpoint within its epoch (``True``)
    or at its end (``False``), whatever the Trainer's loop says (``analyze`` uses it)."""
    token = _WITHIN_EPOCH.set(within)
    try:
        yield
    finally:
        _WITHIN_EPOCH.reset(token)


def within_epoch(trainer: Trainer) -> bool:
    """Whether the analysis now running lies within a training epoch, before its last batch: a
    fit's validation run by ``val_check_interval`` inside an epoch, or a checkpoint that
    ``analyze`` marked so (:func:`checkpoint_within_epoch`)."""
    marked = _WITHIN_EPOCH.get()
    if marked is not None:
        return marked
    if trainer.state.fn != "fit" or trainer.sanity_checking:
        return False
    loop = trainer.fit_loop.epoch_loop
    done = loop.batch_progress.current.ready >= trainer.num_training_batches
    return not (loop.batch_progress.is_last_batch or done)


def epoch_folder(trainer: Trainer) -> str:
    """``epoch=EEE`` for an analysis at an epoch's end (or of a ``validate``/``test`` run),
    ``epoch=EEE-step=SSSSSSS`` for one within an epoch (:func:`within_epoch`)."""
    name = f"epoch={trainer.current_epoch:03d}"
    return f"{name}-step={trainer.global_step:07d}" if within_epoch(trainer) else name


def validations_by_batches(trainer: Trainer) -> bool:
    """Whether the fit validates every ``val_check_interval`` training batches across epochs
    (``check_val_every_n_epoch=None``) rather than in chosen epochs."""
    return trainer.check_val_every_n_epoch is None


def note_validation(trainer: Trainer) -> None:
    """Counts the validation that starts now when the fit validates across epochs (each
    callback calls it; a validation counts once)."""
    if trainer.state.fn != "fit" or trainer.sanity_checking or not validations_by_batches(trainer):
        return
    seen = _VALIDATED_AFTER.setdefault(trainer, [])
    batch = trainer.fit_loop.epoch_loop.total_batch_idx
    if not seen or seen[-1] != batch:
        seen.append(batch)


def noted_validations(trainer: Trainer) -> list[int]:
    """The training batch after which each validation counted so far ran (for a checkpoint)."""
    return list(_VALIDATED_AFTER.get(trainer, []))


def restore_validations(trainer: Trainer, after: list[int]) -> None:
    """Counts on from a checkpoint's validations (:func:`noted_validations`)."""
    _VALIDATED_AFTER[trainer] = list(after)


def validation_number(trainer: Trainer) -> int:
    """The number of the fit's validation that runs now, counted from 1, when the fit validates
    across epochs (:func:`validations_by_batches`): the training batches so far over
    ``val_check_interval``; by time (``val_check_interval="DD:HH:MM:SS"``), the validations
    counted so far (:func:`note_validation`). A resumed fit counts on, as does a second ``fit``
    of the same Trainer (which continues its steps)."""
    every = trainer.val_check_batch
    batch = trainer.fit_loop.epoch_loop.total_batch_idx
    if isinstance(every, (int, float)) and every > 0 and not math.isinf(every):
        return max(1, int((batch + 1) // every))
    return max(1, len(_VALIDATED_AFTER.get(trainer, [])))


def is_due(trainer: Trainer, every_n_epochs: int, within_epochs: bool = True) -> bool:
    """Whether an analysis with ``every_n_epochs`` runs now: never in the sanity check; always in
    ``validate``/``test``; in a fit, after every n-th epoch (counted from 1), or every n-th
    validation when the fit validates across epochs; with ``within_epochs=False`` a fit's
    validations within an epoch (:func:`within_epoch`) are skipped."""
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != "fit":
        return True
    if not within_epochs and within_epoch(trainer):
        return False
    if validations_by_batches(trainer) and trainer.validating:
        return validation_number(trainer) % every_n_epochs == 0
    return (trainer.current_epoch + 1) % every_n_epochs == 0
