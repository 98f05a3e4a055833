"""What the analyses that run the model themselves need: a strategy that does not shard it, and a
LightningModule with a ``forward``."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_neurons.errors import NeuronsError


def sharded_strategy(trainer: Trainer) -> str | None:
    """The name of the trainer's strategy when it shards the model's parameters over the ranks
    (FSDP, DeepSpeed ZeRO stage 3, model parallel), else ``None``."""
    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return type(strategy).__name__
    config = getattr(strategy, "config", None)
    if (
        isinstance(strategy, DeepSpeedStrategy)
        and isinstance(config, dict)
        and strategy.zero_stage_3
    ):
        return "DeepSpeedStrategy (ZeRO stage 3)"
    return None


def refuse_sharded(trainer: Trainer, who: str) -> None:
    """Raise at set-up when the model is sharded: ``who`` runs extra forward and backward passes
    of the model (rendering, saliency, contribution, ablation), each rank on its own share of the
    work (and rank zero alone for some, such as the cluster images), while a sharded model needs
    every rank in every pass, on the same inputs (a rank would wait forever for the others).

    Raises:
        NeuronsError: Under FSDP, DeepSpeed ZeRO stage 3 or model parallelism.
    """
    name = sharded_strategy(trainer)
    if name is not None:
        raise NeuronsError(
            f"{who} runs extra forward and backward passes of the model on each rank alone, "
            f"which a sharded model cannot do ({name}: every rank must take part in every forward "
            f"pass). Train with strategy='ddp' (or DeepSpeed stage 1 or 2) while {who} is "
            "attached, or leave it out."
        )


def require_forward(pl_module: LightningModule, who: str) -> None:
    """Raise at set-up when the LightningModule defines no ``forward`` (its steps call a
    submodule, ``self.model(x)``): ``who`` runs the model on images of its own.

    Raises:
        NeuronsError: Naming the submodule whose call would make a ``forward``.
    """
    if type(pl_module).forward not in (LightningModule.forward, nn.Module.forward):
        return
    sizes = {
        name: sum(p.numel() for p in child.parameters())
        for name, child in pl_module.named_children()
    }
    name = max(sizes, key=lambda n: sizes[n]) if sizes else "model"
    raise NeuronsError(
        f"{who} runs the model on images of its own, but {type(pl_module).__name__} defines no "
        "`forward` (its steps call a submodule). Add one that maps an input batch to the logits, "
        f"for example `def forward(self, x): return self.{name}(x)`; the steps may go on calling "
        f"`self.{name}`."
    )
