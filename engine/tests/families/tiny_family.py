"""Writes a tiny random model of one family with transformers, its GGUF made by llama.cpp's own
converter, a random PEFT adapter on it, and what transformers (+ PEFT) computes from them, for
engine/tests/families.rs.

python tiny_family.py FAMILY OUT_DIR LLAMA_CONVERT_DIR

OUT_DIR receives:
- `hf/`: config.json, model.safetensors, tokenizer files (a byte-level BPE or a SentencePiece
  vocabulary trained here on a fixed text, with the family's kind of tokenizer);
- `model.gguf` (float32) and `model-q8_0.gguf` (Q8_0 projections), written by
  `convert_hf_to_gguf.py` from LLAMA_CONVERT_DIR (scripts/fetch-llama-convert.sh);
- `model-q4_0.gguf`: `model.gguf` with every projection of the layers quantised to Q4_0 by
  `gguf`'s quantiser, and `hf-q4_0/`: the same model for transformers, its projections those Q4_0
  weights dequantised, attending fully where the GGUF file does (Mistral's: the converter drops
  the window); the QLoRA check trains on the first and asks PEFT about the second;
- `adapter/`: a PEFT LoRA adapter on every projection the family's PEFT names (random A and B);
- `expected.json`: the token ids of a fixed prompt longer than every attention window, the full
  float32 logits of transformers on it, 12 greedy tokens after it (no end-of-sequence stop), the
  same with the adapter applied, and a sample text's token ids.

Every family has its distinguishing features switched on (see FAMILIES); weights are drawn with a
larger spread than transformers' init (and norms, biases and q/k norms randomised too), so that
logits differ by more than rounding and every feature moves them.
"""
import json
import os
import subprocess
import sys

import torch

CORPUS = [
    "The river carried the stories of the people who lived along its banks.",
    "A small village built a bridge of stone and timber over the valley in 1843.",
    "Every winter the engineer measured the snow: 12, 37 and 105 centimetres.",
    "The old library described the quiet garden behind the station, and the garden grew.",
    "héllo wörld! Ça va? 42 + 17 = 59; tabs\tand\nnewlines and  double  spaces.",
]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPT_LEN, GREEDY = 40, 12
SAMPLE = "The engineer built 42 bridges, héllo!  Twice."

