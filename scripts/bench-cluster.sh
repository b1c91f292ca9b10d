#!/usr/bin/env bash
# Cluster figures on this machine (release build, SmolLM2): p50/p99 of 200 small /chat requests
# on a head-local replica vs a worker's, and how fast a killed worker is seen and its job resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
model=$(scripts/fetch-model.sh)
cargo build --release --locked -q
python scripts/bench_cluster.py target/release/tessera "$model"
