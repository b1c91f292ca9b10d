"""Makes the references the parity tests hold Tessera to, with transformers + PEFT: SmolLM2 (the
default model) and Gemma 3 270M (real weights of a second family).

python scripts/make_reference.py MODEL_GGUF OUT_ROOT      # prints the reference directory
python scripts/make_reference.py MODEL_GGUF --check DIR   # recomputes DIR's cases with DIR's own
                                                          # adapter and compares (exit 1 on a miss)

The reference is a directory `OUT_ROOT/<name>-<key>/` (`<name>`: smollm2 or gemma3, from the
file's name) holding `expected.json` and, for SmolLM2, a seeded PEFT adapter
`adapters/lora_qv_r8/` (`adapter_config.json` + `adapter_model.safetensors`). `<key>` hashes this
script, the model file's size and name and the versions of torch, transformers, peft and gguf, so
a change of any of them makes a new reference and an existing one is reused as it is.

`expected.json`, as the tests read it:
- `base[]`: one case per prompt: `kind` (`raw`: tokenized with the tokenizer's default special
  tokens; `chat`: `messages` rendered by the chat template with `add_generation_prompt=True`, the
  text in `templated` and `prompt`, tokenized without extra special tokens), `input_ids`,
  `last_logits_top10` (`ids`, `values`) of the last position, `logits_sum_last`,
  `logits_at_positions[p]` (the first 8 logits at positions 0, len/2 and len-1), and
  `greedy_20_ids` / `greedy_20_text`: 20 greedy tokens, not stopping at end-of-sequence.
- `adapters[]`: the adapter (`name`, `path` relative to the directory, `r`, `alpha`, `targets`,
  `rslora`) and the same `cases` computed with it applied (lora_dropout 0).

transformers dequantises the GGUF's tensors to float32 and builds the tokenizer from its metadata;
everything runs in float32 on the CPU.
"""
import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sys
import tempfile

