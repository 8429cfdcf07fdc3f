//! The finetuning loop: epochs of shuffled batches, micro-batches accumulated into each optimizer step,
//! clipping, the schedule, validation, metrics.jsonl, the loss plot and checkpoints that resume exactly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::adamw::{self, AdamW, AdamWParams};
use super::checkpoint::{self, TrainerState};
use super::data::{read_chat_jsonl, tokenize, TokenizedRow};
use super::pass::{accumulate, eval_loss, Pass, TrainBatch};
use super::plot;
use super::schedule::{Schedule, ScheduleKind};
use crate::fsutil::write_atomic;
use crate::lora::{parse_targets, peft, Adapter, LoraConfig};
use crate::memory::{self, Checkpointing};
use crate::model::LoadedModel;

/// Every setting of a run. The defaults are the paper's Llama recipe (rank 32, lr 2e-5, batch 16,
/// one epoch) with alpha = 2·rank (see the README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Hub names of the adapted projections, e.g. ["q_proj", "v_proj"].
    pub targets: Vec<String>,
    pub lr: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub epochs: usize,
    pub max_seq_len: usize,
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end).
    pub save_every: usize,
    /// Measure the validation loss every this many steps (0: at the end only).
    pub eval_every: usize,
    /// Activation checkpointing: auto (on when the memory plan does not fit without it), on, off.
    /// Same gradients either way; left out of the run's fingerprint while auto.
    #[serde(skip_serializing_if = "Checkpointing::is_auto")]
    pub checkpointing: Checkpointing,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            rank: 32,
            alpha: 64.0,
            dropout: 0.0,
            targets: crate::lora::Target::ALL
                .iter()
                .map(|t| t.hub_name().to_string())
                .collect(),
            lr: 2e-5,
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            batch_size: 16,
            micro_batch_size: 16,
            epochs: 1,
            max_seq_len: 1024,
            seed: 0,
            save_every: 50,
            eval_every: 0,
            checkpointing: Checkpointing::Auto,
        }
    }
}

