#!/usr/bin/env bash
# Issue 14's GPU checks, for a session lent a GPU machine (the `device` tool), in two halves:
#
#   scripts/gpu-check.sh prepare   here: builds the CUDA tests (engine/tests/packed_cuda.rs),
#                                  bench_engine and write_random_gguf in release and copies them,
#                                  without debug info, into .gpu/ (ignored via .git/info/exclude)
#   scripts/gpu-check.sh run       there, with .gpu carried: points the binaries at that machine's
#                                  torch libraries, runs the CUDA tests (not the SmolLM2 one: the
#                                  model cannot travel), writes a random ~1.1B Llama as a Q4_0 GGUF
#                                  and benchmarks it packed (torch's CUDA int4 kernel) against the
#                                  same file dequantised, both bfloat16: weight bytes, tok/s.
#
# The device call: command "scripts/gpu-check.sh run", carry [".gpu"], timeout_s 540. The figures
# and logs land in $OUT (tests.log, packed.json, dequantize.json). Not a test; CI has no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    . scripts/setup.sh
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu
    tests=$(cargo test --release --locked -p tessera-engine --test packed_cuda --no-run \
        --message-format=json | python -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "packed_cuda" \
            and m.get("executable"):
        print(m["executable"])')
    cargo build --release --locked --workspace --example bench_engine --example write_random_gguf
    objcopy --strip-debug "$tests" .gpu/packed_cuda
    for b in bench_engine write_random_gguf; do
        objcopy --strip-debug "target/release/examples/$b" ".gpu/$b"
    done
    du -sh .gpu/* ;;
run)
    torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    out="${OUT:-$(mktemp -d)}"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    .gpu/packed_cuda --include-ignored --skip smollm2 --test-threads 1 --nocapture 2>&1 | tee "$out/tests.log"
    model=/tmp/random-1b-q4_0.gguf
    [ -f "$model" ] || .gpu/write_random_gguf "$model" --size 1b
    mkdir -p /tmp/gpu-adapters
    for q in packed dequantize; do
        echo "gpu-check: bench_engine --quantization $q" >&2
        .gpu/bench_engine "$model" /tmp/gpu-adapters --device cuda:0 --dtype bfloat16 \
            --runs 3 --new-tokens 64 --quantization "$q" > "$out/$q.json"
    done
    python3 - "$out/packed.json" "$out/dequantize.json" <<'PY'
import json, sys
p, d = (json.load(open(f)) for f in sys.argv[1:3])
print(f"random 1.1B Llama, Q4_0 GGUF, {p['device']} {p['dtype']}, median of {p['runs']} runs, "
      f"{p['new_tokens']} new tokens; packed projections {p['packed_projections']}/{p['projections']}")
print(f"{'measure':34} {'bf16':>10} {'packed':>10} {'ratio':>7}")
for label, key in [("resident weight MiB", "resident_weight_bytes"),
                   ("single-stream decode tok/s", "single_stream_decode_tok_s"),
                   ("single stream, adapter tok/s", "single_stream_adapter_decode_tok_s"),
                   (f"{p['streams']} streams tok/s", "batch32_tok_s"),
                   (f"{p['streams']} streams, 8 adapters tok/s", "batch32_8_adapters_tok_s")]:
    a, b = d[key], p[key]
    if key.endswith("bytes"):
        a, b = a / 2**20, b / 2**20
    print(f"{label:34} {a:10.1f} {b:10.1f} {b / a:7.2f}")
PY
    ;;
*)
    echo "usage: scripts/gpu-check.sh prepare|run" >&2
    exit 2 ;;
esac
