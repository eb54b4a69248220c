#!/usr/bin/env bash
# Everything a GPU session of issues 7/8 measures, in priority order, bounded to fit one 10-minute
# device call each. Usage on the device machine (repository root):
#   bash benchmarks/gpu_session.sh PART      PART = build | tests | large | base | maxbatch | kernels
# Results go to $OUT/results.tgz (one file: the device tool returns at most 8 files).
# Lessons from 2026-11-24: pip's --no-build-isolation build lacks pybind11 in the device image's
# pip environment, so the extension is built with CMake directly; torch.compile of the large reference
# takes > 2 minutes, so `large` gives it its own time budget.
set -uo pipefail
PART=${1:-large}
rc=0  # any failing step (tests, sanitizer, benchmark) makes the script exit non-zero
R=/tmp/m3ae-results; mkdir -p "$R"
export PYTHONPATH=. PYTHONUNBUFFERED=1
export M3AE_GIT_COMMIT=${M3AE_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

build() {  # the CUDA extension for this GPU only (about 40 s)
  cmake -S . -B /tmp/m3ae-build -G Ninja -DM3AE_CUDA_ARCHS=90a -DPython_EXECUTABLE="$(which python3)" \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DM3AE_OUTPUT_DIR="$PWD/m3ae_engine" > "$R/build.log" 2>&1 \
    && cmake --build /tmp/m3ae-build -j"$(nproc)" >> "$R/build.log" 2>&1 || { tail -30 "$R/build.log"; return 1; }
  python3 -c "from m3ae_engine import ops; print(ops.available_backends())"
}

case "$PART" in
  build) build || rc=1 ;;
  tests) build || rc=1
         timeout 400 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$R/pytest_gpu.log" | tail -15 || rc=1
         compute-sanitizer --error-exitcode 1 --tool memcheck python3 benchmarks/sanitize_cuda.py 2>&1 | tail -3 || rc=1
         compute-sanitizer --error-exitcode 1 --tool racecheck python3 benchmarks/sanitize_cuda.py 2>&1 | tail -3 || rc=1 ;;
  large) { build && timeout 500 python3 benchmarks/throughput.py --preset large --batch-size 256 --steps 10 --warmup 3 \
           --time-limit 420 --out-dir "$R" 2>&1 | tail -14; } || rc=1 ;;
  base) { build && timeout 300 python3 benchmarks/throughput.py --preset base --batch-size 256 --steps 10 --warmup 3 \
           --time-limit 240 --out-dir "$R" 2>&1 | tail -14; } || rc=1 ;;
  maxbatch) { build && timeout 500 python3 benchmarks/throughput.py --preset large --max-batch \
           --variants reference,engine,engine-padded --steps 5 --warmup 2 --time-limit 420 --out-dir "$R" 2>&1 | tail -10; } || rc=1 ;;
  kernels) build || rc=1
           timeout 200 python3 benchmarks/bench_cuda_kernels.py --out "$R" 2>&1 | tail -26 || rc=1
           timeout 200 python3 benchmarks/kernels.py --presets large --dtypes bf16 --out "$R/kernels.json" 2>&1 | tail -12 || rc=1
           python3 benchmarks/smoke_gpu.py --preset large --batch-size 256 --steps 6 --profile --rows 30 > "$R/profile.txt" 2>&1 || rc=1
           head -45 "$R/profile.txt" | cut -c1-170 ;;
  *) echo "unknown part $PART (build | tests | large | base | maxbatch | kernels)"; exit 2 ;;
esac
tar czf "${OUT:-/tmp}/results.tgz" -C "$R" .
exit $rc
