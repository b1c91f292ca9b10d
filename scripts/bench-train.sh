#!/usr/bin/env bash
# Training benchmark: Tessera's LoRA SFT against PEFT + transformers on the same model, data and
# thread count, on this machine, in the same run. The runs alternate (tessera, tessera with layer
# recompute, tessera on the 4-bit base kept packed (QLoRA; GGUF models), PEFT; repeated --runs times) so a change in load hits every side; each figure is the
# median, and each run prints the load average before it. The timed steps exclude the first
# (warm-up) and the last (which writes Tessera's final checkpoint). Prints tokens/s and peak RSS
# with ratios. Not a test.
#
#   scripts/bench-train.sh [MODEL] [--threads N] [--runs 3] [--baseline PATH] [--features jemalloc]
#
# --baseline adds a row for another build of the bench_train example (e.g. one built from main),
# measured in the same alternation. --features builds Tessera's side with those cargo features
# (`jemalloc`: jemalloc as the process's allocator, engine/src/allocator.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/setup-reference.sh
. scripts/bench-lib.sh
model= threads=0 runs=3 baseline= features=
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --baseline) baseline="$2"; shift 2 ;;
        --features) features="$2"; shift 2 ;;
        --*) echo "bench-train: unknown option $1" >&2; exit 2 ;;
        *) model="$1"; shift ;;
    esac
done
model="${model:-$(scripts/fetch-model.sh)}"
# --workspace: the same dependency features as the release head, so nothing builds twice.
cargo build --release --locked --workspace --example bench_train ${features:+--features "$features"}
bench_threads "$threads"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 28 examples of well over 256 tokens (truncated to 256): 7 steps of batch 4, 5 of them timed.
python - "$work/data.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = "the model learns to write clear short answers about rust actors tensors and adapters".split()
with open(sys.argv[1], "w") as f:
    for i in range(28):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(400))}) + "\n")
PY
for run in $(seq "$runs"); do
    echo "bench: run $run/$runs: Tessera trainer (no recompute, recompute, packed base), then PEFT" >&2
    target/release/examples/bench_train "$model" "$work/data.jsonl" "$work/o$run-off" off \
        --threads "$OMP_NUM_THREADS" > "$work/t_off.$run.json"
    target/release/examples/bench_train "$model" "$work/data.jsonl" "$work/o$run-on" on \
        --threads "$OMP_NUM_THREADS" > "$work/t_on.$run.json"
    case "$model" in
        *.gguf) target/release/examples/bench_train "$model" "$work/data.jsonl" "$work/o$run-packed" \
                    packed --threads "$OMP_NUM_THREADS" > "$work/t_packed.$run.json" ;;
    esac
    if [ -n "$baseline" ]; then
        "$baseline" "$model" "$work/data.jsonl" "$work/o$run-base" off \
            --threads "$OMP_NUM_THREADS" > "$work/t_base.$run.json"
    fi
    python scripts/bench_train_reference.py "$model" "$work/data.jsonl" \
        --threads "$OMP_NUM_THREADS" > "$work/ref.$run.json"
    rm -rf "$work/o$run-"*
done
python - "$work" "$runs" <<'PY'
import json, os, statistics, sys
w, runs = sys.argv[1], int(sys.argv[2])
def med(prefix):
    rs = [json.load(open(os.path.join(w, f"{prefix}.{i}.json"))) for i in range(1, runs + 1)]
    keys = ("tokens_per_s", "peak_rss_mib", "weight_mib")
    return {k: statistics.median(r.get(k, float("nan")) for r in rs) for k in keys}, rs
ref, ref_runs = med("ref")
rows = [("tessera", "t_off"), ("tessera + layer recompute", "t_on")]
if os.path.exists(os.path.join(w, "t_packed.1.json")):
    rows.append(("tessera, packed 4-bit base (QLoRA)", "t_packed"))
if os.path.exists(os.path.join(w, "t_base.1.json")):
    rows.append(("baseline build (--baseline)", "t_base"))
print(f"LoRA SFT, r=16, 7 targets, seq 256, batch 4, float32, {os.environ.get('OMP_NUM_THREADS')} "
      f"threads, median of {runs} runs")
print(f"{'run':34} {'tokens/s':>9} {'vs PEFT':>8} {'peak RSS MiB':>13} {'base MiB':>9}  runs (tokens/s)")
for name, prefix in rows + [("PEFT + transformers", "ref")]:
    r, rs = med(prefix)
    each = " ".join(f"{x['tokens_per_s']:.0f}" for x in rs)
    print(f"{name:34} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / ref['tokens_per_s']:7.2f}x "
          f"{r['peak_rss_mib']:13.0f} {r['weight_mib']:9.0f}  {each}")
if os.path.exists(os.path.join(w, "t_packed.1.json")):
    packed, _ = med("t_packed")
    for name, prefix in rows[:2]:
        r, _ = med(prefix)
        print(f"packed base vs {name}: peak RSS {packed['peak_rss_mib'] / r['peak_rss_mib']:.2f}x, "
              f"tokens/s {packed['tokens_per_s'] / r['tokens_per_s']:.2f}x")
    print("target: packed base peak RSS <= 0.5x the dequantised trainer's")
print("target: tessera >= 1.2x PEFT")
PY
