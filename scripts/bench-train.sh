#!/usr/bin/env bash
# Training benchmark: Tessera's LoRA SFT against PEFT + transformers on the same model and data, on
# this machine, in the same run. Prints tokens/s and peak RSS with ratios. Not a test.
#
#   scripts/bench-train.sh [MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
model="${1:-$(scripts/fetch-model.sh)}"
. scripts/setup-reference.sh
cargo build --release --locked -p tessera-engine --example bench_train
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 28 examples of well over 256 tokens (truncated to 256): 7 steps of batch 4.
python - "$work/data.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = "the model learns to write clear short answers about rust actors tensors and adapters".split()
with open(sys.argv[1], "w") as f:
    for i in range(28):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(400))}) + "\n")
PY
echo "bench: Tessera trainer (no recompute, then recompute)" >&2
target/release/examples/bench_train "$model" "$work/data.jsonl" "$work/out1" off > "$work/t_off.json"
target/release/examples/bench_train "$model" "$work/data.jsonl" "$work/out2" on > "$work/t_on.json"
echo "bench: PEFT reference" >&2
python scripts/bench_train_reference.py "$model" "$work/data.jsonl" > "$work/ref.json"
python - "$work" <<'PY'
import json, sys, os
w = sys.argv[1]
off, on, ref = (json.load(open(os.path.join(w, n))) for n in ("t_off.json", "t_on.json", "ref.json"))
print("LoRA SFT, r=16, 7 targets, seq 256, batch 4, float32")
print(f"{'run':34} {'tokens/s':>9} {'vs PEFT':>8} {'peak RSS MiB':>13}")
for name, r in (("tessera", off), ("tessera + layer recompute", on), ("PEFT + transformers", ref)):
    print(f"{name:34} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / ref['tokens_per_s']:7.2f}x {r['peak_rss_mib']:13.0f}")
print("target: tessera >= 1.2x PEFT")
PY
