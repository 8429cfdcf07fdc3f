#!/usr/bin/env python3
"""Recomputes an experiment's self/cross figure by the notebook's rules (spec §6.9) with pandas, from the
run's stored logs alone, and compares it with introspect's metrics.json.

A second, independent implementation of the rules in the tools the authors used: pandas' own `mode()[0]`
(ties to the smaller value), its merge, lower-casing and boolean masks, scipy's `sem`. The property values
are the ones introspect stored with each object answer (its property rules are checked separately against
the paper's released rows), and a record's `compliant` flag stands for the `default` checks, which is exact
for tasks whose only compliance group is `default` (the quick profiles' held-out tasks).

    python scripts/notebook-check.py runs/quick        # needs pandas and scipy
"""

import json
import sys

import numpy as np
import pandas as pd
from scipy import stats


def load(run, sub, log):
    return pd.DataFrame([json.loads(line) for line in open(f"{run}/{sub}/{log}")])


def figure(run, hyp_dir, target_dir, own_dir, tasks, props):
    target = load(run, target_dir, "object.jsonl")
    own = load(run, own_dir, "object.jsonl")
    hyp = load(run, hyp_dir, "hypothetical.jsonl")
    correctness, baselines = [], []
    for task in tasks:
        for prop in props:
            obj = target[target.task == task].copy()
            obj["value"] = obj.properties.map(lambda p: p.get(prop))
            # The predictor is asked only about strings its own object answer complied with.
            asked = set(own[(own.task == task) & (own.compliant == True) & own.response.notna()].string)
            meta = hyp[(hyp.task == task) & (hyp.property == prop) & hyp.string.isin(asked)]
            if meta.empty:
                continue
            merged = pd.merge(
                obj.add_prefix("obj_"), meta.add_prefix("meta_"), left_on="obj_string", right_on="meta_string"
            )
            correct = merged.obj_value.astype(str).str.lower() == merged.meta_response.astype(str).str.lower()
            # Undefined object values are kept and scored wrong (§6.9).
            correct &= merged.obj_value.notna()
            correct &= merged.meta_compliant == True
            correctness.extend(correct[merged.obj_compliant == True])
            # The baseline: the raw-case mode over all the target's compliant answers.
            compliant = obj[obj.compliant == True]
            mode = compliant.value.mode()[0]
            baselines.append((compliant.value == mode).mean())
    return {
        "accuracy": float(np.mean(correctness)),
        "n": len(correctness),
        "se": float(stats.sem(correctness)),
        "mode_baseline": float(np.mean(baselines)),
    }


def main(run):
    manifest = json.load(open(f"{run}/manifest.json"))
    metrics = json.load(open(f"{run}/metrics.json"))
    cfg = manifest["config"]
    tasks = cfg["data"]["held_out_tasks"]
    props = cfg["data"]["properties"]
    ours = [b for b in metrics["self_vs_cross"] + metrics["self_vs_cross_other_rules"]
            if b["rules"] == "notebook" and b["task"] == "all held-out"][0]
    checks = [
        ("self", figure(run, "m1ft/hyp-val", "m1ft/object-val", "m1ft/object-val", tasks, props),
         ours["self_prediction"], ours["mode_baseline"]),
        ("cross", figure(run, "m2ft/hyp-val", "m1ft/object-val", "m2ft/object-val", tasks, props),
         ours["cross_prediction"], ours["mode_baseline"]),
        ("untrained", figure(run, "m1/hyp-val", "m1/object-val", "m1/object-val", tasks, props),
         ours["untrained"], ours["untrained"]["mode_baseline"]),
    ]
    ok = True
    print("| bar | pandas: accuracy, n, SE, baseline | introspect |")
    print("|---|---|---|")
    for name, theirs, mine, baseline in checks:
        same = (theirs["n"] == mine["n"]
                and abs(theirs["accuracy"] - mine["accuracy"]) < 1e-12
                and abs(theirs["se"] - mine["se"]) < 1e-12
                and abs(theirs["mode_baseline"] - baseline) < 1e-12)
        ok &= same
        print(f"| {name} | {theirs['accuracy']:.6f}, {theirs['n']}, {theirs['se']:.6f}, {theirs['mode_baseline']:.6f} "
              f"| {mine['accuracy']:.6f}, {mine['n']}, {mine['se']:.6f}, {baseline:.6f} {'=' if same else 'DIFFERS'} |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1])
