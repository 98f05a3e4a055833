"""``lightning-neurons analyze``: the analyses of a config, run on saved checkpoints.

Checkpoints are Lightning's or weights saved by a plain PyTorch loop (a state dict, PyTorch's,
torchvision's or timm's checkpoint dicts: :mod:`lightning_neurons.weights`). Each checkpoint is
loaded into the config's model and validated with the config's data and
callbacks, with the Trainer's epoch and global step set to the checkpoint's: everything is logged
where a live run logs it (the same TensorBoard tags, at the checkpoint's step; the same files,
under ``neurons/validate/<kind>/epoch=EEE``), so TensorBoard's step slider walks through the
checkpoints and :func:`lightning_neurons.load_run` reads them back.

Example:
    lightning-neurons analyze --config configs/digits.yaml --ckpt_path "checkpoints/*.ckpt"
"""

from __future__ import annotations

import argparse
import glob
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_neurons.errors import NeuronsError
from lightning_neurons.schedule import checkpoint_within_epoch
from lightning_neurons.weights import (
    HF_WEIGHTS,
    epochs_from_names,
    fitted_state,
    hf_weights,
    load_safetensors,
    load_sharded,
    read_weights,
)

#: The files a folder given to ``--ckpt_path`` is searched for.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".pth.tar", ".safetensors")
_KINDS = ", ".join(f"*{s}" for s in CHECKPOINT_SUFFIXES[:-1]) + f" or *{CHECKPOINT_SUFFIXES[-1]}"

#: How many key names an error message lists.
_SHOWN_KEYS = 5

USAGE = """\
lightning-neurons analyze --config CONFIG --ckpt_path PATH [--weights_only false] [config options]

Runs the config's lightning-neurons callbacks on the config's validation data for each checkpoint
(in epoch order) and logs everything at the checkpoint's epoch and global step: TensorBoard's step
slider then walks through the checkpoints, and lightning_neurons.load_run(<log dir>) reads the
results back.

  --ckpt_path PATH     one checkpoint file, a glob ("runs/ckpt/*.ckpt", quoted) or a folder (its
                       *.ckpt, *.pt, *.pth, *.pth.tar, *.safetensors): Lightning checkpoints, or
                       weights a plain PyTorch loop saved (a state dict, or a dict with it under
                       'model_state_dict', 'model' or 'state_dict'; its 'epoch' if it has one,
                       else from the paths), or Hugging Face weights (a Trainer's output_dir or
                       its checkpoint-<step> folders: model.safetensors or pytorch_model.bin,
                       the epoch and step from trainer_state.json)
  --weights_only BOOL  load checkpoints with torch.load(weights_only=...) (default true; false only
                       for checkpoints you trust that hold other objects than tensors and numbers)

Every other option is a config option as for `lightning-neurons validate` (--config,
--trainer.limit_val_batches, --trainer.logger.init_args.save_dir, --model..., --data...).
"""


@dataclass
class CheckpointInfo:
    """One checkpoint to analyse.

    Attributes:
        path: The file.
        epoch: The epoch it was saved in (``checkpoint["epoch"]``, else from the files' names:
            :func:`~lightning_neurons.weights.epochs_from_names`).
        global_step: The optimizer steps taken when it was saved (else its epoch).
        within_epoch: Whether a later checkpoint of the same epoch follows it (saved every N
            steps, say): its files are then named by epoch and step (``epoch=000-step=0000500``),
            the epoch's last one by its epoch alone, as a fit names its validations
            (:mod:`lightning_neurons.schedule`).
    """

    path: Path
    epoch: int
    global_step: int
    within_epoch: bool = False


