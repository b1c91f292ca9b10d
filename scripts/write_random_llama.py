"""Writes a Llama with random weights as a Hugging Face directory (config.json, model.safetensors,
tokenizer files), for benchmarks that need a bigger model than the default SmolLM2 (GPU runs). The
tokenizer is SmolLM2's (vocabulary 49152), taken from the GGUF file. Seeded: the same arguments
write the same model. Skips the work when OUT already holds a complete model of that size.

python scripts/write_random_llama.py OUT TOKENIZER.gguf [--size 1b|tiny] [--dtype bfloat16]
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

# ~1.07B parameters (Llama 3.2 1B's shape on SmolLM2's vocabulary); `tiny` checks the script fast.
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("tokenizer_gguf")
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    shape = SIZES[args.size]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
              "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu", "torch_dtype": args.dtype, **shape}
    done = os.path.join(args.out, ".complete")
    if os.path.exists(done) and json.load(open(done)) == config:
        print(args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    from transformers import AutoTokenizer
    d, f = os.path.split(os.path.abspath(args.tokenizer_gguf))
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(args.out)
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], config["vocab_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]

    def lin(out, inp):
        return (torch.randn(out, inp, generator=g) / inp ** 0.5).to(dtype)

    tensors = {"model.embed_tokens.weight": (torch.randn(v, h, generator=g) * 0.02).to(dtype),
               "model.norm.weight": torch.ones(h, dtype=dtype)}
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors.update({
            f"{p}.input_layernorm.weight": torch.ones(h, dtype=dtype),
            f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
            f"{p}.self_attn.q_proj.weight": lin(q, h),
            f"{p}.self_attn.k_proj.weight": lin(kv, h),
            f"{p}.self_attn.v_proj.weight": lin(kv, h),
            f"{p}.self_attn.o_proj.weight": lin(h, q),
            f"{p}.mlp.gate_proj.weight": lin(inter, h),
            f"{p}.mlp.up_proj.weight": lin(inter, h),
            f"{p}.mlp.down_proj.weight": lin(h, inter),
        })
    save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    n = sum(t.numel() for t in tensors.values())
    with open(done, "w") as fh:
        json.dump(config, fh)
    print(f"bench: wrote a random Llama of {n / 1e9:.2f}B parameters to {args.out}",
          file=__import__("sys").stderr)
    print(args.out)


if __name__ == "__main__":
    main()
