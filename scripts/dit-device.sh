#!/usr/bin/env bash
# On the GPU machine: the DiT kernels' GPU tests, the host's SD3/FLUX forward
# against diffusers (correctness, scripts/dit_reference.py), the 1024² step time
# of both, and a calibrated FP8 FLUX.1-dev run. Binaries are built on a Rust
# machine and carried in $QS_DEVICE_DIR (default .device) as dit-bins.tar.xz:
#
#   cargo build --release --bin run-recipe
#   cargo test --release -p quantsmith --test nn_gpu_dit --no-run    # note the binary
#   mkdir -p .device/dit && strip -o .device/dit/run-recipe target/release/run-recipe \
#     && strip -o .device/dit/nn_gpu_dit target/release/deps/nn_gpu_dit-<hash> \
#     && strip -o .device/dit/libtests target/release/deps/quantsmith-<hash> \
#     && tar -C .device/dit -cJf .device/dit-bins.tar.xz run-recipe nn_gpu_dit libtests
#   bash scripts/device-wheels.sh download
#   # device tool: carry [".device/dit-bins.tar.xz", ".device/wheels"]; command:
#   bash scripts/dit-device.sh [tests] [t5] [flux] [sd3] [variants] [profile] [calib]
WHEELS=diffusers . scripts/dit-device-env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/gpu.txt"
step() { echo "== $*" | tee -a "$O/steps.log"; timeout "${STEP_TIMEOUT:-400}" "$@"; }
want() { [ $# -eq 0 ] || [[ " $* " == *" $1 "* ]]; }
ARGS=" $* "
has() { [ -z "${ARGS// /}" ] || [[ "$ARGS" == *" $1 "* ]]; }

if has tests; then
  QUANTSMITH_REQUIRE_GPU=1 QUANTSMITH_REQUIRE_NVRTC=1 step "$W/bin/nn_gpu_dit" --test-threads 1 2>&1 | tail -40 | tee "$O/nn_gpu_dit.log"
  QUANTSMITH_REQUIRE_GPU=1 step "$W/bin/libtests" models::text::t5::tests::cuda_bf16_matches_cpu --nocapture > "$O/t5_gpu.log" 2>&1; tail -25 "$O/t5_gpu.log"
fi
if has t5; then
  # T5 in bf16: transformers' f32 against our CPU f32 (1e-5), transformers' own bf16
  # against its f32 (T5's sensitivity), our CUDA bf16 against transformers' f32 (no
  # further than theirs), on cuda_bf16_matches_cpu's own weights and on a tiny T5-XXL.
  QUANTSMITH_T5_DUMP=$W/t5-test.safetensors step "$W/bin/libtests" models::text::t5::tests::dump_bf16_test_model --exact --nocapture > "$O/t5-dump.log" 2>&1
  step "$RR" synth t5xxl --scale tiny -o "$W/t5-tiny.safetensors" > /dev/null
  for m in t5-test t5-tiny; do
    step python3 scripts/t5_reference.py "$W/$m.safetensors" "$W/$m-ref.safetensors" --batch 2 --tokens 300 --bf16 2>&1 | tail -5 | tee "$O/$m-reference.txt"
    QUANTSMITH_REQUIRE_GPU=1 QUANTSMITH_T5_MODEL=$W/$m.safetensors QUANTSMITH_T5_REFERENCE=$W/$m-ref.safetensors \
      step "$W/bin/libtests" models::text::t5::tests::matches_transformers --exact --nocapture > "$O/$m-host.log" 2>&1
    grep -E "relative L2|panicked|test result" "$O/$m-host.log"
  done
fi
ref() {  # family-variant, synth args...
  local name=$1; shift
  local c=$W/$name.safetensors
  step "$RR" synth "$@" --scale full --init conditioned -o "$c" || return
  # The small-input comparison (bf16 and f32, CPU f32 included): REF_ALL=0 skips it
  # and keeps only the 1024² bf16 comparison below.
  if [ "${REF_ALL:-1}" != 0 ]; then
    step python3 scripts/dit_reference.py all "$c" --host "$RR" --work "$W/ref-$name" > "$O/ref-$name.txt" 2>&1
    grep -i -E "rel|pass|l2|error|Traceback" "$O/ref-$name.txt" | head -30
  fi
  # The 1024² step (batch 1; FLUX: 512 T5 tokens, SD3: 154), host bf16 vs diffusers bf16.
  local tokens=512; [ "${name%%-*}" = sd3 ] && tokens=154
  step python3 scripts/dit_reference.py make-inputs "$c" -o "$W/$name-1024.safetensors" --latent 128 --tokens $tokens
  step "$RR" forward "$c" --inputs "$W/$name-1024.safetensors" --out "$W/$name-1024-ours.safetensors" --device cuda --repeat 5 | tee "$O/step-$name-host.json"
  step python3 scripts/dit_reference.py run "$c" --inputs "$W/$name-1024.safetensors" -o "$W/$name-1024-ref.safetensors" --dtype bf16 --repeat 5 2>&1 | tail -5 | tee "$O/step-$name-diffusers.txt"
  python3 -c "
import sys; from safetensors.torch import load_file
a = load_file(sys.argv[1])['out'].double(); b = load_file(sys.argv[2])['out'].double()
print('$name 1024² bf16, ours vs diffusers: relative L2', ((a - b).norm() / b.norm()).item())" \
    "$W/$name-1024-ours.safetensors" "$W/$name-1024-ref.safetensors" | tee -a "$O/step-$name-host.json"
}
has sd3 && ref sd3-large sd3 --variant 3.5-large
has flux && ref flux-dev flux
if has variants; then
  # The 1024² step under each fused-attention kernel (QUANTSMITH_FLASH_VARIANT).
  for name in flux-dev sd3-large; do
    c=$W/$name.safetensors; inp=$W/$name-1024.safetensors
    tokens=512; synth=(flux); [ "${name%%-*}" = sd3 ] && { tokens=154; synth=(sd3 --variant 3.5-large); }
    [ -f "$c" ] || step "$RR" synth "${synth[@]}" --scale full --init conditioned -o "$c" || continue
    [ -f "$inp" ] || step python3 scripts/dit_reference.py make-inputs "$c" -o "$inp" --latent 128 --tokens $tokens || continue
    for v in narrow narrow-capped narrow-capped-more wide wide-k32; do
      echo -n "$name $v: " | tee -a "$O/variants.txt"
      QUANTSMITH_FLASH_VARIANT=$v step "$RR" forward "$c" --inputs "$inp" --out "$W/var.safetensors" --device cuda --repeat 5 \
        | grep -o '"median_seconds":[0-9.]*' | tee -a "$O/variants.txt"
    done
  done
fi
if has profile; then
  # Step time, then the per-op device time table (QUANTSMITH_PROFILE_OPS=1,
  # printed to stderr after the timing; events around every op, so its own
  # median is a little slower than the plain run's).
  for name in flux-dev sd3-large; do
    c=$W/$name.safetensors; inp=$W/$name-1024.safetensors
    tokens=512; synth=(flux); [ "${name%%-*}" = sd3 ] && { tokens=154; synth=(sd3 --variant 3.5-large); }
    [ -f "$c" ] || step "$RR" synth "${synth[@]}" --scale full --init conditioned -o "$c" || continue
    [ -f "$inp" ] || step python3 scripts/dit_reference.py make-inputs "$c" -o "$inp" --latent 128 --tokens $tokens || continue
    step "$RR" forward "$c" --inputs "$inp" --out "$W/prof.safetensors" --device cuda --repeat 5 | tee "$O/step-$name-host.json"
    QUANTSMITH_PROFILE_OPS=1 step "$RR" forward "$c" --inputs "$inp" --out "$W/prof.safetensors" \
      --device cuda --repeat 3 2> "$O/profile-$name.txt" >/dev/null
    grep -A40 "^op profile" "$O/profile-$name.txt"
  done
fi
if has calib; then
  c=$W/flux-dev.safetensors
  [ -f "$c" ] || step "$RR" synth flux --scale full --init conditioned -o "$c"
  step /usr/bin/time -v "$RR" run "$c" -o "$W/flux-fp8.safetensors" --set format=fp8 --set calib-steps=16 --set calib-samples=1 \
    --device cuda --eval-inputs 6 --report "$O/calib-flux-fp8.json" 2>&1 | grep -v "^\s*\(Page\|Voluntary\|Involuntary\|Swaps\|File\|Socket\|Signals\|Average\|Exit\|Minor\|Major\|Percent\|System\|User\)" | tail -30 | tee "$O/calib-flux-fp8.txt"
  rm -f "$W/flux-fp8.safetensors"
fi
ls -la "$O"
