#!/usr/bin/env bash
# Makes a reference (transformers + PEFT on a GGUF file: token ids, logits, greedy continuations,
# for SmolLM2 a seeded PEFT adapter) into Tessera's cache, once per set of versions, and prints its
# directory. The parity tests read SmolLM2's through $TESSERA_REFERENCE_DIR and Gemma 3's through
# $TESSERA_GEMMA3_REFERENCE_DIR (scripts/test.sh sets both).
#
#   scripts/make-reference.sh                 # SmolLM2: make if missing, print the directory
#   scripts/make-reference.sh gemma3          # Gemma 3 270M (scripts/fetch-gemma3.sh's file)
#   scripts/make-reference.sh --check DIR     # recompute DIR's SmolLM2 cases with DIR's adapter
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/setup-reference.sh
name=smollm2
case "${1:-}" in
--check) exec python scripts/make_reference.py "$(scripts/fetch-model.sh)" --check "$2" ;;
gemma3) name=gemma3; model=$(scripts/fetch-gemma3.sh) ;;
*) model=$(scripts/fetch-model.sh) ;;
esac
dir=$(python scripts/make_reference.py "$model" "$TESSERA_CACHE/reference")
# The newest reference also answers at a fixed path, for `cargo test` run by hand.
ln -sfn "$dir" "$TESSERA_CACHE/reference/$name"
echo "$dir"
