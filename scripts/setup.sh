#!/usr/bin/env bash
# Sets up what building Tessera needs, idempotently: a Python virtual environment in Tessera's cache
# (outside the repo) holding PyPI's torch==2.11.0, whose libtorch tch 0.24 links against.
#
#   . scripts/setup.sh     # install if missing, then export LIBTORCH_USE_PYTORCH=1 and the venv's PATH
#   scripts/setup.sh       # install if missing, then print the exports
#
# TESSERA_CACHE (default ~/.cache/tessera) moves the cache. Safe to re-run: nothing is reinstalled.

tessera_setup() {
    local torch_version=2.11.0
    export TESSERA_CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
    local venv="$TESSERA_CACHE/venv"

    if ! command -v cargo >/dev/null 2>&1; then
        echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
        return 1
    fi
    mkdir -p "$TESSERA_CACHE" || return 1
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup: creating virtual environment $venv" >&2
        python3 -m venv "$venv" || return 1
    fi
    if ! compgen -G "$venv/lib/python3*/site-packages/torch-${torch_version}*.dist-info" >/dev/null; then
        echo "setup: installing torch==${torch_version} from PyPI into $venv (several GB, once)" >&2
        "$venv/bin/python" -m pip install --disable-pip-version-check -q "torch==${torch_version}" || return 1
    fi
    export VIRTUAL_ENV="$venv"
    case ":$PATH:" in
        *":$venv/bin:"*) ;;
        *) export PATH="$venv/bin:$PATH" ;;
    esac
    export LIBTORCH_USE_PYTORCH=1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    tessera_setup
    echo "export TESSERA_CACHE=\"$TESSERA_CACHE\" VIRTUAL_ENV=\"$VIRTUAL_ENV\" LIBTORCH_USE_PYTORCH=1 PATH=\"$VIRTUAL_ENV/bin:\$PATH\""
else
    tessera_setup
fi
