#!/usr/bin/env bash
# The realistic serving workload against a release `tessera head` serving the default SmolLM2 on
# this machine, side by side with transformers in the same run (both on the same threads):
#  1. `--clients` (32) concurrent streaming clients (the official `openai` client), each a
#     different chat prompt of a different length, 64-128 new tokens each (fixed per prompt,
#     greedy), against transformers generating the same prompts as one left-padded static batch;
#  2. the same spread over 8 random r=16 adapters (PEFT with `adapter_names` per row on the
#     reference side);
#  3. structured outputs: the same clients, half of them asking for JSON under a schema
#     (`response_format`), against the base run: aggregate tok/s ratio and the mean mask time;
#  4. requests sharing a ~1,000-token system prompt: TTFT of a new request with the prefix cached
#     (`batching.prefix_cache=true`) vs not (`=false`); prints "prefix cache: not available" where
#     the head has no such key.
# Prints a table of figures and ratios with the issue's targets. Not a test. Options (all passed on
# to the Python sides): --threads N (default: all cores), --runs 3, --clients 32, --min-tokens 64,
# --max-tokens 128, --prefix-tokens 1000, --prefix-requests 4, --chat to add the older
# POST /chat figure at 1 and 16 clients, and --structured-only for phase 3 alone (with its base
# run, no reference).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/setup-reference.sh
. scripts/bench-lib.sh
threads=0 runs=3 clients=32 min_tokens=64 max_tokens=128 prefix_tokens=1000 prefix_requests=4 chat=
structured_only=
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --clients) clients="$2"; shift 2 ;;
        --min-tokens) min_tokens="$2"; shift 2 ;;
        --max-tokens) max_tokens="$2"; shift 2 ;;
        --prefix-tokens) prefix_tokens="$2"; shift 2 ;;
        --prefix-requests) prefix_requests="$2"; shift 2 ;;
        --chat) chat=1; shift ;;
        --structured-only) structured_only=1; shift ;;
        *) echo "bench-http: unknown option $1" >&2; exit 2 ;;
    esac
done
model=$(scripts/fetch-model.sh)
cargo build --release --locked -q
bench_threads "$threads"
work=$(mktemp -d)
trap 'bench_stop_head; rm -rf "$work"' EXIT
shape=(--clients "$clients" --min-tokens "$min_tokens" --max-tokens "$max_tokens" --runs "$runs")
python - "$model" "$work/adapters" <<'PY'
import os, sys
sys.path.insert(0, "scripts")
from bench_common import write_random_adapters
from transformers import AutoConfig
d, f = os.path.split(os.path.abspath(sys.argv[1]))
write_random_adapters(AutoConfig.from_pretrained(d, gguf_file=f), sys.argv[2], n=8, r=16)
PY

# The reference first, with no head running.
phases="base adapters structured"
[ -n "$structured_only" ] && phases="base structured"
for phase in $([ -z "$structured_only" ] && echo base adapters); do
    python scripts/bench_http_reference.py "$model" "$work/adapters" --phase "$phase" \
        --threads "$OMP_NUM_THREADS" "${shape[@]}" > "$work/ref_$phase.json"
done

head_args=(--model "$model" --set "adapters.root=\"$work/adapters\""
    --set "training.data_root=\"$work/data\"" --set "jobs.db_path=\"$work/jobs.sqlite\""
    --set cluster.port=0 --set "batching.max_batch_size=$((clients > 32 ? clients : 32))")
name=$(basename "$model")
prefix=available
if ! bench_start_head "$work/head.log" "${head_args[@]}" --set batching.prefix_cache=true; then
    if grep -q "unknown config key \`batching.prefix_cache\`" "$work/head.log"; then
        prefix="not available"
        echo "bench: prefix cache: not available (this head has no batching.prefix_cache)" >&2
        bench_start_head "$work/head.log" "${head_args[@]}" || { cat "$work/head.log"; exit 1; }
    else
        cat "$work/head.log"
        exit 1
    fi
fi
for phase in $phases; do
    python scripts/bench_http.py workload "$head_url" --model "$name" --phase "$phase" \
        "${shape[@]}" > "$work/tessera_$phase.json"
done
prefix_args=(--model "$name" --phase prefix --prefix-tokens "$prefix_tokens"
    --prefix-requests "$prefix_requests")
[ -n "$structured_only" ] && prefix=skipped
[ -z "$structured_only" ] && python scripts/bench_http.py workload "$head_url" "${prefix_args[@]}" > "$work/prefix_on.json"
if [ -n "$chat" ]; then
    python scripts/bench_http.py chat "$head_url" > "$work/chat.json"
