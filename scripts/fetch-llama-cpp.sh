#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` and `llama-server` for this CPU (-DGGML_NATIVE=ON) from the
# llama.cpp tree that PyPI's llama-cpp-python sdist vendors, with cmake from PyPI, into Tessera's
# cache, and prints the directory holding the two binaries. The benchmarks compare Tessera with
# it on the same machine, file and threads (issue 26). Idempotent; the build is kept per version
# and per CPU (its flags), since a native build runs only where it was built. Not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
cpu=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
dir="$cache/llama-cpp-$version-$cpu"
python="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}python3"
if [ -x "$dir/bin/llama-bench" ] && [ -x "$dir/bin/llama-server" ]; then
    echo "$dir/bin"
    exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.llama-cpp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-llama-cpp: downloading llama-cpp-python==$version's sdist from PyPI" >&2
"$python" -m pip download --disable-pip-version-check --no-deps -q \
    --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$version"
tar -xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp" "llama_cpp_python-$version/vendor/llama.cpp"
cmake=cmake
if ! command -v cmake >/dev/null; then
    "$python" -m pip install --disable-pip-version-check -q "cmake>=3.28,<5"
    cmake="$("$python" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))')"
fi
src="$tmp/llama_cpp_python-$version/vendor/llama.cpp"
echo "fetch-llama-cpp: building llama-bench and llama-server (-DGGML_NATIVE=ON; a few minutes)" >&2
"$cmake" -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF >&2
"$cmake" --build "$tmp/build" --config Release -j "$(nproc)" --target llama-bench llama-server >&2
mkdir -p "$tmp/out/bin"
cp "$tmp/build/bin/llama-bench" "$tmp/build/bin/llama-server" "$tmp/out/bin/"
"$tmp/out/bin/llama-bench" --help >/dev/null
rm -rf "$dir"
mv "$tmp/out" "$dir"
echo "$dir/bin"
