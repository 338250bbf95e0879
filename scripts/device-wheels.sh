#!/usr/bin/env bash
# Wheels the GPU machine lacks for the reference runs (scripts/unet_reference.py,
# torch_unet_bench.py, modelopt_calib_bench.py). That machine has no network; its
# image already holds torch 2.11, numpy, safetensors 0.8, huggingface-hub 1.33,
# pyyaml, regex, requests, pillow, accelerate, scipy, rich, tqdm, ninja,
# nvidia-ml-py (KINDS.md's package list), Python 3.12. So only what is missing
# travels, with --no-deps, for cp312 / manylinux x86_64, whatever this machine is.
#
# Here (repo root):   bash scripts/device-wheels.sh download
#   .device/wheels/           diffusers                              (~6 MB)
#   .device/wheels-modelopt/  nvidia-modelopt and what it imports    (~21 MB)
# There (carry ".device/wheels", plus ".device/wheels-modelopt" for the ModelOpt run):
#   bash scripts/device-wheels.sh install [diffusers|modelopt|all] && export PYTHONPATH=/tmp/site
# installs into $SITE (default /tmp/site) without touching the image's own packages.
set -euo pipefail
SITE=${SITE:-/tmp/site}

DIFFUSERS=(diffusers==0.42.1)
# What `import modelopt.torch.quantization` needs beyond the image: pydantic (its
# config schemas), omegaconf + antlr4 (modelopt.torch.utils.robust_json) and pulp
# (modelopt.torch.opt.searcher imports it at module level, although mtq.quantize
# never solves an LP; it is 16 MB because it ships CBC solver binaries for every
# platform). pydantic 2.12 wants typing-extensions >= 4.14.1, newer than torch
# needs, so a known one travels along.
MODELOPT=(nvidia-modelopt==0.47.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0
    typing-inspection==0.4.2 typing-extensions==4.15.0 omegaconf==2.3.0 pulp==3.3.2)
# omegaconf 2.3 pins antlr4 4.9.*, published only as an sdist: build its (pure
# Python) wheel here.
ANTLR=antlr4-python3-runtime==4.9.3

dl() {
    local dest=$1
    shift
    mkdir -p "$dest"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@"
}

case "${1:-}" in
download)
    grep -qx '/.device' .gitignore || { echo ".device must be git-ignored (it is in .gitignore)" >&2; exit 1; }
    dl .device/wheels "${DIFFUSERS[@]}"
    dl .device/wheels-modelopt "${MODELOPT[@]}"
    python3 -m pip wheel -q --no-deps -w .device/wheels-modelopt "$ANTLR"
    du -sh .device/wheels .device/wheels-modelopt
    ls -l .device/wheels .device/wheels-modelopt
    ;;
install)
    what=${2:-all}
    dirs=()
    case "$what" in
    diffusers) dirs=(.device/wheels) ;;
    modelopt) dirs=(.device/wheels-modelopt) ;;
    all) dirs=(.device/wheels .device/wheels-modelopt) ;;
    *) echo "install: diffusers, modelopt or all" >&2; exit 2 ;;
    esac
    wheels=()
    for d in "${dirs[@]}"; do
        [ -d "$d" ] || { echo "$d missing: run 'download' here and carry .device" >&2; exit 1; }
        wheels+=("$d"/*.whl)
    done
    # A wheel the image already has at the same or a newer version stays out: on
    # PYTHONPATH it would shadow the image's copy for every other package too.
    mapfile -t wheels < <(python3 - "${wheels[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version
for path in sys.argv[1:]:
    name, ver, _, _ = parse_wheel_filename(path.rsplit("/", 1)[-1])
    try:
        have = Version(version(canonicalize_name(name)))
    except PackageNotFoundError:
        have = None
    if have is not None and have >= ver:
        print(f"  {name} {have} already there (carried {ver})", file=sys.stderr)
    else:
        print(path)
PY
)
    if [ "${#wheels[@]}" -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}"
    fi
    echo "installed into $SITE: ${wheels[*]##*/}"
    ;;
*)
    echo "usage: $0 download | install [diffusers|modelopt|all]" >&2
    exit 2
    ;;
esac
