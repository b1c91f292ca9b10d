#!/usr/bin/env bash
# Tessera's tests on a fresh machine: set up torch, fetch the default model (a few tests load it),
# check formatting and lints, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export TESSERA_MODEL_PATH
TESSERA_MODEL_PATH=$(scripts/fetch-model.sh)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
