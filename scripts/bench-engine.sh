#!/usr/bin/env bash
# Engine benchmark: Tessera's engine against transformers (+ PEFT) on the same model, same machine,
# same run. Prints a table of figures and ratios. Not a test: nothing here fails on a slow machine.
#
#   scripts/bench-engine.sh [MODEL] [--device cpu|cuda:0]
#
# MODEL defaults to the SmolLM2 GGUF (fetched if missing). The reference needs transformers 5,
# peft and gguf, installed into Tessera's cache venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
model="${1:-}"
if [ -z "$model" ] || [ "${model#--}" != "$model" ]; then
    model="$(scripts/fetch-model.sh)"
else
    shift
fi
. scripts/setup-reference.sh
cargo build --release --locked -p tessera-engine --example bench_engine
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "bench: Tessera engine on $model" >&2
target/release/examples/bench_engine "$model" "$work" "$@" > "$work/tessera.json"
echo "bench: transformers reference" >&2
python scripts/bench_reference.py "$model" "$work" > "$work/reference.json"
python - "$work/tessera.json" "$work/reference.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2]))
print(f"device {t['device']}  dtype {t['dtype']}  prompt {t['prompt_tokens']} tokens, {t['new_tokens']} new")
print(f"{'measure':38} {'tessera':>10} {'transformers':>13} {'ratio':>7}  target")
rows = [("single-stream decode tok/s", "single_stream_decode_tok_s", True, ">= 1.0"),
        ("32 streams tok/s", "batch32_tok_s", True, ">= 3.0"),
        ("32 streams, 8 adapters tok/s", "batch32_8_adapters_tok_s", True, ""),
        ("load a new r=16 adapter ms", "adapter_load_ms", False, "<= 50 ms"),
        ("load the model s", "load_model_s", False, "")]
for name, key, higher, target in rows:
    a, b = t.get(key), r.get(key)
    ratio = (a / b if higher else b / a) if a and b else float("nan")
    print(f"{name:38} {a:10.2f} {b if b is not None else float('nan'):13.2f} {ratio:6.2f}x  {target}")
mixed = t["batch32_8_adapters_tok_s"] / t["batch32_tok_s"]
print(f"{'8 adapters / base-only (tessera)':38} {mixed:10.2f} {'':13} {'':7}  >= 0.8")
PY
