"""Demo models: a small CNN, and a LightningModule that trains any backbone as a classifier."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from lightning_neurons.batch import INPUT_KEYS, LABEL_KEYS, read_inputs, read_logits
from lightning_neurons.errors import NeuronsError
from lightning_neurons.weights import natural_key


class SmallCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> max-pool blocks, global average pooling, a linear classifier.

    Module names are readable so they can be used as layer names: ``features.conv1``,
    ``features.bn1``, ``features.relu1``, ``features.pool1``, ..., ``classifier``.

    Args:
        in_channels: Input channels (1 for grayscale, 3 for RGB).
        num_classes: Output logits.
        widths: Channels of each conv block.
        batch_norm: Put a BatchNorm2d after each conv (trains much faster).

    Example:
        >>> SmallCNN()(torch.rand(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        previous = in_channels
        for i, width in enumerate(widths, start=1):
            blocks[f"conv{i}"] = nn.Conv2d(previous, width, kernel_size=3, padding=1)
            if batch_norm:
                blocks[f"bn{i}"] = nn.BatchNorm2d(width)
            blocks[f"relu{i}"] = nn.ReLU()
            if i < len(widths):
                blocks[f"pool{i}"] = nn.MaxPool2d(2)
            previous = width
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)
        self.num_classes = num_classes
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def timm_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 3,
    pretrained: bool = False,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm model by name (``timm.create_model``), for a YAML config's backbone, where timm's
    own keyword options cannot be given (``class_path: timm.create_model`` takes no
    ``num_classes``). Its weights are named as timm names them, so a timm training's checkpoints
    load into ``ImageClassifier(timm_model(...))`` (``lightning-neurons analyze``).

    Args:
        name: The model's name in timm (``"resnet18"``, ``"convnext_atto"``, ``"vit_tiny_patch16_224"``).
        num_classes: Output logits.
        in_chans: Input channels (1 for grayscale).
        pretrained: Load timm's pretrained weights (a download: not on a machine without network).
        options: More keyword options of ``timm.create_model`` (``{"img_size": 32}``,
            ``{"drop_rate": 0.1}``).

    Raises:
        NeuronsError: Without timm, or for a name timm does not know (with the close names).

    Example (YAML)::

        model:
          class_path: lightning_neurons.models.ImageClassifier
          init_args:
            backbone:
              class_path: lightning_neurons.models.timm_model
              init_args: {name: resnet18, num_classes: 10, in_chans: 1}
    """
    try:
        import timm
    except ImportError as err:
        raise NeuronsError("timm_model needs timm: pip install timm") from err
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise NeuronsError(
            f"timm knows no model {name!r}"
            + (f"; close names: {', '.join(close)}" if close else "")
            + " (timm.list_models('*pattern*') lists them)"
        )
    return timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **(options or {})
    )


def hf_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """A Hugging Face image classifier (``AutoModelForImageClassification``) for a YAML config's
    backbone, built from the ``config.json`` of a folder that ``save_pretrained`` wrote (a
    Trainer's ``output_dir``, or one of its ``checkpoint-<step>/`` folders) or of a model on the
    Hub (a download). Its weights are random unless ``pretrained``: ``lightning-neurons
    analyze`` loads each checkpoint's into it. Its output's ``logits`` are what ImageClassifier
    reads.

    Args:
        name: The folder, or the model's id on the Hub (``"microsoft/resnet-18"``).
        num_classes: Output logits (``num_labels``); default: the config's.
        pretrained: Load the folder's (or the Hub's) weights now.
        options: More options of the model's config (``{"num_channels": 1}``).

    Raises:
        NeuronsError: Without transformers, or when no config can be read.

    Example (YAML)::

        model:
          class_path: lightning_neurons.models.ImageClassifier
          init_args:
            backbone:
              class_path: lightning_neurons.models.hf_model
              init_args: {name: out/checkpoint-500}
            num_classes: 10
    """
    try:
        from transformers import AutoConfig, AutoModelForImageClassification
    except ImportError as err:
        raise NeuronsError("hf_model needs transformers: pip install transformers") from err
    source = Path(name)
    if source.is_dir() and not (source / "config.json").is_file():
        inside = sorted(source.glob("*/config.json"), key=lambda p: natural_key(p.parent))
        source = inside[-1].parent if inside else source  # a Trainer's latest checkpoint
    given = dict(options or {})
    if num_classes is not None:
        given["num_labels"] = num_classes
    where = str(source) if source.is_dir() else name
    try:
        config = AutoConfig.from_pretrained(where, **given)
    except (OSError, ValueError) as err:
        raise NeuronsError(
            f"hf_model: no model config for {name!r} ({err}); give a folder that save_pretrained "
            "wrote (with its config.json: a Trainer's output_dir or checkpoint-<step>/) or a "
            "model id on the Hugging Face Hub (with network access)"
        ) from err
    if pretrained:
        return AutoModelForImageClassification.from_pretrained(where, config=config)
    return AutoModelForImageClassification.from_config(config)


