"""Loads a Tessera-trained adapter with PEFT (no warnings allowed about keys) and prints the
next-token top-3 log-probabilities with it, to compare with
`tessera generate --max-tokens 1 --top-logprobs 3 --json --adapter ADAPTER --prompt PROMPT`.

python scripts/check_adapter_with_peft.py MODEL.gguf ADAPTER_DIR PROMPT
(needs transformers 5, peft and gguf in the venv: scripts/bench-engine.sh installs them)
"""
import json
import os
import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_path, adapter, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
d, f = os.path.split(os.path.abspath(model_path))
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
ids = tok(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    before = base(ids).logits[0, -1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(base, adapter).eval()
key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
with torch.no_grad():
    after = model(ids).logits[0, -1]
lp = torch.log_softmax(after, -1)
top = lp.topk(3)
print(json.dumps({
    "prompt_ids": ids[0].tolist(),
    "key_warnings": key_warnings,
    "max_logit_change_vs_base": (after - before).abs().max().item(),
    "top_logprobs": {str(i): v for i, v in zip(top.indices.tolist(), top.values.tolist())},
}))
sys.exit(1 if key_warnings else 0)
