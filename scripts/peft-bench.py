"""The peer figures for scripts/gpu-check: PyTorch + transformers + PEFT on the same checkpoint and GPU,
measured as `introspect bench` measures itself: pp64 / pp512 (one forward over N tokens), tg32 (32
tokens decoded one at a time with the KV cache), and one LoRA step (16 × 64 random tokens, loss on the
last 2 positions, r 32 on all seven projections, AdamW) in PEFT's mixed precision: bf16 base, f32
adapters under bf16 autocast. Prints one JSON line.

    python3 scripts/peft-bench.py MODEL_DIR [--reps 3]
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--reps", type=int, default=3)
args = p.parse_args()
torch.backends.cuda.matmul.allow_tf32 = True
dev = "cuda"
model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(dev)
model.eval()
vocab = model.config.vocab_size


def timed(f):
    torch.cuda.synchronize()
    t = time.perf_counter()
    f()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def median(xs):
    return sorted(xs)[len(xs) // 2]


out = {"peer": f"torch {torch.__version__} + PEFT, bf16"}
with torch.no_grad():
    for n in (64, 512):
        ids = (torch.arange(n, device=dev) * 7919 + 13) % vocab
        ids = ids.unsqueeze(0)
        times = [timed(lambda: model(ids).logits[:, -1].float().cpu()) for _ in range(args.reps + 1)][1:]
        out[f"pp{n}"] = n / median(times)

    def decode():
        model.generate(torch.tensor([[1]], device=dev), max_new_tokens=33, min_new_tokens=33, do_sample=False)

    def first():
        model.generate(torch.tensor([[1]], device=dev), max_new_tokens=1, do_sample=False)

    times = []
    for _ in range(args.reps + 1):
        times.append(32 / (timed(decode) - timed(first)))
    out["tg32"] = median(times[1:])

model.train()
lora = LoraConfig(
    r=32,
    lora_alpha=64,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
peft_model = get_peft_model(model, lora)
for n, prm in peft_model.named_parameters():
    if prm.requires_grad:
        prm.data = prm.data.float()
opt = torch.optim.AdamW([q for q in peft_model.parameters() if q.requires_grad], lr=2e-5)
g = torch.Generator(device="cpu").manual_seed(0)
ids = torch.randint(0, vocab, (16, 64), generator=g).to(dev)
labels = torch.full_like(ids, -100)
labels[:, -2:] = ids[:, -2:]
torch.cuda.reset_peak_memory_stats()


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = peft_model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([q for q in peft_model.parameters() if q.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


times = [timed(step) for _ in range(args.reps + 1)][1:]
out["train_step_s"] = median(times)
out["train_tokens_per_s"] = 16 * 64 / out["train_step_s"]
out["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(out))
