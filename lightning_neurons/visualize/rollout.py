"""Attention rollout: where a vision transformer looks, from its attention maps.

- plain rollout (Abnar & Zuidema 2020), the default: each block's attention averaged over its
  heads, the residual added (``(A + I) / 2``, rows summing to 1), the blocks' matrices
  multiplied from the first to the last; the same for every class;
- gradient-weighted rollout (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability"),
  ``weighted=True``: each block's attention times its gradient from the target logit, its
  positive part averaged over the heads, accumulated as ``R <- R + A_w R`` from ``R = I``;
  class-specific. On the small ViTs of ``benchmarks/gradcam_layers.py`` the plain rollout
  deleted and inserted better (docs/benchmarks.md).

The map is the class token's row over the patch tokens (a model without a class token, which
pools its tokens: the rows' mean), on the patch grid (tokens out of raster order, Hiera's, put
back by the model's own ``reroll``), upsampled to the image as Grad-CAM's.

The attention probabilities are read where they are made, whoever writes the model: while the
maps are taken, :func:`torch.nn.functional.scaled_dot_product_attention` (timm's and Hugging
Face's ViTs by default, ``nn.MultiheadAttention``, also when asked for its weights as tutorials
call it) is replaced by the same product written out, and every softmax over the last axis of a
``[N, heads, queries, keys]`` tensor (``Tensor.softmax``, ``torch.softmax``, ``F.softmax``:
timm's ``fused_attn=False``, Hugging Face's ``attn_implementation="eager"``, attention written
by hand) is kept; a ``torch.compile``'d model runs its code as written (``force_eager``)
meanwhile. Blocks whose attention is not over the image's tokens (pooling attention, windows)
are left out of the product.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lightning_neurons.batch import BatchFn, InputTransform, as_model_input, to_model_input
from lightning_neurons.errors import NeuronsError
from lightning_neurons.gradients import gradients_at
from lightning_neurons.layouts import image_token_grid, token_order
from lightning_neurons.state import analysis_mode, compiled_as_written, model_device
from lightning_neurons.visualize.probe import (
    Probe,
    class_logits,
    logits_without_graph,
    probe_targets,
    row_chunks,
)

__all__ = ["attention_rollout", "recorded_attention"]


def _explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` written out: its softmax is one that
    :func:`recorded_attention` keeps (no dropout: the maps are taken in eval mode)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = (t.repeat_interleave(repeat, dim=-3) for t in (key, value))
    scores = (query @ key.transpose(-2, -1)) * (scale or 1.0 / math.sqrt(query.shape[-1]))
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores.float().softmax(dim=-1).to(query.dtype) @ value


def _is_attention(probs: object, dim: object) -> bool:
    """Whether a softmax's output is attention probabilities: ``[N, heads, queries, keys]``,
    normalised over the keys."""
    return isinstance(probs, torch.Tensor) and probs.dim() == 4 and dim in (-1, 3)


def _weights_from_sdpa(
    real: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    store: list[torch.Tensor],
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) asked for its weights
    (``need_weights=True``, its default), which it computes as ``[N x heads, L, S]`` whose heads
    cannot be told apart: run through ``scaled_dot_product_attention`` instead (recorded as
    ``[N, heads, L, S]``), its weights then made of the recorded ones as the real call makes
    them (averaged over the heads unless ``average_attn_weights=False``)."""
    call = _MHA_SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    if not call.arguments["need_weights"]:
        return real(*args, **kwargs)
    before = len(store)
    call.arguments["need_weights"] = False
    output, _ = real(*call.args, **call.kwargs)
    if len(store) != before + 1:  # not the one product expected: the call as it was made
        del store[before:]
        return real(*args, **kwargs)
    weights = store[-1].to(output.dtype)
    if call.arguments["average_attn_weights"]:
        weights = weights.mean(dim=1)
    return output, weights if call.arguments["query"].dim() == 3 else weights.squeeze(0)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@contextlib.contextmanager
