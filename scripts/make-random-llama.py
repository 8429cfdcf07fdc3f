"""A random-weight checkpoint with Llama-3.1-8B's shapes, for speed and memory figures only: config.json,
bf16 safetensors, a byte-level BPE tokenizer trained on a few sentences (no download) and a Llama-3
style chat template. Made on the GPU machine with the PyTorch and transformers found there; introspect
and PEFT then load the same files.

    python3 scripts/make-random-llama.py OUT_DIR [--layers N]
"""
import argparse
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=32)
args = p.parse_args()
if os.path.exists(os.path.join(args.out, "model.safetensors.index.json")) or os.path.exists(
    os.path.join(args.out, "model.safetensors")
):
    print(f"{args.out}: already made")
    raise SystemExit(0)

cfg = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=args.layers,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=[128001, 128004],  # <|end_of_text|>, <|eot_id|> as this tokenizer numbers them
    torch_dtype="bfloat16",
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(args.out, safe_serialization=True)

# A tokenizer of the model's vocabulary size: byte-level BPE trained on a little text, its special
# tokens at Llama-3's ids.
text = [
    "What is the next animal in the following text? deer cow chicken fish rabbit",
    "Respond only with the next word and nothing else, including punctuation.",
    "The quick brown fox jumps over the lazy dog. Hello there! A cow.",
] * 50
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
filler = [f"<|reserved_{i}|>" for i in range(128000 - tok.get_vocab_size())]
tok.add_tokens(filler)
special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
tok.add_special_tokens(special + [f"<|special_{i}|>" for i in range(128256 - 128000 - len(special))])
assert tok.get_vocab_size() == 128256, tok.get_vocab_size()
tok.save(os.path.join(args.out, "tokenizer.json"))
template = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}, f)
print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
