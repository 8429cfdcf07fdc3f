//! OpenAI's files and fine-tuning endpoints on `introspect serve --state-dir DIR`: a client that trains
//! through a hosted API (the openai SDK, the paper authors' code, `introspect finetune --backend openai`)
//! trains a LoRA adapter here instead, which is then served under the job's `fine_tuned_model` name.
//!
//! Jobs run one at a time on the engine thread (serving waits while one trains), with the server's recipe
//! (`--finetune-config`) and the job's `n_epochs`, `batch_size`, `learning_rate_multiplier` (× the recipe's
//! lr) and `seed`. Everything lives under DIR (uploads in `files/`, each job in `jobs/ID/` with its
//! trainer's checkpoints), written atomically: a restarted server serves the finished jobs' models and
//! resumes the unfinished ones from their last checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{check_key, now, parse_body, read_body, ApiError, AppState};
use crate::backend::LocalBackend;
use crate::fsutil::write_atomic;
use crate::train::trainer::{Finetune, FinetuneConfig};

/// `serve`'s fine-tuning settings.
#[derive(Debug, Clone)]
pub struct FineTuningConfig {
    pub dir: PathBuf,
    /// The recipe each job starts from.
    pub recipe: FinetuneConfig,
}

/// An uploaded file, as OpenAI describes one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: usize,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

/// A fine-tuning job, as OpenAI describes one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobObject {
    pub id: String,
    pub object: String,
    pub model: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub fine_tuned_model: Option<String>,
    pub organization_id: String,
    pub result_files: Vec<String>,
    /// validating_files → queued → running → succeeded | failed | cancelled.
    pub status: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub hyperparameters: Hyperparameters,
    pub method: serde_json::Value,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobError>,
    pub seed: u64,
    pub suffix: Option<String>,
    pub estimated_finish: Option<u64>,
}

impl JobObject {
    fn finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// The files and jobs, in memory and under the state directory.
pub struct Store {
    config: FineTuningConfig,
    files: Mutex<BTreeMap<String, FileObject>>,
    jobs: Mutex<BTreeMap<String, JobObject>>,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::rng().random::<u128>() >> 32)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a valid record", path.display()))
}

impl Store {
    /// Opens (or starts) the state directory.
    pub fn open(config: FineTuningConfig) -> Result<Self> {
        let (mut files, mut jobs) = (BTreeMap::new(), BTreeMap::new());
        for sub in ["files", "jobs"] {
            let d = config.dir.join(sub);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
        }
        for e in std::fs::read_dir(config.dir.join("files"))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let f: FileObject = read_json(&p)?;
                files.insert(f.id.clone(), f);
            }
        }
        for e in std::fs::read_dir(config.dir.join("jobs"))? {
            let p = e?.path().join("job.json");
            if p.exists() {
                let j: JobObject = read_json(&p)?;
                jobs.insert(j.id.clone(), j);
            }
        }
        Ok(Self {
            config,
            files: Mutex::new(files),
            jobs: Mutex::new(jobs),
        })
    }

    fn file_path(&self, id: &str) -> PathBuf {
        self.config.dir.join("files").join(format!("{id}.jsonl"))
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.config.dir.join("jobs").join(id)
    }

    fn save_job(&self, job: &JobObject) -> Result<()> {
        write_atomic(
            &self.job_dir(&job.id).join("job.json"),
            serde_json::to_string_pretty(job)?.as_bytes(),
        )
    }

    /// Changes a job, in memory and on disk; returns it as changed.
    fn update(&self, id: &str, f: impl FnOnce(&mut JobObject)) -> Result<JobObject> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        let job = jobs.get_mut(id).context("no such job")?;
        f(job);
        self.save_job(job)?;
        Ok(job.clone())
    }

    /// A job as it stands, or 404.
    fn job(&self, id: &str) -> Result<JobObject, ApiError> {
        let jobs = self.jobs.lock().expect("jobs lock");
        jobs.get(id)
            .cloned()
            .ok_or_else(|| not_found("fine-tuning job", id))
    }

    /// Finished jobs' models (name, adapter directory), to serve; unfinished jobs' ids, to resume.
    pub fn startup(&self) -> (Vec<(String, PathBuf)>, Vec<String>) {
        let jobs = self.jobs.lock().expect("jobs lock");
        let mut models = vec![];
        let mut pending = vec![];
        for j in jobs.values() {
            match (&j.status[..], &j.fine_tuned_model) {
                ("succeeded", Some(name)) => {
                    models.push((name.clone(), self.job_dir(&j.id).join("run")))
                }
                _ if !j.finished() => pending.push(j.id.clone()),
                _ => {}
            }
        }
        (models, pending)
    }
}

