#!/usr/bin/env bash
# On the GPU machine, for BENCHMARKS.md (issue 10 part 8). Carry [".device/dit-bins.tar.xz",
# ".device/wheels", ".device/wheels-modelopt"] (see scripts/dit-device.sh).
#
#   bash scripts/dit-modelopt-device.sh [bench] [compare flux] [compare sd3]
#
# bench (the default): FP8 calibration of a full-size synthetic FLUX.1-dev by the host
#   (16 steps, 1024²) and by ModelOpt (scripts/modelopt_dit_bench.py, the same 16 calls' worth).
# compare flux|sd3: output error of our calibrated FP8 file against ModelOpt's
#   fake-quantized model (scripts/dit_quant_compare.py) on synthetic full-size FLUX.1-dev /
#   SD3.5-large (`--init conditioned`). Our file: `run --set format=fp8 --set calib-steps=16
#   --set calib-samples=1 --device cuda` (one 16-step walk, 1024², random conditioning: the
#   same number of calls ModelOpt calibrates over, not the preset's 8 samples). Each model
#   takes a few minutes; one per call keeps within the 10-minute limit.
WHEELS=all . scripts/dit-device-env.sh
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/scripts
ARGS=" $* "
[ -n "${ARGS// /}" ] || ARGS=" bench "
has() { [[ "$ARGS" == *" $1 "* ]]; }

if has bench; then
  c=$W/flux-dev.safetensors
  [ -f "$c" ] || "$RR" synth flux --scale full --init conditioned -o "$c"
  /usr/bin/time -f "host run: %e s wall, peak RSS %M KiB" "$RR" run "$c" -o "$W/flux-fp8.safetensors" --set format=fp8 \
    --set calib-steps=16 --set calib-samples=1 --device cuda --eval-inputs 0 --report "$O/host-calib.json" 2>&1 | tail -12 | tee "$O/host-calib.txt"
  rm -f "$W/flux-fp8.safetensors"
  timeout 400 python3 scripts/modelopt_dit_bench.py "$c" --calib-steps 16 2>&1 | tail -5 | tee "$O/modelopt.txt"
fi

compare() {  # name, synth args...
  local name=$1; shift
  local c=$W/$name.safetensors q=$W/$name-fp8.safetensors
  [ -f "$c" ] || "$RR" synth "$@" --scale full --init conditioned -o "$c" || return
  /usr/bin/time -f "host run: %e s wall, peak RSS %M KiB" "$RR" run "$c" -o "$q" --set format=fp8 \
    --set calib-steps=16 --set calib-samples=1 --device cuda --eval-inputs 0 --report "$O/compare-$name-host.json" 2>&1 \
    | tail -12 | tee "$O/compare-$name-host.txt"
  # the reference and ModelOpt first, then ours: one model on the GPU at a time
  /usr/bin/time -f "compare: %e s wall, peak RSS %M KiB" timeout 480 python3 scripts/dit_quant_compare.py "$c" "$q" \
    >"$O/compare-$name.json" 2>"$O/compare-$name.log"
  tail -4 "$O/compare-$name.log"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); e=r["relative_l2"]
print(json.dumps({k: [round(v["mean"], 5), round(v["se"], 5)] for k, v in e.items()}))
print(json.dumps({k: r.get(k) for k in ("ours_minus_modelopt_fused_scales", "ours_minus_modelopt_same_layers", "ours_minus_modelopt_preset", "layers", "wall_s", "peak_alloc_GiB")}))' "$O/compare-$name.json"
  rm -f "$c" "$q"
}
if has compare; then
  has flux && compare flux-dev flux
  has sd3 && compare sd3-large sd3 --variant 3.5-large
fi