fi
bench_stop_head
if [ "$prefix" = available ]; then
    bench_start_head "$work/head-off.log" "${head_args[@]}" --set batching.prefix_cache=false \
        || { cat "$work/head-off.log"; exit 1; }
    python scripts/bench_http.py workload "$head_url" "${prefix_args[@]}" > "$work/prefix_off.json"
    bench_stop_head
fi

python - "$work" "$prefix" <<'PY'
import json, os, sys
w, prefix = sys.argv[1], sys.argv[2]
def load(name):
    p = os.path.join(w, name)
    return json.load(open(p)) if os.path.exists(p) else None
tb, ta, rb, ra = (load(f) for f in ("tessera_base.json", "tessera_adapters.json",
                                     "ref_base.json", "ref_adapters.json"))
on, off, chat = load("prefix_on.json"), load("prefix_off.json"), load("chat.json")
ts = load("tessera_structured.json")
if prefix == "skipped":
    print(f"threads {os.environ.get('OMP_NUM_THREADS')}, {tb['clients']} streaming clients, "
          f"median of {len(tb['runs'])} runs, load average {os.getloadavg()[0]:.2f}")
    print(f"base: {tb['tok_s']:.1f} tok/s; half JSON schema: {ts['tok_s']:.1f} tok/s; ratio "
          f"{ts['tok_s'] / tb['tok_s']:.2f}x (target >= 0.9)")
    print(f"TTFT p50 {tb['ttft_p50_ms']:.0f} / {ts['ttft_p50_ms']:.0f} ms, ITL p50 "
          f"{tb['itl_p50_ms']:.1f} / {ts['itl_p50_ms']:.1f} ms (base / structured)")
    if ts.get("masks"):
        print(f"grammar mask: mean {ts['mask_us']:.1f} µs over {int(ts['masks'])} masks "
              f"(on a helper thread beside the forward)")
    sys.exit(0)
TODAY = 45.9  # bench-http's 16-client POST /chat tokens/s at commit 51f11e1 (issue 12)
print(f"threads {os.environ.get('OMP_NUM_THREADS')}, {tb['clients']} streaming clients, "
      f"median of {len(tb['runs'])} runs; reference: transformers static batch (left padding)")
print(f"{'measure':34} {'tessera':>10} {'reference':>10} {'ratio':>7}  target")
def row(name, a, b, higher=True, target=""):
    ratio = (a / b if higher else b / a) if a and b else float("nan")
    bs = f"{b:10.1f}" if b is not None else f"{'':10}"
    print(f"{name:34} {a:10.1f} {bs} {ratio:6.2f}x  {target}")
row("base: aggregate tok/s", tb["tok_s"], rb["tok_s"], target=">= 3x")
row("base: tok/s vs bench-http at 51f11e1", tb["tok_s"], TODAY, target=">= 2.5x")
for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
    row(f"base: {k.replace('_ms', '')} ms", tb[k], rb[k], higher=False)
row("8 adapters: aggregate tok/s", ta["tok_s"], ra["tok_s"])
for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
    row(f"8 adapters: {k.replace('_ms', '')} ms", ta[k], ra[k], higher=False)
if ra.get("note"):
    print(f"  (reference: {ra['note']})")
print(f"{'tessera TTFT p99 / p50 (base)':34} {tb['ttft_p99_ms'] / tb['ttft_p50_ms']:10.2f} "
      f"{'':10} {'':7}  <= 2")
print(f"{'tessera 8 adapters / base tok/s':34} {ta['tok_s'] / tb['tok_s']:10.2f} {'':10} "
      f"{'':7}  >= 0.8")
if ts:
    print(f"{'half JSON schema / base tok/s':34} {ts['tok_s'] / tb['tok_s']:10.2f} {'':10} "
          f"{'':7}  >= 0.9  ({ts['tok_s']:.1f} vs {tb['tok_s']:.1f} tok/s)")
    if ts.get("masks"):
        print(f"{'grammar mask, mean µs (beside fwd)':34} {ts['mask_us']:10.1f} {'':10} {'':7}  "
              f"({int(ts['masks'])} masks; base ITL p50 {tb['itl_p50_ms']:.1f} ms)")
if prefix == "available" and off:
    print(f"{'prefix TTFT ms: cached / not':34} {on['ttft_ms']:10.1f} {off['ttft_ms']:10.1f} "
          f"{on['ttft_ms'] / off['ttft_ms']:6.2f}x  <= 0.2x")
else:
    print(f"prefix cache: not available; TTFT of a new request after a ~{on['prefix_tokens']}-token "
          f"shared system prompt: {on['ttft_ms']:.1f} ms")
if chat:
    for r in chat:
        print(f"POST /chat {r['concurrency']:>3} clients: {r['tokens_per_s']:.1f} tok/s, "
              f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms")
PY
