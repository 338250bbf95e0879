#!/usr/bin/env bash
# End-to-end conversion of a full-size synthetic checkpoint against `cp` of the
# same file, in the same run, with peak RSS. Usage:
#   scripts/bench-e2e.sh [family=flux] [format=fp8] [device=cpu] [workdir=/tmp/qs-bench]
# Needs about 2.5x the checkpoint's size free in workdir (FLUX.1-dev: ~24 GB).
set -euo pipefail
family=${1:-flux}; format=${2:-fp8}; device=${3:-cpu}; work=${4:-/tmp/qs-bench}
bin=${RUN_RECIPE:-target/release/run-recipe}
mkdir -p "$work"
src="$work/$family-full.safetensors"
if [ ! -f "$src" ]; then
  echo "synthesizing $src"
  /usr/bin/time -f "synth: %e s, peak RSS %M KiB" "$bin" synth "$family" --scale full -o "$src"
fi
size=$(stat -c %s "$src")
echo "input: $src ($((size / 1000000)) MB)"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
/usr/bin/time -f "cp: %e s, peak RSS %M KiB" cp "$src" "$work/copy.safetensors"
sync; rm -f "$work/copy.safetensors"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
/usr/bin/time -f "run-recipe ($format, $device): %e s, peak RSS %M KiB" \
  "$bin" run "$src" -o "$work/out.safetensors" --force --set "format=$format" --device "$device" --quiet --report "$work/report.json"
sync
echo "output: $(( $(stat -c %s "$work/out.safetensors") / 1000000 )) MB"
rm -f "$work/out.safetensors"
