#!/usr/bin/env bash
# Download the wheels a GPU machine without registry access needs for `tools/gpu_check.py`:
# what MegaDual imports beyond torch / transformers / numpy / pytest, at the versions this
# checkout's .venv runs (so GPU and CPU test the same code), for CPython 3.12 on x86-64.
#
#   tools/gpu_wheels.sh [DIR]        # default .whl (ignored by git)
#
# The check installs them with `pip install --no-index --no-deps --target`; nothing here
# resolves dependencies, so the list below names every one. wandb is left out: MegaDual
# imports it only when a run asks for it.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
py=.venv/bin/python
test -x "$py" || { echo "gpu_wheels: $py not found; run 'make setup' first" >&2; exit 1; }
packages=(deepspeed hjson pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand lpips)
mkdir -p "$dir"
for name in "${packages[@]}"; do
    version=$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    test -n "$version" || { echo "gpu_wheels: $name is not installed in .venv; run 'make setup'" >&2; exit 1; }
    # Binary wheels for CPython 3.12 first; a package published only as an sdist (DeepSpeed)
    # is built here into a pure-Python wheel (its CUDA ops stay JIT, unused by MegaDual).
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "$name==$version" 2>/dev/null \
        || DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dir" "$name==$version"
done
ls -1 "$dir"
