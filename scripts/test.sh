#!/usr/bin/env bash
# Tessera's tests on a fresh machine: set up torch, fetch the default model (a few tests load it),
# check formatting and lints, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export TESSERA_MODEL_PATH
TESSERA_MODEL_PATH=$(scripts/fetch-model.sh)
# The official `openai` client checks the OpenAI-compatible routes (tests/openai_client.py).
python -c "import openai" 2>/dev/null || python -m pip install --quiet "openai>=1.40"
# schemathesis fuzzes every route from /openapi.json (tests/schema_fuzz.rs, tests/schema_fuzz.py).
python -c "import schemathesis" 2>/dev/null || python -m pip install --quiet "schemathesis>=4,<5"
# The dashboard test drives Debian's chromium through chromedriver (tests/dashboard.py, Selenium).
# Installed where apt is at hand and we are root; elsewhere the test says why it skips.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        (timeout 600 apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
            || { timeout 300 apt-get update -qq >/dev/null 2>&1 \
                 && timeout 600 apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }) \
            || echo "test.sh: could not install chromium; the dashboard test will skip" >&2
    fi
fi
# gguf-py (llama.cpp's numpy reference) checks the K-quant dequantisation (engine/tests/kquants.rs).
python -c "import gguf.quants" 2>/dev/null || python -m pip install --quiet "gguf>=0.10"
python -c "import selenium" 2>/dev/null || python -m pip install --quiet "selenium>=4.20,<5"
# transformers' GGUF tokenizer conversion checks SentencePiece vocabularies (engine/tests/tokenizer_spm.rs).
python -c 'import transformers; assert transformers.__version__.startswith("5.")' 2>/dev/null \
    || python -m pip install --quiet "transformers>=5,<6"
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    export TESSERA_REQUIRE_BROWSER=1
fi
export TESSERA_PYTHON TESSERA_REQUIRE_OPENAI=1 TESSERA_REQUIRE_SCHEMATHESIS=1 TESSERA_REQUIRE_GGUF=1 \
    TESSERA_REQUIRE_TRANSFORMERS=1
TESSERA_PYTHON=$(command -v python)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
# The opt-in jemalloc build (engine/src/allocator.rs): libtorch's allocations reach it.
cargo test -p tessera-engine --locked --features jemalloc --lib allocator