# The features each family switches on, on top of a 3-layer model of hidden size 64, 4 heads over
# 2 key/value heads and an MLP of 128.
FAMILIES = {
    # Llama 3.x rope scaling (the original context shorter than the prompt), tied embeddings.
    "llama": dict(cls="LlamaForCausalLM", config="LlamaConfig", tokenizer="bpe", pre="llama-bpe",
                  extra=dict(head_dim=16, tie_word_embeddings=True, rope_parameters=dict(
                      rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=16))),
    # A sliding window shorter than the prompt. llama.cpp's converter writes Mistral as `llama`
    # without the window (llama.cpp attends fully), so the GGUF file is compared within it.
    "mistral": dict(cls="MistralForCausalLM", config="MistralConfig", tokenizer="bpe", pre="llama-bpe",
                    gguf_arch="llama", gguf_drops_window=8, extra=dict(head_dim=16, sliding_window=8)),
    # Biases on q, k and v; a large rope theta.
    "qwen2": dict(cls="Qwen2ForCausalLM", config="Qwen2Config", tokenizer="bpe", pre="qwen2",
                  extra=dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # q/k norms; head_dim not hidden / heads.
    "qwen3": dict(cls="Qwen3ForCausalLM", config="Qwen3Config", tokenizer="bpe", pre="qwen2",
                  extra=dict(head_dim=24)),
    # Scaled embeddings, (1 + w) norms before and after attention and MLP, GeGLU, attention and
    # final soft-caps small enough to bite, a sliding window on alternate layers.
    # (query_pre_attn_scalar is head_dim, as in Gemma 2 2B and 9B: GGUF files do not carry it, and
    # llama.cpp takes head_dim. Embeddings tied, as in every Gemma: the converter drops lm_head.)
    "gemma2": dict(cls="Gemma2ForCausalLM", config="Gemma2Config", tokenizer="spm",
                   extra=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
                              attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    # Gemma 2 without soft-caps, plus q/k norms, 5 sliding layers to 1 global one (the pattern
    # llama.cpp assumes), a local and a (linearly scaled) global rope.
    "gemma3": dict(cls="Gemma3ForCausalLM", config="Gemma3TextConfig", tokenizer="spm",
                   extra=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=6,
                              tie_word_embeddings=True,
                              rope_parameters={
                                  "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1000000.0),
                                  "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
    # Fused qkv_proj and gate_up_proj in the checkpoint; a sliding window.
    "phi3": dict(cls="Phi3ForCausalLM", config="Phi3Config", tokenizer="spm",
                 extra=dict(sliding_window=8, pad_token_id=0)),
}


def log(*a):
    print("tiny_family:", *a, file=sys.stderr, flush=True)


def bpe_tokenizer(out, pre):
    """A byte-level BPE vocabulary trained on CORPUS, split as the family's tokenizer splits."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    split = {
        "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    }[pre]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def spm_tokenizer(out, family):
    """A SentencePiece BPE vocabulary with byte fallback trained on CORPUS (tokenizer.model),
    and the family's transformers tokenizer over it."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    prefix = os.path.join(out, "tokenizer")
    # Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3, no dummy prefix; Phi-3 (Llama's): <unk> 0,
    # <s> 1, </s> 2.
    gemma = family.startswith("gemma")
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
               bos_piece="<bos>", unk_piece="<unk>") if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_prefix=prefix, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=not gemma,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2, **ids)
    os.remove(prefix + ".vocab")
    import transformers
    cls = getattr(transformers, "GemmaTokenizer" if gemma else "LlamaTokenizer")
    # Gemma and Phi-3 start every text with BOS.
    tok = cls.from_pretrained(out, add_bos_token=True)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def randomise(model, family):
    """Weights with a spread that makes every feature matter: projections and embeddings
    N(0, 0.25), norms around their neutral value, biases and q/k norms random too."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                neutral = 0.0 if family.startswith("gemma") else 1.0
                p.copy_(neutral + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))


def logits_and_greedy(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
        seq = list(ids)
        for _ in range(GREEDY):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return logits, seq[len(ids):]


def convert(hf, gguf, outtype, convert_dir, pre):
    """llama.cpp's converter, with the BPE pre-tokenizer named (its check hashes known vocabularies
    only, and this one is made here)."""
    code = (
        "import runpy, sys\n"
        f"sys.path[:0] = [{convert_dir!r}, {os.path.join(convert_dir, 'gguf-py')!r}]\n"
        "from conversion import base\n"
        f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {hf!r}, '--outfile', {gguf!r}, '--outtype', {outtype!r}]\n"
        f"runpy.run_path({os.path.join(convert_dir, 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed on {hf} ({outtype}):\n{out.stderr[-4000:]}")


def is_projection(name, shape):
    """The weights quantised in `model-q4_0.gguf`: 2-D weights of the layers, rows of whole blocks."""
    return name.startswith("blk.") and name.endswith(".weight") and len(shape) == 2 and shape[-1] % 32 == 0


def quantize_q4_0(src, dst):
    """`src` (a float32 GGUF file) with every projection of its layers quantised to Q4_0."""
    import gguf
    from gguf.quants import quantize

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        data = t.data
        if is_projection(t.name, data.shape):
            writer.add_tensor(t.name, quantize(data, gguf.GGMLQuantizationType.Q4_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def save_q4_0_weights(model, out, drops_window):
    """`model` with the projections of its layers replaced by their Q4_0 round trip (quantised by
    rows, as in `quantize_q4_0`; the converter only reorders or concatenates rows of these), and
    without its sliding window where the GGUF file has none (`drops_window`)."""
    import gguf
    from gguf.quants import dequantize, quantize

    q4 = gguf.GGMLQuantizationType.Q4_0
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."):
                w = m.weight.numpy()
                m.weight.copy_(torch.from_numpy(dequantize(quantize(w, q4), q4).reshape(w.shape)))
    if drops_window:
        model.config.sliding_window = None
    model.save_pretrained(out)


def main():
    family, out, convert_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    import transformers
    from peft import LoraConfig, get_peft_model

    spec = FAMILIES[family]
    torch.manual_seed(0)
    hf = os.path.join(out, "hf")
    os.makedirs(hf, exist_ok=True)
    tok = bpe_tokenizer(hf, spec["pre"]) if spec["tokenizer"] == "bpe" else spm_tokenizer(hf, family)
    vocab = len(tok)
    config = getattr(transformers, spec["config"])(
        **{"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-5, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "tie_word_embeddings": False, **spec["extra"]})
    model = getattr(transformers, spec["cls"])(config).eval()
    randomise(model, family)
    model.save_pretrained(hf)
    log(f"{family}: {sum(p.numel() for p in model.parameters())} parameters, vocabulary {vocab}")

    ids = torch.randint(3, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)).tolist()
    logits, greedy = logits_and_greedy(model, ids)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")})
    torch.manual_seed(99)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  lora_dropout=0.0, init_lora_weights=False))
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    adapted_logits, adapted_greedy = logits_and_greedy(peft_model.eval(), ids)
    model = peft_model.unload()

    pre = spec.get("pre", "default")
    convert(hf, os.path.join(out, "model.gguf"), "f32", convert_dir, pre)
    convert(hf, os.path.join(out, "model-q8_0.gguf"), "q8_0", convert_dir, pre)
    quantize_q4_0(os.path.join(out, "model.gguf"), os.path.join(out, "model-q4_0.gguf"))
    save_q4_0_weights(model, os.path.join(out, "hf-q4_0"), spec.get("gguf_drops_window"))
    expected = {
        "family": family,
        "transformers": transformers.__version__,
        "input_ids": ids,
        "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
        "greedy_ids": greedy,
        "adapter": {"targets": targets, "logits": [[round(v, 6) for v in row] for row in adapted_logits.tolist()],
                    "greedy_ids": adapted_greedy},
        "sample": SAMPLE,
        "sample_ids": tok(SAMPLE)["input_ids"],
        "layer_types": getattr(config, "layer_types", None),
        "gguf_arch": spec.get("gguf_arch", family),
        "gguf_drops_window": spec.get("gguf_drops_window"),
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f)
    log(f"{family}: written to {out}")


if __name__ == "__main__":
    main()
