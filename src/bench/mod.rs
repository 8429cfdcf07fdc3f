//! `introspect bench`: prefill and decode tokens/s and batched prompts/s, as llama-bench measures them
//! (pp64, pp512: one forward over N prompt tokens; tg32: 32 tokens decoded one at a time after a 1-token
//! prompt), so the figures sit beside llama.cpp's and PyTorch's from the same machine kind.

use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;

use crate::engine::{GenerationParams, Generator};
use crate::model::llama::{causal_mask, last_position, Batch};
use crate::model::{LoadedModel, Message};

pub mod adapters;
pub mod hooks;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub weights: String,
    pub pp64: f64,
    pub pp512: f64,
    pub tg32: f64,
    /// Chat prompts per second: 64 prompts, 16 per batch, 16 new tokens each.
    pub batched_prompts_per_s: f64,
    pub batched_tokens_per_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Decode tokens/s of `prompts` in one batch, each with its row's adapter and hooks: the prompts are
/// prefilled together (not timed), then `tokens` greedy decode steps of every row are timed.
fn decode_rate(
    gen: &Generator,
    prompts: &[Vec<u32>],
    rows: &[crate::engine::RowSpec],
    tokens: usize,
) -> Result<f64> {
    use crate::engine::{LiveBatch, Sequence};
    let params = std::sync::Arc::new(GenerationParams {
        max_tokens: tokens + 1,
        ..Default::default()
    });
    let seqs: Vec<Sequence> = prompts
        .iter()
        .zip(rows)
        .enumerate()
        .map(|(key, (prompt, row))| Sequence {
            key,
            prompt,
            params: params.clone(),
            row: row.clone(),
        })
        .collect();
    let mut batch = LiveBatch::default();
    batch.admit(gen, &seqs)?;
    let t = Instant::now();
    let mut steps = 0;
    while !batch.is_empty() {
        batch.step(gen, &mut |_| Ok(()))?;
        steps += 1;
    }
    anyhow::ensure!(
        steps == tokens + 1,
        "every row runs to max_tokens (no end-of-sequence ids)"
    );
    // The last step only samples: `tokens` forwards in all.
    Ok((prompts.len() * tokens) as f64 / t.elapsed().as_secs_f64())
}

/// Prompt-processing tokens/s for `n` tokens (median of `reps`).
pub fn prefill(model: &LoadedModel, n: usize, reps: usize) -> Result<f64> {
    let llama = &model.llama;
    let dev = llama.device();
    let vocab = llama.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let ids = Tensor::from_vec(ids, (1, n), dev)?;
    let positions = Tensor::arange(0f32, n as f32, dev)?.unsqueeze(0)?;
    let mask = causal_mask(&[0], n, 0, dev)?;
    let mut times = vec![];
    for _ in 0..reps + 1 {
        let t = Instant::now();
        let h = llama.forward(
            &Batch {
                ids: &ids,
                positions: &positions,
                mask: mask.as_ref(),
                adapters: crate::lora::RowAdapters::Same(None),
                hooks: None,
            },
            None,
        )?;
        llama.logits(&last_position(&h)?)?.to_vec2::<f32>()?;
        times.push(n as f64 / t.elapsed().as_secs_f64());
    }
    times.remove(0); // warm-up
    Ok(median(times))
}

/// Decode tokens/s: 32 tokens after a 1-token prompt, EOS ignored (median of `reps`).
pub fn decode(model: &LoadedModel, reps: usize) -> Result<f64> {
    let gen = Generator::for_ids(&model.llama, &[]);
    let params = GenerationParams {
        max_tokens: 33,
        ..Default::default()
    };
    let mut times = vec![];
    for _ in 0..reps + 1 {
        // The first token comes from the prefill; the 32 after it are decode steps.
        let t0 = Instant::now();
        gen.generate(
            &[vec![1]],
            &GenerationParams {
                max_tokens: 1,
                ..Default::default()
            },
        )?;
        let prefill = t0.elapsed().as_secs_f64();
        let t = Instant::now();
        gen.generate(&[vec![1]], &params)?;
        times.push(32.0 / (t.elapsed().as_secs_f64() - prefill));
    }
    times.remove(0);
    Ok(median(times))
}