PROMPTS = [
    {"kind": "raw", "prompt": "The quick brown fox"},
    {"kind": "raw", "prompt": "Rust is a systems programming language that"},
    {"kind": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
]
ADAPTER = {"name": "lora_qv_r8", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "rslora": False}
# The adapter's random weights: torch's generator seeded with this (PEFT's `init_lora_weights=False`
# draws A and B as nn.Linear does, so B is not zero and the adapter changes every logit).
ADAPTER_SEED = 1234
GREEDY = 20
# Tolerances the shared reference's README states for a float32 implementation.
TOL_BASE, TOL_ADAPTER = 1e-3, 2e-3


# No progress bars from transformers' GGUF conversion in the test command's output.
os.environ.setdefault("TQDM_DISABLE", "1")


def log(*a):
    print("make_reference:", *a, file=sys.stderr, flush=True)


def versions():
    return {p: md.version(p) for p in ("torch", "transformers", "peft", "gguf")}


# Gemma 3 270M (a base model: its file has no chat template): raw prompts only, no adapter.
GEMMA3_PROMPTS = [
    {"kind": "raw", "prompt": "The capital of France is"},
    {"kind": "raw", "prompt": "Rust is a systems programming language that"},
]


def name_of(model_path):
    return "gemma3" if "gemma-3" in os.path.basename(model_path) else "smollm2"


def key(model_path):
    h = hashlib.sha256()
    with open(__file__, "rb") as f:
        h.update(f.read())
    h.update(f"{os.path.basename(model_path)} {os.path.getsize(model_path)}".encode())
    h.update(json.dumps(versions(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def load(model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    d, f = os.path.dirname(os.path.abspath(model_path)), os.path.basename(model_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    return tok, model


def input_ids(tok, case):
    if case["kind"] == "raw":
        return tok(case["prompt"])["input_ids"]
    if "messages" in case:
        text = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
        case["templated"] = case["prompt"] = text
    else:
        # Adapter cases carry the rendered prompt only, as the base case wrote it.
        text = case["prompt"]
    return tok(text, add_special_tokens=False)["input_ids"]


def compute(tok, model, prompts):
    """Every field of each case, from `model` (base or PEFT-wrapped)."""
    import torch

    cases = []
    for p in prompts:
        case = dict(p)
        ids = input_ids(tok, case)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
            last = logits[-1]
            values, top = last.topk(10)
            # Greedy with the whole sequence each step (no cache): 20 tokens, past any EOS.
            seq = list(ids)
            for _ in range(GREEDY):
                nxt = model(torch.tensor([seq])).logits[0, -1].argmax().item()
                seq.append(nxt)
        n = len(ids)
        greedy = seq[n:]
        case.update({
            "input_ids": ids,
            "last_logits_top10": {"ids": top.tolist(), "values": [round(v, 5) for v in values.tolist()]},
            "logits_sum_last": round(last.sum().item(), 3),
            "logits_at_positions": {str(q): [round(v, 5) for v in logits[q, :8].tolist()]
                                    for q in sorted({0, n // 2, n - 1})},
            "greedy_20_ids": greedy,
            "greedy_20_text": tok.decode(greedy, skip_special_tokens=False),
        })
        cases.append(case)
    return cases


def with_adapter(model, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


def make_adapter(model, adapter_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(ADAPTER_SEED)
    config = LoraConfig(r=ADAPTER["r"], lora_alpha=ADAPTER["alpha"], target_modules=ADAPTER["targets"],
                        lora_dropout=0.0, use_rslora=ADAPTER["rslora"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(adapter_dir)
    return peft_model.eval()


def make(model_path, out_root):
    name = name_of(model_path)
    out = os.path.join(out_root, f"{name}-{key(model_path)}")
    if os.path.exists(os.path.join(out, "expected.json")):
        return out
    import time
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    os.makedirs(out_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=out_root)
    log(f"making the {name} reference with transformers + PEFT into {out}")
    tok, model = load(model_path)
    if name == "gemma3":
        expected = {
            "model": f"{os.path.basename(model_path)}, dequantized to float32 by transformers",
            **versions(),
            "base": compute(tok, model, GEMMA3_PROMPTS),
        }
        return finish(expected, tmp, out, t0)
    base = compute(tok, model, PROMPTS)
    rel = f"adapters/{ADAPTER['name']}"
    peft_model = make_adapter(model, os.path.join(tmp, rel))
    adapted = compute(tok, peft_model, [{k: v for k, v in c.items() if k in ("kind", "prompt")} for c in base])
    expected = {
        "model": f"{os.path.basename(model_path)}, dequantized to float32 by transformers",
        **versions(),
        "base": base,
        "adapters": [{**ADAPTER, "path": rel, "seed": ADAPTER_SEED, "cases": adapted}],
    }
    return finish(expected, tmp, out, t0)


def finish(expected, tmp, out, t0):
    """Writes `expected.json` into `tmp` and moves it into place as `out`."""
    import time

    with open(os.path.join(tmp, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    if os.path.exists(out):  # made meanwhile by another run: keep that one
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return out


def differences(got, want, tol):
    """What differs between two lists of cases beyond `tol` (logits) or at all (ids, text)."""
    out = []
    for g, w in zip(got, want, strict=True):
        name = repr(w["prompt"][:40])
        for field in ("input_ids", "greedy_20_ids", "greedy_20_text"):
            if g[field] != w[field]:
                out.append(f"{name}: {field} {g[field]} != {w[field]}")
        if g["last_logits_top10"]["ids"] != w["last_logits_top10"]["ids"]:
            out.append(f"{name}: top-10 ids {g['last_logits_top10']['ids']} != {w['last_logits_top10']['ids']}")
        pairs = list(zip(g["last_logits_top10"]["values"], w["last_logits_top10"]["values"]))
        for p, vals in w["logits_at_positions"].items():
            pairs += list(zip(g["logits_at_positions"][p], vals))
        worst = max(abs(a - b) for a, b in pairs)
        if worst > tol:
            out.append(f"{name}: logits differ by {worst:.2e} > {tol}")
        log(f"check {name}: max |logit difference| {worst:.2e}")
    return out


def check(model_path, ref_dir):
    """Recomputes `ref_dir`'s cases (with its own adapter) and compares them with its expected.json."""
    with open(os.path.join(ref_dir, "expected.json")) as f:
        want = json.load(f)
    tok, model = load(model_path)
    problems = differences(compute(tok, model, want["base"]), want["base"], TOL_BASE)
    for a in want["adapters"]:
        prompts = [{k: v for k, v in c.items() if k in ("kind", "prompt")} for c in a["cases"]]
        peft_model = with_adapter(model, os.path.join(ref_dir, a["path"]))
        problems += differences(compute(tok, peft_model, prompts), a["cases"], TOL_ADAPTER)
        model = peft_model.unload()
    for p in problems:
        log("MISMATCH", p)
    log("the reference matches" if not problems else f"{len(problems)} mismatches")
    return not problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out_root", nargs="?")
    ap.add_argument("--check", metavar="DIR", help="compare DIR's expected.json with a fresh computation")
    args = ap.parse_args()
    if args.check:
        sys.exit(0 if check(args.model, args.check) else 1)
    if not args.out_root:
        ap.error("OUT_ROOT is required unless --check is given")
    print(make(args.model, args.out_root))


if __name__ == "__main__":
    main()
