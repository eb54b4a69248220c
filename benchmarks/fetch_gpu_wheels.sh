#!/usr/bin/env bash
# Wheels the GPU machine lacks, for its Python (3.12, x86_64), into .whl/ (git-ignored): the device tool
# carries that folder (`carry: [".whl"]`, 64 MiB at most) and `gpu_session.sh deepspeed|offload` installs
# from it offline. DeepSpeed is an sdist on PyPI, so it is built here into a pure-Python wheel (its CUDA
# ops are JIT-compiled on the GPU machine when a config needs them, e.g. CPU Adam for offload).
# Usage (on this machine, which reaches the package registry): bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
mkdir -p "$DEST"
DS_VERSION=${DS_VERSION:-0.19.8}
# deepspeed's runtime dependencies (torch, numpy, packaging are on the GPU image already)
DEPS="einops hjson msgpack ninja psutil py-cpuinfo pydantic tqdm nvidia-ml-py"
"$PY" -m pip download -q --dest "$DEST" --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  $DEPS  # with their own dependencies: one consistent set (pydantic pins pydantic-core)
if ! ls "$DEST"/deepspeed-"$DS_VERSION"-*.whl > /dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$DS_VERSION"
fi
du -sh "$DEST"
ls "$DEST"