def recorded_attention() -> Iterator[list[torch.Tensor]]:
    """Inside the block, the attention probabilities computed on this thread (see the module's
    description: ``scaled_dot_product_attention`` written out, softmaxes over the keys of
    ``[N, heads, queries, keys]`` scores) are appended, in the autograd graph, to the list it
    yields; other threads run as they were; everything is restored on exit."""
    store: list[torch.Tensor] = []
    owner = threading.get_ident()
    real_sdpa, real_mha = F.scaled_dot_product_attention, F.multi_head_attention_forward
    real_function = torch.softmax
    own_method = torch.Tensor.__dict__.get("softmax")  # None: TensorBase's

    def sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        if threading.get_ident() != owner:
            return real_sdpa(*args, **kwargs)
        return _explicit_attention(*args, **kwargs)

    def mha(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if threading.get_ident() != owner:
            return real_mha(*args, **kwargs)
        return _weights_from_sdpa(real_mha, store, *args, **kwargs)

    def recording(real: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def softmax(*args: Any, **kwargs: Any) -> torch.Tensor:
            probs = real(*args, **kwargs)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if threading.get_ident() == owner and _is_attention(probs, dim):
                store.append(probs)
            return probs

        return softmax

    F.scaled_dot_product_attention = sdpa
    F.multi_head_attention_forward = mha
    torch.softmax = recording(real_function)
    torch.Tensor.softmax = recording(torch.Tensor.softmax)  # type: ignore[method-assign]
    try:
        with compiled_as_written():
            yield store
    finally:
        F.scaled_dot_product_attention = real_sdpa
        F.multi_head_attention_forward = real_mha
        torch.softmax = real_function
        if own_method is None:
            del torch.Tensor.softmax
        else:
            torch.Tensor.softmax = own_method  # type: ignore[method-assign]


def attention_rollout(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    weighted: bool = False,
    input_transform: InputTransform | None = None,
    batch_size: int | None = None,
    output_fn: BatchFn | None = None,
) -> torch.Tensor:
    """Attention rollout maps of a vision transformer (see the module's description).

    Args:
        model: Maps model inputs to logits; its attention is read as the module's description
            says (fused or written out).
        images: ``[N, C, H, W]`` display images.
        target: Class per image (or one for all) of the weighted rollout; default: the
            predicted class. The plain rollout does not depend on it.
        weighted: Chefer et al.'s gradient-weighted rollout (class-specific); ``False``: Abnar
            and Zuidema's plain rollout.
        input_transform: Display image -> model input.
        batch_size: Images per forward pass (default: chunks bounded in memory).
        output_fn: Reads the logits from the model's output.

    Returns:
        ``[N, H, W]`` non-negative maps (CPU, float32).

    Raises:
        NeuronsError: When no attention over the image's patch tokens is seen, or the logits
            have no graph (``weighted``).
    """
    device = model_device(model)
    with analysis_mode(model):
        images = images.detach().clone().to(device)
        probe = Probe(model, images, input_transform, output_fn)
        target = probe_targets(probe, target) if weighted else None
        n, maps = images.shape[0], []
        extra = 0 if batch_size or n <= 4 else _attention_elements(model, images, input_transform)
        for part in row_chunks(n, batch_size, probe, extra):
            part_target = None if target is None else target[part]
            maps.append(_rollout_maps(model, images[part], part_target, input_transform, output_fn))
    return torch.cat(maps).float().cpu()


def _rollout_maps(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor | None,
    input_transform: InputTransform | None,
    output_fn: BatchFn | None,
) -> torch.Tensor:
    # an input that requires a gradient: a graph through the attention (the parameters are
    # frozen), and no fused kernel (nn.MultiheadAttention's fast path skips the recorded call)
    x = images.detach().requires_grad_(True)
    with recorded_attention() as store:
        logits = class_logits(model, x, input_transform, output_fn)
    height, width = images.shape[-2:]
    blocks = _image_attention(store, images.shape[0], (height, width), model)
    grads: list[torch.Tensor | None] = [None] * len(blocks)
    if target is not None:
        if not logits.requires_grad:
            raise logits_without_graph()
        grads = gradients_at(logits.gather(1, target.view(-1, 1)).sum(), blocks)
    n, tokens = images.shape[0], blocks[0].shape[-1]
    eye = torch.eye(tokens, device=images.device)
    relevance = eye.expand(n, tokens, tokens)
    for probs, grad in zip(blocks, grads, strict=True):
        attention = probs.detach().float()
        if target is None:  # plain: heads averaged, the residual added, rows summing to 1
            mixed = 0.5 * attention.mean(dim=1) + 0.5 * eye
            relevance = (mixed / mixed.sum(dim=-1, keepdim=True)) @ relevance
        elif grad is not None:  # weighted: (gradient x attention)+ averaged over the heads
            weighted = (grad.float() * attention).clamp_min(0).mean(dim=1)
            relevance = relevance + weighted @ relevance
    grid = image_token_grid(tokens, (height, width))
    assert grid is not None  # _image_attention kept only such blocks
    prefix = tokens - grid[0] * grid[1]
    rows = relevance[:, 0] if prefix else relevance.mean(dim=1)  # the class token's, or all
    patches = rows[:, prefix:]
    index = _grid_order(model, patches.shape[-1])
    if index is not None:  # Hiera's unrolled tokens, put back on the grid
        patches = patches[:, index.to(patches.device)]
    cells = patches.reshape(n, 1, *grid)
    up = F.interpolate(cells, size=(height, width), mode="bilinear", align_corners=False)
    return up[:, 0].clamp_min(0).detach()


def _grid_order(model: nn.Module, tokens: int) -> torch.Tensor | None:
    """The token on each cell of the grid (:func:`~lightning_neurons.layouts.token_order`) for
    ``tokens`` patch tokens out of raster order (Hiera's unrolled ones: read where a block or
    stage of that many tokens puts them back); ``None`` when they are in raster order."""
    for name, _ in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in ("blocks", "stages") and parts[-1].isdigit():
            index = token_order(model, name, tokens)
            if index is not None:
                return index
    return None


def _over_image(probs: torch.Tensor, n: int, size: tuple[int, int]) -> bool:
    """Whether recorded attention probabilities are ``[n, heads, T, T]`` self-attention over
    the ``n`` images' tokens (``T``: a patch grid with at most a few leading tokens); attention
    within windows (``[n x windows, ...]``) is not."""
    return (
        probs.dim() == 4
        and probs.shape[0] == n
        and probs.shape[-1] == probs.shape[-2]
        and image_token_grid(probs.shape[-1], size) is not None
    )


def _image_attention(
    store: list[torch.Tensor], n: int, size: tuple[int, int], model: nn.Module
) -> list[torch.Tensor]:
    """The recorded self-attention over the ``n`` images' tokens (:func:`_over_image`), of the
    most common token count."""
    on_grid = [p for p in store if _over_image(p, n, size)]
    if not on_grid:
        raise NeuronsError(
            f"attention rollout saw no self-attention over the image's patch tokens in "
            f"{type(model).__name__} ({len(store)} attention softmaxes seen, none [N, heads, T, T] "
            f"over the {n} images' patch grid): it reads the probabilities of "
            "torch.nn.functional.scaled_dot_product_attention and of softmaxes over the keys "
            "of [N, heads, queries, keys] scores; use 'integrated' or 'gradient' maps for "
            "other models"
        )
    counts: dict[int, int] = {}
    for p in on_grid:
        counts[p.shape[-1]] = counts.get(p.shape[-1], 0) + 1
    tokens = max(counts, key=lambda t: (counts[t], t))
    return [p for p in on_grid if p.shape[-1] == tokens]


def _attention_of(
    model: nn.Module, image: torch.Tensor, input_transform: InputTransform | None
) -> list[torch.Tensor]:
    """The attention probabilities recorded in one forward pass of ``image`` (a display image;
    no logits read)."""
    with analysis_mode(model), recorded_attention() as store:
        x = to_model_input(image.detach().to(model_device(model)), input_transform)
        model(as_model_input(x, model).requires_grad_(True))  # no fused fast path
    return store


def _attention_elements(
    model: nn.Module, images: torch.Tensor, input_transform: InputTransform | None
) -> int:
    """Elements a row of the rollout keeps beyond its layer outputs: all its blocks' attention
    probabilities (``heads x T^2`` each) and, as much again, their gradients or products."""
    return 2 * sum(p.numel() for p in _attention_of(model, images[:1], input_transform))


def has_image_attention(
    model: nn.Module, image: torch.Tensor, input_transform: InputTransform | None = None
) -> bool:
    """Whether one forward pass of ``image`` (``[1, C, H, W]``, a display image) computes
    attention over the image's patch tokens (:func:`recorded_attention`): whether
    :func:`attention_rollout` can map the model."""
    store = _attention_of(model, image, input_transform)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    return any(_over_image(p, image.shape[0], size) for p in store)
