"""PEFT + transformers reference for scripts/bench-train.sh: LoRA r=16 on all 7 projections,
sequences of 256 tokens, batch 4, AdamW; tokens/s and peak RSS. The timed steps are the same as
bench_train.rs's: the second to the last but one.

python scripts/bench_train_reference.py MODEL.gguf DATASET.jsonl [--threads N]
"""
import json
import os
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_path, data = sys.argv[1], sys.argv[2]
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_common import load_check, set_threads
    threads = set_threads(threads)
    load_check("the PEFT run")
    d, f = os.path.split(os.path.abspath(model_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    model.train()
    texts = [json.loads(line)["text"] for line in open(data)]
    ids = [tok(t)["input_ids"][:255] + [tok.eos_token_id] for t in texts]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    marks = []
    start = time.perf_counter()
    for step in range(len(ids) // 4):
        batch = torch.tensor(ids[step * 4:(step + 1) * 4])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        marks.append(time.perf_counter() - start)
    tokens = 4 * 256 * (len(marks) - 2)
    print(json.dumps({
        "tokens_per_s": tokens / (marks[-2] - marks[0]),
        "steps": len(marks),
        "timed_steps": len(marks) - 2,
        "threads": threads,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
