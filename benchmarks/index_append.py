"""The cost of indexing artifacts as a run grows: records appended to ``index.jsonl``.

The issue that motivated the JSON-lines index: at 1,000 classes (every record carries the class
names in its ``meta``), the old ``index.json`` was re-read and rewritten on every record, so the
first 400 records took 56 s and the next 400 took 202 s. This script writes ``--records`` records
the way the callbacks do (``AnalysisLogger.save_arrays`` of a small array with 1,000 class names
as meta) and prints the seconds taken by each half: with an O(1) append both halves cost the same
(the ``.npz`` files dominate), and :func:`load_index` reads them all back.

Run: ``python benchmarks/index_append.py [--records 800] [--classes 1000]``
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from lightning.pytorch import Trainer

from lightning_neurons.loggers import AnalysisLogger, load_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=800)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    names = [f"class_{c:04d}" for c in range(args.classes)]
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(default_root_dir=root, logger=False, enable_progress_bar=False)
        out = AnalysisLogger(trainer, "contribution")
        half = args.records // 2
        times = []
        for part in range(2):
            start = time.perf_counter()
            for i in range(part * half, (part + 1) * half):
                out.save_arrays(f"layer{i}", {"x": np.zeros(4)}, meta={"class_names": names})
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        records = load_index(out.root)
        read = time.perf_counter() - start
    print(f"records with {args.classes} class names each")
    print(
        f"  first {half}: {times[0]:.2f} s   next {half}: {times[1]:.2f} s   "
        f"ratio {times[1] / times[0]:.2f}"
    )
    print(f"  load_index of {len(records)} records: {read:.2f} s")


if __name__ == "__main__":
    main()
