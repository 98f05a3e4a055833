"""Gradients the analyses take through the user's model, whatever its forward does with graphs.

Rendering, saliency and contributions differentiate a value (an objective, a logit) with respect
to the image or a layer's output. Three things in a model's forward can stand in the way:

- **activation checkpointing** (``torch.utils.checkpoint``) runs a block's forward again in the
  backward pass: the hooks do nothing there (:func:`in_backward`), and what their own operations
  save is kept out of the block's recomputation (:func:`kept_saved_tensors`);
- **a reentrant checkpoint** (``use_reentrant=True``) refuses ``torch.autograd.grad``: through
  one, gradients are taken with ``backward()`` (:func:`gradients_at`, :func:`reentrant`);
- **a layer without a graph from the image** (``torch.no_grad()``, inside a reentrant
  checkpoint, after a ``.detach()``, or not computed from the image) has no gradient to climb:
  :func:`check_gradient` says so, and why (:data:`NO_GRAPH`), and what would give it one
  (:data:`GIVE_GRAPH`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from lightning_neurons.errors import NeuronsError

#: Where a floating-point output without a gradient from the image comes from (in a forward
#: pass with gradients, the parameters frozen).
NO_GRAPH = (
    "under torch.no_grad(), inside torch.utils.checkpoint(..., use_reentrant=True), after a "
    ".detach(), or from parameters and buffers alone"
)
#: What gives the layers a graph again.
GIVE_GRAPH = (
    "checkpoint with use_reentrant=False (or behind a flag such as timm's grad_checkpointing), "
    "or freeze weights with requires_grad_(False) rather than torch.no_grad()"
)
#: The causes, told apart by the grad mode where the layer ran: off...
GRAD_OFF = "under torch.no_grad() or inside torch.utils.checkpoint(..., use_reentrant=True)"
#: ... and on (its inputs have no graph).
FROM_NO_GRAPH = (
    "from inputs without a gradient from the image: after a .detach(), after layers computed "
    f"{GRAD_OFF}, or from parameters and buffers alone"
)


def why_no_gradient(grad_enabled: bool | None) -> tuple[str, str]:
    """``(where the model computes the output, what would work)`` for an output without a
    gradient from the image, by the grad mode where it was computed (``None``: unknown).

    Example:
        >>> where, fix = why_no_gradient(False)
        >>> where
        'under torch.no_grad() or inside torch.utils.checkpoint(..., use_reentrant=True)'
    """
    if grad_enabled is None:
        return NO_GRAPH, GIVE_GRAPH
    if grad_enabled:
        return FROM_NO_GRAPH, f"{GIVE_GRAPH}, or choose a layer computed from the image"
    return GRAD_OFF, GIVE_GRAPH


def in_backward() -> bool:
    """Whether the backward pass is running this code: a forward pass recomputed there is a
    block's under activation checkpointing (``torch.utils.checkpoint``). Not asked while Dynamo
    traces (the question would break its graph)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def kept_saved_tensors() -> AbstractContextManager[object]:
    """Inside a block checkpointed with ``torch.utils.checkpoint(use_reentrant=False)``: the
    tensors that a hook's own operations save for the backward pass are kept as they are.

    Checkpointing drops what the block's operations save and recomputes it in the backward pass,
    where the hooks do nothing (:func:`in_backward`): the hook's operations would be missing
    from the recomputation (torch's ``CheckpointError``: "a different number of tensors was
    saved"). Outside saved-tensor hooks (no checkpoint) nothing changes.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return nullcontext()
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None or top(False) is None:  # no saved-tensor hooks: nothing dropped
        return nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def gradients_at(
    value: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    retain_graph: bool = False,
    whole: bool | None = None,
) -> list[torch.Tensor | None]:
    """The gradient of the scalar ``value`` at each of ``tensors`` (``None``: not on its path).

    By ``torch.autograd.grad``, which runs the backward pass only down to ``tensors``; through a
    block checkpointed with ``use_reentrant=True`` (:func:`reentrant`), which refuses it, by
    ``backward()``, which runs down to every leaf that requires a gradient. Call it with the
    model's parameters frozen (:func:`~lightning_neurons.state.frozen_parameters`, or inside
    :func:`~lightning_neurons.state.analysis_mode`): ``backward()`` adds to their ``.grad``.
    ``whole``: whether ``backward()`` is needed, when the caller knows (passes through one graph
    ask once); ``None``: :func:`reentrant` says.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> y = x * 3
        >>> gradients_at((y**2).sum(), [y, x])
        [tensor([6., 6.]), tensor([18., 18.])]
    """
    if not tensors:
        return []
    if not (reentrant(value) if whole is None else whole):
        grads = torch.autograd.grad(value, tensors, retain_graph=retain_graph, allow_unused=True)
        return list(grads)
    for tensor in tensors:
        tensor.grad = None
        tensor.retain_grad()
    value.backward(retain_graph=retain_graph)
    return [tensor.grad for tensor in tensors]


def reentrant(value: torch.Tensor) -> bool:
    """Whether ``value``'s graph holds a block checkpointed with ``use_reentrant=True`` (torch's,
    or one written like it: a node named ``*Checkpoint*Backward``), whose backward runs a
    backward pass of its own. A walk of the graph's nodes (a ResNet-50's 177 in 0.3 ms).

    Example:
        >>> from torch.utils.checkpoint import checkpoint
        >>> x = torch.ones(2, requires_grad=True)
        >>> reentrant(checkpoint(torch.sin, x, use_reentrant=True).sum()), reentrant(x.sin().sum())
        (True, False)
    """
    seen: set[object] = set()
    stack = [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if "Checkpoint" in type(node).__name__:
            return True
        seen.add(node)
        stack.extend(parent for parent, _ in node.next_functions)
    return False


def check_gradient(layer: str, output: torch.Tensor) -> None:
    """Raise :func:`no_gradient` if ``output``, met in a forward pass that is asked for
    gradients, is a floating-point tensor without a graph. Called where the layer ran (in a
    forward hook), where the grad mode tells the causes apart."""
    if not output.requires_grad and output.is_floating_point():
        raise no_gradient(layer, torch.is_grad_enabled())


def no_gradient(layer: str, grad_enabled: bool | None = None) -> NeuronsError:
    """The error for layer ``layer``, whose output carries no gradient from the image where one
    is needed (:func:`why_no_gradient`)."""
    where, fix = why_no_gradient(grad_enabled)
    outside = ", or choose a layer outside that block" if grad_enabled is False else ""
    return NeuronsError(
        f"layer {layer!r} gave an output without a gradient from the image in a forward pass "
        f"that needs one: the model computes it {where}, which keeps no graph of the image; "
        f"{fix}{outside}"
    )


def unreached(what: str) -> NeuronsError:
    """The error for logits that ``what`` (the images, or layers) gives no gradient: the model
    computes the logits, or the layers before them, :data:`NO_GRAPH`."""
    return NeuronsError(
        f"no gradient reaches {what} from the logits: the model computes the layers after them "
        f"{NO_GRAPH}; {GIVE_GRAPH}"
    )
