#!/usr/bin/env bash
# On the GPU machine, one call: FP8 calibration of a full-size synthetic
# FLUX.1-dev by the host (16 steps, 1024²) and by ModelOpt (scripts/modelopt_dit_bench.py,
# the same 16 calls' worth), for BENCHMARKS.md. Carry [".device/dit-bins.tar.xz",
# ".device/wheels", ".device/wheels-modelopt"] (see scripts/dit-device.sh).
set -uo pipefail
D=${QS_DEVICE_DIR:-.device}
W=${WORK:-/tmp/qs}
O=${OUT:-$W/out}
mkdir -p "$W/bin" "$O"
tar -C "$W/bin" -xJf "$D/dit-bins.tar.xz"
RR=$W/bin/run-recipe
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bash scripts/device-wheels.sh install all >"$O/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site:$PWD/scripts
c=$W/flux-dev.safetensors
"$RR" synth flux --scale full --init conditioned -o "$c"
/usr/bin/time -f "host run: %e s wall, peak RSS %M KiB" "$RR" run "$c" -o "$W/flux-fp8.safetensors" --set format=fp8 \
  --set calib-steps=16 --set calib-samples=1 --device cuda --eval-inputs 0 --report "$O/host-calib.json" 2>&1 | tail -12 | tee "$O/host-calib.txt"
rm -f "$W/flux-fp8.safetensors"
timeout 400 python3 scripts/modelopt_dit_bench.py "$c" --calib-steps 16 2>&1 | tail -5 | tee "$O/modelopt.txt"
