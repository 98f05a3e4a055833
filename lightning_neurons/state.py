"""Running analysis code on the user's model without changing it.

Every analysis that runs the model outside Lightning's own steps goes through
:func:`analysis_mode` (eval mode inside :func:`untouched`), so that training is exactly what it
would have been without the analysis.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import chain

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn

#: How many :func:`untouched` blocks are open: forwards inside them are analyses', not training's.
_open_blocks = 0
#: :func:`untouched` copies the buffers in groups of at most this many bytes (one device, one
#: type): one copy and one comparison a group, not one each per buffer (ResNet-50's 159 BatchNorm
#: buffers cost 318 kernels and 159 waits for a GPU at every analysis before).
BUFFER_GROUP_BYTES = 64 * 2**20


def compiled_as_written() -> AbstractContextManager[object]:
    """A block in which ``torch.compile``'d code runs as written (torch >= 2.6:
    ``torch.compiler.set_stance("force_eager")``; before, compiled code runs as compiled)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return nullcontext() if set_stance is None else set_stance("force_eager")


def in_analysis() -> bool:
    """Whether an analysis is running the model (inside :func:`untouched`) right now.

    Hooks that gather statistics of Lightning's own batches ignore such forwards, whatever the
    order in which callbacks run (e.g. a set-up check on the first batch).
    """
    return _open_blocks > 0


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    return next((t.device for t in chain(model.parameters(), model.buffers())), torch.device("cpu"))


@contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and the given CUDA device's) RNG state on exit.

    Analyses draw random numbers from their own ``torch.Generator``; this guards against
    anything else (a DataLoader iterator draws a seed from the global generator, for example).
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    devices = [device] if cuda else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def defines_forward(model: nn.Module) -> bool:
    """Whether ``model``'s class defines a ``forward`` (a LightningModule need not: its steps may
    call a submodule, ``self.model(x)``)."""
    return type(model).forward not in (LightningModule.forward, nn.Module.forward)


