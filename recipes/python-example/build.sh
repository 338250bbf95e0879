#!/usr/bin/env bash
# Builds the Python recipe into recipes/python-example/py_recipe.wasm with componentize-py.
#
#   bash recipes/python-example/build.sh          # from anywhere
#   FORCE=1 bash recipes/python-example/build.sh  # rebuild even if up to date
#
# Needs python3 (3.10+) with venv and pip reaching PyPI. Idempotent: it skips the
# build when py_recipe.wasm is newer than src/*.py, the WIT contract and this script.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wit="$here/../../wit"
venv="$here/.venv"
out="$here/py_recipe.wasm"
python="${PYTHON:-python3}"

sources=("$here"/src/*.py "$wit/recipe.wit" "$here/build.sh")

up_to_date() {
    [[ -f "$out" ]] || return 1
    local s
    for s in "${sources[@]}"; do
        [[ "$s" -nt "$out" ]] && return 1
    done
    return 0
}

if [[ "${FORCE:-0}" != 1 ]] && up_to_date; then
    echo "py_recipe.wasm is up to date ($out)"
    exit 0
fi

# The venv holds only componentize-py (the CPython runtime ships inside its wheel).
if ! "$venv/bin/componentize-py" --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION"; then
    echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

# Typed bindings for editors and type checkers (componentize generates its own copy).
rm -rf "$here/bindings"
"$venv/bin/componentize-py" --quiet -d "$wit" -w recipe-v0 bindings "$here/bindings"

echo "building $out"
cd "$here"
# Only src/ is on the component's Python path (the venv's site-packages stays out:
# VIRTUAL_ENV is unset). The app module is src/app.py; its class Recipe is the export.
env -u VIRTUAL_ENV "$venv/bin/componentize-py" --quiet -d "$wit" -w recipe-v0 \
    componentize app -p "$here/src" -o "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out ($(du -h "$out" | cut -f1))"
