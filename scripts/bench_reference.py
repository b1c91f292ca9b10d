"""The transformers (+ PEFT) reference for scripts/bench-engine.sh: the same measurements as
engine/examples/bench_engine.rs, on the same GGUF model, on this machine. Prints one JSON object.

python scripts/bench_reference.py MODEL.gguf ADAPTER_DIR
"""
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 128
STREAMS = 32
ADAPTERS = 8
PROMPT = "Write a short story about a robot who learns to paint."


def main():
    model_path, adapter_root = sys.argv[1], sys.argv[2]
    d, f = os.path.split(os.path.abspath(model_path))
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ids = tok(PROMPT, return_tensors="pt")

    def generate(m, n, **kw):
        batch = tok([PROMPT] * n, return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tok.pad_token_id, **kw)
        dt = time.perf_counter() - t
        assert out.shape[1] - batch["input_ids"].shape[1] == NEW_TOKENS
        return n * NEW_TOKENS / dt

    generate(model, 1)  # warm-up
    # Single stream: decode rate, prefill removed by timing a 1-token generation too.
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=tok.pad_token_id)
        total = time.perf_counter() - t
    single = (NEW_TOKENS - 1) / (total - first)
    batch = generate(model, STREAMS)

    result = {"load_model_s": load_s, "single_stream_decode_tok_s": single, "batch32_tok_s": batch}
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = None
    if PeftModel is not None:
        names = [f"bench_r16_{i}" for i in range(ADAPTERS)]
        pm = PeftModel.from_pretrained(model, os.path.join(adapter_root, names[0]), adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(os.path.join(adapter_root, n), adapter_name=n)
        pm.eval()
        per_row = [names[i % ADAPTERS] for i in range(STREAMS)]
        result["batch32_8_adapters_tok_s"] = generate(pm, STREAMS, adapter_names=per_row)
        loads = []
        for i in range(5):
            t = time.perf_counter()
            pm.load_adapter(os.path.join(adapter_root, f"load_{i}"), adapter_name=f"load_{i}")
            loads.append((time.perf_counter() - t) * 1e3)
        result["adapter_load_ms"] = sorted(loads)[2]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