def forward_submodule(model: nn.Module) -> nn.Module | None:
    """The submodule that runs a model whose class defines no ``forward``: its only child with
    parameters (``self.model = resnet18()`` beside a loss and metrics). ``None`` when the class
    defines one, when the instance has one already, when no child or several (a backbone and a
    head) hold parameters, or when the model holds parameters of its own (a temperature the steps
    divide the logits by, say)."""
    if defines_forward(model) or "forward" in vars(model):
        return None
    if next(model.parameters(recurse=False), None) is not None:
        return None
    holders = [c for c in model.children() if next(c.parameters(), None) is not None]
    return holders[0] if len(holders) == 1 else None


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``model`` inside the block (given back on
    exit): a ``backward()`` inside reaches inputs and activations only, never the training's
    ``.grad`` (a no-op inside :func:`untouched`, where they are frozen already)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run analysis code on ``model`` and put back everything it may change.

    Inside the block: gradients are enabled (also under Lightning's ``inference_mode``), every
    parameter has ``requires_grad=False`` and ``.grad=None`` (so analyses take gradients with
    respect to inputs or activations only, and a ``backward()`` cannot add to the training's
    gradients). On exit, the ``training`` flag of every module, each parameter's
    ``requires_grad`` and ``.grad`` (the very same tensor objects), the values of all buffers
    (BatchNorm running statistics) and the RNG streams are as they were. A model whose class
    defines no ``forward`` runs its :func:`forward_submodule` when called inside the block.
    Activation checkpointing is off inside (the :data:`CHECKPOINTING` flags of timm's and Hugging
    Face's models): a checkpointed block runs its forward again in the backward pass, and the
    analyses' hooks inside it would not run the same way twice. A ``torch.compile``'d model (or
    part) runs its code as written inside (``force_eager``): hooks registered after it was
    compiled are called (a cached graph may skip them), and inputs of new shapes compile
    nothing, which would use up the recompilations that training's own shapes are allowed.

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> from lightning_neurons.visualize import gradient
        >>> model = SmallCNN().train()
        >>> with untouched(model):
        ...     maps = gradient(model, torch.rand(2, 1, 32, 32))
        >>> model.training, model.classifier.weight.requires_grad, model.classifier.weight.grad
        (True, True, None)

    Analyses use :func:`analysis_mode`, which adds eval mode.
    """
    global _open_blocks
    borrowed = forward_submodule(model)
    modes = [(m, m.training) for m in model.modules()]
    checkpointed = _checkpointed(model)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = _SavedBuffers(model)
    device = params[0].device if params else None
    _open_blocks += 1
    try:
        if borrowed is not None:  # an instance attribute: found before the class's, then deleted
            model.forward = borrowed.__call__
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for module, flag in checkpointed:
            setattr(module, flag, False)
        with (
            preserved_rng(device),
            torch.inference_mode(False),
            torch.enable_grad(),
            compiled_as_written(),
        ):
            yield
    finally:
        _open_blocks -= 1
        for module, flag in checkpointed:
            setattr(module, flag, True)
        if borrowed is not None and "forward" in vars(model):
            del model.forward
        for module, mode in modes:
            module.training = mode
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        buffers.restore()


#: The attributes that turn activation checkpointing on: timm's (``set_grad_checkpointing()``)
#: and Hugging Face's (``gradient_checkpointing_enable()``, in training mode only).
CHECKPOINTING = ("grad_checkpointing", "gradient_checkpointing")


def _checkpointed(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The modules of ``model`` whose :data:`CHECKPOINTING` flag is on, with the flag's name."""
    return [
        (module, flag)
        for module in model.modules()
        for flag in CHECKPOINTING
        if vars(module).get(flag) is True
    ]


class _SavedBuffers:
    """A copy of a model's buffers, taken in groups (:data:`BUFFER_GROUP_BYTES`): each group is
    one flat tensor, compared with the buffers as they are in one operation and one wait for the
    device; only a group that changed is restored, buffer by buffer, each one only if changed
    (an unchanged buffer is never written). A sparse buffer or a tensor subclass (a DTensor, say)
    is copied and compared alone, as it is."""

    def __init__(self, model: nn.Module) -> None:
        #: ``(buffers, their shapes, the flat copy)``, and the buffers copied alone
        self.groups: list[tuple[list[torch.Tensor], list[torch.Size], torch.Tensor]] = []
        self.alone: list[tuple[torch.Tensor, torch.Tensor]] = []
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for b in model.buffers():
            if b.layout != torch.strided or type(b) is not torch.Tensor:
                self.alone.append((b, b.detach().clone()))
            else:
                by_kind.setdefault((b.device, b.dtype), []).append(b)
        for tensors in by_kind.values():
            for part in _bounded(tensors, BUFFER_GROUP_BYTES):
                self.groups.append((part, [t.shape for t in part], _flat(part)))

    def restore(self) -> None:
        """Write back every buffer that differs from its copy."""
        with torch.no_grad():
            changed = list(self.alone)
            for tensors, shapes, saved in self.groups:
                if not torch.equal(_flat(tensors), saved):
                    parts = saved.split([shape.numel() for shape in shapes])
                    olds = [p.view(shape) for p, shape in zip(parts, shapes, strict=True)]
                    changed += zip(tensors, olds, strict=True)
            for buffer, old in changed:
                if not _equal(buffer, old):
                    buffer.copy_(old)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, for sparse tensors too (compared dense)."""
    if a.layout != torch.strided or b.layout != torch.strided:
        return a.shape == b.shape and torch.equal(a.to_dense(), b.to_dense())
    return torch.equal(a, b)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' values in one new flat tensor."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _bounded(tensors: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """``tensors`` in consecutive groups of at most ``limit`` bytes (a larger one alone)."""
    group: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append(t)
        size += nbytes
    if group:
        yield group


@contextmanager
def analysis_mode(model: nn.Module, *, grad: bool = True) -> Iterator[None]:
    """:func:`untouched`, with the model in eval mode inside: how every analysis runs the model.

    Eval mode matters for correctness, not only speed: in training mode BatchNorm would mix the
    rows of a batch (so one image's result would depend on the others') and update its running
    statistics, and Dropout would draw random numbers.

    Args:
        model: The model.
        grad: Gradients enabled inside (with respect to inputs or activations: the parameters
            are frozen either way); ``False`` for forward passes only.
    """
    with untouched(model), torch.set_grad_enabled(grad):
        model.eval()
        yield