impl FinetuneConfig {
    fn validate(&self) -> Result<()> {
        let checks = [
            (self.rank == 0, "--rank must be at least 1"),
            (self.batch_size == 0, "--batch-size must be at least 1"),
            (
                self.micro_batch_size == 0,
                "--micro-batch-size must be at least 1",
            ),
            (self.epochs == 0, "--epochs must be at least 1"),
            (self.max_seq_len < 2, "--max-seq-len must be at least 2"),
            (
                !(0.0..1.0).contains(&self.dropout),
                "--dropout must be in [0, 1)",
            ),
            (self.lr.is_nan() || self.lr <= 0.0, "--lr must be positive"),
        ];
        for (bad, msg) in checks {
            if bad {
                bail!("{msg}");
            }
        }
        parse_targets(&self.targets.join(","))?;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub final_train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub tokens_per_s: f64,
    /// Tokens trained on by this process's steps (a resumed run counts those after the resume).
    #[serde(default)]
    pub tokens: usize,
    pub seconds: f64,
    pub adapter_dir: PathBuf,
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetricsLine {
    step: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_s: Option<f64>,
}

impl MetricsLine {
    fn validation(step: usize, val_loss: f64) -> Self {
        Self {
            step,
            epoch: None,
            loss: None,
            val_loss: Some(val_loss),
            lr: None,
            grad_norm: None,
            tokens_per_s: None,
        }
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn tokenize_file(model: &LoadedModel, path: &Path, max_len: usize) -> Result<Vec<TokenizedRow>> {
    read_chat_jsonl(path)?
        .iter()
        .map(|row| tokenize(model, row, max_len))
        .collect()
}

/// The order of the examples in `epoch`: a permutation seeded by (seed, epoch).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    order.shuffle(&mut rng);
    order
}

fn micro_batches(
    rows: &[TokenizedRow],
    idx: &[usize],
    micro: usize,
    pad: u32,
    dev: &candle_core::Device,
) -> Result<Vec<TrainBatch>> {
    // Similar lengths share a micro-batch: less padding, same gradient.
    let mut idx = idx.to_vec();
    idx.sort_by_key(|&i| rows[i].ids.len());
    idx.chunks(micro)
        .map(|c| {
            let r: Vec<(Vec<u32>, Vec<bool>)> = c
                .iter()
                .map(|&i| (rows[i].ids.clone(), rows[i].targets.clone()))
                .collect();
            TrainBatch::new(&r, pad, dev)
        })
        .collect()
}

/// Mean validation loss over every target token of `rows`.
pub fn validation_loss(
    model: &LoadedModel,
    adapter: Option<&Adapter>,
    rows: &[TokenizedRow],
    micro: usize,
) -> Result<f64> {
    let idx: Vec<usize> = (0..rows.len()).collect();
    let pad = model.eos_ids.first().copied().unwrap_or(0);
    let (mut sum, mut n) = (0.0, 0usize);
    for b in micro_batches(rows, &idx, micro, pad, model.llama.device())? {
        sum += eval_loss(&model.llama, adapter, &b)?;
        n += b.num_targets();
    }
    Ok(sum / n.max(1) as f64)
}

fn read_metrics(path: &Path, upto: usize) -> Vec<MetricsLine> {
    // A line cut by a kill does not parse and is dropped; so are steps after the checkpoint.
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<MetricsLine>(l).ok())
        .filter(|m| m.step <= upto)
        .collect()
}

pub struct Finetune<'a> {
    pub model: &'a LoadedModel,
    /// The model's name as given by the user (recorded as the adapter's base model).
    pub base_model: String,
    pub config: FinetuneConfig,
    pub train: PathBuf,
    pub val: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    /// Show progress bars (off in tests).
    pub progress: bool,
}

impl Finetune<'_> {
    pub fn run(&self) -> Result<Summary> {
        let cfg = &self.config;
        cfg.validate()?;
        let model = self.model;
        let dev = model.llama.device();
        let out = &self.out;
        let started = Instant::now();

        let train = tokenize_file(model, &self.train, cfg.max_seq_len)?;
        let val = match &self.val {
            Some(p) => tokenize_file(model, p, cfg.max_seq_len)?,
            None => vec![],
        };
        let fingerprint = serde_json::json!({
            "config": cfg,
            "train_sha256": sha256_file(&self.train)?,
            "val_sha256": self.val.as_deref().map(sha256_file).transpose()?,
            "model": model.path,
        });
        // The memory plan from the real rows: the longest one and the most targets in one.
        let longest = train.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let most_targets = train.iter().map(|r| r.num_targets()).max().unwrap_or(0);
        let lora_targets = parse_targets(&cfg.targets.join(","))?;
        let fit = memory::fit_training(
            &model.llama.cfg,
            model.spec,
            memory::free_bytes(dev),
            cfg.micro_batch_size.min(cfg.batch_size),
            longest,
            most_targets,
            cfg.rank,
            &lora_targets,
            cfg.checkpointing,
        )?;
        if self.progress {
            eprintln!(
                "training memory plan (micro-batch {}, checkpointing {}):\n{}",
                fit.micro_batch,
                if fit.checkpoint { "on" } else { "off" },
                fit.plan
            );
        }
        let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
        let total_steps = steps_per_epoch * cfg.epochs;
        let schedule = Schedule {
            kind: cfg.schedule,
            lr: cfg.lr,
            warmup_steps: cfg.warmup_steps,
            total_steps,
        };

        let existing = checkpoint::list(out)?;
        if !existing.is_empty() && !self.resume {
            bail!(
                "{} already holds a run (checkpoint at step {}); pass --resume to continue it or choose another --out",
                out.display(),
                existing.last().unwrap()
            );
        }
        let lora_cfg = LoraConfig {
            r: cfg.rank,
            alpha: cfg.alpha,
            dropout: cfg.dropout,
            targets: lora_targets,
            layers: None,
            use_rslora: false,
        };
        let (mut adapter, mut opt, start) = match checkpoint::load_latest(
            out,
            &model.llama.cfg,
            dev,
        )? {
            Some(ck) if self.resume => {
                if ck.state.fingerprint != fingerprint {
                    bail!(
                            "{}: the checkpoint was made with other settings or data; resume with the same \
                             command, or choose another --out\n  checkpoint: {}\n  now:        {}",
                            out.display(),
                            ck.state.fingerprint,
                            fingerprint
                        );
                }
                (ck.adapter, ck.optimizer, ck.state.step)
            }
            _ => {
                let a = Adapter::init(lora_cfg, &model.llama.cfg, cfg.seed, dev)?;
                let params = AdamWParams {
                    weight_decay: cfg.weight_decay,
                    ..Default::default()
                };
                let o = AdamW::new(params, &a)?;
                (a, o, 0)
            }
        };
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        write_atomic(
            &out.join("train_config.json"),
            serde_json::to_string_pretty(&fingerprint)?.as_bytes(),
        )?;
        let metrics_path = out.join("metrics.jsonl");
        let mut history = read_metrics(&metrics_path, start);
        let mut text = String::new();
        for m in &history {
            text += &serde_json::to_string(m)?;
            text.push('\n');
        }
        write_atomic(&metrics_path, text.as_bytes())?;
        let mut metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)?;
        let mut log = |m: MetricsLine, history: &mut Vec<MetricsLine>| -> Result<()> {
            writeln!(metrics, "{}", serde_json::to_string(&m)?)?;
            metrics.flush()?;
            history.push(m);
            Ok(())
        };

