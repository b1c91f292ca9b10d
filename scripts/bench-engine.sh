#!/usr/bin/env bash
# Engine benchmark: Tessera's engine against transformers (+ PEFT) on the same model, device, dtype
# and thread count, in the same run. Each side warms up every measured shape, prints the load
# average before each measurement and reports the median of --runs runs; both probe the memory
# bandwidth and report single-stream decode as a fraction of the batch-1 roofline (weight bytes /
# bandwidth). Prints a table of figures and ratios with the issue's targets. Not a test.
#
#   scripts/bench-engine.sh [MODEL | --model random-1b] [--device cpu|cuda:0]
#       [--dtype float32|bfloat16] [--threads N] [--runs 3] [--streams 32] [--new-tokens 128]
#       [--quantization dequantize|packed|auto]   (Tessera's side; scripts/bench-quant.sh compares)
#
# MODEL defaults to the SmolLM2 GGUF (fetched if missing); `--model random-1b` writes (once) a
# ~1.07B-parameter Llama with random bf16 weights under the models cache, for GPU runs. --dtype
# defaults to float32 on the CPU and bfloat16 on CUDA; --threads to all cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/setup-reference.sh
. scripts/bench-lib.sh
model= threads=0 pass=() quant=()
while [ $# -gt 0 ]; do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --quantization) quant=(--quantization "$2"); shift 2 ;;
        --device|--dtype|--runs|--streams|--new-tokens) pass+=("$1" "$2"); shift 2 ;;
        --*) echo "bench-engine: unknown option $1" >&2; exit 2 ;;
        *) model="$1"; shift ;;
    esac
done
case "$model" in
    "") model="$(scripts/fetch-model.sh)" ;;
    random-1b)
        model=$(python scripts/write_random_llama.py "$TESSERA_CACHE/models/random-1b" \
            "$(scripts/fetch-model.sh)" --size 1b) ;;
esac
# --workspace: the same dependency features as the release head, so nothing builds twice.
cargo build --release --locked --workspace --example bench_engine
bench_threads "$threads"
pass+=(--threads "$OMP_NUM_THREADS")
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "bench: Tessera engine on $model" >&2
target/release/examples/bench_engine "$model" "$work" "${pass[@]}" "${quant[@]}" > "$work/tessera.json"
echo "bench: transformers reference" >&2
python scripts/bench_reference.py "$model" "$work" "${pass[@]}" > "$work/reference.json"
python - "$work/tessera.json" "$work/reference.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2]))
gpu = "cuda" in t["device"].lower()
print(f"device {t['device']}  dtype {t['dtype']} / {r['dtype']}  threads {t['threads']}  "
      f"prompt {t['prompt_tokens']} tokens, {t['new_tokens']} new, median of {t['runs']} runs")
print(f"memory bandwidth {t['bandwidth_gb_s']:.1f} GB/s (tch) / {r['bandwidth_gb_s']:.1f} GB/s "
      f"(torch); decode reads {t['weight_bytes'] / 1e6:.0f} MB of weights a step: "
      f"batch-1 roofline {t['roofline_tok_s']:.1f} tok/s")
print(f"{'measure':38} {'tessera':>10} {'transformers':>13} {'ratio':>7}  target")
n = t["streams"]
rows = [("single-stream decode tok/s", "single_stream_decode_tok_s", True,
         ">= 1.0 (GPU)" if gpu else ">= 1.2"),
        ("single stream with an adapter tok/s", "single_stream_adapter_decode_tok_s", True, ""),
        (f"{n} streams tok/s", "batch32_tok_s", True, ">= 1.5 (GPU)" if gpu else ">= 3.0"),
        (f"{n} streams, 8 adapters tok/s", "batch32_8_adapters_tok_s", True, ""),
        ("load a new r=16 adapter ms", "adapter_load_ms", False, "<= 50 ms"),
        ("load the model s", "load_model_s", False, "")]
for name, key, higher, target in rows:
    a, b = t.get(key), r.get(key)
    ratio = (a / b if higher else b / a) if a and b else float("nan")
    print(f"{name:38} {a:10.2f} {b if b is not None else float('nan'):13.2f} {ratio:6.2f}x  {target}")
print(f"{'single stream / roofline':38} {t['roofline_fraction']:10.2f} "
      f"{r['roofline_fraction']:13.2f} {'':7}  >= 0.8")
mixed = t["batch32_8_adapters_tok_s"] / t["batch32_tok_s"]
print(f"{'8 adapters / base-only (tessera)':38} {mixed:10.2f} {'':13} {'':7}  >= 0.8")
alone = t["single_stream_adapter_decode_tok_s"] / t["single_stream_decode_tok_s"]
print(f"{'one adapter / base-only, 1 stream':38} {alone:10.2f} {'':13} {'':7}  >= 0.8")
PY
