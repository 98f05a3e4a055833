"""Work shared across DDP ranks: split a list of work items, gather or sum the results, and make
sure that a failure on one rank is reported on every rank instead of leaving the others waiting in
a collective.

The pattern of every shared step: each rank does a contiguous share of the items and every rank
gets every rank's results, in rank order::

    parts = map_shares(lambda part: compute(items[part]), len(items), rank, world, "saliency")
    maps = concat(parts)  # one process's result; raises on every rank if any rank failed

Every rank must make the same collective calls in the same order, so a step runs its local work
inside :func:`attempt` (which turns an exception into a :class:`Failed` value under DDP) and hands
the outcome to the collective, which raises :class:`~lightning_neurons.errors.NeuronsError` on
every rank when any rank failed. With one process (``world == 1``) nothing is exchanged and
exceptions propagate unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lightning_neurons.errors import NeuronsError

T = TypeVar("T")

__all__ = [
    "Failed",
    "attempt",
    "broadcast_from_zero",
    "concat",
    "gather",
    "gather_all",
    "map_shares",
    "share",
    "sum_over_ranks",
]


@dataclass(frozen=True)
class Failed:
    """A rank's local step failed with ``message`` (``"RuntimeError: out of memory"``)."""

    message: str


def share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items: ``n * rank // world`` up to
    ``n * (rank + 1) // world`` (the shares of all ranks, in rank order, are the ``n`` items).

    Example:
        >>> [share(5, r, 2) for r in range(2)]
        [slice(0, 2, None), slice(2, 5, None)]
    """
    return slice(n * rank // world, n * (rank + 1) // world)


def attempt(fn: Callable[[], T], world: int) -> T | Failed:
    """``fn()``; under DDP (``world > 1``) an exception becomes a :class:`Failed` to be reported
    on every rank by the next collective (:func:`gather`, :func:`sum_over_ranks`,
    :func:`broadcast_from_zero`)."""
    if world == 1:
        return fn()
    try:
        return fn()
    except Exception as err:  # reported on every rank by the next collective
        return Failed(f"{type(err).__name__}: {err}")


def _raise_failures(outcomes: list[Any], what: str) -> None:
    failed = [f"rank {r}: {o.message}" for r, o in enumerate(outcomes) if isinstance(o, Failed)]
    if failed:
        raise NeuronsError(f"{what} failed on {'; '.join(failed)}")


def gather(mine: T | Failed, world: int, what: str) -> list[T]:
    """Every rank's ``mine``, in rank order, on every rank (``torch.distributed.all_gather_object``).

    Raises:
        NeuronsError: On every rank, when ``mine`` is a :class:`Failed` on any rank.
    """
    if world == 1:
        if isinstance(mine, Failed):  # pragma: no cover - attempt() raises with one process
            raise NeuronsError(f"{what} failed: {mine.message}")
        return [mine]
    import torch.distributed as dist

    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, mine)
    _raise_failures(outcomes, what)
    return outcomes


def gather_all(fn: Callable[[], T], world: int, what: str) -> list[T]:
    """Every rank's ``fn()``, in rank order, on every rank: :func:`attempt` then :func:`gather`.

    Raises:
        NeuronsError: On every rank, when ``fn`` failed on any rank (with one process, ``fn``'s
            own exception).
    """
    return gather(attempt(fn, world), world, what)


def map_shares(
    fn: Callable[[slice], T | None], n: int, rank: int, world: int, what: str
) -> list[T]:
    """Each rank runs ``fn`` on its contiguous :func:`share` of ``n`` items, and every rank gets
    every rank's results in rank order: the results of one process that ran ``fn`` on the
    shares one after the other (join them with :func:`concat`).

    ``fn`` is not called on an empty share; results that are ``None`` are left out.

    Example:
        >>> map_shares(lambda part: list(range(5))[part], 5, rank=0, world=1, what="counting")
        [[0, 1, 2, 3, 4]]

    Raises:
        NeuronsError: On every rank, when ``fn`` failed on any rank (with one process, ``fn``'s
            own exception).
    """
    part = share(n, rank, world)
    done = gather_all(lambda: fn(part) if part.stop > part.start else None, world, what)
    return [result for result in done if result is not None]


def concat(parts: Sequence[Any]) -> Any:
    """``parts`` of one structure joined along the first dimension: tensors are concatenated,
    tuples and lists element by element, dicts key by key (the first part's keys, in its order).

    Example:
        >>> concat([(torch.zeros(1), {"a": torch.ones(2)}), (torch.zeros(2), {"a": torch.ones(1)})])
        (tensor([0., 0., 0.]), {'a': tensor([1., 1., 1.])})
    """
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        return {key: concat([p[key] for p in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        joined = [concat([p[i] for p in parts]) for i in range(len(first))]
        return type(first)(joined)
    raise TypeError(f"concat joins tensors, tuples, lists and dicts of them, not {type(first)}")


def broadcast_from_zero(fn: Callable[[], T], rank: int, world: int, what: str) -> T:
    """``fn()`` run on rank zero alone, its result sent to every rank
    (``torch.distributed.broadcast_object_list``): results that exist on rank zero only, such as
    NeuronClustering's clusters.

    Raises:
        NeuronsError: On every rank, when ``fn`` failed on rank zero.
    """
    if world == 1:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [attempt(fn, world) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    _raise_failures([box[0]], what)
    return box[0]


def sum_over_ranks(
    mine: Mapping[str, torch.Tensor] | Failed | None,
    world: int,
    device: torch.device,
    what: str,
) -> dict[str, torch.Tensor] | None:
    """The element-wise sum over ranks of every rank's named tensors, on every rank (on the CPU).

    ``mine`` is ``None`` on a rank that has nothing to add (no data): it adds zeros of the shapes
    and types that the other ranks give. Names and shapes are agreed first (one small
    ``all_gather_object``, which also carries failures), then each tensor is summed with
    ``all_reduce`` on ``device`` (the process group's device: CUDA under NCCL) in its own type, so
    float64 sums stay float64 and integer counts exact.

    Returns:
        ``{name: sum}`` in the order of the first rank that has tensors; ``None`` when no rank has.

    Raises:
        NeuronsError: On every rank, when ``mine`` is a :class:`Failed` on any rank, or the ranks'
            names or shapes differ.
    """
    if world == 1:
        if isinstance(mine, Failed):  # pragma: no cover - attempt() raises with one process
            raise NeuronsError(f"{what} failed: {mine.message}")
        return None if mine is None else dict(mine)
    import torch.distributed as dist

    spec = None if isinstance(mine, Failed) or mine is None else _spec(mine)
    specs = gather(mine if isinstance(mine, Failed) else spec, world, what)
    known = [s for s in specs if s is not None]
    if not known:
        return None
    if any(s != known[0] for s in known):
        raise NeuronsError(f"{what}: the ranks computed different tensors ({known})")
    assert mine is None or not isinstance(mine, Failed)
    summed = {}
    for name, (shape, dtype) in known[0].items():
        local = mine[name] if mine is not None else torch.zeros(shape, dtype=getattr(torch, dtype))
        buffer = local.detach().to(device).clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        summed[name] = buffer.cpu()
    return summed


def _spec(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()
    }