/// Batched chat generation: `prompts` rendered prompts, 16 rows per batch, 16 new tokens each.
pub fn batched(model: &LoadedModel, prompts: usize) -> Result<(f64, f64)> {
    let animals = [
        "deer", "cow", "chicken", "fish", "rabbit", "rat", "panda", "owl", "fox", "bee",
    ];
    let mut ids = vec![];
    for i in 0..prompts {
        let seq: Vec<&str> = (0..6 + i % 7)
            .map(|k| animals[(i * 3 + k * 7) % animals.len()])
            .collect();
        let msg = format!(
            "What is the next 5 animals in the following text? Respond only with the next 5 animals and nothing else, including punctuation.\n{} \n",
            seq.join(" ")
        );
        ids.push(model.encode_chat(&[Message::new("user", &msg)])?.1);
    }
    let gen = Generator::for_ids(&model.llama, &[]);
    let params = GenerationParams {
        max_tokens: 16,
        ..Default::default()
    };
    let t = Instant::now();
    gen.generate(&ids, &params)?;
    let s = t.elapsed().as_secs_f64();
    Ok((prompts as f64 / s, (prompts * 16) as f64 / s))
}

pub fn run(model: &LoadedModel, weights: &str, reps: usize) -> Result<Figures> {
    let (prompts_per_s, tokens_per_s) = batched(model, 64)?;
    Ok(Figures {
        weights: weights.into(),
        pp64: prefill(model, 64, reps)?,
        pp512: prefill(model, 512, reps.div_ceil(2))?,
        tg32: decode(model, reps)?,
        batched_prompts_per_s: prompts_per_s,
        batched_tokens_per_s: tokens_per_s,
    })
}

/// Peer figures on this machine kind (../shared/notes/perf-anchors.md; medians, 2 threads).
pub const LLAMA_CPP_Q4_1: (f64, f64, f64) = (264.0, 271.0, 108.0);
pub const LLAMA_CPP_F32: (f64, f64, f64) = (470.0, 481.0, 47.0);
pub const LLAMA_CPP_BF16: (f64, f64, f64) = (817.0, 760.0, 92.0);
pub const TORCH_F32_PREFILL: f64 = 315.0;
pub const HF_GENERATE: f64 = 14.0;

pub fn markdown(rows: &[Figures]) -> String {
    let mut s = String::from(
        "| introspect weights | pp64 tok/s | pp512 tok/s | tg32 tok/s | batched prompts/s (tok/s) | vs llama.cpp Q4_1 (pp64 / pp512 / tg32) | vs llama.cpp same weights | vs PyTorch f32 (prefill / HF generate) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for f in rows {
        let (a, b, c) = LLAMA_CPP_Q4_1;
        let same = match f.weights.as_str() {
            "f32" => LLAMA_CPP_F32,
            "bf16" => LLAMA_CPP_BF16,
            _ => LLAMA_CPP_Q4_1,
        };
        s += &format!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.2} ({:.0}) | {:.2}× / {:.2}× / {:.2}× | {:.2}× / {:.2}× / {:.2}× | {:.2}× / {:.1}× |\n",
            f.weights,
            f.pp64,
            f.pp512,
            f.tg32,
            f.batched_prompts_per_s,
            f.batched_tokens_per_s,
            f.pp64 / a,
            f.pp512 / b,
            f.tg32 / c,
            f.pp64 / same.0,
            f.pp512 / same.1,
            f.tg32 / same.2,
            f.pp64 / TORCH_F32_PREFILL,
            f.tg32 / HF_GENERATE,
        );
    }
    s
}

