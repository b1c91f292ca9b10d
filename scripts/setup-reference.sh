#!/usr/bin/env bash
# Sourced by the benchmarks: installs the Python reference stack (transformers 5, peft, gguf) and
# the official `openai` client (bench-http's streaming clients) into Tessera's cache venv, once.
# Expects scripts/setup.sh to have been sourced.
if ! python -c 'import transformers, peft, gguf, openai; assert transformers.__version__.startswith("5.")' 2>/dev/null; then
    echo "bench: installing transformers 5, peft, gguf and openai into $VIRTUAL_ENV" >&2
    python -m pip install --disable-pip-version-check -q "transformers>=5,<6" peft gguf openai
fi
