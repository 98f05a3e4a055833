"""One harness for every DDP test: N CPU processes (gloo), one function per rank.

`run_ranks(fn, world_size, *args)` spawns ``world_size`` fresh processes with
``torch.multiprocessing`` (start method "spawn"), joins them into one gloo process group and calls
``fn(rank, world_size, *args)`` in each. It returns the ranks' return values, in rank order, once
every rank has finished. A rank that raises fails the call with that rank's traceback (the other
ranks are terminated, so nothing waits at a collective); a run longer than ``timeout`` seconds
is terminated and fails too.

Each process is set up as an external launcher (torchrun, SLURM) sets it up, so a Lightning
``Trainer(accelerator="cpu", devices=world_size, strategy="ddp")`` built inside ``fn`` joins the
group that is already there instead of launching processes of its own; ``devices=1`` with the
default strategy is the one-process reference. Raw ``torch.distributed`` calls work as well.

Rules for ``fn`` and its arguments (they cross a process boundary):

- ``fn`` is a module-level function of a test module (pickled by name), its arguments and its
  return value are picklable: tensors, numbers, lists, dicts, dataclasses, paths. Return only
  what the test compares (numbers, not models).
- Each process starts from nothing: seed it (``pl.seed_everything``) and build the model and the
  data inside ``fn``. Patch what the test needs inside ``fn``, with ``unittest.mock.patch``; the
  patch lives and dies with the process.
- Every process runs with one thread (``torch.set_num_threads(1)``) and warnings ignored.

Example:
    >>> def count_images(rank, world_size, folder):
    ...     trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", ...)
    ...     trainer.validate(model, datamodule=data, verbose=False)
    ...     return tracker.results["fc"].counts
    >>> one, two = run_ranks(count_images, 1, tmp_path), run_ranks(count_images, 2, tmp_path)
    >>> torch.equal(one[0], two[0]) and torch.equal(two[0], two[1])
"""

from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks"]

#: Seconds a whole run may take by default; a rank left waiting at a collective ends here.
TIMEOUT = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Seconds before the deadline at which a rank still running writes every thread's stack.
_STACKS_BEFORE = 10.0


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    folder: str,
    port: int,
    timeout: float,
) -> None:
    """The body of one spawned process: the group, ``fn``, its result saved for the parent.

    A rank still running shortly before the deadline writes its threads' stacks to
    ``rank<N>.stacks`` (shown in the parent's ``TimeoutError``), at the moment and in the place
    where it waits: a hang in CI explains itself."""
    stacks = open(Path(folder) / f"rank{rank}.stacks", "w")  # noqa: SIM115 - open until exit
    faulthandler.dump_traceback_later(max(1.0, timeout - _STACKS_BEFORE), file=stacks)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    group_file = f"file://{folder}/group"
    dist.init_process_group("gloo", init_method=group_file, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        # Close the group before the interpreter exits: its gloo threads may otherwise still be
        # joinable when the C++ statics are destroyed (SIGABRT at exit).
        if dist.is_initialized():
            dist.destroy_process_group()


def _stacks(folder: str, rank: int) -> str:
    path = Path(folder) / f"rank{rank}.stacks"
    text = path.read_text() if path.exists() else ""
    return f"\n\nrank {rank}'s threads {_STACKS_BEFORE:.0f} s before the deadline:\n{text or '(none written)'}"


def run_ranks(
    fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = TIMEOUT
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo CPU processes.

    Args:
        fn: A module-level function (pickled by name) taking the rank, the world size and
            ``args``; its return value must be picklable (``torch.save``).
        world_size: How many processes; 1 gives the one-process reference under the same setup.
        *args: Picklable arguments passed to every rank.
        timeout: Seconds the whole run may take before every process is terminated.

    Returns:
        Each rank's return value, in rank order.

    Raises:
        torch.multiprocessing.ProcessRaisedException: A rank raised (its traceback is in the
            message); the other ranks were terminated.
        torch.multiprocessing.ProcessExitedException: A rank died (a signal, a hard exit).
        TimeoutError: The run took longer than ``timeout``.
    """
    with tempfile.TemporaryDirectory(prefix="ddp-") as folder:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, args, folder, _free_port(), timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                    process.join()
                running = [r for r, p in enumerate(context.processes) if p.exitcode != 0]
                raise TimeoutError(
                    f"DDP run of {fn.__name__} passed {timeout:.0f} s; ranks {running}"
                    + "".join(_stacks(folder, r) for r in running)
                )
        return [
            torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
        ]
