#!/usr/bin/env bash
# Sourced by the benchmarks: installs the Python reference stack (transformers 5, peft, gguf) into
# Tessera's cache venv, once. Expects scripts/setup.sh to have been sourced.
if ! python -c 'import transformers, peft, gguf; assert transformers.__version__.startswith("5.")' 2>/dev/null; then
    echo "bench: installing transformers 5, peft and gguf into $VIRTUAL_ENV" >&2
    python -m pip install --disable-pip-version-check -q "transformers>=5,<6" peft gguf
fi