class ImageClassifier(pl.LightningModule):
    """Trains a backbone as an image classifier with cross-entropy and Adam(W).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (and ``test/...``), with
    torchmetrics accuracy, and ``val/acc_best``: the best epoch's validation accuracy so far
    (torchmetrics ``MaxMetric``), so a run's summary can report both its last and its best epoch.
    Batches are read as the callbacks read them (:func:`images_and_targets`): ``(images, targets)``
    tuples or mappings such as ``{"pixel_values": ..., "labels": ...}``; the targets are class
    indices, or class probabilities (mixup, cutmix), whose top class the accuracy scores.

    A binary classifier may have one logit (``num_classes=1``): it is read as the two classes'
    logits ``[-z/2, z/2]`` (:func:`~lightning_neurons.batch.read_logits`), whose softmax is the
    sigmoid's ``[1 - p, p]``, so the cross-entropy is BCE with logits. Its targets may then also be
    floats or booleans (``[B]`` or ``[B, 1]``; 0.0 and 1.0, or the probability of class 1).

    Args:
        backbone: Any ``nn.Module`` mapping images to ``num_classes`` logits (in YAML, any class
            path, e.g. ``torchvision.models.resnet18`` with ``init_args: {num_classes: 10}``).
            Default: :class:`SmallCNN` for grayscale input. Of a backbone that returns several
            outputs (torchvision's GoogLeNet and Inception v3 in training mode), the main logits
            are trained (read as :func:`~lightning_neurons.batch.read_logits` reads them); the
            auxiliary classifiers are not.
        num_classes: Number of classes (1: a binary classifier's one logit).
        lr: The (peak) learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay (0: plain Adam).
        schedule: ``"constant"`` keeps ``lr``; ``"onecycle"`` warms up to ``lr`` over the first
            30% of the steps and anneals to ``lr / 10^4`` by the last step (``OneCycleLR``), so the
            last epoch ends on settled weights and BatchNorm statistics.

    Example:
        >>> model = ImageClassifier(SmallCNN(in_channels=3), num_classes=10)
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "onecycle"] = "constant",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if schedule not in ("constant", "onecycle"):
            raise NeuronsError(f"`schedule` must be 'constant' or 'onecycle', got {schedule!r}")
        if not lr > 0 or weight_decay < 0:
            raise NeuronsError(
                f"`lr` must be > 0 and `weight_decay` >= 0, got lr={lr!r}, "
                f"weight_decay={weight_decay!r}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise NeuronsError(
                f"`num_classes` must be a positive integer (1: a binary classifier's one logit), "
                f"got {num_classes!r}"
            )
        self.backbone = backbone if backbone is not None else SmallCNN(num_classes=num_classes)
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.schedule = schedule
        metric = torchmetrics.classification.MulticlassAccuracy
        classes = max(num_classes, 2)  # one logit: read as two classes
        self.train_acc = metric(num_classes=classes, average="micro")
        self.val_acc = metric(num_classes=classes, average="micro")
        self.test_acc = metric(num_classes=classes, average="micro")
        self.val_acc_best = torchmetrics.MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _step(self, batch, stage: str, acc: torchmetrics.Metric) -> torch.Tensor:
        x, y = images_and_targets(batch, self.num_classes)
        logits = read_logits(self(x))  # the first output of aux-logit models (GoogLeNet's, say)
        loss = F.cross_entropy(logits, y)  # class indices, or class probabilities (mixup)
        self._log_step(stage, loss, logits, y, acc)
        return loss

    # Under torch.compile, run as written: traced, the stages' names and the metric's counters
    # recompiled Lightning's `log` until TorchDynamo gave up on it.
    @torch.compiler.disable
    def _log_step(
        self,
        stage: str,
        loss: torch.Tensor,
        logits: torch.Tensor,
        y: torch.Tensor,
        acc: torchmetrics.Metric,
    ) -> None:
        acc(logits.detach(), y if y.dim() == 1 else y.argmax(dim=1))
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, on_step=on_step, on_epoch=True)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val", self.val_acc)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        # `val_acc` is computed (and synced across processes) here, before Lightning resets it
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=False)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """``[B, num_classes]`` class probabilities of a batch: images alone, or with labels
        (``trainer.predict`` on the validation loader); ``[B, 2]`` for one logit (``1 - p, p``)."""
        return read_logits(self(read_inputs(batch))).softmax(dim=1)

    def configure_optimizers(self):
        if self.weight_decay:
            optimizer = torch.optim.AdamW(
                self.parameters(), lr=self.lr, weight_decay=self.weight_decay
            )
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.schedule == "constant":
            return optimizer
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=self.lr,
            total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=0.3,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def images_and_targets(batch: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and targets :class:`ImageClassifier` trains on, from a batch as the loader yields it.

    Args:
        batch: ``(images, targets, ...)``, or a mapping with one of
            :data:`~lightning_neurons.batch.INPUT_KEYS` and one of
            :data:`~lightning_neurons.batch.LABEL_KEYS` (Hugging Face datasets' layout).
        num_classes: The classifier's classes (1: one logit, read as two classes).

    Returns:
        The images, and the targets: ``[B]`` class indices (a ``[B, 1]`` column is flattened), or
        ``[B, num_classes]`` class probabilities, as mixup and cutmix make them. Of a binary
        classifier (``num_classes`` 1 or 2), boolean targets are class indices and float ones
        (``[B]`` or ``[B, 1]``: class 1's probability ``p``) the probabilities ``[1 - p, p]``.

    Raises:
        NeuronsError: If the batch has no images or targets, or the targets are neither.

    Example:
        >>> x, y = images_and_targets({"image": torch.zeros(2, 1, 4, 4), "label": [[3], [1]]}, 10)
        >>> y
        tensor([3, 1])
    """
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        x = y = None
    if not isinstance(x, torch.Tensor) or y is None:
        keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""
        raise NeuronsError(
            f"ImageClassifier cannot find images and targets in a batch of type "
            f"{type(batch).__name__}{keys}; it trains on `(images, targets, ...)` tuples or on "
            f"mappings with an image key ({', '.join(INPUT_KEYS)}) and a label key "
            f"({', '.join(LABEL_KEYS)}). Rename your dataset's keys, or subclass ImageClassifier "
            "and override `_step`."
        )
    y = torch.as_tensor(y, device=x.device)
    if y.dim() == 2 and y.shape[1] == 1 and (num_classes <= 2 or not y.dtype.is_floating_point):
        y = y[:, 0]
    if num_classes <= 2 and y.dim() == 1 and y.dtype.is_floating_point:
        y = _binary_probabilities(y)
    elif num_classes <= 2 and y.dtype == torch.bool:
        y = y.long()
    num_classes = max(num_classes, 2)
    indices = y.dim() == 1 and not (y.dtype.is_floating_point or y.dtype == torch.bool)
    soft = y.dim() == 2 and y.shape[1] == num_classes  # probabilities, or one-hot of any dtype
    if not (indices or soft) or y.shape[0] != x.shape[0]:
        raise NeuronsError(
            f"ImageClassifier's targets must be {x.shape[0]} integer class indices (shape [B]) or "
            f"class probabilities of shape [B, {num_classes}] (mixup, cutmix); got dtype "
            f"{y.dtype} and shape {tuple(y.shape)}. Check `num_classes={num_classes}` and the "
            "dataset's labels."
        )
    if soft and not y.dtype.is_floating_point:
        y = y.float()  # cross-entropy takes probabilities as floats
    return x, y.long() if indices else y


def _binary_probabilities(p: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` class probabilities ``[1 - p, p]`` of a binary classifier's float targets."""
    inside = (p >= 0) & (p <= 1) if p.device.type == "cpu" else None  # no wait for a GPU
    if inside is not None and not bool(inside.all()):
        bad = p[~inside][0].item()
        raise NeuronsError(
            f"ImageClassifier's float targets of a binary classifier are class 1's probability, "
            f"in [0, 1]; got {bad!r}. Pass 0/1 labels (or probabilities) as targets."
        )
    return torch.stack([1 - p, p], dim=1)
