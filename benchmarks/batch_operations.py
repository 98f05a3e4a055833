"""What the callbacks add to each training-loop batch on a GPU, counted on the CPU: operations.

The GPU goal for the tracker (its per-batch overhead <= 5% of the step, ResNet-50 at 1,000
classes and 32 px) is about a step that the host bounds: a GPU runs ResNet-50's kernels on 64
images of 32 px faster than the host queues them. What the callbacks add to such a step is, to a
first approximation, the kernels they launch and the Python around them. This script validates
``ImageClassifier(torchvision <model>, weights=None)`` on random images with the accelerator's
code paths chosen (the tracker's label check deferred, no finite-sum shortcut, the accelerator's
flush sizes), and counts the operations dispatched inside the validation batches, for the bare
model, the tracker alone and every callback. Views, and conversions that return their input,
launch no kernel and are not counted; neither are the reads of host memory. The flushes of the
tracker's held batches are counted over the whole epoch (its end included) and spread over its
batches. Each setup runs in a fresh process.

    python benchmarks/batch_operations.py                      # ResNet-50, 128 batches of 64
    python benchmarks/batch_operations.py --setups none tracker --batches 256

(It runs on earlier commits too: copy it into their ``benchmarks/``; it counts the library of
the worktree it lies in.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the library of the worktree this script lies in (copied into an older one, that one's)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count(model_name: str, setup: str, batches: int, classes: int) -> dict:
    """Run one setup in this process; return its counts per batch."""
    import lightning.pytorch as pl
    import scale
    import torch
    import torchvision
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_neurons import batch as ln_batch
    from lightning_neurons import stats

    try:  # where HeldBatches lies (lightning_neurons.stats before it had a module of its own)
        from lightning_neurons import held
    except ImportError:
        held = stats
    from lightning_neurons.models import ImageClassifier

    # the accelerator's code paths (see the docstrings of these names)
    stats._all_finite = lambda values: False
    if hasattr(held.HeldBatches, "limits"):
        limits = held.HeldBatches.limits
        held.HeldBatches.limits = lambda self, device: limits(self, torch.device("meta"))
    else:  # before HeldBatches.limits: one bound per layer
        held.FLUSH_VALUES, held.FLUSH_ROWS = held.FLUSH_VALUES_DEVICE, held.FLUSH_ROWS_DEVICE
    init = ln_batch.LabelRange.__init__
    ln_batch.LabelRange.__init__ = lambda self, defer=None: init(self, True)

    where = {"batch": False, "flush": False, "first": True}
    in_first, in_batches, in_flushes = Counter(), Counter(), Counter()

    def storages(x: object) -> set[int]:
        items = x if isinstance(x, list | tuple) else [x]
        return {t.untyped_storage().data_ptr() for t in items if isinstance(t, torch.Tensor)}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not (where["batch"] or where["flush"]):
                return out
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "item"):
                return out  # host memory read (the label check's copy)
            if not name.endswith("_"):
                made, given = storages(out), set().union(*map(storages, args)) if args else set()
                if made and made <= given:
                    return out  # a view, or a conversion that returned its input
            if where["flush"]:
                in_flushes[name] += 1
            else:
                (in_first if where["first"] else in_batches)[name] += 1
            return out

    add = held.HeldBatches._add

    def counted_add(*a):
        where["flush"] = True
        try:
            return add(*a)
        finally:
            where["flush"] = False

    held.HeldBatches._add = staticmethod(counted_add)

    class Window(pl.Callback):
        def __init__(self, opens: bool) -> None:
            self.opens = opens

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, *args):
            if self.opens:
                where["batch"], where["first"] = True, batch_idx == 0

        def on_validation_batch_end(self, *args, **kwargs):
            if not self.opens:
                where["batch"] = False

    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    n = 64 * batches
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    backbone = getattr(torchvision.models, model_name)(weights=None, num_classes=classes)
    model = ImageClassifier(backbone, num_classes=classes)
    callbacks = [Window(True), *scale.make_callbacks(setup, hdbscan_ok=False), Window(False)]
    trainer = pl.Trainer(
        logger=TensorBoardLogger(tempfile.mkdtemp(prefix="ln-batch-ops-")),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    data = DataLoader(TensorDataset(x, torch.arange(n) % classes), batch_size=64)
    with Count():
        trainer.validate(model, data, verbose=False)
    return {
        "first": dict(in_first),
        "batch": {k: v / (batches - 1) for k, v in in_batches.items()},
        "flush": {k: v / batches for k, v in in_flushes.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=128, help="validation batches of 64")
    parser.add_argument("--setups", nargs="+", default=["none", "tracker", "all"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(count(args.model, args.child, args.batches, args.classes)))
        return
    results = {}
    for setup in args.setups:
        command = [sys.executable, __file__, "--child", setup, "--model", args.model]
        command += ["--batches", str(args.batches), "--classes", str(args.classes)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[setup] = json.loads(done.stdout.strip().splitlines()[-1])
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    print(
        f"{args.model}, {args.classes} classes, 32 px, {args.batches} validation batches of 64, "
        "accelerator code paths: operations that launch a kernel, per batch. 'later': batches "
        "2 on; 'epoch': the first batch's (the statistics made), the later ones' and every "
        "flush (the epoch end's too) over the epoch's batches"
    )
    epochs = {}
    for setup, counts in results.items():
        later, flushes = sum(counts["batch"].values()), sum(counts["flush"].values())
        first = sum(counts["first"].values())
        epochs[setup] = (first + later * (args.batches - 1)) / args.batches + flushes
        line = (
            f"  {setup:8s} later {later:7.2f}, flushes {flushes:5.2f}, epoch {epochs[setup]:7.2f}"
        )
        if "none" in epochs and setup != "none":
            bare = epochs["none"]
            line += f"; added {epochs[setup] - bare:6.2f} ({epochs[setup] / bare - 1:+.1%})"
        print(line)
        if "none" in results and setup != "none":
            extra = Counter(counts["batch"]) + Counter(counts["flush"])
            extra.subtract(results["none"]["batch"])
            common = ", ".join(f"{op} {n:.2f}" for op, n in extra.most_common(8) if n > 0.005)
            print(f"           (later batches and flushes, most added: {common})")


if __name__ == "__main__":
    main()
