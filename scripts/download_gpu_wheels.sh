#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels scripts/gpu_check.sh installs on a GPU machine without one:
# the pins of scripts/gpu_wheels.txt (trl, transformers, peft, datasets, dill, multiprocess: about 15 MB), built for
# the GPU machine's Python (3.12, CPython, manylinux x86_64 by default), without their dependencies (--no-deps: the
# check installs only what its Python lacks, and names any requirement no wheel meets).
#
# Usage:
#   bash scripts/download_gpu_wheels.sh [DEST]            # DEST default .whl (git-ignored), emptied of old wheels
#   bash scripts/download_gpu_wheels.sh --print [DEST]    # print the pip command only
#
# Environment:
#   PY_VERSION   the GPU machine's Python version (default 3.12; 3.11 for a check of the install step on this machine)
#   PLATFORMS    pip --platform tags (default: manylinux_2_28, 2_27, 2_24, 2_17, 2014 and 1, x86_64; pip matches
#                each tag exactly)
#   EXTRA        more NAME==VERSION wheels, e.g. EXTRA="bitsandbytes==0.50.2" for the QLoRA part (41 MB more: 56 MB in
#                all, within the 64 MiB that the device tool carries with the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
print_only=
if [[ ${1:-} == --print ]]; then
    print_only=1
    shift
fi
dest=${1:-.whl}
py_version=${PY_VERSION:-3.12}
platforms=${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64}
mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' scripts/gpu_wheels.txt | grep -v '^$')
# shellcheck disable=SC2206  # EXTRA is a list of words
pins+=(${EXTRA:-})
command=(python3 -m pip download --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp)
for platform in $platforms; do
    command+=(--platform "$platform")
done
command+=(-d "$dest" "${pins[@]}")
if [[ -n $print_only ]]; then
    echo "${command[*]}"
    exit 0
fi
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: a leftover wheel of another version would be a second candidate
"${command[@]}"
echo "download_gpu_wheels: $(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