fn not_enabled() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "fine-tuning is off on this server; start `introspect serve` with --state-dir DIR to accept files and fine-tuning jobs".into(),
        kind: "invalid_request_error",
        param: None,
        code: None,
    }
}

fn store(state: &AppState) -> Result<&Arc<Store>, ApiError> {
    state.fine_tuning.as_ref().ok_or_else(not_enabled)
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no {what} with id `{id}`"),
        kind: "invalid_request_error",
        param: None,
        code: None,
    }
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::internal(format!("{e:#}"))
}

fn answer<T: Serialize>(r: Result<T, ApiError>) -> Response {
    r.map(Json).into_response()
}

/// Every non-blank line must be a chat conversation the trainer reads; the first that is not is named.
fn check_training_file(name: &str, bytes: &[u8]) -> Result<(), ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::bad_request(format!("{name} is not UTF-8 text: {e}"), Some("file"))
    })?;
    let mut rows = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        crate::train::data::parse_chat_line(line, &format!("{name} line {}", i + 1))
            .map_err(|e| ApiError::bad_request(format!("{e:#}"), Some("file")))?;
        rows += 1;
    }
    if rows == 0 {
        return Err(ApiError::bad_request(
            format!("{name} holds no conversations"),
            Some("file"),
        ));
    }
    Ok(())
}

/// POST /v1/files: multipart with `purpose` (fine-tune) and `file` (chat JSONL).
pub(super) async fn upload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    answer(upload_inner(&state, &headers, form).await)
}

async fn upload_inner(
    state: &AppState,
    headers: &HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<FileObject, ApiError> {
    check_key(state, headers)?;
    let store = store(state)?;
    let mut form = form.map_err(|e| {
        ApiError::bad_request(format!("expected a multipart/form-data body: {e}"), None)
    })?;
    let (mut purpose, mut file) = (None, None);
    let form_error = |e: axum::extract::multipart::MultipartError| {
        let status = e.status();
        ApiError {
            status,
            message: format!("cannot read the form: {}", e.body_text()),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    };
    while let Some(field) = form.next_field().await.map_err(form_error)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(form_error)?),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                file = Some((name, field.bytes().await.map_err(form_error)?));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::bad_request("the form has no `purpose` field".into(), Some("purpose"))
    })?;
    if purpose != "fine-tune" {
        return Err(ApiError::bad_request(
            format!("purpose `{purpose}` is not accepted here; only `fine-tune`"),
            Some("purpose"),
        ));
    }
    let (filename, bytes) = file.ok_or_else(|| {
        ApiError::bad_request("the form has no `file` field".into(), Some("file"))
    })?;
    check_training_file(&filename, &bytes)?;
    let f = FileObject {
        id: new_id("file"),
        object: "file".into(),
        bytes: bytes.len(),
        created_at: now(),
        filename,
        purpose,
        status: "processed".into(),
    };
    write_atomic(&store.file_path(&f.id), &bytes).map_err(internal)?;
    let meta = store.file_path(&f.id).with_extension("json");
    write_atomic(&meta, serde_json::to_string_pretty(&f).unwrap().as_bytes()).map_err(internal)?;
    store
        .files
        .lock()
        .expect("files lock")
        .insert(f.id.clone(), f.clone());
    Ok(f)
}

/// GET /v1/files/{id}.
pub(super) async fn file(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    answer((|| {
        check_key(&state, &headers)?;
        let files = store(&state)?.files.lock().expect("files lock");
        files
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found("file", &id))
    })())
}

/// A hyperparameter: a number, or "auto" (the recipe's value).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum Auto<T> {
    Value(T),
    #[allow(dead_code)]
    Auto(AutoWord),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AutoWord {
    Auto,
}

