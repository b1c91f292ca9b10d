#!/usr/bin/env bash
# Packed 4-bit weights against the dequantised float32 path (issue 14), on the same GGUF, device,
# thread count and run: Tessera's engine benchmark (scripts/bench-engine.sh's, without the
# transformers side) once with `--quantization dequantize` and once with `packed`, each warmed up
# and the median of --runs runs with the load average printed; then a table of single-stream
# decode, 32 streams, resident weight bytes (the engine's count and RSS) against the GGUF's tensor
# bytes, with the issue's targets. When llama-cpp-python is installed, llama.cpp's single-stream
# decode on the same file and thread count is measured too (build it from PyPI's source with
# CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON"; without AVX-512 units,
# -DGGML_AVX512=OFF), in the venv or in the Python that $TESSERA_LLAMA_PYTHON names. Not a test.
#
#   scripts/bench-quant.sh [MODEL] [--threads N] [--runs 3] [--streams 32] [--new-tokens 128]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/bench-lib.sh
model= threads=0 pass=() new_tokens=128 runs=3
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --new-tokens) new_tokens="$2"; pass+=("$1" "$2"); shift 2 ;;
        --runs) runs="$2"; pass+=("$1" "$2"); shift 2 ;;
        --streams) pass+=("$1" "$2"); shift 2 ;;
        --*) echo "bench-quant: unknown option $1" >&2; exit 2 ;;
        *) model="$1"; shift ;;
    esac
done
[ -n "$model" ] || model="$(scripts/fetch-model.sh)"
cargo build --release --locked --workspace --example bench_engine
bench_threads "$threads"
pass+=(--threads "$OMP_NUM_THREADS")
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for q in dequantize packed; do
    echo "bench: Tessera engine, --quantization $q, on $model" >&2
    target/release/examples/bench_engine "$model" "$work" --dtype float32 --quantization "$q" \
        "${pass[@]}" > "$work/$q.json"
done
llama="{}"
llama_py="${TESSERA_LLAMA_PYTHON:-python}"
if "$llama_py" -c "import llama_cpp" 2>/dev/null; then
    echo "bench: llama.cpp (llama-cpp-python) single-stream decode" >&2
    # Tessera's figure: the same prompt, end-of-text banned, tokens after the first over the time
    # after the first; median of --runs after a warm-up.
    llama=$("$llama_py" - "$model" "$OMP_NUM_THREADS" "$new_tokens" "$runs" <<'PY'
import json, os, statistics, sys, time
from llama_cpp import Llama
model, threads, new_tokens, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
prompt = "Write a short story about a robot who learns to paint."
no_eos = {llm.token_eos(): -1e9}
def decode_rate():
    llm.reset()
    first = None
    n = 0
    for _ in llm(prompt, max_tokens=new_tokens, temperature=0.0, logit_bias=no_eos, stream=True):
        n += 1
        if first is None:
            first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)
decode_rate()
rates = []
for r in range(runs):
    print(f"bench: llama.cpp single stream (run {r + 1}/{runs}), load average "
          f"{os.getloadavg()[0]:.2f}", file=sys.stderr)
    rates.append(decode_rate())
print(json.dumps({"single_stream_decode_tok_s": statistics.median(rates), "runs": rates}))
PY
)
else
    echo "bench: llama-cpp-python is not installed: no llama.cpp column" >&2
fi
python - "$work/dequantize.json" "$work/packed.json" "$model" "$llama" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); p = json.load(open(sys.argv[2])); llama = json.loads(sys.argv[4])
try:
    import gguf
    gguf_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(sys.argv[3]).tensors)
except Exception:
    gguf_bytes = None
print(f"threads {d['threads']}, median of {d['runs']} runs, prompt {d['prompt_tokens']} tokens, "
      f"{d['new_tokens']} new; packed projections {p['packed_projections']}/{p['projections']}")
mib = lambda b: b / 2**20
rows = [
    ("single-stream decode tok/s", "single_stream_decode_tok_s", ">= 2.0 (and >= 1.0x llama.cpp)"),
    ("single stream with an adapter tok/s", "single_stream_adapter_decode_tok_s", ""),
    (f"{d['streams']} streams tok/s", "batch32_tok_s", ">= 1.0"),
    (f"{d['streams']} streams, 8 adapters tok/s", "batch32_8_adapters_tok_s", ""),
]
print(f"{'measure':34} {'float32':>10} {'packed':>10} {'ratio':>7}  target")
for label, key, target in rows:
    print(f"{label:34} {d[key]:10.1f} {p[key]:10.1f} {p[key] / d[key]:7.2f}  {target}")
print(f"{'resident weight MiB (engine)':34} {mib(d['resident_weight_bytes']):10.1f} "
      f"{mib(p['resident_weight_bytes']):10.1f} {p['resident_weight_bytes'] / d['resident_weight_bytes']:7.2f}")
print(f"{'RSS after load MiB':34} {mib(d['rss_after_load_bytes']):10.1f} {mib(p['rss_after_load_bytes']):10.1f} "
      f"{p['rss_after_load_bytes'] / max(d['rss_after_load_bytes'], 1):7.2f}")
if d.get("peak_rss_bytes") and p.get("peak_rss_bytes"):
    print(f"{'peak RSS MiB (whole benchmark)':34} {mib(d['peak_rss_bytes']):10.1f} {mib(p['peak_rss_bytes']):10.1f} "
          f"{p['peak_rss_bytes'] / d['peak_rss_bytes']:7.2f}")
print(f"allocator: {p.get('allocator', 'unknown')}")
if gguf_bytes:
    print(f"GGUF tensor bytes {mib(gguf_bytes):.1f} MiB: packed resident weights are "
          f"{p['resident_weight_bytes'] / gguf_bytes:.2f}x (target <= 1.3x)")
if llama:
    l = llama["single_stream_decode_tok_s"]
    print(f"llama.cpp single-stream decode {l:.1f} tok/s: packed is {p['single_stream_decode_tok_s'] / l:.2f}x, "
          f"float32 {d['single_stream_decode_tok_s'] / l:.2f}x")
PY
