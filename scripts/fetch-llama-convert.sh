#!/usr/bin/env bash
# Puts llama.cpp's own Hugging Face → GGUF converter (convert_hf_to_gguf.py, its `conversion`
# package and gguf-py) into Tessera's cache and prints the directory. It comes from the llama.cpp
# tree that PyPI's llama-cpp-python sdist vendors; nothing is built. The model-family tests write
# tiny random models with transformers and convert them with it, so Tessera reads the GGUF files
# llama.cpp's converter writes. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
dir="$cache/llama-convert-$version"
python="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}python3"
if [ -f "$dir/convert_hf_to_gguf.py" ]; then
    echo "$dir"
    exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.llama-convert.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-llama-convert: downloading llama-cpp-python==$version's sdist from PyPI" >&2
# The sdist only (its build dependencies as wheels, nothing compiled).
"$python" -m pip download --disable-pip-version-check --no-deps -q \
    --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$version"
src="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp" \
    "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py"
mv "$tmp/$src" "$tmp/out"
rm -rf "$dir"
mv "$tmp/out" "$dir"
echo "$dir"