        let bar = if self.progress {
            indicatif::ProgressBar::new(total_steps as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "step {pos}/{len} {wide_bar} {elapsed_precise}<{eta_precise} {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(start as u64);
        let pad = model.eos_ids.first().copied().unwrap_or(0);
        let mut order = (usize::MAX, vec![]);
        let (mut tokens_done, mut last_loss) = (0usize, None);
        let loop_started = Instant::now();
        for step in start..total_steps {
            let t0 = Instant::now();
            let (epoch, k) = (step / steps_per_epoch, step % steps_per_epoch);
            if order.0 != epoch {
                order = (epoch, epoch_order(train.len(), cfg.seed, epoch));
            }
            let idx = &order.1[k * cfg.batch_size..((k + 1) * cfg.batch_size).min(train.len())];
            let batches = micro_batches(&train, idx, fit.micro_batch, pad, dev)?;
            let n_targets: usize = batches.iter().map(TrainBatch::num_targets).sum();
            let (mut grads, mut loss_sum, mut tokens) = (None, 0.0, 0);
            for (mi, b) in batches.iter().enumerate() {
                let pass = Pass {
                    llama: &model.llama,
                    adapter: &adapter,
                    dropout_seed: cfg.seed ^ ((step as u64) << 20 | mi as u64),
                    checkpoint: fit.checkpoint,
                };
                let (l, g) = pass.forward_backward(b, n_targets as f64)?;
                loss_sum += l;
                tokens += b.num_tokens();
                accumulate(&mut grads, g)?;
            }
            let mut grads = adamw::flatten(&adapter, grads.expect("a batch has a micro-batch"));
            let grad_norm = if cfg.max_grad_norm > 0.0 {
                adamw::clip(&mut grads, cfg.max_grad_norm)?
            } else {
                adamw::global_norm(&grads)?
            };
            let lr = schedule.lr(step);
            opt.step(&mut adapter, &grads, lr)?;
            let loss = loss_sum / n_targets as f64;
            if !loss.is_finite() {
                bail!("step {}: the loss is {loss}; lower --lr", step + 1);
            }
            tokens_done += tokens;
            let tps = tokens as f64 / t0.elapsed().as_secs_f64();
            last_loss = Some(loss);
            log(
                MetricsLine {
                    step: step + 1,
                    epoch: Some((step + 1) as f64 / steps_per_epoch as f64),
                    loss: Some(loss),
                    val_loss: None,
                    lr: Some(lr),
                    grad_norm: Some(grad_norm),
                    tokens_per_s: Some(tps),
                },
                &mut history,
            )?;
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
            bar.inc(1);
            let last = step + 1 == total_steps;
            if !val.is_empty() && cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0 && !last {
                let v = validation_loss(model, Some(&adapter), &val, fit.micro_batch)?;
                log(MetricsLine::validation(step + 1, v), &mut history)?;
            }
            if last || (cfg.save_every > 0 && (step + 1) % cfg.save_every == 0) {
                let state = TrainerState {
                    step: step + 1,
                    total_steps,
                    fingerprint: fingerprint.clone(),
                };
                checkpoint::save(out, &adapter, &opt, &state, &self.base_model, 2)?;
            }
        }
        bar.finish_and_clear();

        let val_loss = match val.is_empty() {
            true => None,
            false => {
                let done = history
                    .iter()
                    .any(|m| m.step == total_steps && m.val_loss.is_some());
                let v = validation_loss(model, Some(&adapter), &val, fit.micro_batch)?;
                if !done {
                    log(MetricsLine::validation(total_steps, v), &mut history)?;
                }
                Some(v)
            }
        };
        peft::save(&adapter, out, &self.base_model)?;
        let train_curve: Vec<(usize, f64)> = history
            .iter()
            .filter_map(|m| m.loss.map(|l| (m.step, l)))
            .collect();
        let val_curve: Vec<(usize, f64)> = history
            .iter()
            .filter_map(|m| m.val_loss.map(|l| (m.step, l)))
            .collect();
        // The figure is a convenience: without a font the run still succeeds.
        if let Err(e) = plot::loss_curve(out, &train_curve, &val_curve) {
            tracing::warn!("no loss curve: {e:#}");
        }
        let secs = loop_started.elapsed().as_secs_f64();
        Ok(Summary {
            steps: total_steps,
            final_train_loss: last_loss.or(train_curve.last().map(|p| p.1)),
            val_loss,
            tokens_per_s: tokens_done as f64 / secs.max(1e-9),
            tokens: tokens_done,
            seconds: started.elapsed().as_secs_f64(),
            adapter_dir: out.clone(),
        })
    }
}