/// One LoRA optimizer step as the peer measured it: batch 16 × 64 random tokens, rank 32, alpha 64, all
/// seven projections, loss on the last 2 targets of each row (logits for the last 3 positions).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainFigures {
    pub weights: String,
    pub forward_backward_s: f64,
    pub optimizer_s: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// Peak resident memory of this process (VmHWM), GiB.
    pub peak_rss_gib: f64,
    /// On a GPU: the device memory in use after the steps (its allocator keeps what the step took).
    pub device_used_gib: Option<f64>,
    pub trainable_params: usize,
    /// Activation checkpointing on.
    #[serde(default)]
    pub checkpointing: bool,
}

pub fn train_step(
    model: &LoadedModel,
    weights: &str,
    reps: usize,
    checkpoint: bool,
) -> Result<TrainFigures> {
    use crate::lora::{Adapter, LoraConfig};
    use crate::train::adamw::{self, AdamW, AdamWParams};
    use crate::train::pass::{Pass, TrainBatch};
    use rand::{Rng, SeedableRng};

    let llama = &model.llama;
    let (b, t) = (16, 64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let rows: Vec<(Vec<u32>, Vec<bool>)> = (0..b)
        .map(|_| {
            let ids = (0..t)
                .map(|_| rng.random_range(0..llama.cfg.vocab_size as u32))
                .collect();
            let mask = (0..t).map(|i| i >= t - 2).collect();
            (ids, mask)
        })
        .collect();
    let batch = TrainBatch::new(&rows, 0, llama.device())?;
    let cfg = LoraConfig::every_projection(32, 64.0);
    let mut adapter = Adapter::init(cfg, &llama.cfg, 0, llama.device())?;
    let mut opt = AdamW::new(AdamWParams::default(), &adapter)?;
    let (mut fb, mut os) = (vec![], vec![]);
    for _ in 0..reps + 1 {
        let t0 = Instant::now();
        let pass = Pass {
            llama,
            adapter: &adapter,
            dropout_seed: 0,
            checkpoint,
        };
        let (_, grads) = pass.forward_backward(&batch, batch.num_targets() as f64)?;
        let mut grads = adamw::flatten(&adapter, grads);
        let t1 = Instant::now();
        adamw::clip(&mut grads, 1.0)?;
        opt.step(&mut adapter, &grads, 2e-5)?;
        let t2 = Instant::now();
        fb.push((t1 - t0).as_secs_f64());
        os.push((t2 - t1).as_secs_f64());
    }
    // The first step pays for page faults and warm-up, as the peer's warm-up steps did.
    fb.remove(0);
    os.remove(0);
    let (f, o) = (median(fb), median(os));
    Ok(TrainFigures {
        weights: weights.into(),
        forward_backward_s: f,
        optimizer_s: o,
        step_s: f + o,
        tokens_per_s: (b * t) as f64 / (f + o),
        peak_rss_gib: peak_rss_gib(),
        device_used_gib: device_used_gib(llama.device()),
        trainable_params: adapter.num_parameters(),
        checkpointing: checkpoint,
    })
}

/// The CPU's model name as /proc/cpuinfo gives it ("unknown CPU" elsewhere).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Device memory in use (total − free) on a GPU, GiB; None on the CPU.
pub fn device_used_gib(device: &candle_core::Device) -> Option<f64> {
    let (free, total) = crate::memory::device_memory(device)?;
    Some((total - free) as f64 / (1u64 << 30) as f64)
}

/// VmHWM of this process in GiB (0 where /proc is not available).
pub fn peak_rss_gib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0))
}

/// PyTorch 2.15 + PEFT 0.21, f32, 2 threads, same step (../shared/notes/perf-anchors.md): seconds per step
/// and peak RSS in GiB with logits for the last 3 positions only.
pub const TORCH_PEFT_STEP: (f64, f64) = (5.2, 4.5);

