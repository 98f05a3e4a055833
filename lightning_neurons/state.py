"""Running analysis code on the user's model without changing it.

Every analysis that runs the model outside Lightning's own steps goes through
:func:`analysis_mode` (eval mode inside :func:`untouched`), so that training is exactly what it
would have been without the analysis.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain

import numpy as np
import torch
from torch import nn

#: How many :func:`untouched` blocks are open: forwards inside them are analyses', not training's.
_open_blocks = 0


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


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run analysis code on ``model`` and put back everything it may change.

    Inside the block: gradients are enabled (also under Lightning's ``inference_mode``), every
    parameter has ``requires_grad=False`` and ``.grad=None`` (so analyses take gradients with
    respect to inputs or activations only, and a ``backward()`` cannot add to the training's
    gradients). On exit, the ``training`` flag of every module, each parameter's
    ``requires_grad`` and ``.grad`` (the very same tensor objects), the values of all buffers
    (BatchNorm running statistics) and the RNG streams are as they were.

    Example:
        >>> with untouched(pl_module):
        ...     saliency = input_gradient(pl_module, images)  # doctest: +SKIP

    Analyses use :func:`analysis_mode`, which adds eval mode.
    """
    global _open_blocks
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    device = params[0].device if params else None
    _open_blocks += 1
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        with preserved_rng(device), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        _open_blocks -= 1
        for module, mode in modes:
            module.training = mode
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)


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
