"""Which neurons drive a prediction: first-order contribution (activation x gradient).

**First order.** The contribution of neuron ``k`` of a layer to the logit ``z_c`` of class ``c``
on image ``x`` is activation x gradient, summed over the neuron's spatial positions::

    contribution[x, c, k] = sum_{h, w} A[x, k, h, w] * d z_c(x) / d A[x, k, h, w]

It is the first-order (Taylor) estimate of how much ``z_c`` would fall if the neuron were zeroed.
For a layer feeding a linear classifier through global average pooling it is exact:
``contribution = mean activation x weight``, and the contributions plus the bias sum to the logit.

:func:`contribution_batch` gives one batch's contributions to one logit per image; the full
per-image tensor over **all** logits, ``[images, num_classes, num_neurons]``, is what
:func:`neuron_contributions` gives for a few probe images (which neurons drove *this* prediction,
and which pushed towards the other classes). Averaged per class, streamed, and the domination of
each class by its top neurons: :mod:`lightning_neurons.class_contribution`. **Causal.** Zeroing
neurons and measuring what it does is in :mod:`lightning_neurons.ablation`.

Efficiency: the gradients of all images come from **one** backward pass per batch (the sum of the
images' selected logits is differentiated; in eval mode an image's logits depend only on that
image, so each image receives exactly its own gradient). All-class contributions for probe images
use the same trick: each image repeated a few times in one forward pass, then one backward pass
per as many explained logits, through the kept graph (:func:`neuron_contributions`). All analysed
layers share the forward and the backward passes.

Every function puts the model in eval mode and gives everything back as it was: module
``training`` flags, parameters' ``requires_grad`` and ``.grad``, and the random number generators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import (
    BatchFn,
    as_model_input,
    check_targets,
    read_logits,
)
from lightning_neurons.errors import NeuronsError
from lightning_neurons.gradients import check_gradient, gradients_at, reentrant, unreached
from lightning_neurons.hooks import HookSet, get_module, selects
from lightning_neurons.state import analysis_mode, frozen_parameters, model_device

__all__ = ["ContributionBatch", "contribution_batch", "layer_list", "neuron_contributions"]

#: :func:`neuron_contributions`: bytes of contributions that wait on the model's device before
#: they are copied to the host together.
HELD_BYTES = 2**26


# ---- batches, model state --------------------------------------------------------------------


def layer_list(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """The layer list (names, or ``name#call``; a module name selects each of its calls)."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise NeuronsError("`layers` is empty; name at least one layer")
    for name in names:
        get_module(model, name)
    return list(dict.fromkeys(names))


# ---- first order ----------------------------------------------------------------------------


@dataclass
class ContributionBatch:
    """One batch's first-order contributions (see :func:`contribution_batch`).

    Attributes:
        contributions: ``{layer: [B, K]}`` contribution of each neuron to the selected logit.
        activations: ``{layer: [B, K]}`` the neurons' activations (conv channels averaged over space).
        logits: ``[B, C]`` the model's logits.
        without_gradient: With ``without_gradient="skip"``, the call sites left out: their
            outputs carry no gradient (see :func:`contribution_batch`).
    """

    contributions: dict[str, torch.Tensor]
    activations: dict[str, torch.Tensor]
    logits: torch.Tensor
    without_gradient: list[str] = field(default_factory=list)


def contribution_batch(
    model: nn.Module,
    layers: str | Sequence[str],
    x: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    output_fn: BatchFn | None = None,
    without_gradient: Literal["raise", "skip"] = "raise",
) -> ContributionBatch:
    """Contributions of the layers' neurons to one logit per image, in one forward and one backward.

    The caller is responsible for eval mode (see :func:`neuron_contributions`, which handles it):
    the images of the batch must not influence each other's logits.

    Args:
        model: Maps ``x`` to ``[B, C]`` logits.
        layers: Module names; their outputs ``[B, K]`` or ``[B, K, H, W]`` are the neurons. A
            module run several times per forward pass gives one layer per call (``"relu"``,
            ``"relu#1"``, ...; ``"relu#1"`` selects that call only).
        x: ``[B, ...]`` input on the model's device.
        targets: ``[B]`` class whose logit is explained, per image; default: the predicted class.
        output_fn: Reads the logits from the model's output (see
            :func:`~lightning_neurons.batch.read_logits`).
        without_gradient: A layer whose output carries no gradient from the image (the model
            computes it under ``torch.no_grad()``, inside ``torch.utils.checkpoint(...,
            use_reentrant=True)``, after a ``.detach()`` or not from the image): ``"raise"``, or
            ``"skip"`` it (named in the result's ``without_gradient``).

    Returns:
        A :class:`ContributionBatch` on the model's device, detached, keyed by call site
        (float32 contributions and activations, also for a bfloat16 or float16 model).

    Raises:
        NeuronsError: For unknown layers, bad targets, a layer that is not run, or whose output
            does not depend on the input or is not batch-first.
    """
    with frozen_parameters(model):  # a whole `backward()` (reentrant checkpoints) adds to no .grad
        logits, names, acts, lost = _capture(
            model, layers, x, output_fn, without_gradient == "skip"
        )
        if targets is None:
            targets = logits.detach().argmax(dim=1)  # in range: nothing to check
        else:  # checked where they are (NeuronContribution's kept labels: the host, no GPU wait)
            targets = check_targets(targets, x.shape[0], logits.shape[1]).to(logits.device)
        selected = logits.gather(1, targets.unsqueeze(1)).sum()
        if acts and not selected.requires_grad:  # no layer's output reaches the logits in a graph
            if without_gradient == "raise":
                raise unreached(f"layers {list(names)}")
            lost, names, acts = [*lost, *names], [], []
        grads = gradients_at(selected, acts)
    activations = {  # averaged over positions (channels first: see lightning_neurons.layouts)
        name: act.flatten(2).mean(dim=2) if act.dim() > 2 else act
        for name, act in zip(names, (a.detach().float() for a in acts), strict=True)
    }
    contributions = _contributions(names, acts, grads)
    return ContributionBatch(contributions, activations, logits.detach().float(), lost)


def _capture(
    model: nn.Module,
    layers: str | Sequence[str],
    x: torch.Tensor,
    output_fn: BatchFn | None,
    skip: bool = False,
) -> tuple[torch.Tensor, list[str], list[torch.Tensor], list[str]]:
    """One forward pass of ``x`` with the layers' outputs kept on the graph: the logits, the
    call sites in the order they ran, their outputs, and (``skip``) the call sites left out
    because their outputs carry no gradient (else they raise)."""
    names = layer_list(model, layers)
    outputs: dict[str, torch.Tensor] = {}
    lost: list[str] = []

    def capture(name: str, output: torch.Tensor) -> torch.Tensor | None:
        if not (x.requires_grad or output.requires_grad) and output.is_floating_point():
            output = output.detach().requires_grad_(True)  # uint8 images: the graph starts here
        elif x.requires_grad and skip and output.is_floating_point() and not output.requires_grad:
            lost.append(name)
            return None
        elif x.requires_grad:
            check_gradient(name, output)
        outputs[name] = output
        # the model may modify our output in place further on (ReLU(inplace=True)): hand it a copy
        return output.clone()

    x = as_model_input(x.detach(), model).clone().requires_grad_(x.is_floating_point())
    hooks = HookSet()
    try:
        hooks.add(model, names, capture)
        logits = read_logits(model(x), output_fn)
    finally:
        hooks.remove()
    batch = x.shape[0]
    if logits.shape[0] != batch:
        raise NeuronsError(
            f"the model returned {logits.shape[0]} rows of logits for {batch} images"
        )
    for spec in names:
        if not any(selects([spec], name) for name in [*outputs, *lost]):
            raise NeuronsError(
                f"layer {spec!r} was not run by the model's forward; choose a layer on the path to the logits"
            )
    acts = []
    for name, act in outputs.items():
        if act.dim() < 2 or act.shape[0] != batch:
            raise NeuronsError(
                f"layer {name!r} returned a tensor of shape {tuple(act.shape)}; neurons are read from "
                f"outputs shaped [B, K], [B, K, H, W] or [B, N, D] (tokens) with B = {batch} images"
            )
        if not act.requires_grad:
            raise NeuronsError(
                f"the output of layer {name!r} does not depend on the input; nothing flows through it"
            )
        acts.append(act)
    return logits, list(outputs), acts, lost


def _contributions(
    names: Sequence[str], acts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """Per layer, activation x gradient summed over positions (float32)."""
    contributions = {}
    for name, act, grad in zip(names, acts, grads, strict=True):
        act = act.detach().float()
        grad = torch.zeros_like(act) if grad is None else grad.float()  # None: not on the path
        product = act * grad
        # channels first (see lightning_neurons.layouts): summed over positions
        contributions[name] = product.flatten(2).sum(dim=2) if act.dim() > 2 else product
    return contributions


def neuron_contributions(
    model: nn.Module,
    layers: str | Sequence[str],
    x: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    classes: torch.Tensor | None = None,
    chunk_size: int = 256,
    output_fn: BatchFn | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image contributions of the layers' neurons to the logits: which neurons drove *this*
    prediction.

    Args:
        model: Maps ``x`` to ``[B, C]`` logits. Run in eval mode inside; its state is restored.
        layers: Module names (outputs ``[B, K]`` or ``[B, K, H, W]``).
        x: ``[B, ...]`` images (any device; moved to the model's).
        targets: ``[B]`` class per image: the contribution to that class's logit, ``[B, K]``. ``None``:
            the contribution to **every** logit, ``[B, C, K]`` (costs about ``C`` forward and
            backward passes per image, batched in passes of ``chunk_size`` image-class pairs).
        classes: ``[B, L]``: with ``targets`` ``None``, the contributions to these ``L`` logits of
            each image only, ``[B, L, K]`` (row ``j`` of image ``i`` explains logit
            ``classes[i, j]``): ``L`` instead of ``C`` passes per image (at 1,000 classes, e.g.
            the top 10 logits).
        chunk_size: Image-class pairs per pass when ``targets`` is ``None``: what bounds the memory.
            As many images as fit go forward once (each repeated ``chunk_size // images`` times,
            at most ``L``); the graph is kept for the ``ceil(L / repeats)`` backward passes.
        output_fn: Reads the logits from the model's output.

    Returns:
        ``{layer: tensor}`` on the CPU, float32.

    Raises:
        NeuronsError: For unknown layers, bad targets or a non-positive ``chunk_size``.

    Example:
        >>> from lightning_neurons.models import SmallCNN
        >>> model = SmallCNN(widths=(8, 16, 32)).eval()
        >>> c = neuron_contributions(model, "features.relu3", torch.rand(4, 1, 16, 16))
        >>> c["features.relu3"].shape  # [images, classes, neurons]
        torch.Size([4, 10, 32])
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise NeuronsError(f"`chunk_size` must be a positive integer, got {chunk_size!r}")
    names = layer_list(model, layers)
    with analysis_mode(model):
        x = x.to(model_device(model))
        if targets is not None:
            out = contribution_batch(model, names, x, targets, output_fn=output_fn)
            return {n: c.float().cpu() for n, c in out.contributions.items()}
        batch = x.shape[0]
        if classes is None:
            with torch.no_grad():
                num_classes = read_logits(model(as_model_input(x[:1], model)), output_fn).shape[1]
            classes = torch.arange(num_classes).expand(batch, -1)
        else:
            classes = torch.as_tensor(classes, dtype=torch.long)
            if classes.dim() != 2 or classes.shape[0] != batch:
                raise NeuronsError(
                    f"`classes` must be [images, L] = [{batch}, L] class indices, got shape "
                    f"{tuple(classes.shape)}"
                )
        # as many images as fit go forward once (the fewest rows forward), each repeated for as
        # many logits as fit; that graph serves ceil(L / per_backward) backward passes
        per_forward = max(1, min(batch, chunk_size))
        per_backward = max(1, min(classes.shape[1], chunk_size // per_forward))
        parts = []
        for start in range(0, batch, per_forward):
            progress.update("images", min(start + per_forward, batch), batch)
            part = slice(start, start + per_forward)
            parts.append(
                _logit_contributions(model, names, x[part], classes[part], per_backward, output_fn)
            )
        return {n: torch.cat([part[n] for part in parts]) for n in parts[0]} if parts else {}


def _logit_contributions(
    model: nn.Module,
    names: list[str],
    x: torch.Tensor,
    classes: torch.Tensor,
    per_backward: int,
    output_fn: BatchFn | None,
) -> dict[str, torch.Tensor]:
    """``{layer: [B, L, K]}`` on the CPU: the contributions to logit ``classes[i, j]`` of each
    image ``i``. One forward pass of the images, each repeated ``per_backward`` times, then one
    backward pass per ``per_backward`` columns of ``classes`` through the kept graph: repeat
    ``s`` of image ``i`` explains column ``g * per_backward + s`` in pass ``g`` (in eval mode each
    row gets its own gradient). The passes' contributions wait on the model's device and go to
    the host together, one copy a layer every :data:`HELD_BYTES` (on a GPU a copy to the host
    waits for the device)."""
    batch, count = classes.shape
    logits, sites, acts, _ = _capture(model, names, x.repeat_interleave(per_backward, 0), output_fn)
    if acts and not logits.requires_grad:  # no layer's output reaches the logits in a graph
        raise unreached(f"layers {list(sites)}")
    picked = check_targets(classes.flatten(), classes.numel(), logits.shape[1], "classes")
    picked = picked.view(batch, count).to(logits.device)
    rows = torch.arange(batch, device=logits.device).unsqueeze(1) * per_backward  # [B, 1]
    whole = reentrant(logits)  # one graph for every pass
    result: dict[str, torch.Tensor] = {}
    waiting: list[dict[str, torch.Tensor]] = []  # each pass's {layer: [B, used, K]}
    done = held = 0  # columns on the host; bytes waiting
    for first in range(0, count, per_backward):
        columns = picked[:, first : first + per_backward]  # [B, r'] with r' <= per_backward
        used = columns.shape[1]
        selected = logits[
            (rows + torch.arange(used, device=rows.device)).flatten(), columns.flatten()
        ]
        last = first + per_backward >= count
        grads = gradients_at(selected.sum(), acts, retain_graph=not last, whole=whole)
        waiting.append(
            {
                name: c.view(batch, per_backward, -1)[:, :used]  # c: [B * per_backward, K]
                for name, c in _contributions(sites, acts, grads).items()
            }
        )
        held += sum(c.numel() * c.element_size() for c in waiting[-1].values())
        if last or held >= HELD_BYTES:
            done = _to_host(result, waiting, done, count)
            waiting, held = [], 0
    return result


def _to_host(
    result: dict[str, torch.Tensor], waiting: list[dict[str, torch.Tensor]], done: int, count: int
) -> int:
    """Copy the waiting passes' ``{layer: [B, used, K]}`` into ``result``'s ``[B, count, K]``
    columns from ``done`` on: one copy a layer. Returns the columns on the host after it."""
    columns = sum(next(iter(part.values())).shape[1] for part in waiting)  # each layer's
    for name in waiting[0]:
        block = torch.cat([part[name] for part in waiting], dim=1).cpu()
        if name not in result:
            result[name] = torch.empty(block.shape[0], count, block.shape[2])
        result[name][:, done : done + columns] = block
    return done + columns