def _folder_files(folder: Path) -> list[Path]:
    """A folder's checkpoint files: its folders' Hugging Face weights (a Trainer's
    ``output_dir`` of ``checkpoint-<step>/``), with its own final model when its
    ``trainer_state.json`` says its step; else the weights of a Hugging Face ``save_pretrained``
    folder (a ``checkpoint-<step>/``: not its ``optimizer.pt``); else its ``*.ckpt``, ``*.pt``,
    ``*.pth``, ``*.pth.tar`` and ``*.safetensors`` files."""
    own = hf_weights(folder)
    inside = [w for sub in sorted(folder.iterdir()) if sub.is_dir() and (w := hf_weights(sub))]
    if inside:
        if own is not None and not (folder / "trainer_state.json").is_file():
            rank_zero_warn(
                f"analyze: {str(own)!r} is not analysed with the checkpoints of its folders: no "
                "trainer_state.json beside it says its epoch and step (give its path alone to "
                "analyse it)"
            )
            own = None
        return inside + ([own] if own is not None else [])
    if own is not None:
        return [own]
    return sorted(p for suffix in CHECKPOINT_SUFFIXES for p in folder.glob(f"*{suffix}"))


def find_checkpoints(pattern: str | Path) -> list[Path]:
    """The checkpoint files of ``pattern``: one file, a glob (of files, or of Hugging Face
    checkpoint folders), or a folder (:func:`_folder_files`).

    Raises:
        NeuronsError: If nothing matches.
    """
    path = Path(pattern)
    if path.is_dir():
        found = _folder_files(path)
        where = (
            f"folder {str(path)!r} holds no {_KINDS} file, no Hugging Face weights "
            f"({', '.join(HF_WEIGHTS)}) and no folder with them"
        )
    elif path.is_file():
        found = [path]
        where = ""
    else:
        matches = [Path(p) for p in sorted(glob.glob(str(pattern)))]
        found = [p for p in matches if p.is_file()]
        found += [w for p in matches if p.is_dir() and (w := hf_weights(p)) is not None]
        where = f"no file matches {str(pattern)!r}"
    if not found:
        raise NeuronsError(
            f"--ckpt_path: {where}; give one checkpoint file, a glob such as "
            f"'checkpoints/*.ckpt' (quoted, so that the shell does not expand it) or a folder of "
            f"{_KINDS} files"
        )
    return found


