#!/usr/bin/env bash
# Everything a GPU session of issues 7/8 measures, in priority order, each PART bounded to fit one
# 10-minute device call. Usage on the device machine (repository root):
#   bash benchmarks/gpu_session.sh PART [PRESET]
#   PART = build | tests | kernels | profile | large | ablations | base | maxbatch | data | deepspeed | offload
#   PRESET (deepspeed, offload): large (default) or huge, one per call
# Results go to $OUT/results.tgz (one file: the device tool returns at most 8 files). It is rewritten after
# every step and every command gets only the time left before BUDGET (560 s) runs out, so a part that runs
# long still returns what it measured (the device tool stops a call at 600 s).
# deepspeed / offload install DeepSpeed offline from .whl/: run `bash benchmarks/fetch_gpu_wheels.sh` here
# first and pass carry: [".whl"] to the device call.
# Lessons from 2026-11-24: pip's --no-build-isolation build lacks pybind11 in the device image's
# pip environment, so the extension is built with CMake directly; torch.compile of the large reference
# takes minutes, so `large` runs only the three headline variants, the compiled one first (the scripts'
# --time-limit is checked before a variant starts), and `ablations` the engine variants.
set -uo pipefail
PART=${1:-large}
PRESET=${2:-large}
rc=0  # any failing step (tests, sanitizer, benchmark) makes the script exit non-zero
R=/tmp/m3ae-results; mkdir -p "$R"
DEADLINE=$((SECONDS + ${BUDGET:-560}))
export PYTHONPATH=. PYTHONUNBUFFERED=1
# the device copy has no .git: pass M3AE_GIT_COMMIT=<sha>; without it results say "unknown (... set it)"
[ -z "${M3AE_GIT_COMMIT:-}" ] && c=$(git rev-parse --short HEAD 2>/dev/null) && export M3AE_GIT_COMMIT=$c
TP="python3 benchmarks/throughput.py --out-dir $R"

left() { local l=$((DEADLINE - SECONDS)); echo $((l > 5 ? l : 5)); }     # seconds left for a command
limit() { local l=$(($(left) - ${1:-90})); echo $((l > 1 ? l : 1)); }   # a --time-limit leaving $1 s for a variant
pack() { tar czf /tmp/m3ae-results.tgz -C "$R" . && mv /tmp/m3ae-results.tgz "${OUT:-/tmp}/results.tgz"; }

build() {  # the CUDA extension for this GPU only (about 40 s)
  cmake -S . -B /tmp/m3ae-build -G Ninja -DM3AE_CUDA_ARCHS=90a -DPython_EXECUTABLE="$(which python3)" \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DM3AE_OUTPUT_DIR="$PWD/m3ae_engine" > "$R/build.log" 2>&1 \
    && cmake --build /tmp/m3ae-build -j"$(nproc)" >> "$R/build.log" 2>&1 || { tail -30 "$R/build.log"; return 1; }
  python3 -c "from m3ae_engine import ops; print(ops.available_backends())"
}

install_deepspeed() {
  python3 -c "import deepspeed" 2> /dev/null && return 0
  ls .whl/deepspeed-*.whl > /dev/null 2>&1 || { echo "no .whl/deepspeed-*.whl: run benchmarks/fetch_gpu_wheels.sh and carry .whl"; return 1; }
  pip install -q --no-index --find-links .whl deepspeed 2>&1 | tail -3
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
}

table() { grep -E "^\| |error|Error" | grep -v "^| variant\|^|---" | cut -c1-200; }

case "$PART" in
  build) build || rc=1 ;;
  tests) build || rc=1
         timeout "$(($(left) - 120))" python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 \
           | tee "$R/pytest_gpu.log" | tail -15 || rc=1
         pack
         for tool in memcheck racecheck; do
           timeout "$(left)" compute-sanitizer --error-exitcode 1 --tool $tool python3 benchmarks/sanitize_cuda.py \
             2>&1 | tail -3 || rc=1
         done ;;
  kernels) build || rc=1  # device time (CUDA graph), eager time, host cost, kernel list per op; the step's profile
           timeout "$(($(left) - 90))" python3 benchmarks/kernels.py --presets large --dtypes bf16,fp32 \
             --out "$R/kernels_large.json" 2>&1 | grep -v "^ " | tail -30 || rc=1
           pack
           timeout "$(left)" python3 benchmarks/step_profile.py --variants engine --out-dir "$R" 2>&1 | tail -40 || rc=1 ;;
  profile) build || rc=1  # where the large step's time goes: the engine, then the compiled variants
           timeout "$(left)" python3 benchmarks/step_profile.py --variants engine,reference+compile,engine+compile \
             --time-limit "$(limit 150)" --out-dir "$R" 2>&1 | grep -E "^\*\*|^\| [a-z]" | head -60 || rc=1 ;;
  large) { build && timeout "$(left)" $TP --preset large --batch-size 256 --steps 10 --warmup 3 --time-limit "$(limit)" \
           --variants reference+compile,reference,engine 2>&1 | tail -14; } || rc=1 ;;
  ablations) { build && timeout "$(left)" $TP --preset large --batch-size 256 --steps 10 --warmup 3 --time-limit "$(limit)" \
           --variants engine,engine+compile,engine-no-fused-kernels,engine-padded,engine-sdpa 2>&1 | table; } || rc=1 ;;
  base) { build && timeout "$(left)" $TP --preset base --batch-size 256 --steps 10 --warmup 3 --time-limit "$(limit)" \
           --variants reference+compile,reference,engine,engine+compile 2>&1 | tail -14; } || rc=1 ;;
  maxbatch) { build && timeout "$(left)" $TP --preset large --max-batch --time-limit "$(limit 150)" \
           --variants engine,reference,engine-padded --steps 5 --warmup 2 2>&1 | tail -10; } || rc=1 ;;
  data) build || rc=1  # loader images/s, then the engine step with the best available loader in the loop
        timeout "$(($(left) - 200))" python3 benchmarks/dataloader.py --out "$R/dataloader.json" 2>&1 | tail -8 || rc=1
        pack
        for data in synthetic auto; do
          timeout "$(left)" $TP --preset large --batch-size 256 --variants engine --steps 10 --warmup 3 --data $data \
            --tag "_data-$data" 2>&1 | grep -E "^\| engine|^Data|error" || rc=1
          pack
        done ;;
  deepspeed) { build && install_deepspeed; } || rc=1  # the plain engine, ZeRO-2 (ds.json) and ZeRO-3, one preset
        for cfg in none ds.json configs/zero3.json; do
          ds=(); [ "$cfg" != none ] && ds=(--deepspeed_config "$cfg")
          timeout "$(left)" $TP --preset "$PRESET" --batch-size 256 --variants engine --steps 5 --warmup 2 "${ds[@]}" \
            --tag "_ds-$(basename "$cfg" .json)" 2>&1 | table || rc=1
          pack
        done ;;
  offload) { build && install_deepspeed; } || rc=1  # ZeRO-3 + CPU offload (DeepSpeed JIT-builds CPU Adam first)
        timeout "$(left)" $TP --preset "$PRESET" --batch-size 256 --variants engine --steps 3 --warmup 1 \
          --deepspeed_config configs/zero3_offload.json --tag _ds-zero3_offload 2>&1 | table || rc=1 ;;
  *) echo "unknown part $PART (build | tests | kernels | profile | large | ablations | base | maxbatch | data |"\
          "deepspeed | offload)"
     exit 2 ;;
esac
pack
exit $rc