impl<T: Copy> Auto<T> {
    fn or(v: Option<Auto<T>>, default: T) -> T {
        match v {
            Some(Auto::Value(x)) => x,
            _ => default,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HyperIn {
    n_epochs: Option<Auto<usize>>,
    batch_size: Option<Auto<usize>>,
    learning_rate_multiplier: Option<Auto<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SupervisedIn {
    #[serde(default)]
    hyperparameters: HyperIn,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MethodIn {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    supervised: Option<SupervisedIn>,
}

/// POST /v1/fine_tuning/jobs's body. `hyperparameters` at the top is OpenAI's older place for them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob {
    model: String,
    training_file: String,
    #[serde(default)]
    validation_file: Option<String>,
    #[serde(default)]
    hyperparameters: Option<HyperIn>,
    #[serde(default)]
    method: Option<MethodIn>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    /// Weights & Biases and the like: accepted, nothing is sent anywhere.
    #[serde(default)]
    integrations: Option<serde_json::Value>,
}

/// The recipe a job trains with: the server's, with the job's hyperparameters.
fn job_recipe(base: &FinetuneConfig, job: &JobObject) -> FinetuneConfig {
    let h = &job.hyperparameters;
    FinetuneConfig {
        epochs: h.n_epochs,
        batch_size: h.batch_size,
        micro_batch_size: base.micro_batch_size.min(h.batch_size),
        lr: base.lr * h.learning_rate_multiplier,
        seed: job.seed,
        ..base.clone()
    }
}

/// POST /v1/fine_tuning/jobs.
pub(super) async fn create_job(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let r = async {
        let bytes = read_body(body, state.max_body_bytes).await?;
        check_key(&state, &headers)?;
        let store = store(&state)?.clone();
        let c: CreateJob = parse_body(&bytes)?;
        if c.model != state.base {
            return Err(ApiError::bad_request(
                format!(
                    "jobs here train the base model `{}`; `{}` cannot be fine-tuned (training on top of an adapter is not supported)",
                    state.base, c.model
                ),
                Some("model"),
            ));
        }
        for (file, param) in [
            (Some(&c.training_file), "training_file"),
            (c.validation_file.as_ref(), "validation_file"),
        ] {
            if let Some(id) = file {
                if !store.files.lock().expect("files lock").contains_key(id) {
                    return Err(ApiError::bad_request(
                        format!("no uploaded file with id `{id}`"),
                        Some(param),
                    ));
                }
            }
        }
        let hyper = match (c.method, c.hyperparameters) {
            (Some(m), _) if m.kind != "supervised" => {
                return Err(ApiError::bad_request(
                    format!(
                        "method `{}` is not supported here; only `supervised`",
                        m.kind
                    ),
                    Some("method"),
                ))
            }
            (
                Some(MethodIn {
                    supervised: Some(s),
                    ..
                }),
                _,
            ) => s.hyperparameters,
            (_, Some(h)) => h,
            _ => HyperIn::default(),
        };
        let recipe = &store.config.recipe;
        let h = Hyperparameters {
            n_epochs: Auto::or(hyper.n_epochs, recipe.epochs),
            batch_size: Auto::or(hyper.batch_size, recipe.batch_size),
            learning_rate_multiplier: Auto::or(hyper.learning_rate_multiplier, 1.0),
        };
        if h.n_epochs == 0
            || h.batch_size == 0
            || h.learning_rate_multiplier.is_nan()
            || h.learning_rate_multiplier <= 0.0
        {
            return Err(ApiError::bad_request(
                "n_epochs and batch_size must be at least 1 and learning_rate_multiplier above 0"
                    .into(),
                Some("hyperparameters"),
            ));
        }
        let _ = (c.metadata, c.integrations);
        let job = JobObject {
            id: new_id("ftjob"),
            object: "fine_tuning.job".into(),
            model: c.model,
            created_at: now(),
            finished_at: None,
            fine_tuned_model: None,
            organization_id: "introspect".into(),
            result_files: vec![],
            status: "queued".into(),
            training_file: c.training_file,
            validation_file: c.validation_file,
            method: serde_json::json!({"type": "supervised", "supervised": {"hyperparameters": &h}}),
            hyperparameters: h,
            trained_tokens: None,
            error: None,
            seed: c.seed.unwrap_or(recipe.seed),
            suffix: c.suffix,
            estimated_finish: None,
        };
        store.save_job(&job).map_err(internal)?;
        store
            .jobs
            .lock()
            .expect("jobs lock")
            .insert(job.id.clone(), job.clone());
        if !state
            .engine
            .submit_task(train_task(state.clone(), job.id.clone()))
        {
            store.jobs.lock().expect("jobs lock").remove(&job.id);
            let _ = std::fs::remove_dir_all(store.job_dir(&job.id));
            return Err(ApiError::queue_full());
        }
        Ok(job)
    };
    answer(r.await)
}

/// The engine-thread work of one job: train, then serve the adapter under the job's model name.
pub(super) fn train_task(state: Arc<AppState>, id: String) -> super::engine::Task {
    Box::new(move |backend: &mut LocalBackend| {
        let Some(store) = state.fine_tuning.clone() else {
            return;
        };
        let Ok(job) = store.update(&id, |j| {
            if !j.finished() {
                j.status = "running".into();
            }
        }) else {
            return;
        };
        if job.finished() {
            return; // cancelled while queued
        }
        let result = run_job(&store, &state.base, backend, &job);
        let _ = store.update(&id, |j| {
            j.finished_at = Some(now());
            match result {
                Ok((name, tokens)) => {
                    j.status = "succeeded".into();
                    j.fine_tuned_model = Some(name.clone());
                    j.trained_tokens = Some(tokens);
                    state.adapters.write().expect("adapters lock").push(name);
                }
                Err(e) => {
                    tracing::error!("fine-tuning job {id}: {e:#}");
                    j.status = "failed".into();
                    j.error = Some(JobError {
                        code: "training_failed".into(),
                        message: format!("{e:#}"),
                        param: None,
                    });
                }
            }
        });
    })
}

/// Trains the job's adapter and loads it; its model name and the tokens trained on.
fn run_job(
    store: &Store,
    base: &str,
    backend: &mut LocalBackend,
    job: &JobObject,
) -> Result<(String, u64)> {
    let dir = store.job_dir(&job.id);
    let summary = Finetune {
        model: &backend.model,
        base_model: base.to_string(),
        config: job_recipe(&store.config.recipe, job),
        train: store.file_path(&job.training_file),
        val: job.validation_file.as_deref().map(|f| store.file_path(f)),
        out: dir.join("run"),
        resume: true,
        progress: false,
    }
    .run()?;
    let name = format!(
        "ft:{base}:{}:{}",
        job.suffix.as_deref().unwrap_or("introspect"),
        job.id.trim_start_matches("ftjob-")
    );
    backend.add_adapter(&name, &summary.adapter_dir)?;
    Ok((name, summary.tokens as u64))
}

/// GET /v1/fine_tuning/jobs/{id}.
pub(super) async fn job(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    answer((|| {
        check_key(&state, &headers)?;
        store(&state)?.job(&id)
    })())
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
}

/// GET /v1/fine_tuning/jobs: newest first.
pub(super) async fn jobs(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    answer((|| {
        check_key(&state, &headers)?;
        let jobs = store(&state)?.jobs.lock().expect("jobs lock");
        let mut data: Vec<&JobObject> = jobs.values().collect();
        data.sort_by_key(|j| std::cmp::Reverse(j.created_at));
        data.truncate(q.limit.unwrap_or(20));
        Ok(serde_json::json!({"object": "list", "data": data, "has_more": false}))
    })())
}

/// POST /v1/fine_tuning/jobs/{id}/cancel: a queued job is cancelled; a running one trains on (the
/// trainer has no point to stop at short of a step), which is said.
pub(super) async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    answer((|| {
        check_key(&state, &headers)?;
        let store = store(&state)?;
        match store.job(&id)?.status.as_str() {
            "queued" | "validating_files" => store
                .update(&id, |j| {
                    j.status = "cancelled".into();
                    j.finished_at = Some(now());
                })
                .map_err(internal),
            s => Err(ApiError::bad_request(
                format!("job `{id}` is {s}; only a queued job can be cancelled here"),
                None,
            )),
        }
    })())
}

/// GET /v1/fine_tuning/jobs/{id}/events: the trainer's steps (loss, lr) and the job's status, newest
/// first.
pub(super) async fn events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    answer((|| {
        check_key(&state, &headers)?;
        let store = store(&state)?;
        let job = store.job(&id)?;
        let mut data = vec![];
        let metrics = store.job_dir(&id).join("run/metrics.jsonl");
        for (k, line) in std::fs::read_to_string(metrics)
            .unwrap_or_default()
            .lines()
            .enumerate()
        {
            let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a line being written
            };
            let loss = m.get("loss").and_then(|l| l.as_f64());
            let val = m.get("val_loss").and_then(|l| l.as_f64());
            let message = match (loss, val) {
                (Some(l), _) => format!("Step {}: training loss={l:.4}", m["step"]),
                (None, Some(v)) => format!("Step {}: validation loss={v:.4}", m["step"]),
                _ => continue,
            };
            data.push(serde_json::json!({
                "object": "fine_tuning.job.event", "id": format!("ftevent-{id}-{k}"),
                "created_at": job.created_at, "level": "info", "message": message,
                "data": m, "type": "metrics",
            }));
        }
        data.push(serde_json::json!({
            "object": "fine_tuning.job.event", "id": format!("ftevent-{id}-status"),
            "created_at": job.finished_at.unwrap_or(job.created_at), "level": "info",
            "message": format!("Job {}", job.status), "data": {}, "type": "message",
        }));
        data.reverse();
        data.truncate(q.limit.unwrap_or(20));
        Ok(serde_json::json!({"object": "list", "data": data, "has_more": false}))
    })())
}
