#!/usr/bin/env bash
# On the GPU machine: what calibration and SmoothQuant buy on SDXL, measured by
# the run report's fake-quantized evaluation (held-out inputs, paired modes).
# The binary is built on a Rust machine and carried in $QS_DEVICE_DIR.
#
#   QS_DEVICE_DIR=.device/calib bash scripts/smoothquant-bench.sh   # writes $OUT
set -uo pipefail
D=${QS_DEVICE_DIR:-.device}
RR=$D/run-recipe
W=${WORK:-/tmp/qs}
O=${OUT:-$W/out}
EVAL=${EVAL_INPUTS:-24}
CALIB=${CALIB:-"--set calib-steps=16 --set calib-samples=4"}
mkdir -p "$W" "$O"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/gpu.txt"
c=$W/sdxl.safetensors
[ -f "$c" ] || "$RR" synth sdxl --scale full --init conditioned -o "$c" | tail -1
run() {
  local name=$1; shift
  echo "== $name: $*" | tee -a "$O/summary.txt"
  /usr/bin/time -f "%e s wall, %M KB peak RSS" timeout 420 "$RR" run "$c" --force -o "$W/$name.safetensors" --device cuda --calibrate on \
    --eval-inputs "$EVAL" $CALIB "$@" --report "$O/$name.json" 2>&1 | grep -E "^(calib|eval|smooth|wrote|error)|wall|Error|error" | tee -a "$O/summary.txt"
  "$RR" check "$c" "$W/$name.safetensors" 2>&1 | tail -1 | tee -a "$O/summary.txt"
  rm -f "$W/$name.safetensors"
}
for cfg in ${CONFIGS:-fp8-max fp8-p50 fp8-sq05 int8-sq05 int8-sq08 nvfp4-max nvfp4-sq05}; do
  case $cfg in
    fp8-max)   run $cfg --set format=fp8 ;;
    fp8-p50)   run $cfg --set format=fp8 --set calib-algorithm=percentile --set calib-percentile=50 ;;
    fp8-sq05)  run $cfg --set format=fp8 --set smoothquant=0.5 ;;
    fp8-sq08)  run $cfg --set format=fp8 --set smoothquant=0.8 ;;
    int8-sq05) run $cfg --set format=int8 --set smoothquant=0.5 ;;
    int8-sq08) run $cfg --set format=int8 --set smoothquant=0.8 ;;
    nvfp4-max) run $cfg --set format=nvfp4 ;;
    nvfp4-sq05) run $cfg --set format=nvfp4 --set smoothquant=0.5 ;;
  esac
done
