"""What every analysis callback shares: scheduling, error policy, and leaving training untouched."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, overload

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_neurons import progress
from lightning_neurons.checks import Constraints, Interval, Options, StrList, validate_params
from lightning_neurons.errors import NeuronsError
from lightning_neurons.figure_worker import background_figures
from lightning_neurons.heap import release_freed_memory
from lightning_neurons.loggers import AnalysisLogger, find_tensorboard, wait_for_output
from lightning_neurons.progress import reporting
from lightning_neurons.schedule import (
    is_due,
    note_validation,
    noted_validations,
    restore_validations,
)

T = TypeVar("T")
C = TypeVar("C", bound=Callback)
OnError = Literal["warn", "raise"]
#: A checkpoint's entry of the fit's validations so far, when it validates by time
#: (:func:`~lightning_neurons.schedule.noted_validations`).
VALIDATIONS_KEY = "lightning_neurons_validations"
Stage = Literal["train", "validation", "test"]
#: The ``__init__`` arguments every analysis callback takes (see :class:`AnalysisCallback`).
_SHARED_OPTIONS = ("layers", "every_n_epochs", "within_epochs", "enable_logging", "on_error")


def class_names_of(trainer: Trainer, num_classes: int) -> list[str]:
    """``trainer.datamodule.class_names`` when it has the right length, else ``"0"``, ``"1"``..."""
    names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(c) for c in range(num_classes)]


def checked_options(owner: Callback, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a callback's ``__init__`` arguments (its ``locals()``) against its class's
    ``_parameter_constraints`` (:func:`~lightning_neurons.checks.validate_params`) and return
    those that :class:`AnalysisCallback` takes: ``super().__init__(**checked_options(self,
    locals()))``."""
    validate_params(owner, params)
    return {name: params[name] for name in _SHARED_OPTIONS}


def as_patterns(layers: str | Sequence[str] | None) -> list[str] | None:
    """Layer names or glob patterns as a list (one may be given as a string); ``None`` stays
    ``None`` (the default layers)."""
    return None if layers is None else [layers] if isinstance(layers, str) else list(layers)


@overload
def find_callback(
    trainer: Trainer, cls: type[C], *, required: Literal[False] = False
) -> C | None: ...


@overload
def find_callback(trainer: Trainer, cls: type[C], *, required: str) -> C: ...


def find_callback(
    trainer: Trainer, cls: type[C], *, required: str | Literal[False] = False
) -> C | None:
    """The first of the trainer's callbacks that is an instance of ``cls`` (as Lightning finds its
    checkpoint callbacks): the one way callbacks of this package find each other.

    Args:
        trainer: The trainer.
        cls: The callback class looked for; subclasses count.
        required: The name of the callback that needs one: a missing one then raises.
            ``False``: a missing one gives ``None``.

    Returns:
        The callback, or ``None`` when there is none and it is not required.

    Raises:
        NeuronsError: If there is none and ``required`` names who needs it; the message shows how
            to add one.
    """
    found = next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)
    if found is None and required:
        name = cls.__name__
        article = "an" if name[0] in "AEIOU" else "a"
        raise NeuronsError(
            f"{required} reads the results of {article} {name}, but none is attached to the "
            f"Trainer. Add one: `Trainer(callbacks=[{name}(), {required}(...)])`, or in YAML "
            f"under `trainer.callbacks` add `- class_path: lightning_neurons.{name}`."
        )
    return found


def builds_later(pl_module: LightningModule) -> bool:
    """Whether the model may build its layers after the callbacks' ``setup``: in its own
    ``setup`` or ``configure_model`` hook, as Lightning's large-model guide has it."""
    return is_overridden("configure_model", pl_module) or is_overridden("setup", pl_module)


