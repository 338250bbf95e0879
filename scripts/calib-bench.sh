#!/usr/bin/env bash
# On the GPU machine: the host UNet against diffusers (correctness), the host's
# observed step against its plain step, and a full calibration run.
# Binaries are built on a Rust machine and carried in $QS_DEVICE_DIR (default
# .device); diffusers comes from the wheels of scripts/device-wheels.sh.
#
#   QS_DEVICE_DIR=.device bash scripts/calib-bench.sh     # writes $OUT (or /tmp/qs/out)
set -uo pipefail
D=${QS_DEVICE_DIR:-.device}
RR=$D/run-recipe
W=${WORK:-/tmp/qs}
O=${OUT:-$W/out}
INIT=${INIT:-conditioned}
mkdir -p "$W" "$O"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bash scripts/device-wheels.sh install diffusers >"$O/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/gpu.txt"
REF=scripts/unet_reference.py
step() { echo "== $*" | tee -a "$O/steps.log"; timeout "${STEP_TIMEOUT:-300}" "$@"; }

# sdxl-refiner: the refiner's layout (no manifest; ComfyUI's SDXLRefiner config).
for fam in ${FAMILIES:-sd15 sdxl}; do
  L=64; [ "${fam%%-*}" = sdxl ] && L=128
  c=$W/$fam.safetensors; i=$W/$fam-in.safetensors
  synth_args=("${fam%%-*}"); [ "$fam" = sdxl-refiner ] && synth_args=(sdxl --variant refiner)
  step "$RR" synth "${synth_args[@]}" --scale full --init "$INIT" -o "$c" || continue
  step python3 $REF make-inputs "$c" --latent $L --batch 2 -o "$i" || continue
  step python3 $REF run "$c" --inputs "$i" -o "$W/$fam-bf16.safetensors" --device cuda --dtype bf16
  step python3 $REF run "$c" --inputs "$i" -o "$W/$fam-f32.safetensors" --device cuda --dtype f32
  step "$RR" forward "$c" --inputs "$i" --out "$W/$fam-ours.safetensors" --device cuda --repeat 10 | tee "$O/$fam-forward.json"
  step "$RR" forward "$c" --inputs "$i" --out "$W/$fam-ours-observed.safetensors" --device cuda --repeat 10 --observe | tee "$O/$fam-forward-observed.json"
  step "$RR" forward "$c" --inputs "$i" --out "$W/$fam-ours-f32.safetensors" --device cpu | tee "$O/$fam-forward-cpu-f32.json"
  {
    echo "# $fam: host bf16 (cuda) vs diffusers bf16, with diffusers f32 as the reference"
    python3 $REF compare "$W/$fam-ours.safetensors" "$W/$fam-bf16.safetensors" --f32-reference "$W/$fam-f32.safetensors"
    echo "# $fam: host f32 (cpu) vs diffusers f32"
    python3 $REF compare "$W/$fam-ours-f32.safetensors" "$W/$fam-f32.safetensors"
    echo "# $fam: host observed vs plain forward (observers must not change the output)"
    python3 $REF compare "$W/$fam-ours-observed.safetensors" "$W/$fam-ours.safetensors"
  } 2>&1 | tee "$O/$fam-compare.txt"
done

if [ -f "$W/sdxl.safetensors" ] && [ -z "${NO_CALIB:-}" ]; then
  # 16 steps x 1 sample at 1024²: 16 UNet calls on a CFG batch of 2, as ModelOpt's 16 calibration calls.
  step "$RR" run "$W/sdxl.safetensors" --force -o "$W/sdxl-fp8.safetensors" --device cuda -q \
    --set calib-steps=16 --set calib-samples=1 --report "$O/sdxl-calib-report.json" 2>&1 | tee "$O/sdxl-calib.txt"
  step "$RR" check "$W/sdxl.safetensors" "$W/sdxl-fp8.safetensors" 2>&1 | tail -3 | tee -a "$O/sdxl-calib.txt"
fi
