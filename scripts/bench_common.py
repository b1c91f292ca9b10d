"""What every benchmark script shares, so both sides of a comparison run under the same conditions:
the thread count (set explicitly and printed), the idle-machine check (load average printed before
each measurement, with a warning above half the cores), medians of repeated runs, the memory
bandwidth probe, the chat prompts of the HTTP workload and random PEFT adapters.
"""
import json
import os
import statistics
import sys
import time


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cores():
    return os.cpu_count() or 1


def set_threads(threads):
    """torch's intra-op (and inter-op) pool to exactly `threads`; prints it. Returns the count."""
    import torch
    threads = threads or cores()
    torch.set_num_threads(threads)
    log(f"bench: torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    return threads


def load_check(label):
    """Prints the 1-minute load average before a measurement; warns when the machine is busy."""
    one = os.getloadavg()[0]
    n = cores()
    warn = "  WARNING: machine busy (> 0.5 x cores), figures will be low" if one > 0.5 * n else ""
    log(f"bench: load average {one:.2f} on {n} cores before {label}{warn}")
    return one


def median_of(runs, fn, label):
    """Runs `fn` (which returns a dict of figures) `runs` times after a load check each; returns
    the per-key median, and the list of every run under `runs`."""
    results = []
    for i in range(runs):
        load_check(f"{label} (run {i + 1}/{runs})")
        results.append(fn())
    out = {}
    for key in results[0]:
        values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        if len(values) == len(results):
            out[key] = statistics.median(values)
    out["runs"] = results
    return out


def sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth_gb_s(device="cpu", gib=1.0, repeats=5):
    """Memory read bandwidth: median time of `sum` over `gib` GiB of float32."""
    import torch
    n = int(gib * (1 << 30)) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    x.sum()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    del x
    return n * 4 / statistics.median(times) / 1e9


def decode_weight_bytes(c, elt_size):
    """Bytes of weights one decode step reads (as bench_engine.rs counts them): every layer, the
    final norm and the output matrix (the embedding table only through one row per token)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h, i = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    return (c.num_hidden_layers * layer + h + c.vocab_size * h) * elt_size


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


# The HTTP workload's chat prompts: `n` different questions, each with a different amount of
# context so prompt lengths spread from a sentence to a few hundred tokens, and a fixed
# max_tokens per prompt between `lo` and `hi`.
TOPICS = ["the water cycle", "how a compiler works", "the history of the bicycle", "photosynthesis",
          "why the sky is blue", "how vaccines work", "the rules of chess", "volcanoes",
          "the Roman empire", "how airplanes fly", "black holes", "the stock market",
          "how bread rises", "the human heart", "electric cars", "the Moon landing"]
CONTEXT = ("Some background: people often ask about this topic because it connects everyday "
           "experience with ideas that took centuries to work out, and a good answer should be "
           "short, concrete and friendly. ")
SYSTEM = "You are a helpful assistant. Answer clearly and concisely."


def chat_prompts(n=32, lo=64, hi=128):
    """[(messages, max_tokens)]: deterministic, all different, lengths spread over ~1..12 context
    paragraphs."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        context = CONTEXT * ((i * 5) % 13)
        style = ["Explain", "Describe", "Summarise", "Tell me about"][i // len(TOPICS) % 4]
        user = f"{context}{style} {topic} in a few sentences (question {i + 1})."
        max_tokens = lo + (i * 37) % (hi - lo + 1)
        out.append(([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                    max_tokens))
    return out


def shared_prefix_system(tokens=1000):
    """A system prompt of roughly `tokens` tokens (for SmolLM2's tokenizer), the same every time."""
    rules = [f"Rule {i + 1}: when the user asks about topic number {i + 1}, answer in plain words, "
             f"cite no sources, and keep the reply under {40 + i} words." for i in range(200)]
    text = SYSTEM + " Follow these house rules. "
    i = 0
    while len(text) < tokens * 4.2 and i < len(rules):  # ~4.2 characters per token of English
        text += rules[i] + " "
        i += 1
    return text


def write_random_adapters(model_config, root, n=8, r=16, seed=0,
                          targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """`n` random PEFT LoRA adapters `bench_r{r}_{i}` (B not zero) under `root` for a Llama whose
    transformers config is `model_config`; returns their directory names."""
    import torch
    from safetensors.torch import save_file
    c = model_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dims = {"q_proj": (c.hidden_size, c.num_attention_heads * head_dim),
            "k_proj": (c.hidden_size, c.num_key_value_heads * head_dim),
            "v_proj": (c.hidden_size, c.num_key_value_heads * head_dim),
            "o_proj": (c.num_attention_heads * head_dim, c.hidden_size),
            "gate_proj": (c.hidden_size, c.intermediate_size),
            "up_proj": (c.hidden_size, c.intermediate_size),
            "down_proj": (c.intermediate_size, c.hidden_size)}
    names = []
    for a in range(n):
        name = f"bench_r{r}_{a}"
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        g = torch.Generator().manual_seed(seed + a)
        tensors = {}
        for layer in range(c.num_hidden_layers):
            for t in targets:
                inp, out = dims[t]
                module = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{module}.{t}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.01
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.01
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                       "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
                       "base_model_name_or_path": None}, f)
        names.append(name)
    return names


def load_reference(model_path, dtype, device):
    """transformers' tokenizer and model for a GGUF file or a Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if os.path.isdir(model_path):
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    else:
        d, f = os.path.split(os.path.abspath(model_path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model.to(device).eval()
