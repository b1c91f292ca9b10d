#!/usr/bin/env bash
# Single-stream decode of a GGUF file, packed (issue 26, target 1): Tessera's packed engine
# (`step_breakdown`: tokens/s and the forward's time per step) and llama.cpp's `llama-bench` built
# for this CPU (scripts/fetch-llama-cpp.sh), on the same file, at the thread count given and at one
# thread, in one run: each side warmed up, runs alternated, medians printed with the load average,
# the CPU's vector features, how the load probe held the 4-bit weights in each run, and the weight
# bytes read per second against the copy bandwidth measured here. Not a test.
#
#   scripts/bench-decode.sh [MODEL] [--threads N] [--runs 5] [--new-tokens 128]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/bench-lib.sh
model= threads=0 runs=5 new_tokens=128
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --new-tokens) new_tokens="$2"; shift 2 ;;
        --*) echo "bench-decode: unknown option $1" >&2; exit 2 ;;
        *) model="$1"; shift ;;
    esac
done
[ -n "$model" ] || model="$(scripts/fetch-model.sh)"
llama_bin="$(scripts/fetch-llama-cpp.sh)"
cargo build --release --locked --workspace --example step_breakdown >&2
bench_threads "$threads"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); vector features:" \
    "$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512(f|bw|dq|vl|_vnni|_bf16)|avx_vnni|amx_(bf16|int8))$' | sort | xargs)"
echo "threads $OMP_NUM_THREADS, $new_tokens new tokens, median of $runs runs (each side warmed up)"
tessera() { # THREADS → "tok/s forward-ms"; the weights line (how the probe chose to hold the
    # 4-bit weights: it measures each kernel at load, per process) goes to $work/weights
    OMP_NUM_THREADS="$1" target/release/examples/step_breakdown \
        "$model" 1 "$new_tokens" packed 2>"$work/stderr" \
        | sed -E 's/.*: ([0-9.]+) tok\/s.*forward ([0-9.]+) .*/\1 \2/'
    grep -m1 '^weights:' "$work/stderr" >> "$work/weights" || true
}
llama() { # THREADS → tok/s
    "$llama_bin/llama-bench" -m "$model" -t "$1" -p 0 -n "$new_tokens" -r 1 -o json \
        2>/dev/null | python -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])'
}
t="$OMP_NUM_THREADS"
tessera "$t" >/dev/null; llama "$t" >/dev/null
: > "$work/weights"
for r in $(seq "$runs"); do
    echo "run $r/$runs, load average $(cut -d' ' -f1 /proc/loadavg)" >&2
    echo "best $(tessera "$t")" >> "$work/runs"
    echo "llama $(llama "$t")" >> "$work/runs"
    if [ "$t" -gt 1 ]; then
        echo "best1 $(tessera 1)" >> "$work/runs"
        echo "llama1 $(llama 1)" >> "$work/runs"
    fi
done
weights=$(sort "$work/weights" | uniq -c | sed -E 's/^ *([0-9]+) weights: /\1 runs: /' | paste -sd';' -)
# Memory bandwidth here: torch copying 256 MiB (read + write), the best of 5.
bandwidth=$(python - <<'PY'
import time, torch
torch.set_num_threads(int(__import__("os").environ["OMP_NUM_THREADS"]))
a = torch.empty(64 * 2**20, dtype=torch.float32); b = torch.empty_like(a); a.fill_(1.0)
best = 0.0
for _ in range(5):
    t = time.perf_counter(); b.copy_(a); dt = time.perf_counter() - t
    best = max(best, 2 * a.numel() * 4 / dt / 1e9)
print(f"{best:.1f}")
PY
)
python - "$work/runs" "$bandwidth" "$weights" "$(cut -d' ' -f1 /proc/loadavg)" "$t" <<'PY'
import statistics, sys, re
runs = {}
for line in open(sys.argv[1]):
    name, *vals = line.split()
    runs.setdefault(name, []).append([float(v) for v in vals])
bw, weights, load, t = float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
med = lambda name, i=0: statistics.median(r[i] for r in runs[name])
m = re.search(r"([0-9.]+) MiB", weights)
mib = float(m.group(1)) if m else None
print(f"weights ({weights}); copy bandwidth {bw} GB/s; load average at the end {load}")
print(f"{'':34} {'tok/s':>8} {'forward ms':>10} {'GB/s of weights':>16}  runs")
rows = [("best", f"Tessera packed, {t} threads"), ("best1", "Tessera packed, 1 thread")]
for name, label in rows:
    if name not in runs:
        continue
    tok, fwd = med(name), med(name, 1)
    gbs = f"{mib * 2**20 * tok / 1e9:16.1f}" if mib else f"{'?':>16}"
    print(f"{label:34} {tok:8.1f} {fwd:10.2f} {gbs}  {[round(r[0], 1) for r in runs[name]]}")
for name, label in [("llama", f"llama.cpp (native), {t} threads"), ("llama1", "llama.cpp (native), 1 thread")]:
    if name in runs:
        print(f"{label:34} {med(name):8.1f} {'':10} {'':16}  {[round(r[0], 1) for r in runs[name]]}")
print(f"Tessera / llama.cpp at {t} threads: {med('best') / med('llama'):.2f}x (target >= 1.0)")
if "best1" in runs:
    print(f"at 1 thread: Tessera / llama.cpp {med('best1') / med('llama1'):.2f}x")
PY
