#!/usr/bin/env bash
# Tessera's main job on a fresh machine: set up torch, fetch the default model, build the release
# binary, and start a single-node head serving SmolLM2. Extra arguments go to `tessera head`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
model=$(scripts/fetch-model.sh)
cargo build --release --locked
exec target/release/tessera head --model "$model" "$@"
