//! Finetuning through an OpenAI-compatible API (OpenAI, `introspect serve --state-dir`): upload the
//! chat JSONL (`/v1/files`, purpose `fine-tune`), create a job (`/v1/fine_tuning/jobs`, supervised, with
//! the recipe's epochs, batch size, seed and learning-rate multiplier), poll it with backoff, and keep
//! every step's outcome in `OUT/hosted.json` (written atomically), so a killed run resumes where it was:
//! an uploaded file is not uploaded again, a created job is polled, not created again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::client::{form, ApiClient, Repeat};
use super::OpenAiConfig;
use crate::fsutil::write_atomic;

/// What the job is asked for; None leaves a value to the provider ("auto").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostedHyperparameters {
    pub n_epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate_multiplier: Option<f64>,
}

pub struct HostedFinetune {
    pub config: OpenAiConfig,
    /// The model to finetune, as the provider names it.
    pub model: String,
    pub train: PathBuf,
    pub val: Option<PathBuf>,
    /// Where hosted.json goes.
    pub out: PathBuf,
    pub hyperparameters: HostedHyperparameters,
    pub seed: u64,
    pub suffix: Option<String>,
    /// The first wait between polls; it grows 1.5× per poll up to a minute.
    pub poll: Duration,
    pub progress: bool,
}

/// `OUT/hosted.json`: the job and its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostedRecord {
    pub base_url: String,
    pub model: String,
    pub train_sha256: String,
    pub hyperparameters: HostedHyperparameters,
    pub seed: u64,
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    pub job_id: Option<String>,
    pub status: String,
    /// The trained model's name: what requests send as `model` from here on.
    pub fine_tuned_model: Option<String>,
    pub trained_tokens: Option<u64>,
    /// From the job's newest metrics event, where the provider sends them.
    pub steps: Option<u64>,
    pub final_train_loss: Option<f64>,
    /// Seconds waited on the job (this process and any it resumed).
    pub seconds: f64,
    pub error: Option<String>,
}

pub const RECORD_FILE: &str = "hosted.json";

#[derive(Deserialize)]
struct FileAnswer {
    id: String,
}

#[derive(Deserialize)]
struct JobAnswer {
    id: String,
    status: String,
    #[serde(default)]
    fine_tuned_model: Option<String>,
    #[serde(default)]
    trained_tokens: Option<u64>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Events {
    data: Vec<serde_json::Value>,
}

impl HostedFinetune {
    fn save(&self, r: &HostedRecord) -> Result<()> {
        write_atomic(
            &self.out.join(RECORD_FILE),
            serde_json::to_string_pretty(r)?.as_bytes(),
        )
    }

    /// The record of an earlier attempt at this same job, or a fresh one; a record of another job in
    /// OUT is an error (its model would be mistaken for this one's).
    fn start(&self) -> Result<HostedRecord> {
        let train_sha256 = crate::registry::sha256_file(&self.train)?;
        let fresh = HostedRecord {
            base_url: self.config.base_url.clone(),
            model: self.model.clone(),
            train_sha256,
            hyperparameters: self.hyperparameters.clone(),
            seed: self.seed,
            training_file: None,
            validation_file: None,
            job_id: None,
            status: "new".into(),
            fine_tuned_model: None,
            trained_tokens: None,
            steps: None,
            final_train_loss: None,
            seconds: 0.0,
            error: None,
        };
        let path = self.out.join(RECORD_FILE);
        if !path.exists() {
            return Ok(fresh);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let old: HostedRecord = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a hosted-finetuning record", path.display()))?;
        fn key(r: &HostedRecord) -> (&str, &str, &str, &HostedHyperparameters, u64) {
            (
                &r.base_url,
                &r.model,
                &r.train_sha256,
                &r.hyperparameters,
                r.seed,
            )
        }
        if key(&old) != key(&fresh) {
            bail!(
                "{} records a job for other settings (server, model, training file or hyperparameters); use another --out",
                path.display()
            );
        }
        if matches!(old.status.as_str(), "failed" | "cancelled") {
            // A failed job is tried again from the upload on; its outcome stays in the log.
            tracing::warn!(
                "{}: the last job {}; starting a new one",
                path.display(),
                old.status
            );
            return Ok(HostedRecord {
                training_file: old.training_file,
                validation_file: old.validation_file,
                ..fresh
            });
        }
        Ok(old)
    }

    fn upload(&self, client: &ApiClient, path: &Path) -> Result<String> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let name = path
            .file_name()
            .map_or("train.jsonl".into(), |n| n.to_string_lossy().into_owned());
        let answer: FileAnswer = client.request(
            "POST",
            "files",
            &form(&[("purpose", "fine-tune")], "file", &name, &bytes),
            Repeat::Safe,
        )?;
        Ok(answer.id)
    }

