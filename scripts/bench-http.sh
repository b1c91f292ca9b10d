#!/usr/bin/env bash
# Latency and throughput of `POST /chat` (max_tokens 32) at 1 and 16 concurrent clients against a
# release `tessera head` serving the default SmolLM2 on this machine. Extra arguments go to
# scripts/bench_http.py (e.g. --concurrency 1 4 16).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
model=$(scripts/fetch-model.sh)
cargo build --release --locked -q
work=$(mktemp -d)
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/release/tessera head --model "$model" --port "$port" \
    --set "adapters.root=\"$work/adapters\"" --set "training.data_root=\"$work/data\"" \
    --set "jobs.db_path=\"$work/jobs.sqlite\"" --set cluster.port=0 >"$work/head.log" 2>&1 &
head_pid=$!
trap 'kill $head_pid 2>/dev/null; wait $head_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
    sleep 0.2
done
curl -sf "http://127.0.0.1:$port/ready" >/dev/null || { cat "$work/head.log"; exit 1; }
python scripts/bench_http.py "http://127.0.0.1:$port" "$@"
