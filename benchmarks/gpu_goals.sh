#!/usr/bin/env bash
# Issue 20's GPU goals in one run, sized for a lent GPU machine (about 6 minutes on an H200):
# ResNet-50 (weights None) at 1,000 classes, 3 epochs of 2,560 training and 20,000 validation
# images at 32 px, with scale.py:
#   1. the tracker's per-batch overhead: 3 rounds of a bare and a tracked fit, interleaved,
#      each tracked fit paired with its round's bare fit (goal: <= 5%);
#   2. every analysis: seconds per analysed epoch, first and later (goal: <= 20 s), and peak
#      host memory of the process and its figure workers (goal: <= 4 GB), with the 12 longest
#      phases and the peak during each;
#   3. not a goal, a check no CPU can make: the tracker's statistics of a model compiled with
#      CUDA graphs (mode "reduce-overhead", fullgraph) against the eager model's
#      (compiled_statistics.py; last, so that a slow compile costs no goal's figures).
# Usage, from the repository root: bash benchmarks/gpu_goals.sh [OUT_DIR] (default: $OUT, else
# ./gpu_goals). hdbscan wheels in .whl/ (untracked: carry the folder to the machine) are
# installed into /tmp/site first (a machine without network access; the one whose Python
# matches). Make them where pip reaches a registry, one per Python the machine may have:
#   for v in 3.10 3.11 3.12 3.13; do pip download hdbscan==0.8.44 --no-deps --only-binary=:all: \
#       --python-version $v --platform manylinux2014_x86_64 -d .whl; done
# machine.txt says whether hdbscan could be imported (without it NeuronClustering's default
# fails, and the run measures less). Each step has its own time limit, so the first step's
# figures survive a slow second step.
set -u
out=${1:-${OUT:-gpu_goals}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir \
        --target /tmp/site hdbscan
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nproc
    python3 --version
    python3 -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)"
    python3 -c "import hdbscan, importlib.metadata as m; print('hdbscan', m.version('hdbscan'))" \
        || echo "hdbscan: NOT importable"
} >"$out/machine.txt" 2>&1
common=(--model resnet50 --device cuda --classes 1000 --val-images 20000 --train-images 2560
    --epochs 3 --threads 8)
timeout 300 python3 benchmarks/scale.py "${common[@]}" --callbacks tracker --repeats 3 \
    2>&1 | tee "$out/tracker.txt"
timeout 240 python3 benchmarks/scale.py "${common[@]}" --callbacks all --phases 12 \
    2>&1 | tee "$out/all.txt"
timeout 120 python3 benchmarks/compiled_statistics.py --device cuda --fullgraph \
    2>&1 | tee "$out/compiled.txt"
