"""The helpers that share work across DDP ranks, in two CPU processes (gloo): results in rank
order on every rank, sums with a rank that has nothing to add, rank zero's objects on every rank,
and a failure on one rank raised on every rank instead of a hang."""

from __future__ import annotations

import pytest
import torch
from ddp import run_ranks

from lightning_neurons.distributed import (
    Failed,
    attempt,
    broadcast_from_zero,
    gather,
    share,
    sum_over_ranks,
)
from lightning_neurons.errors import NeuronsError


def _caught(fn) -> str | None:
    try:
        fn()
    except NeuronsError as err:
        return str(err)
    return None


def _exchanges(rank: int, world: int) -> dict:
    cpu = torch.device("cpu")
    found: dict = {}
    found["gather"] = gather(attempt(lambda: [rank] * (rank + 1), world), world, "lists")

    def fail_on_one() -> int:
        if rank == 1:
            raise RuntimeError("out of memory")
        return rank

    found["gather_failed"] = _caught(lambda: gather(attempt(fail_on_one, world), world, "x"))
    # rank 1 has nothing to add: zeros of rank 0's shapes and types
    mine = {"n": torch.tensor([3, 4]), "s": torch.tensor([0.5], dtype=torch.float64)}
    summed = sum_over_ranks(mine if rank == 0 else None, world, cpu, "sums")
    found["sum_none"] = {k: (v.tolist(), str(v.dtype)) for k, v in summed.items()}
    both = sum_over_ranks({"n": torch.tensor([rank + 1])}, world, cpu, "sums")
    found["sum"] = both["n"].tolist()
    found["sum_failed"] = _caught(
        lambda: sum_over_ranks(
            Failed("boom") if rank == 0 else {"n": torch.ones(1)}, world, cpu, "sums"
        )
    )
    found["sum_nobody"] = sum_over_ranks(None, world, cpu, "sums")
    found["broadcast"] = broadcast_from_zero(lambda: {"from": rank}, rank, world, "clusters")

    def zero_fails() -> int:
        raise ValueError("no clusters")

    found["broadcast_failed"] = _caught(
        lambda: broadcast_from_zero(zero_fails, rank, world, "reading clusters")
    )
    found["after"] = gather(rank, world, "still in step")  # no rank was left behind
    return found


@pytest.mark.slow
def test_two_ranks_share_gather_sum_and_broadcast_and_failures_reach_every_rank():
    found = run_ranks(_exchanges, 2)
    for rank in (0, 1):
        got = found[rank]
        assert got["gather"] == [[0], [1, 1]]
        assert got["gather_failed"] == "x failed on rank 1: RuntimeError: out of memory"
        assert got["sum_none"] == {"n": ([3, 4], "torch.int64"), "s": ([0.5], "torch.float64")}
        assert got["sum"] == [3]
        assert got["sum_failed"] == "sums failed on rank 0: boom"
        assert got["sum_nobody"] is None
        assert got["broadcast"] == {"from": 0}
        assert (
            got["broadcast_failed"] == "reading clusters failed on rank 0: ValueError: no clusters"
        )
        assert got["after"] == [0, 1]


def test_share_and_one_process():
    assert [share(5, r, 2) for r in range(2)] == [slice(0, 2), slice(2, 5)]
    assert [share(2, r, 3) for r in range(3)] == [slice(0, 0), slice(0, 1), slice(1, 2)]
    # one process: nothing exchanged, errors propagate unchanged
    assert gather(attempt(lambda: 7, 1), 1, "x") == [7]
    with pytest.raises(RuntimeError, match="boom"):
        attempt(lambda: (_ for _ in ()).throw(RuntimeError("boom")), 1)
    assert sum_over_ranks({"a": torch.ones(2)}, 1, torch.device("cpu"), "x")["a"].tolist() == [
        1.0,
        1.0,
    ]
    assert broadcast_from_zero(lambda: "mine", 0, 1, "x") == "mine"


def _fail_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise RuntimeError("rank one broke")
    gather(rank, world, "waiting for rank one")  # rank 0 would wait here forever
    return rank


def _sleep(rank: int, world: int, seconds: float) -> None:
    import time

    time.sleep(seconds)


@pytest.mark.slow
def test_the_harness_reports_a_failing_rank_and_a_run_past_its_time():
    import torch.multiprocessing as mp

    # whichever process spawn sees end first is reported: rank 1's own error, or rank 0's
    # collective losing its peer (gloo: "Connection closed by peer" or "... reset by peer");
    # either way the failure surfaces instead of a hang
    with pytest.raises(mp.ProcessRaisedException, match="rank one broke|by peer"):
        run_ranks(_fail_on_rank_one, 2, timeout=120)
    with pytest.raises(TimeoutError, match="_sleep passed 2 s"):
        run_ranks(_sleep, 2, 60.0, timeout=2)
