#!/usr/bin/env bash
# GPU tests and benchmarks, run on the GPU machine from the repository root.
#
# The GPU machine has no Rust: build here first and put the binaries in .device/
# (git-ignored), then run this script there with .device carried along:
#
#   cargo test --release -p quantsmith --test gpu --no-run          # note the binary path it prints
#   cargo build --release -p quantsmith --example gpu_bench --bin run-recipe
#   mkdir -p .device && cp target/release/deps/gpu-<hash> .device/gpu-test \
#       && cp target/release/examples/gpu_bench target/release/run-recipe .device/
#   # on the GPU machine:
#   bash scripts/gpu-bench.sh [--e2e]
#
# QS_DEVICE_DIR names another folder for the binaries (e.g. .device/<name>, so
# only that folder needs carrying). Writes logs to $OUT (or /tmp/qs-out).
# The kernel table of gpu_bench gives, per format, the quantize kernel alone
# (what runs after the upload: the per-tensor amax is taken piece by piece
# during the upload) and all the device work for an input already on the
# device (amax kernel included), each against cuMemcpyDtoD of the input.
# --e2e adds the end-to-end FLUX.1-dev conversion (synthesized full size on
# local disk): cp vs --device cuda vs --device cpu.
set -uo pipefail
OUT=${OUT:-/tmp/qs-out}
D=${QS_DEVICE_DIR:-.device}
mkdir -p "$OUT"
E2E=0
[ "${1:-}" = "--e2e" ] && E2E=1

# NVRTC: the CUDA toolkit's, or the one PyTorch's wheels bring.
if ! ldconfig -p | grep -q 'libnvrtc.so.13 '; then
    n=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so.13' 2>/dev/null | head -1)
    [ -n "$n" ] && export LD_LIBRARY_PATH="$(dirname "$n"):${LD_LIBRARY_PATH:-}"
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
nproc; free -g | head -2; df -h /tmp | tail -1

echo "== tests"
QUANTSMITH_REQUIRE_GPU=1 QUANTSMITH_REQUIRE_NVRTC=1 timeout 200 "$D"/gpu-test --test-threads 1 --nocapture 2>&1 | tee "$OUT/gpu-test.log"

echo "== kernel and streaming benchmarks"
timeout 200 "$D"/gpu_bench --dump /tmp/qsdump 2>&1 | tee "$OUT/bench.txt"

echo "== PyTorch FP8 on the same GPU"
timeout 90 python3 scripts/torch_fp8_bench.py /tmp/qsdump 2>&1 | tee "$OUT/torch.txt"

if [ "$E2E" = 1 ]; then
    echo "== end to end: FLUX.1-dev, full size, bf16"
    W=/tmp/e2e
    mkdir -p $W
    t() { local s=$(date +%s%N); "$@"; local r=$?; echo "  wall $(( ($(date +%s%N) - s) / 1000000 )) ms: $*"; return $r; }
    t "$D"/run-recipe synth flux --scale full -o $W/flux.safetensors >/dev/null || exit 1
    ls -l $W/flux.safetensors; df -h $W | tail -1
    sync
    t cp $W/flux.safetensors $W/copy.safetensors
    t sync
    rm -f $W/copy.safetensors
    sync
    for fmt in fp8 nvfp4; do
        for dev in cuda cpu; do
            t env RUST_LOG=warn,quantsmith::gpu=info "$D"/run-recipe run $W/flux.safetensors --recipe flux --set format=$fmt \
                --device $dev -q --force -o $W/out.safetensors --report $OUT/e2e-$fmt-$dev.json
            t sync
            ls -l $W/out.safetensors
            rm -f $W/out.safetensors
            sync
        done
    done
    rm -f $W/flux.safetensors
fi
