#!/usr/bin/env bash
# On the GPU machine: per-kernel time of one 1024² DiT step, the host's (ncu over
# `run-recipe forward`) beside diffusers' (torch.profiler, scripts/dit_profile.py).
# Carry .device/dit-bins.tar.xz (see scripts/dit-device.sh) and .device/wheels.
#   bash scripts/dit-profile-device.sh [flux] [sd3]
WHEELS=diffusers . scripts/dit-device-env.sh
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
prof() {  # name, tokens, synth args...
  local name=$1 tokens=$2; shift 2
  local c=$W/$name.safetensors
  timeout 300 "$RR" synth "$@" --scale full --init conditioned -o "$c" || return
  python3 scripts/dit_reference.py make-inputs "$c" -o "$W/$name-in.safetensors" --latent 128 --tokens "$tokens"
  timeout 300 "$RR" forward "$c" --inputs "$W/$name-in.safetensors" --out "$W/o.safetensors" --device cuda --repeat 3 | tee "$O/$name-host-time.json"
  # One forward under ncu: the step's kernels are the last ones launched.
  timeout 400 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
    "$RR" forward "$c" --inputs "$W/$name-in.safetensors" --out "$W/o.safetensors" --device cuda > "$W/$name-ncu.csv" 2> "$O/$name-ncu.err"
  python3 - "$W/$name-ncu.csv" > "$O/$name-host-kernels.txt" <<'PY'
import csv, sys, collections, re
rows = list(csv.reader(open(sys.argv[1])))
h = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
hdr = rows[h]; ki = hdr.index("Kernel Name"); ti = hdr.index("gpu__time_duration.sum")
agg = collections.OrderedDict()
for r in rows[h + 2:]:
    if len(r) <= max(ki, ti): continue
    try: t = float(r[ti].replace(",", ""))
    except ValueError: continue
    a = agg.setdefault(r[ki], [0, 0.0]); a[0] += 1; a[1] += t
tot = sum(v[1] for v in agg.values())
print(f"host kernels (whole program incl. weight conversion): {tot/1e6:.2f} ms (unit ns assumed)")
for k, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:50]:
    print(f"{t/1e6:9.3f} ms {n:6d}x {k[:150]}")
PY
  head -60 "$O/$name-host-kernels.txt"; tail -5 "$O/$name-ncu.err"
  python3 scripts/dit_profile.py "$c" --inputs "$W/$name-in.safetensors" > "$O/$name-diffusers-kernels.txt" 2>&1
  head -50 "$O/$name-diffusers-kernels.txt"
  rm -f "$c"
}
ARGS=" $* "
has() { [ -z "${ARGS// /}" ] || [[ "$ARGS" == *" $1 "* ]]; }
has flux && prof flux-dev 512 flux
has sd3 && prof sd3-large 154 sd3 --variant 3.5-large
ls -la "$O"
