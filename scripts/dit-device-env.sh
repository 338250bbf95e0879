# Sourced by the DiT device scripts (dit-device.sh, dit-profile-device.sh,
# dit-modelopt-device.sh) on the GPU machine: unpacks the carried binaries, sets
# the environment and installs the carried wheels. In: QS_DEVICE_DIR (default
# .device), WORK (default /tmp/qs), OUT (the device tool's), WHEELS (what
# scripts/device-wheels.sh installs: diffusers or all). Out: D, W, O, RR, and
# PYTHONPATH naming the installed wheels.
set -uo pipefail
D=${QS_DEVICE_DIR:-.device}
W=${WORK:-/tmp/qs}
O=${OUT:-$W/out}
mkdir -p "$W/bin" "$O"
tar -C "$W/bin" -xJf "$D/dit-bins.tar.xz"
RR=$W/bin/run-recipe
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
bash scripts/device-wheels.sh install "${WHEELS:-diffusers}" >"$O/wheels.log" 2>&1 && export PYTHONPATH=${SITE:-/tmp/site}
