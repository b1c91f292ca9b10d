"""The transformers (+ PEFT) reference for scripts/bench-engine.sh: the same measurements as
engine/examples/bench_engine.rs, on the same model, device, dtype and thread count. Every measured
shape is warmed up first; each figure is the median of `--runs` runs. Prints one JSON object.

python scripts/bench_reference.py MODEL ADAPTER_DIR [--device cpu|cuda:0] [--dtype float32|bfloat16]
    [--threads N] [--runs 3] [--streams 32] [--new-tokens 128]

MODEL is a GGUF file or a Hugging Face directory; ADAPTER_DIR holds the adapters bench_engine wrote
(bench_r16_0..7, load_0..4).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (bandwidth_gb_s, decode_weight_bytes, load_check, load_reference, log, median_of,  # noqa: E402
                          set_threads, sync)

ADAPTERS = 8
PROMPT = "Write a short story about a robot who learns to paint."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("adapter_root")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="", help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--threads", type=int, default=0, help="default: all cores")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    device = args.device
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    new = args.new_tokens

    load_check("the memory bandwidth probe")
    bandwidth = bandwidth_gb_s(device)
    t = time.perf_counter()
    tok, model = load_reference(args.model, dtype, device)
    sync(device)
    load_s = time.perf_counter() - t
    weight_bytes = decode_weight_bytes(model.config, torch.finfo(dtype).bits // 8)
    ids = tok(PROMPT, return_tensors="pt").to(device)

    def generate(m, n, max_new=new, **kw):
        batch = tok([PROMPT] * n, return_tensors="pt", padding=True).to(device)
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(**batch, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=tok.pad_token_id, **kw)
        sync(device)
        dt = time.perf_counter() - t
        assert out.shape[1] - batch["input_ids"].shape[1] == max_new
        return n * max_new / dt

    def single():
        # Decode rate: a 1-token generation times the prefill, removed from the full one.
        with torch.inference_mode():
            sync(device)
            t = time.perf_counter()
            model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
            sync(device)
            first = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(**ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            sync(device)
            total = time.perf_counter() - t
        return {"single_stream_decode_tok_s": (new - 1) / (total - first)}

    log("bench: reference warm-up (1 and all streams)")
    single()
    generate(model, args.streams, max_new=8)
    s = median_of(args.runs, single, "reference single stream")
    b = median_of(args.runs, lambda: {"batch_tok_s": generate(model, args.streams)},
                  f"reference {args.streams} streams")
    roofline = bandwidth * 1e9 / weight_bytes
    result = {"device": device, "dtype": dtype_name, "threads": threads, "runs": args.runs,
              "streams": args.streams, "new_tokens": new, "load_model_s": load_s,
              "bandwidth_gb_s": bandwidth, "weight_bytes": weight_bytes,
              "roofline_tok_s": roofline,
              "single_stream_decode_tok_s": s["single_stream_decode_tok_s"],
              "roofline_fraction": s["single_stream_decode_tok_s"] / roofline,
              "batch32_tok_s": b["batch_tok_s"]}
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = None
    if PeftModel is not None:
        names = [f"bench_r16_{i}" for i in range(ADAPTERS)]
        pm = PeftModel.from_pretrained(model, os.path.join(args.adapter_root, names[0]),
                                       adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(os.path.join(args.adapter_root, n), adapter_name=n)
        pm.eval()
        per_row = [names[i % ADAPTERS] for i in range(args.streams)]
        generate(pm, args.streams, max_new=8, adapter_names=per_row)  # warm-up
        m = median_of(args.runs, lambda: {"tok_s": generate(pm, args.streams,
                                                             adapter_names=per_row)},
                      f"reference {args.streams} streams over {ADAPTERS} adapters")
        result["batch32_8_adapters_tok_s"] = m["tok_s"]
        loads = []
        for i in range(5):
            t = time.perf_counter()
            pm.load_adapter(os.path.join(args.adapter_root, f"load_{i}"), adapter_name=f"load_{i}")
            sync(device)
            loads.append((time.perf_counter() - t) * 1e3)
        result["adapter_load_ms"] = sorted(loads)[2]
    print(__import__("json").dumps(result))


if __name__ == "__main__":
    main()
