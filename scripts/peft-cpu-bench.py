"""The CPU peer of `introspect bench --only train`: PyTorch + transformers + PEFT, one LoRA step on the same
checkpoint and CPU (16 × 64 random tokens, loss on the last 2 positions, r 32 / alpha 64 on all seven
projections, AdamW lr 2e-5, gradient clipping at 1), timed after one warm-up step. One process per
variant so the peak RSS (ru_maxrss) is the step's own. Prints one JSON line.

    python3 scripts/peft-cpu-bench.py MODEL_DIR [--precision f32|bf16] [--keep 3] [--threads 2] [--reps 3]
    python3 scripts/peft-cpu-bench.py MODEL_DIR --prefill [--precision f32|bf16]

--prefill measures `introspect bench`'s pp64 / pp512 instead: one forward over N tokens, logits for the
last position only, the weights in the given precision (bf16: the model loaded as bfloat16).

--precision bf16 is PEFT's mixed precision on the CPU: f32 weights and adapters under bf16 autocast
(oneDNN's bf16 GEMM, AMX or avx512_bf16 where the CPU has them). --keep N computes logits for the last N
positions only (`logits_to_keep`) and the loss by hand, as introspect does; without it, the HF loss over
every position (the usual PEFT recipe).
"""
import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
p.add_argument("--keep", type=int, default=0)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--reps", type=int, default=3)
p.add_argument("--prefill", action="store_true")
args = p.parse_args()
torch.set_num_threads(args.threads)

if args.prefill:
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).eval()
    out = {"peer": f"torch {torch.__version__}, {args.precision} weights", "threads": args.threads}
    with torch.no_grad():
        for n in (64, 512):
            ids = ((torch.arange(n) * 7919 + 13) % model.config.vocab_size).unsqueeze(0)
            times = []
            for _ in range(args.reps + 1):
                t = time.perf_counter()
                model(ids, logits_to_keep=1).logits.float()
                times.append(time.perf_counter() - t)
            times = sorted(times[1:])
            out[f"pp{n}"] = n / times[len(times) // 2]
    print(json.dumps(out))
    raise SystemExit

model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
vocab = model.config.vocab_size
lora = LoraConfig(
    r=32,
    lora_alpha=64,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
peft_model = get_peft_model(model, lora)
peft_model.train()
params = [q for q in peft_model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=2e-5)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (16, 64), generator=g)
labels = torch.full_like(ids, -100)
labels[:, -2:] = ids[:, -2:]


def loss_of():
    if args.keep:
        logits = peft_model(input_ids=ids, logits_to_keep=args.keep).logits.float()
        # Position t predicts token t + 1: the last `keep` logits predict the last keep - 1 tokens.
        pred = logits[:, :-1].reshape(-1, vocab)
        target = ids[:, -(args.keep - 1):].reshape(-1)
        return torch.nn.functional.cross_entropy(pred, target)
    return peft_model(input_ids=ids, labels=labels).loss


def step():
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        loss = loss_of()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, loss.item()


step()
times = sorted(step()[0] for _ in range(args.reps))
median = times[len(times) // 2]
print(json.dumps({
    "peer": f"torch {torch.__version__} + PEFT, {args.precision}"
    + (" autocast" if args.precision == "bf16" else "")
    + (f", logits for the last {args.keep}" if args.keep else ", HF loss over all logits"),
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "threads": args.threads,
    "train_step_s": median,
    "train_step_range_s": [times[0], times[-1]],
    "train_tokens_per_s": 16 * 64 / median,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
}))