pub fn train_markdown(rows: &[TrainFigures]) -> String {
    let (ts, tm) = TORCH_PEFT_STEP;
    let mut s = String::from(
        "| introspect base weights | checkpointing | forward+backward s | AdamW s | step s | tokens/s | peak RSS GiB | device GiB | vs PyTorch+PEFT speed (5.2 s) | vs PyTorch memory (4.5 GiB) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for f in rows {
        s += &format!(
            "| {} | {} | {:.2} | {:.3} | {:.2} | {:.0} | {:.2} | {} | {:.2}× | {:.2}× |\n",
            f.weights,
            if f.checkpointing { "on" } else { "off" },
            f.forward_backward_s,
            f.optimizer_s,
            f.step_s,
            f.tokens_per_s,
            f.peak_rss_gib,
            f.device_used_gib.map_or("-".into(), |g| format!("{g:.2}")),
            ts / f.step_s,
            f.peak_rss_gib / tm,
        );
    }
    s
}

/// The self-prediction loop's throughput: one object-level and one hypothetical run over `rows`
/// generated animals_long strings (first_word), greedy, no request cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskFigures {
    pub run: String,
    pub batch: usize,
    pub rows: usize,
    pub seconds: f64,
    pub prompts_per_s: f64,
    /// Generated tokens per second (responses re-tokenized).
    pub output_tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
}

pub fn task_loop(
    backend: &mut crate::backend::LocalBackend,
    rows: usize,
    batch: usize,
) -> Result<Vec<TaskFigures>> {
    use crate::runs::{items_from_files, Run, RunKind, RunSettings};
    use crate::tasks::build::{write_task_files, SourceString};
    use crate::tasks::generate::Generator as Strings;
    use crate::tasks::{Property, Task};
    backend.batch_size = batch;
    let dir = tempfile::tempdir()?;
    let (_, val) = Strings::get("animals")?.generate(0, rows, 2024)?;
    let strings: Vec<SourceString> = val
        .into_iter()
        .map(|string| SourceString {
            string,
            target: None,
        })
        .collect();
    let files = write_task_files(
        dir.path(),
        Task::get("animals_long")?,
        &strings,
        &[Property::FirstWord],
    )?;
    let mut out = vec![];
    for (kind, max_tokens) in [(RunKind::Object, 256), (RunKind::Hypothetical, 32)] {
        let items = items_from_files(kind, &files, None)?;
        let run_dir = dir.path().join(kind.log_name());
        let settings = RunSettings {
            kind,
            model: "bench".into(),
            adapter: None,
            fingerprint: String::new(),
            n: 1,
            temperature: 0.0,
            max_tokens,
            seed: 0,
            system: Some(String::new()),
        };
        let summary = Run {
            backend: &*backend,
            settings: settings.clone(),
            dir: run_dir.clone(),
            chunk: 64,
            progress: true,
        }
        .run(&items)?;
        let (_, records) = crate::runs::read_run(&run_dir, kind)?;
        let tokenizer = &backend.model.tokenizer;
        let mut output_tokens = 0;
        for r in &records {
            output_tokens += tokenizer.encode(r.response.as_deref().unwrap_or(""))?.len() + 1;
        }
        let mut prompt_tokens = 0;
        for i in &items {
            let messages = [Message::new("system", ""), Message::new("user", &i.user)];
            prompt_tokens += backend.model.encode_chat(&messages)?.1.len();
        }
        out.push(TaskFigures {
            run: format!("{kind:?}").to_lowercase(),
            batch,
            rows: summary.rows,
            seconds: summary.seconds,
            prompts_per_s: summary.rows as f64 / summary.seconds,
            output_tokens_per_s: output_tokens as f64 / summary.seconds,
            prompt_tokens_per_s: prompt_tokens as f64 / summary.seconds,
        });
    }
    Ok(out)
}

pub fn task_markdown(rows: &[TaskFigures]) -> String {
    let mut s = String::from(
        "| run (500 animals_long rows, greedy) | batch | s | prompts/s | generated tokens/s | prompt tokens/s |\n|---|---|---|---|---|---|\n",
    );
    for f in rows {
        s += &format!(
            "| {} | {} | {:.1} | {:.2} | {:.0} | {:.0} |\n",
            f.run,
            f.batch,
            f.seconds,
            f.prompts_per_s,
            f.output_tokens_per_s,
            f.prompt_tokens_per_s
        );
    }
    s
}
