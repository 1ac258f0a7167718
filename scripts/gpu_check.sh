#!/usr/bin/env bash
# The one-shot GPU check (one CUDA GPU, about 5-8 minutes): the CUDA tests of the fused token-statistics kernels
# (Triton vs a float64 dense computation and vs the torch tiles, float32 and bf16, trainer steps) and
# `benchmark_speed.py --size gpu` (trl.DPOTrainer, TDPO2, TIS-DPO "none" and "reverse"; LoRA; Qwen2.5-0.5B's shape with
# random weights; 4 pairs x 1,024 tokens; bf16). Prints the step-time ratios to DPO with the peak memory
# (torch.cuda.max_memory_allocated) and writes the block docs/benchmarks.md expects, to paste there.
#
# Usage:
#   bash scripts/gpu_check.sh                             # installs from the package index
#   WHEELS=/path/to/wheels bash scripts/gpu_check.sh      # offline: pip --no-index --find-links /path/to/wheels
#
# Environment:
#   WHEELS   a folder of wheels for an offline install (torch is not needed there when the system Python has a CUDA
#            build: the venv then sees the system's packages and installs only what is missing)
#   PYTHON   the Python that makes the venv (default: python3)
#   VENV     where the venv goes (default: $TMPDIR/trl-tokenpo-gpu-check, outside the repository)
#   OUT      results folder (default: outputs/gpu_check): gpu_check.log (everything), pytest.log,
#            roofline_measured.md (LM-head times, measured / predicted), benchmark_gpu.md (the docs block: paste it
#            over the `speed:main-gpu` block of docs/benchmarks.md)
#   ROUNDS   benchmark rounds (default: 2; each round runs every trainer once, in its own process)
#
# Without a CUDA GPU it stops within seconds, before installing anything, with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "gpu_check: $1" >&2
    exit "${2:-1}"
}

# 1. Is there a CUDA GPU at all? (before any install, so that a CPU machine gets its answer in seconds)
if ! command -v nvidia-smi >/dev/null 2>&1; then
    fail "no CUDA GPU here (no NVIDIA driver: nvidia-smi not found). This check needs a machine with one CUDA GPU; on a
CPU machine the test suite checks the Triton kernels in Triton's interpreter: .venv/bin/python -m pytest -q" 2
fi
if ! gpus=$(nvidia-smi -L 2>/dev/null) || ! grep -q "^GPU" <<<"$gpus"; then
    fail "no CUDA GPU here (nvidia-smi lists none). This check needs a machine with one CUDA GPU." 2
fi

started=$SECONDS
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "gpu_check: $(head -n 1 <<<"$gpus"); results in $OUT"

# 2. A venv with what the tests and the benchmark need
PYTHON=${PYTHON:-python3}
VENV=${VENV:-${TMPDIR:-/tmp}/trl-tokenpo-gpu-check}
has_cuda_torch='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
venv_args=()
if "$PYTHON" -c "$has_cuda_torch" 2>/dev/null; then
    venv_args=(--system-site-packages)  # reuse the system's CUDA torch instead of downloading gigabytes
fi
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
py=$VENV/bin/python
pip_install() {
    if [[ -n ${WHEELS:-} ]]; then
        "$py" -m pip install -q --no-index --find-links "$WHEELS" "$@"
    else
        "$py" -m pip install -q "$@"
    fi
}
if ! "$py" -c "$has_cuda_torch" 2>/dev/null; then
    pip_install torch || fail "could not install torch${WHEELS:+ from $WHEELS} (a CUDA build is needed)"
fi
# The package's own dependency ranges, from pyproject.toml (the package itself runs from this checkout)
mapfile -t deps < <("$py" - <<'PY'
import re

try:
    import tomllib

    with open("pyproject.toml", "rb") as f:
        print("\n".join(tomllib.load(f)["project"]["dependencies"]))
except ModuleNotFoundError:  # Python 3.10: read the list itself
    text = open("pyproject.toml").read()
    print("\n".join(re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))))
PY
)
pip_install "${deps[@]}" pytest || fail "could not install the dependencies${WHEELS:+ from $WHEELS}"
"$py" -c "import triton" 2>/dev/null || pip_install triton || fail "could not install triton"
"$py" -c "$has_cuda_torch" || fail "torch in $VENV sees no CUDA device"
"$py" - <<'PY'
import torch, transformers, triton, trl

print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
echo "gpu_check: environment ready after $((SECONDS - started)) s"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

# 3. The CUDA tests (tests/test_kernels_triton.py runs on the GPU here, not in the interpreter)
if ! timeout 240 "$py" -m pytest -q -p no:cacheprovider -rs tests/test_kernels_cuda.py tests/test_kernels_triton.py \
        2>&1 | tee "$OUT/pytest.log"; then
    echo "gpu_check: CUDA tests FAILED (see $OUT/pytest.log)"
    status=1
fi
echo "gpu_check: tests done after $((SECONDS - started)) s"

# 4. The LM-head part of a step alone, for the three implementations, measured next to the roofline prediction
if ! timeout 150 "$py" scripts/roofline.py --measure --markdown "$OUT/roofline_measured.md"; then
    echo "gpu_check: LM-head measurement FAILED"
    status=1
fi
echo "gpu_check: LM-head measurement done after $((SECONDS - started)) s"

# 5. The speed benchmark: step time (median of 3 after 1 warm-up) and peak memory, interleaved rounds
if ! timeout 360 "$py" scripts/benchmark_speed.py --size gpu --trainers dpo tdpo2 tisdpo-none tisdpo-reverse \
        --no-estimator --rounds "${ROUNDS:-2}" --warmup 1 --steps 3 --markdown "$OUT/benchmark_gpu.md"; then
    echo "gpu_check: benchmark FAILED"
    status=1
fi

echo
echo "gpu_check: done in $((SECONDS - started)) s, status $status; paste $OUT/benchmark_gpu.md and"
echo "$OUT/roofline_measured.md into docs/benchmarks.md (GPU section)"
exit $status
