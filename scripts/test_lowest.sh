#!/usr/bin/env bash
# The fast tests (those not marked slow) against the LOWEST versions pyproject.toml declares for trl, transformers,
# peft, datasets, accelerate, bitsandbytes and (the dev extra's) triton (pinned in scripts/constraints-lowest.txt), in their own virtual
# environment .venv-lowest, set up like .venv by scripts/setup_env.sh. CI runs it after the README's test command.
# Usage: bash scripts/test_lowest.sh [more pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-lowest CONSTRAINTS=scripts/constraints-lowest.txt bash scripts/setup_env.sh
.venv-lowest/bin/python -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|trl|transformers|peft|datasets|accelerate|bitsandbytes|triton)==' | tr '\n' ' '
echo
.venv-lowest/bin/python -m pytest -q -p no:cacheprovider -m "not slow" "$@"
