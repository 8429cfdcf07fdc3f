#!/usr/bin/env bash
# The README's CPU comparison, interleaved rounds on this machine, one process per figure:
#   llama.cpp's llama-bench (pp64, pp512, tg32) on the Q4_1, F32 and BF16 GGUFs;
#   introspect bench --only engine, and --only train for f32 and bf16 (bf16 once more with INTROSPECT_AMX=off
#   where the CPU has AMX);
#   PyTorch + PEFT (scripts/peft-cpu-bench.py): the step in f32 and under bf16 autocast, HF loss over all
#   logits and logits for the last 3; prefill with f32 and bf16 weights.
# Every figure is a JSON line in OUT/<round>-<what>.json(l); stderr goes beside it.
#
#   INTROSPECT=target/release/introspect LLAMA_BIN=.../llama.cpp/build/bin GGUF_DIR=DIR PYTHON=venv/bin/python \
#   HF_DIR=smollm2-hf scripts/cpu-rounds.sh ROUNDS OUT
#
# GGUF_DIR holds SmolLM2-135M-Instruct.{Q4_1,F32,BF16}.gguf (llama-quantize --allow-requantize makes the F32 and
# BF16 ones from the Q4_1); HF_DIR is `introspect model export`'s output. LLAMA_ARGS is added to every llama-bench
# call (`--repack 0` where llama.cpp's repacked Q4 kernels crash, as on the Xeon in the README).
set -euo pipefail
rounds=${1:?rounds} out=${2:?output directory}
: "${INTROSPECT:=target/release/introspect}" "${LLAMA_BIN:?}" "${GGUF_DIR:?}" "${PYTHON:?}" "${HF_DIR:?}"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
amx=$(grep -qw amx_tile /proc/cpuinfo && echo yes || echo no)
for r in $(seq 1 "$rounds"); do
  for q in Q4_1 F32 BF16; do
    "$LLAMA_BIN/llama-bench" -m "$GGUF_DIR/SmolLM2-135M-Instruct.$q.gguf" -t 2 -p 64,512 -n 32 -r 3 -o jsonl ${LLAMA_ARGS:-} \
      >"$out/$r-llama-$q.jsonl" 2>"$out/$r-llama-$q.err"
  done
  "$INTROSPECT" bench --only engine --reps 5 --json "$out/$r-introspect-engine.json" >/dev/null 2>"$out/$r-introspect-engine.err"
  for w in f32 bf16; do
    "$INTROSPECT" bench --only train --weights $w --reps 3 --json "$out/$r-introspect-train-$w.json" \
      >/dev/null 2>"$out/$r-introspect-train-$w.err"
  done
  if [ "$amx" = yes ]; then
    INTROSPECT_AMX=off "$INTROSPECT" bench --only train --weights bf16 --reps 3 \
      --json "$out/$r-introspect-train-bf16-noamx.json" >/dev/null 2>"$out/$r-introspect-train-bf16-noamx.err"
  fi
  for p in f32 bf16; do
    for keep in 0 3; do
      "$PYTHON" "$here/peft-cpu-bench.py" "$HF_DIR" --precision $p --keep $keep \
        >"$out/$r-torch-train-$p-keep$keep.json" 2>"$out/$r-torch-train-$p-keep$keep.err"
    done
    "$PYTHON" "$here/peft-cpu-bench.py" "$HF_DIR" --prefill --precision $p \
      >"$out/$r-torch-prefill-$p.json" 2>"$out/$r-torch-prefill-$p.err"
  done
  echo "round $r done" >&2
done
