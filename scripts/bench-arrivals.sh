#!/usr/bin/env bash
# Realistic arrivals (issue 26, target 4): Poisson arrivals at each of --rates requests/s for
# --duration seconds, prompt and output lengths drawn from long-tailed distributions (seeded: both
# servers get the same requests), streamed over /v1/completions (scripts/bench_arrivals.py),
# against a release `tessera head` and llama.cpp's `llama-server -np N` built for this CPU
# (scripts/fetch-llama-cpp.sh), one after the other on the same model, threads and machine.
# Prints, per rate, goodput (requests/s meeting TTFT <= 1 s and time per output token <= 100 ms)
# and p50/p99 TTFT and inter-token latency for both, and the ratio at the first rate where
# llama-server misses the SLO for more than 10% of requests. Not a test.
#
#   scripts/bench-arrivals.sh [--rates 1,2,4] [--duration 30] [--slots 32] [--threads N] [--seed 7]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/setup-reference.sh
. scripts/bench-lib.sh
rates=1,2,4 duration=30 slots=32 threads=0 seed=7
while [ $# -gt 0 ]; do
    case "$1" in
        --rates) rates="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --slots) slots="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        *) echo "bench-arrivals: unknown option $1" >&2; exit 2 ;;
    esac
done
model=$(scripts/fetch-model.sh)
llama_bin=$(scripts/fetch-llama-cpp.sh)
cargo build --release --locked -q
bench_threads "$threads"
work=$(mktemp -d)
llama_pid=
trap 'bench_stop_head; [ -n "$llama_pid" ] && kill "$llama_pid" 2>/dev/null; rm -rf "$work"' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores; threads $OMP_NUM_THREADS;" \
    "rates $rates/s for $duration s each, seed $seed; llama-server -np $slots"
run_rates() { # NAME URL
    for rate in ${rates//,/ }; do
        echo "bench: $1 at $rate requests/s, load average $(cut -d' ' -f1 /proc/loadavg)" >&2
        python scripts/bench_arrivals.py "$2" --server "$1" --rate "$rate" --duration "$duration" \
            --seed "$seed" >> "$work/$1.jsonl"
    done
}

bench_start_head "$work/head.log" --model "$model" || { tail -20 "$work/head.log"; exit 1; }
python scripts/bench_arrivals.py "$head_url" --server tessera --rate 2 --duration 3 >/dev/null # warm-up
run_rates tessera "$head_url"
bench_stop_head

port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Each slot gets the longest request's room (1,024 prompt + 256 output tokens, and some).
"$llama_bin/llama-server" -m "$model" -t "$OMP_NUM_THREADS" -tb "$OMP_NUM_THREADS" -np "$slots" \
    -c $((slots * 1536)) --port "$port" > "$work/llama.log" 2>&1 &
llama_pid=$!
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.2
done
python scripts/bench_arrivals.py "http://127.0.0.1:$port" --server llama --rate 2 --duration 3 >/dev/null
run_rates llama "http://127.0.0.1:$port"
kill "$llama_pid"; wait "$llama_pid" 2>/dev/null || true; llama_pid=

python - "$work/tessera.jsonl" "$work/llama.jsonl" <<'PY'
import json, sys
t = [json.loads(l) for l in open(sys.argv[1])]
l = [json.loads(l) for l in open(sys.argv[2])]
print(f"{'rate':>5} {'requests':>8} | {'goodput t/l (req/s)':>20} {'SLO met t/l':>13} | "
      f"{'TTFT p50 t/l ms':>17} {'TTFT p99 t/l':>15} | {'ITL p50 t/l ms':>15} {'ITL p99 t/l':>14}")
for a, b in zip(t, l):
    f = lambda x: "-" if x is None else f"{x:.0f}"
    print(f"{a['rate']:5.1f} {a['requests']:8d} | {a['goodput_rps']:9.2f} / {b['goodput_rps']:<8.2f} "
          f"{a['slo_attainment']:5.0%} / {b['slo_attainment']:<5.0%} | "
          f"{f(a['ttft_ms']['p50']):>7} / {f(b['ttft_ms']['p50']):<7} {f(a['ttft_ms']['p99']):>6} / {f(b['ttft_ms']['p99']):<6} | "
          f"{f(a['itl_ms']['p50']):>6} / {f(b['itl_ms']['p50']):<6} {f(a['itl_ms']['p99']):>5} / {f(b['itl_ms']['p99']):<6}")
miss = next((i for i, b in enumerate(l) if b["slo_attainment"] < 0.9), None)
if miss is None:
    print("llama-server met the SLO for 90% of requests at every rate: raise --rates")
else:
    a, b = t[miss], l[miss]
    ratio = a["goodput_rps"] / b["goodput_rps"] if b["goodput_rps"] else float("inf")
    print(f"at {b['rate']}/s, where llama-server starts missing the SLO: Tessera's goodput is "
          f"{ratio:.2f}x llama-server's (target >= 2.0)")
PY
