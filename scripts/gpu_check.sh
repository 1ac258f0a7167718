#!/usr/bin/env bash
# The one-shot GPU check: one CUDA GPU, at most 8 minutes on an H200 (the budget; each part also has a timeout, so one
# hang cannot eat the rest). It runs with the Python it finds (PYTHON, default python3) when that has a CUDA build of
# torch (no venv), installs only what that Python lacks or holds at a version outside pyproject.toml's ranges, from a
# wheels folder (pip install --no-index --no-deps --target SITE), puts SITE and this repository first on PYTHONPATH, runs
# the parts below, prints one summary table and writes the docs blocks. Exit status: 0 when no part failed, 1 when one
# did, 2 when it cannot run here (no CUDA GPU: within seconds, before installing anything; no CUDA torch in PYTHON; a
# missing dependency with no wheel for it). Missed speed goals are reported in the table, they do not fail the check.
#
# Parts, in the order they run (expected time on one H200, estimated from the first H200 run; timeout):
#   install    missing dependencies from WHEELS (pip --no-deps --target SITE), then an import check    ~10 s
#   tests      pytest -m cuda: the CUDA-marked tests (Triton kernels compiled for the GPU, trainer     100 s / 200 s
#              steps against dense float64, the sync-free step) except the whole jobs below
#   speed      benchmark_speed.py --in-process at 4 pairs x 1,024 and 8 pairs x 2,048 tokens           120 s / 230 s
#              (Qwen2.5-0.5B shape, LoRA, bf16): DPO, TDPO2, TIS-DPO reverse and none interleaved round by
#              round in one process; step wall time and GPU time (torch.profiler) as ratios to DPO, min and
#              median over rounds, host syncs per step, step peak memory
#   lm-head    roofline.py --measure: the LM head alone, measured next to the roofline prediction       35 s / 100 s
#   estimator  tests/test_cuda_jobs.py: fit SFT and DPO adapters on the built-in task, score, AUROC     70 s / 180 s
#              against its oracle; benchmark_speed.py --only-estimator: scoring vs two plain forwards
#   main-job   tests/test_cuda_jobs.py: scripts/train_tisdpo.py end to end on the built-in task        55 s / 150 s
#   llama8b    benchmark_speed.py --size gpu-llama8b: Llama-3.1-8B shapes (hidden 4,096, vocabulary    40 s / 100 s
#              128,256, 32 / 8 heads, 2 layers, random weights), LoRA, bf16; DPO, TDPO2, TIS-DPO reverse
#   qlora      a QLoRA step (4-bit NF4 base, LoRA) when bitsandbytes imports, else skipped             10 s / 60 s
#   zero3      a DeepSpeed ZeRO-3 step in one process when deepspeed imports, else skipped             10 s / 90 s
# (`python scripts/gpu_check.py --list` prints the same from the code; tests/test_gpu_check.py keeps them equal.)
#
# 1. On a machine with a package index (this one), download the wheels the GPU machine lacks (scripts/gpu_wheels.txt:
#    trl, transformers, peft, datasets, dill, multiprocess; about 15 MB, for Python 3.12, manylinux x86_64) into the
#    git-ignored folder .whl:
#        bash scripts/download_gpu_wheels.sh
# 2. Carry the repository and .whl to the GPU machine, and there:
#        WHEELS=.whl bash scripts/gpu_check.sh --commit "$(git rev-parse --short HEAD)"
#    (a machine with a package index and everything installed needs no WHEELS). Through this workplace's `device` tool,
#    in one call: carry [".whl"], timeout_s 600, and the command (its OUT is the tool's return folder, at most 8 files:
#    the results go to /tmp/gpu_check and come back as one archive plus the summary; --commit names the commit where
#    the copy there has no .git):
#        bash scripts/gpu_check.sh --wheels .whl --out /tmp/gpu_check --commit <sha>; s=$?;
#        tar -czf $OUT/gpu_check.tar.gz -C /tmp gpu_check; cp /tmp/gpu_check/summary.md $OUT/; exit $s
# 3. Back here: unpack the archive and paste its docs blocks into docs/benchmarks.md (GPU section), verbatim:
#        python scripts/gpu_check.py --paste outputs/gpu_check/blocks
#
# Options (python scripts/gpu_check.py --help): --parts / --skip NAME..., --install-only (the install step alone, no GPU
# needed: it prints the PYTHONPATH to use), --list, --paste BLOCKS, --out DIR, --wheels DIR, --site DIR, --budget S,
# --rounds N, --commit SHA.
# Environment: PYTHON (default python3), WHEELS (the wheels folder), SITE (where they go; default
#   $TMPDIR/trl-tokenpo-gpu-site, emptied at each run), GPU_CHECK_OUT (results; default outputs/gpu_check: summary.md,
#   results.json, gpu_check.log, logs/ per part, blocks/ the docs blocks), ROUNDS (interleaved rounds, default 3).
#
# The install step alone, on a machine without GPU (a Python that has torch but lacks trl and datasets, as the GPU
# machine's does; tests/test_gpu_check.py does this with a venv built that way):
#     PY_VERSION=3.11 bash scripts/download_gpu_wheels.sh /tmp/wheels
#     PYTHON=/path/to/python-with-torch-only WHEELS=/tmp/wheels bash scripts/gpu_check.sh --install-only
# (Relative paths in the options are taken from the current folder; the parts run in the repository.)
set -uo pipefail
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: no Python '$PYTHON' here: set PYTHON to the Python that has the CUDA build of torch" >&2
    exit 2
fi
exec "$PYTHON" "$(dirname "$0")/gpu_check.py" "$@"
