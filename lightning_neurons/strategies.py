"""What the analyses that run the model themselves need: a strategy that does not shard it, and a
model to call (the LightningModule's ``forward``, or its only child with parameters)."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_neurons.errors import NeuronsError
from lightning_neurons.state import defines_forward, forward_submodule


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
    work (and rank zero alone for some, such as the model's classes of the cluster images), while
    a sharded model needs every rank in every pass, on the same inputs (a rank would wait forever
    for the others).

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
    """Raise at set-up when ``who``, which runs the model on images of its own, cannot call it:
    the LightningModule defines no ``forward`` and its steps' model is not its only child with
    parameters (:func:`~lightning_neurons.state.forward_submodule`, which the analyses call
    otherwise).

    Raises:
        NeuronsError: Naming the children with parameters and the ``forward`` to add.
    """
    if defines_forward(pl_module) or forward_submodule(pl_module) is not None:
        return
    sizes = {
        name: sum(p.numel() for p in child.parameters())
        for name, child in pl_module.named_children()
    }
    holders = [name for name, size in sizes.items() if size]
    if next(pl_module.parameters(recurse=False), None) is not None:
        holders.append(f"{type(pl_module).__name__} itself")
    name = max(sizes, key=lambda n: sizes[n]) if sizes else "model"
    raise NeuronsError(
        f"{who} runs the model on images of its own, but {type(pl_module).__name__} defines no "
        f"`forward` and its parameters are not in one submodule ({', '.join(holders) or 'none'}), "
        "so what maps images to logits is not known. Add a `forward` that maps an input batch "
        f"to the logits, for example `def forward(self, x): return self.{name}(x)`; the steps "
        "may go on as they are."
    )
