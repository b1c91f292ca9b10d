#!/usr/bin/env bash
# Sourced by the tests and the benchmarks: installs the Python reference stack (transformers, peft,
# gguf, pinned: the SmolLM2 reference is keyed by these versions; sentencepiece and protobuf for the
# SentencePiece vocabularies of the family tests) and the official `openai` client
# (tests/openai_client.py, bench-http's streaming clients) with `jsonschema` (tests/structured_client.py)
# into Tessera's cache venv, once.
# Expects scripts/setup.sh to have been sourced.
tessera_reference_stack=("transformers==5.23.0" "peft==0.21.2" "gguf==0.19.0" "sentencepiece==0.2.3"
    "protobuf==7.36.2" "openai>=1.40" "jsonschema>=4.18,<5")
if ! python - "${tessera_reference_stack[@]}" 2>/dev/null <<'PY'
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, _, version = spec.partition("==")
    have = md.version(name.split(">")[0])
    assert not version or have == version, (name, have)
PY
then
    echo "setup: installing ${tessera_reference_stack[*]} into $VIRTUAL_ENV" >&2
    python -m pip install --disable-pip-version-check -q "${tessera_reference_stack[@]}"
fi
unset tessera_reference_stack
