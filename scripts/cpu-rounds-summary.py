"""Medians (and ranges) over the rounds of scripts/cpu-rounds.sh: one line per engine and figure.

    python3 scripts/cpu-rounds-summary.py OUT [--skip-rounds 1]
"""
import argparse
import glob
import json
import os
import re
import statistics
from collections import defaultdict

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--skip-rounds", type=int, nargs="*", default=[])
args = p.parse_args()

figures = defaultdict(list)


def add(name, value):
    if value is not None:
        figures[name].append(value)


for path in sorted(glob.glob(os.path.join(args.out, "*.json*"))):
    base = os.path.basename(path)
    rnd, what = base.split("-", 1)
    if int(rnd) in args.skip_rounds or os.path.getsize(path) == 0:
        continue
    what = re.sub(r"\.jsonl?$", "", what)
    if what.startswith("llama-"):
        for line in open(path):
            r = json.loads(line)
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            add(f"llama.cpp {what[6:]} {test} tok/s", r["avg_ts"])
    elif what == "introspect-engine":
        for e in json.load(open(path))["engine"]:
            for k in ("pp64", "pp512", "tg32", "batched_prompts_per_s", "batched_tokens_per_s"):
                add(f"introspect {e['weights']} {k}", e[k])
    elif what.startswith("introspect-train"):
        for t in json.load(open(path))["train"]:
            tag = what[len("introspect-train-"):]
            add(f"introspect train {tag} step s", t["step_s"])
            add(f"introspect train {tag} peak RSS GiB", t["peak_rss_gib"])
    elif what.startswith("torch-train"):
        r = json.load(open(path))
        add(f"{what} step s", r["train_step_s"])
        add(f"{what} peak RSS GiB", r["peak_rss_gib"])
    elif what.startswith("torch-prefill"):
        r = json.load(open(path))
        for k in ("pp64", "pp512"):
            add(f"{what} {k} tok/s", r[k])

for name in sorted(figures):
    v = figures[name]
    print(f"{name}: {statistics.median(v):.3g} ({min(v):.3g}–{max(v):.3g}, n={len(v)})")
