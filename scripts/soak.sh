#!/usr/bin/env bash
# A soak of a head and two workers on loopback (scripts/soak.py): chat and OpenAI load with an
# adapter, fine-tunes, deployments created and deleted, a worker SIGKILLed and restarted every
# 90 s, one head restart. Prints requests ok / retryable / failed, jobs submitted / succeeded /
# lost (exits 1 if any is lost), RSS and fds at start and end. Not part of the test command.
#   scripts/soak.sh MINUTES   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
model=$(scripts/fetch-model.sh)
cargo build --release --locked -q
python scripts/soak.py target/release/tessera "$model" "${1:-30}"