def load_checkpoint(path: Path, weights_only: bool = True, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file on the CPU (``mmap``: memory-mapped), or a
    ``.safetensors`` file's tensors (always memory-mapped), with an error that says what is wrong.

    Raises:
        NeuronsError: If the file cannot be read.
    """
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.name.endswith(".index.json"):  # Hugging Face's shards
        return load_sharded(path, lambda shard: load_checkpoint(shard, weights_only, mmap))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:
        hint = (
            " It holds objects other than tensors and numbers: pass `--weights_only false` if you "
            "trust the file."
            if weights_only and "weights_only" in str(err)
            else ""
        )
        raise NeuronsError(f"cannot read checkpoint {str(path)!r}: {err}.{hint}") from err
    return checkpoint


def _keys(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_KEYS])
    more = len(names) - _SHOWN_KEYS
    return shown + (f" and {more} more" if more > 0 else "")


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """Check that a checkpoint's ``state_dict`` fits ``model``, key by key and shape by shape.

    Raises:
        NeuronsError: Naming the missing, unexpected and mismatched keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_keys(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_keys(unexpected)}")
    if shapes:
        parts.append(f"of other shapes (checkpoint vs model): {_keys(shapes)}")
    raise NeuronsError(
        f"checkpoint {str(path)!r} is not of the config's model {type(model).__name__}; its "
        f"weights do not fit: {'; '.join(parts)}. Use the config the checkpoint was trained with "
        "(or override the model's options, e.g. --model.init_args...)."
    )


def checkpoint_infos(paths: Sequence[Path], weights_only: bool = True) -> list[CheckpointInfo]:
    """Each checkpoint's epoch and step, sorted by epoch, then step, then name (read memory-mapped:
    the weights are not loaded yet). A file that does not say its epoch takes it from its name
    among the others that do not (:func:`~lightning_neurons.weights.epochs_from_names`), and
    its epoch as its step."""
    said: dict[Path, tuple[int | None, int | None]] = {}
    for path in paths:
        try:
            head = load_checkpoint(path, weights_only, mmap=True)
        except NeuronsError:  # not memory-mappable (the legacy format), or unreadable
            head = load_checkpoint(path, weights_only)  # which explains what is wrong
        weights = read_weights(head, path)
        said[path] = weights.epoch, weights.global_step
        del head, weights
    unsaid = [p for p, (epoch, _) in said.items() if epoch is None]
    named = dict(zip(unsaid, epochs_from_names(unsaid), strict=True))
    infos: list[CheckpointInfo] = []
    for path, (epoch, step) in said.items():
        epoch = named[path] if epoch is None else epoch
        infos.append(CheckpointInfo(path, epoch, epoch if step is None else step))
    return _one_per_step(sorted(infos, key=lambda i: (i.epoch, i.global_step, i.path.name)))


def _one_per_step(infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """``infos`` (sorted) less those of an epoch and step already analysed (Lightning's
    ``last.ckpt`` beside its epoch's file: the files would be written twice), each of the others
    marked when a later checkpoint of its epoch follows it."""
    kept: list[CheckpointInfo] = []
    for info in infos:
        if kept and (kept[-1].epoch, kept[-1].global_step) == (info.epoch, info.global_step):
            rank_zero_warn(
                f"analyze: {str(info.path)!r} is of epoch {info.epoch} and step "
                f"{info.global_step}, as {str(kept[-1].path)!r} is; only the latter is analysed "
                "(give one file of each step, or a glob that matches one)"
            )
            continue
        if kept and kept[-1].epoch == info.epoch:
            kept[-1].within_epoch = True
        kept.append(info)
    return kept


def set_clock(trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> None:
    """Make ``trainer.current_epoch`` and ``trainer.global_step`` the checkpoint's, so that
    everything the callbacks log lands at its epoch and step (and the model's own validation
    metrics at the step the run logged them)."""
    epoch, step = int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))
    fit_loop = trainer.fit_loop
    fit_loop.epoch_progress.current.completed = epoch
    epoch_loop = fit_loop.epoch_loop
    epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
    epoch_loop.manual_optimization.optim_step_progress.total.completed = step
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    stepped = loops.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", step)
    epoch_loop.on_load_checkpoint({"_batches_that_stepped": int(stepped)})


def _analysis_stage(trainer: pl.Trainer) -> str:
    """``"validation"`` or ``"test"``: the stage the config's ActivationTracker analyses."""
    from lightning_neurons.callbacks import ActivationTracker, AnalysisCallback

    if not any(isinstance(cb, AnalysisCallback) for cb in trainer.callbacks):
        raise NeuronsError(
            "the config attaches no lightning-neurons callback, so there is nothing to analyse; "
            "add them under `trainer.callbacks` (see configs/digits.yaml), e.g. "
            "`- class_path: lightning_neurons.ActivationTracker`"
        )
    trackers = [cb for cb in trainer.callbacks if isinstance(cb, ActivationTracker)]
    stages = {t.stage for t in trackers}
    if "train" in stages:
        raise NeuronsError(
            "the config's ActivationTracker has stage='train', but analyze only runs the model "
            "over the validation (or test) data; set `stage: validation` in its init_args"
        )
    return "test" if stages == {"test"} else "validation"


def _check_data(model: pl.LightningModule, datamodule: Any, stage: str) -> None:
    hook = "val_dataloader" if stage == "validation" else "test_dataloader"
    sources = [s for s in (datamodule, model) if s is not None]
    if not any(is_overridden(hook, s) for s in sources):
        raise NeuronsError(
            f"the config gives no {stage} data: neither the data module nor the model defines "
            f"`{hook}()`. Give the config a `data:` section whose data module has {stage} data "
            "(e.g. lightning_neurons.data.DigitsDataModule)."
        )


def _run_one(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: Any,
    stage: str,
    info: CheckpointInfo,
    weights_only: bool,
) -> None:
    checkpoint = load_checkpoint(info.path, weights_only)
    weights = read_weights(checkpoint, info.path)
    state = fitted_state(model, weights.state)
    check_state_dict(model, state, info.path)
    clock = {"epoch": info.epoch, "global_step": info.global_step}
    if weights.lightning:  # its hooks and loops
        model.on_load_checkpoint(checkpoint)
        clock = checkpoint
    model.load_state_dict(state)
    set_clock(trainer, clock)
    del checkpoint, weights, state
    run = trainer.validate if stage == "validation" else trainer.test
    run(model, datamodule=datamodule, verbose=False)
    batches = trainer.num_val_batches if stage == "validation" else trainer.num_test_batches
    if not sum(batches):
        limit = "limit_val_batches" if stage == "validation" else "limit_test_batches"
        raise NeuronsError(
            f"the {stage} data is empty (0 batches; is the Trainer's `{limit}` 0, or the data "
            "set empty?), so there is nothing to analyse"
        )


def analyze_checkpoints(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    ckpt_path: str | Path,
    *,
    weights_only: bool = True,
    progress: bool = True,
) -> list[CheckpointInfo]:
    """Run the trainer's callbacks on each checkpoint of ``ckpt_path``, in epoch order.

    Args:
        trainer: A Trainer with the analysis callbacks (and a logger) attached.
        model: The model the checkpoints are of.
        datamodule: The data (``None``: the model's own loaders).
        ckpt_path: One checkpoint, a glob or a folder.
        weights_only: ``torch.load``'s ``weights_only``.
        progress: Show a progress bar over the checkpoints.

    Returns:
        The checkpoints analysed, in order.

    Raises:
        NeuronsError: If no checkpoint matches, one is of another model, the config attaches no
            analysis callback, or there is no validation data.
    """
    from tqdm import tqdm

    infos = checkpoint_infos(find_checkpoints(ckpt_path), weights_only)
    stage = _analysis_stage(trainer)
    _check_data(model, datamodule, stage)
    bar = tqdm(
        infos,
        desc="analysing checkpoints",
        unit="ckpt",
        disable=not progress,
        dynamic_ncols=True,
    )
    for info in bar:
        bar.set_postfix_str(f"{info.path.name}: epoch {info.epoch}, step {info.global_step}")
        with checkpoint_within_epoch(info.within_epoch):
            _run_one(trainer, model, datamodule, stage, info, weights_only)
    bar.close()
    return infos


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _build_cli(cls: type, args: list[str]) -> Any:
    return cls(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        save_config_kwargs={"overwrite": True},
    )


def main(args: Sequence[str], cli_class: type) -> list[CheckpointInfo]:
    """``lightning-neurons analyze ...`` (``args`` without the word ``analyze``), the config read
    by ``cli_class`` (the command's LightningCLI, :class:`~lightning_neurons.cli.NeuronsCLI`)."""
    from lightning_neurons.loggers import artifact_root, find_tensorboard

    parser = argparse.ArgumentParser(prog="lightning-neurons analyze", usage=USAGE, add_help=True)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--weights_only", type=_bool, default=True)
    own, rest = parser.parse_known_args(list(args))
    if not any(a.startswith("--trainer.enable_progress_bar") for a in rest):
        rest.append("--trainer.enable_progress_bar=false")  # ours goes over the checkpoints
    started = time.perf_counter()
    with warnings.catch_warnings():
        # the arguments are the command line's, less `analyze` and its own options
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _build_cli(cli_class, rest)
    trainer = cli.trainer
    infos = analyze_checkpoints(
        trainer,
        cli.model,
        cli.datamodule,
        own.ckpt_path,
        weights_only=own.weights_only,
        progress=trainer.is_global_zero,
    )
    if trainer.is_global_zero:
        epochs = ", ".join(
            f"{i.epoch} (step {i.global_step})" if i.within_epoch else str(i.epoch) for i in infos
        )
        seconds = time.perf_counter() - started
        tb = find_tensorboard(trainer)
        lines = [
            "",
            f"lightning-neurons: analyze done in {seconds:.1f} s: {len(infos)} checkpoint(s), "
            f"epoch(s) {epochs}.",
        ]
        if tb is not None:
            lines.append(f"  TensorBoard logs: {Path(tb.log_dir).resolve()}")
            lines.append(f"  Open them with:   tensorboard --logdir {Path(tb.save_dir).resolve()}")
        root = artifact_root(trainer).resolve()
        lines.append(f"  Analysis files:   {root}")
        lines.append(f"  Read them back:   lightning_neurons.load_run({str(root.parent)!r})")
        print("\n".join(lines), flush=True)
    return infos