    fn create(&self, client: &ApiClient, r: &HostedRecord) -> Result<String> {
        let h = &self.hyperparameters;
        let auto = |v: Option<serde_json::Value>| v.unwrap_or_else(|| "auto".into());
        let mut body = serde_json::json!({
            "model": self.model,
            "training_file": r.training_file,
            "seed": self.seed,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": auto(h.n_epochs.map(Into::into)),
                "batch_size": auto(h.batch_size.map(Into::into)),
                "learning_rate_multiplier": auto(h.learning_rate_multiplier.map(Into::into)),
            }}},
        });
        if let Some(v) = &r.validation_file {
            body["validation_file"] = v.clone().into();
        }
        if let Some(s) = &self.suffix {
            body["suffix"] = s.clone().into();
        }
        let job: JobAnswer =
            client.post_json("fine_tuning/jobs", &body, Repeat::OnlyUnprocessed)?;
        Ok(job.id)
    }

    /// Uploads, creates and waits; the record of a succeeded job (its `fine_tuned_model` set).
    pub fn run(&self) -> Result<HostedRecord> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        let client = ApiClient::new(&self.config)?;
        let mut r = self.start()?;
        if r.status == "succeeded" && r.fine_tuned_model.is_some() {
            return Ok(r);
        }
        if r.training_file.is_none() {
            r.training_file = Some(self.upload(&client, &self.train)?);
            self.save(&r)?;
        }
        if let (Some(val), None) = (&self.val, &r.validation_file) {
            r.validation_file = Some(self.upload(&client, val)?);
            self.save(&r)?;
        }
        if r.job_id.is_none() {
            r.job_id = Some(self.create(&client, &r)?);
            r.status = "queued".into();
            r.error = None;
            self.save(&r)?;
        }
        let id = r.job_id.clone().expect("set above");
        let bar = if self.progress {
            indicatif::ProgressBar::new_spinner()
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {msg}")
                .expect("a valid template"),
        );
        bar.set_prefix(format!("fine-tuning job {id}"));
        bar.enable_steady_tick(Duration::from_millis(250));
        let started = Instant::now();
        let base_seconds = r.seconds;
        let mut wait = self.poll;
        loop {
            let job: JobAnswer = client.get(&format!("fine_tuning/jobs/{id}"))?;
            let events: Option<Events> = client
                .get(&format!("fine_tuning/jobs/{id}/events?limit=20"))
                .ok();
            if let Some(m) = events
                .as_ref()
                .and_then(|e| e.data.iter().find_map(metrics))
            {
                (r.steps, r.final_train_loss) = (m.0, m.1);
            }
            let changed = job.status != r.status;
            r.status = job.status.clone();
            r.fine_tuned_model = job.fine_tuned_model.clone();
            r.trained_tokens = job.trained_tokens;
            r.seconds = base_seconds + started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "{}{}",
                r.status,
                r.final_train_loss
                    .map_or(String::new(), |l| format!(" · loss {l:.4}"))
            ));
            match job.status.as_str() {
                "succeeded" => {
                    if r.fine_tuned_model.is_none() {
                        bail!("job {id} succeeded without naming its fine_tuned_model");
                    }
                    self.save(&r)?;
                    bar.finish_and_clear();
                    return Ok(r);
                }
                "failed" | "cancelled" => {
                    r.error = Some(
                        job.error
                            .as_ref()
                            .and_then(|e| e.get("message"))
                            .and_then(|m| m.as_str())
                            .unwrap_or("no reason given")
                            .to_string(),
                    );
                    self.save(&r)?;
                    bar.finish_and_clear();
                    bail!(
                        "fine-tuning job {id} {}: {}",
                        job.status,
                        r.error.as_deref().unwrap_or_default()
                    );
                }
                _ => {
                    if changed {
                        self.save(&r)?;
                    }
                }
            }
            std::thread::sleep(wait);
            wait = (wait.mul_f64(1.5)).min(Duration::from_secs(60));
        }
    }
}

/// (step, training loss) of a metrics event: OpenAI's `data.train_loss`, introspect's `data.loss`.
fn metrics(event: &serde_json::Value) -> Option<(Option<u64>, Option<f64>)> {
    let d = event.get("data")?;
    let loss = d
        .get("train_loss")
        .or_else(|| d.get("loss"))
        .and_then(|l| l.as_f64())?;
    Some((d.get("step").and_then(|s| s.as_u64()), Some(loss)))
}
