#!/usr/bin/env bash
# Builds the Python recipe into recipes/python-example/py_recipe.wasm with componentize-py.
#
#   bash recipes/python-example/build.sh          # from anywhere
#   FORCE=1 bash recipes/python-example/build.sh  # rebuild even if up to date
#   PYTHON=python3.12 bash recipes/python-example/build.sh
#
# Needs python3 (3.10+) and pip reaching PyPI. Installs componentize-py into
# recipes/python-example/.venv (a venv, or `pip --target` where venv is missing).
# Idempotent: skips the build when py_recipe.wasm is newer than src/*.py, the WIT
# contract and this script.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wit="$(cd "$here/../../wit" && pwd)"
tools="$here/.venv"
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

# Runs componentize-py from the venv, or from the --target folder.
componentize_py() {
    if [[ -x "$tools/bin/python" ]]; then
        "$tools/bin/python" -c 'import sys; from componentize_py import script; sys.argv[0] = "componentize-py"; sys.exit(script())' "$@"
    else
        PYTHONPATH="$tools/site" "$python" -c 'import sys; from componentize_py import script; sys.argv[0] = "componentize-py"; sys.exit(script())' "$@"
    fi
}

installed_version() {
    componentize_py --version 2>/dev/null | awk '{print $2}'
}

if [[ "$(installed_version || true)" != "$COMPONENTIZE_PY_VERSION" ]]; then
    echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $tools"
    rm -rf "$tools"
    # The CPython runtime for WebAssembly ships inside the componentize-py wheel.
    if "$python" -m venv "$tools" >/dev/null 2>&1; then
        "$tools/bin/python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "componentize-py==$COMPONENTIZE_PY_VERSION"
    else
        echo "($python -m venv is not available here; using pip --target)"
        rm -rf "$tools"
        "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$tools/site" "componentize-py==$COMPONENTIZE_PY_VERSION"
    fi
    [[ "$(installed_version)" == "$COMPONENTIZE_PY_VERSION" ]] || { echo "componentize-py $COMPONENTIZE_PY_VERSION did not install" >&2; exit 1; }
fi

# Typed bindings for editors and type checkers (componentize generates its own copy).
rm -rf "$here/bindings"
componentize_py --quiet -d "$wit" -w recipe-v0 bindings "$here/bindings"

echo "building $out"
cd "$here"
# Only src/ is on the component's Python path (the venv's site-packages stays out:
# VIRTUAL_ENV is unset). The app module is src/app.py; its class Recipe is the export.
(unset VIRTUAL_ENV; componentize_py --quiet -d "$wit" -w recipe-v0 componentize app -p "$here/src" -o "$out.tmp")
mv "$out.tmp" "$out"
echo "built $out ($(du -h "$out" | cut -f1))"
