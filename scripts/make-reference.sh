#!/usr/bin/env bash
# Makes the SmolLM2 reference (transformers + PEFT on the default GGUF: token ids, logits, greedy
# continuations, a seeded PEFT adapter) into Tessera's cache, once per set of versions, and prints
# its directory. The parity tests read it through $TESSERA_REFERENCE_DIR (scripts/test.sh sets it).
#
#   scripts/make-reference.sh                 # make if missing, print the directory
#   scripts/make-reference.sh --check DIR     # recompute DIR's cases with DIR's adapter, compare
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/setup-reference.sh
model=$(scripts/fetch-model.sh)
if [ "${1:-}" = --check ]; then
    exec python scripts/make_reference.py "$model" --check "$2"
fi
dir=$(python scripts/make_reference.py "$model" "$TESSERA_CACHE/reference")
# The newest reference also answers at a fixed path, for `cargo test` run by hand.
ln -sfn "$dir" "$TESSERA_CACHE/reference/smollm2"
echo "$dir"