def _stage_hook(name: str, method: str, stage: Stage) -> Callable[..., None]:
    """Lightning's hook ``name``, handing ``stage`` to the callback's ``method(stage, trainer,
    pl_module)`` (looked up on the callback, so subclasses' overrides count)."""

    def hook(self: Callback, trainer: Trainer, pl_module: LightningModule) -> None:
        getattr(self, method)(stage, trainer, pl_module)

    hook.__name__ = name
    hook.__doc__ = f"Lightning's hook, handed to ``{method}`` with the stage {stage!r}."
    return hook


class AnalysisCallback(Callback):
    """Base of the analysis callbacks: when to run, what to do when an analysis fails, and how
    callbacks read each other's results.

    **How results flow.** A callback *publishes* its ``results`` (typed dataclasses, see
    :mod:`lightning_neurons.results`) when its own work for a stage is done, and *reads* other
    callbacks' results in :meth:`_consume`, which runs at the end of the stage: Lightning calls
    every callback's ``on_validation_epoch_end`` before any ``on_validation_end`` (likewise for
    test), so the :class:`~lightning_neurons.ActivationTracker` publishes its statistics at its
    epoch end and the analyses read them at the stage end. Analyses that read other analyses (the
    callback types in :attr:`reads`, e.g. NeuronContribution reads NeuronClustering's clusters)
    wait at the stage end until every attached callback of those types has finished the stage,
    so the order of the callbacks in the Trainer's list does not change any result. The stage
    ends are ``on_validation_end``, ``on_test_end`` and, for the training stage (which has no
    later per-epoch hook), ``on_train_epoch_end``.

    **Under DDP** there are two ways ranks meet, one per kind of data: statistics streamed over
    batches are torchmetrics ``Metric`` states, summed by their own sync in ``compute()``; every
    other exchange (flags, shares of work, results made on rank zero) goes through
    :mod:`lightning_neurons.distributed`.

    Every callback takes its ``layers`` first and everything else by keyword; the options they
    share are handled here, and every argument is checked in ``__init__`` against the class's
    ``_parameter_constraints`` by :func:`~lightning_neurons.checks.validate_params`.

    Args:
        layers: Module names or glob patterns (one name may be a string); ``None``: the default
            (each callback says which).
        every_n_epochs: Run after every n-th epoch (epochs are counted from 1); every n-th
            validation when the Trainer validates across epochs, by training batches or by time
            (``check_val_every_n_epoch=None``). Every validation of a due epoch is analysed
            (``val_check_interval=0.25``: four), each one's files kept
            (:mod:`lightning_neurons.schedule`).
        within_epochs: Analyse a fit's validations that run within a training epoch too
            (``False``: only each epoch's last; none while an endless training set never ends
            its epoch, and a warning says so). ``analyze`` analyses every checkpoint it is given.
        enable_logging: Log to TensorBoard and write files (``results`` is always filled).
        on_error: ``"warn"``: an analysis that fails is reported with a warning and training goes
            on; ``"raise"``: the error stops training. Mistakes in the callback's own arguments
            always raise when the callback is set up.
    """

    #: The callback types whose results :meth:`_consume` reads (found with :func:`find_callback`).
    reads: ClassVar[tuple[type[Callback], ...]] = ()
    #: What each argument of ``__init__`` may be (see :func:`~lightning_neurons.checks.validate_params`);
    #: subclasses extend it with their own arguments.
    _parameter_constraints: ClassVar[Constraints] = {
        "layers": [StrList(), None],
        "every_n_epochs": [Interval(int, 1, None)],
        "within_epochs": [bool],
        "enable_logging": [bool],
        "on_error": [Options.of(OnError)],
    }

    def __init__(
        self,
        layers: list[str] | None = None,
        *,
        every_n_epochs: int = 1,
        within_epochs: bool = True,
        enable_logging: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        validate_params(self, locals())
        super().__init__()
        #: The ``layers`` argument as a list; :attr:`layers` holds the names it resolves to at
        #: setup.
        self.layer_patterns = as_patterns(layers)
        self.layers: list[str] = []
        self.enable_logging = enable_logging
        self.every_n_epochs = int(every_n_epochs)
        self.within_epochs = within_epochs
        self.on_error = on_error
        self.failures: list[str] = []
        self._unfinished: set[str] = set()  # stages begun whose stage end has not run yet
        self._waiting: dict[str, Callable[[], None]] = {}
        #: Seconds this callback's epoch-end and stage-end analyses took, summed over the run
        #: (a stage-end one may run inside another callback's hook: the last of the callbacks
        #: it reads to finish).
        self.analysis_seconds = 0.0
        # seconds of other callbacks' analyses run in this callback's hooks, and of this
        # callback's analyses run in other callbacks' hooks (for profilers' per-hook times)
        self._hosted_seconds = 0.0
        self._seconds_elsewhere = 0.0
        self._set_up_at_start: str | None = None  # the stage whose set-up waits for the model

    # ---- the stage-end protocol ----------------------------------------------------------------

    def _consume(self, stage: Stage, trainer: Trainer, pl_module: LightningModule) -> None:
        """The analysis at the end of ``stage``, once every attached callback of the :attr:`reads`
        types has finished the stage (their results of this epoch are published)."""

    def _begin(self, stage: Stage, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set_up_late(trainer, pl_module)  # validate / test of a model built later
        self._unfinished.add(stage)
        if stage == "validation":
            note_validation(trainer)  # counts the fit's validations by time

    def _end(self, stage: Stage, trainer: Trainer, pl_module: LightningModule) -> None:
        self._waiting[stage] = lambda: self._consume(stage, trainer, pl_module)
        _run_ready(trainer, stage, self)

    def _ready(self, trainer: Trainer, stage: Stage) -> bool:
        return not any(
            stage in peer._unfinished
            for peer in trainer.callbacks
            if peer is not self
            and isinstance(peer, AnalysisCallback)
            and isinstance(peer, self.reads)
        )

    def _forget_stages(self) -> None:
        self._unfinished.clear()
        self._waiting.clear()

    on_train_epoch_start = _stage_hook("on_train_epoch_start", "_begin", "train")
    on_validation_start = _stage_hook("on_validation_start", "_begin", "validation")
    on_test_start = _stage_hook("on_test_start", "_begin", "test")
    on_train_epoch_end = _stage_hook("on_train_epoch_end", "_end", "train")
    on_validation_end = _stage_hook("on_validation_end", "_end", "validation")
    on_test_end = _stage_hook("on_test_end", "_end", "test")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._start_fit()
        # A model built in its own `setup` or `configure_model` (Lightning calls them after the
        # callbacks' `setup`) has its layers at the stage's start hook.
        self._set_up_at_start = stage if builds_later(pl_module) else None
        if self._set_up_at_start is None:
            self._set_up(trainer, pl_module, stage)

    def _set_up(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """What the callback learns of the model before the stage (its layers, its classes):
        in ``setup``, or at the stage's start for a model built later (:func:`builds_later`)."""

    def _set_up_late(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stage, self._set_up_at_start = self._set_up_at_start, None
        if stage is not None:
            self._set_up(trainer, pl_module, stage)

    def _start_fit(self) -> None:
        """Forget what the epochs of an earlier fit left for the next ones (histories, the last
        epoch's clusters, images to continue): a callback given to a new fit (a notebook's cell
        run again) starts afresh. A resumed fit gets it back from its checkpoint, which Lightning
        loads after ``setup``."""

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set_up_late(trainer, pl_module)
        if self.enable_logging and trainer.is_global_zero and find_tensorboard(trainer):
            background_figures.warm()

    @override
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if noted := noted_validations(trainer):
            checkpoint[VALIDATIONS_KEY] = noted

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if VALIDATIONS_KEY in checkpoint:
            restore_validations(trainer, checkpoint[VALIDATIONS_KEY])

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.within_epochs and math.isinf(trainer.num_training_batches):
            rank_zero_warn(
                f"{type(self).__name__}: within_epochs=False analyses only the validation at a "
                "training epoch's end, and this fit's training set has no length, so its epoch "
                "never ends: no validation will be analysed. Pass within_epochs=True (with "
                "every_n_epochs=N, every N-th validation), or give the training data a length."
            )

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._forget_stages()
        # the files of the epochs analysed so far are kept (written, errors only warned)
        for error in wait_for_output(self):
            rank_zero_warn(f"{type(self).__name__}: {_writing_failed(error)}")
        self._release()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for error in wait_for_output(self):  # every file complete before fit returns
            self._run_safely("writing files and figures", _raiser(error))
        if self._waiting:  # a peer began a stage and never ended it (a hook overridden, say)
            rank_zero_warn(
                f"{type(self).__name__}: the analysis at the end of {', '.join(self._waiting)} did "
                "not run: a callback it reads never finished that stage (does a subclass override "
                "`on_validation_end`/`on_test_end`/`on_train_epoch_end` without calling super()?)."
            )
        self._forget_stages()
        self._release()

    def _release(self) -> None:
        """Remove hooks and drop per-batch state (called on teardown and on exceptions)."""

    # ---- scheduling, errors and files ----------------------------------------------------------

    def _file_writer(self, trainer: Trainer, kind: str) -> AnalysisLogger | None:
        """This rank's logger of figures and files under ``kind``, with the progress phase
        "figures and files" shown; ``None`` on a rank that does not write."""
        out = AnalysisLogger(trainer, kind, owner=self)
        if not out.is_writer:
            return None
        progress.phase("figures and files")
        return out

    def _due(self, trainer: Trainer) -> bool:
        return is_due(trainer, self.every_n_epochs, self.within_epochs)

    def _run_safely(self, what: str, fn: Callable[[], T]) -> T | None:
        """Run an analysis step, applying the ``on_error`` policy."""
        try:
            return fn()
        except Exception as err:
            if self.on_error == "raise":
                raise
            summary = "".join(traceback.format_exception_only(type(err), err)).strip()
            self.failures.append(f"{what}: {summary}")
            rank_zero_warn(
                f"{type(self).__name__}: {what} failed and was skipped ({summary}); training goes "
                "on. Pass `on_error='raise'` to stop on such errors and see the full traceback."
            )
            return None


def _writing_failed(error: BaseException) -> str:
    summary = "".join(traceback.format_exception_only(type(error), error)).strip()
    return f"an analysis file or figure could not be written ({summary})"


def _raiser(error: BaseException) -> Callable[[], None]:
    def fail() -> None:
        raise error

    return fail


def _run_ready(trainer: Trainer, stage: Stage, host: AnalysisCallback) -> None:
    """Run every waiting stage-end analysis whose peers have finished ``stage``, until none is
    left that can run, in ``host``'s stage-end hook. The same order on every DDP rank (the
    callbacks' list order)."""
    progress = True
    while progress:
        progress = False
        for callback in trainer.callbacks:
            if not isinstance(callback, AnalysisCallback) or stage not in callback._waiting:
                continue
            if callback._ready(trainer, stage):
                analysis = callback._waiting.pop(stage)
                start = time.perf_counter()
                try:
                    with reporting(trainer, callback, stage):
                        analysis()
                finally:
                    callback._unfinished.discard(stage)
                    seconds = time.perf_counter() - start
                    callback.analysis_seconds += seconds
                    if callback is not host:
                        host._hosted_seconds += seconds
                        callback._seconds_elsewhere += seconds
                    release_freed_memory()  # its intermediates, before the next one allocates
                progress = True


@dataclass(frozen=True)
class StageBatch:
    """One batch as :class:`StagedCallback`'s hooks see it, whatever the stage.

    Attributes:
        stage: ``"train"``, ``"validation"`` or ``"test"``.
        batch: The batch as the loader yielded it.
        batch_idx: Its index in the epoch.
        dataloader_idx: Its loader among the stage's loaders (0 for training).
    """

    stage: Stage
    batch: Any
    batch_idx: int
    dataloader_idx: int = 0


def _batch_hook(stage: Stage, *, end: bool) -> Callable[..., None]:
    """Lightning's ``on_<stage>_batch_start``/``_end`` hook for ``stage``, handing the batch to
    :meth:`StagedCallback._on_batch_start`/``_end`` as a :class:`StageBatch`. Lightning passes
    ``(trainer, pl_module, [outputs,] batch, batch_idx[, dataloader_idx])`` (``outputs`` at the
    end of a batch only; ``dataloader_idx`` in evaluation only, and only with several loaders)."""

    names = ("outputs", "batch", "batch_idx", "dataloader_idx")[0 if end else 1 :]

    def hook(
        self: StagedCallback, trainer: Trainer, pl_module: LightningModule, *args: Any, **kw: Any
    ) -> None:
        given = {**dict(zip(names, args, strict=False)), **kw}
        step = StageBatch(stage, given["batch"], given["batch_idx"], given.get("dataloader_idx", 0))
        (self._on_batch_end if end else self._on_batch_start)(trainer, pl_module, step)

    hook.__name__ = f"on_{stage}_batch_{'end' if end else 'start'}"
    hook.__doc__ = f"Lightning's hook, handed to ``_on_batch_{'end' if end else 'start'}``."
    return hook


class StagedCallback(AnalysisCallback):
    """An analysis that gathers data during one stage's epochs (train, validation or test).

    Lightning has a hook per stage and event (``on_validation_batch_start``, ...); this class
    routes all of them to methods that take the stage (:meth:`_stage_start`, :meth:`_stage_end`)
    or a :class:`StageBatch` (:meth:`_on_batch_start`, :meth:`_on_batch_end`), so subclasses
    write their logic once; :meth:`_release` runs on teardown and on exceptions. Every default
    does nothing.
    """

    def _stage_start(self, stage: Stage, trainer: Trainer, pl_module: LightningModule) -> None:
        """An epoch of ``stage`` begins."""

    def _on_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, step: StageBatch
    ) -> None:
        """A batch is about to go through the model; also called during Lightning's sanity
        check."""

    def _on_batch_end(self, trainer: Trainer, pl_module: LightningModule, step: StageBatch) -> None:
        """The batch has gone through the model; also called during Lightning's sanity check."""

    def _stage_end(self, stage: Stage, trainer: Trainer, pl_module: LightningModule) -> None:
        """The epoch of ``stage`` has ended."""

    on_train_batch_start = _batch_hook("train", end=False)
    on_validation_batch_start = _batch_hook("validation", end=False)
    on_test_batch_start = _batch_hook("test", end=False)
    on_train_batch_end = _batch_hook("train", end=True)
    on_validation_batch_end = _batch_hook("validation", end=True)
    on_test_batch_end = _batch_hook("test", end=True)

    def _epoch_end(self, stage: Stage, trainer: Trainer, pl_module: LightningModule) -> None:
        """:meth:`_stage_end`, timed in :attr:`analysis_seconds` and shown while it runs."""
        start = time.perf_counter()
        try:
            with reporting(trainer, self, stage):
                self._stage_end(stage, trainer, pl_module)
        finally:
            self.analysis_seconds += time.perf_counter() - start

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._stage_start("train", trainer, pl_module)

    on_validation_epoch_start = _stage_hook(
        "on_validation_epoch_start", "_stage_start", "validation"
    )
    on_test_epoch_start = _stage_hook("on_test_epoch_start", "_stage_start", "test")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end("train", trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    on_validation_epoch_end = _stage_hook("on_validation_epoch_end", "_epoch_end", "validation")
    on_test_epoch_end = _stage_hook("on_test_epoch_end", "_epoch_end", "test")
