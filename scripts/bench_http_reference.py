"""The transformers reference for scripts/bench-http.sh: the same chat prompts as
`bench_http.py workload`, generated the naive way, as one static batch (left padding, greedy, up to
the largest max_tokens; each row counts its tokens up to its own max_tokens or its end of turn).
TTFT and inter-token latency come from the time of each decode step (a logits processor stamps
them). Prints one JSON object per phase; the median of `--runs` runs after a warm-up.

python scripts/bench_http_reference.py MODEL ADAPTER_ROOT [--phase base|adapters] [--runs 3]
    [--clients 32] [--min-tokens 64] [--max-tokens 128] [--threads N] [--device cpu]

`--phase adapters` uses PEFT with the 8 adapters `bench_r16_0..7` under ADAPTER_ROOT, one per row
(`adapter_names`); where this PEFT cannot do that, it says so and measures the base model.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (chat_prompts, load_reference, log, median_of, percentile,  # noqa: E402
                          set_threads, sync)

ADAPTERS = 8


class Stamps:
    """A logits processor that records when each decode step's logits are ready."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("adapter_root")
    ap.add_argument("--phase", default="base", choices=["base", "adapters"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    from transformers import LogitsProcessorList
    set_threads(args.threads)
    device = args.device
    tok, model = load_reference(args.model, getattr(torch, args.dtype), device)
    prompts = chat_prompts(args.clients, args.min_tokens, args.max_tokens)
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m, _ in prompts]
    limits = [n for _, n in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    eos = set(model.generation_config.eos_token_id
              if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id or tok.eos_token_id])
    kw, note = {}, ""
    if args.phase == "adapters":
        from peft import PeftModel
        names = [f"bench_r16_{i}" for i in range(ADAPTERS)]
        model = PeftModel.from_pretrained(model, os.path.join(args.adapter_root, names[0]),
                                          adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(os.path.join(args.adapter_root, n), adapter_name=n)
        model.eval()
        kw["adapter_names"] = [names[i % ADAPTERS] for i in range(len(prompts))]
        try:
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=1, do_sample=False,
                               pad_token_id=tok.pad_token_id, **kw)
        except (TypeError, ValueError) as e:
            note = f"this PEFT cannot mix adapters in a batch ({e}): the reference is base-only"
            log(f"bench: {note}")
            model, kw = model.get_base_model(), {}

    def run(max_new=max(limits)):
        stamps = Stamps(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id,
                                 logits_processor=LogitsProcessorList([stamps]), **kw)
        sync(device)
        end = time.perf_counter()
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        steps = stamps.times
        tokens, ttft, itl = 0, [], []
        for row, limit in zip(new, limits):
            n = min(limit, max_new, len(row))
            for i, t in enumerate(row[:n]):
                if t in eos:
                    n = i + 1
                    break
            tokens += n
            ttft.append((steps[0] - t0) * 1e3)
            itl.extend((b - a) * 1e3 for a, b in zip(steps[:n - 1], steps[1:n]))
        return {"tokens": tokens, "wall_s": end - t0, "tok_s": tokens / (end - t0),
                "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
                "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99)}

    log(f"bench: reference warm-up, {len(prompts)} prompts as one padded batch "
        f"of {batch['input_ids'].shape[1]} tokens ({args.phase})")
    run(4)
    out = median_of(args.runs, run, f"transformers static batch of {len(prompts)} ({args.phase})")
    out.update({"phase": args.phase, "clients": len(prompts), "note": note,
                "padded_prompt_tokens": batch["input_ids"].shape[1]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
