//! What every experiment is made of, whatever its paper: a run directory whose manifest pins the config
//! that made it (a changed config is refused on resume), resumable stages (each writes its outputs,
//! then a marker under `stages/`; a restart skips marked stages), and the model operations stages share
//! (open a model as a backend, finetune it locally or as a hosted job, hash its weights).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{ModelRef, Trained, GIT_COMMIT};
use crate::backend::hosted::{HostedFinetune, HostedHyperparameters};
use crate::backend::{Backend, LocalBackend, OpenAiBackend};
use crate::fsutil::write_atomic;
use crate::model::LoadedModel;
use crate::train::trainer::{Finetune, FinetuneConfig};

/// Everything stored under the run directory's `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest<C> {
    pub config: C,
    pub introspect_version: String,
    /// The Candle release the engine was built with (from Cargo.lock).
    #[serde(default)]
    pub candle_version: String,
    pub git_commit: String,
    pub started: String,
    /// Every seed the run uses (also inside `config`), gathered for the reader.
    #[serde(default)]
    pub seeds: BTreeMap<String, u64>,
    /// sha256 of the weights (and adapters) each model is made of.
    pub hashes: BTreeMap<String, String>,
    /// Seconds each finished stage took.
    pub stages: BTreeMap<String, f64>,
    /// Where the run ran: one entry when it started, one more for each resume on another machine or
    /// device (CPU kinds round and sum differently, so their figures may differ in the last digits).
    #[serde(default)]
    pub machines: Vec<Machine>,
}

/// A machine as the run's numbers depend on it: the CPU, the SIMD features the kernels found, the threads,
/// the kernel paths they chose and the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub features: Vec<String>,
    pub threads: usize,
    pub kernels: String,
    pub device: String,
}

impl Machine {
    pub fn this(device: &Device) -> Self {
        Machine {
            cpu: crate::bench::cpu_model(),
            features: introspect_kernels::cpu_features()
                .into_iter()
                .map(String::from)
                .collect(),
            threads: rayon::current_num_threads(),
            kernels: if device.is_cpu() {
                introspect_kernels::kernel_paths()
            } else {
                "the device-generic path (Candle's ops)".into()
            },
            device: format!("{device:?}"),
        }
    }
}

/// What `stages/NAME.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct StageMarker<T> {
    stage: String,
    seconds: f64,
    output: T,
}

/// A run directory made by a config of type `C`.
pub struct RunDir<C> {
    pub dir: PathBuf,
    config: PhantomData<C>,
}

fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("unix {secs}")
}

/// Every path at which two JSON values differ, as `a.b[2]: X → Y` (arrays of unequal length as one).
pub fn differences(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                differences(&format!("{at}.{k}"), va, vb, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                differences(&format!("{at}[{i}]"), va, vb, out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{}: {a} → {b}", at.trim_start_matches('.'))),
    }
}

fn first_difference(at: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    let mut out = vec![];
    differences(at, a, b, &mut out);
    out.into_iter().next()
}

/// The manifest of the run in `dir`.
pub fn read_manifest<C: DeserializeOwned>(dir: &Path) -> Result<Manifest<C>> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} has no manifest.json: not a run directory (run `introspect experiment run` first)",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a run manifest", path.display()))
}

impl<C: Serialize + DeserializeOwned + PartialEq + Clone> RunDir<C> {
    /// Creates the run directory, or checks that an existing one was made by the same config.
    pub fn prepare(
        config: &C,
        seeds: BTreeMap<String, u64>,
        dir: &Path,
        resume: bool,
    ) -> Result<Self> {
        let manifest_path = dir.join("manifest.json");
        if manifest_path.exists() {
            if !resume {
                bail!(
                    "{} already holds a run; pass --resume to continue it, or choose another --out",
                    dir.display()
                );
            }
            let old: Manifest<serde_json::Value> = read_manifest(dir)?;
            let new = serde_json::to_value(config)?;
            // Read through the config type first, so a key added since (with its default) is no change.
            let old_config = serde_json::from_value::<C>(old.config.clone())
                .ok()
                .and_then(|c| serde_json::to_value(c).ok())
                .unwrap_or(old.config);
            if old_config != new {
                bail!(
                    "{}: the run was started with another config ({}); resume with the same config or choose another --out",
                    dir.display(),
                    first_difference("", &old_config, &new).unwrap_or_default()
                );
            }
        } else {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let manifest = Manifest {
                config: config.clone(),
                introspect_version: env!("CARGO_PKG_VERSION").into(),
                candle_version: env!("INTROSPECT_CANDLE_VERSION").into(),
                git_commit: GIT_COMMIT.into(),
                started: now_utc(),
                seeds,
                hashes: BTreeMap::new(),
                stages: BTreeMap::new(),
                machines: vec![],
            };
            write_atomic(
                &manifest_path,
                serde_json::to_string_pretty(&manifest)?.as_bytes(),
            )?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config: PhantomData,
        })
    }

    pub fn manifest(&self) -> Result<Manifest<C>> {
        read_manifest(&self.dir)
    }

    /// Records that the run (re)starts on this machine and device, unless it last ran on the same.
    pub fn record_machine(&self, device: &Device) -> Result<()> {
        let here = Machine::this(device);
        self.update_manifest(|m| {
            if m.machines.last() != Some(&here) {
                m.machines.push(here);
            }
        })
    }

    pub fn update_manifest(&self, f: impl FnOnce(&mut Manifest<C>)) -> Result<()> {
        let mut m = self.manifest()?;
        f(&mut m);
        write_atomic(
            &self.dir.join("manifest.json"),
            serde_json::to_string_pretty(&m)?.as_bytes(),
        )
    }

    /// Runs `f` unless its marker exists; records its output and time.
    pub fn stage<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let marker = self.dir.join("stages").join(format!("{name}.json"));
        if let Ok(text) = std::fs::read_to_string(&marker) {
            let m: StageMarker<T> = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a stage marker", marker.display()))?;
            eprintln!("· {name}: done earlier ({:.0} s)", m.seconds);
            return Ok(m.output);
        }
        eprintln!("▸ {name}");
        let started = Instant::now();
        let output = f().with_context(|| format!("stage {name}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let m = StageMarker {
            stage: name.into(),
            seconds,
            output,
        };
        write_atomic(&marker, serde_json::to_string_pretty(&m)?.as_bytes())?;
        self.update_manifest(|man| {
            man.stages.insert(name.into(), seconds);
        })?;
        eprintln!("  {name}: {seconds:.0} s");
        Ok(m.output)
    }
}

/// sha256 of a file, or of a directory's weight and config files in name order.
pub fn hash_path(path: &Path) -> Result<String> {
    if path.is_file() {
        return crate::registry::sha256_file(path);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "safetensors" || e == "json")
        })
        .collect();
    files.sort();
    let parts = files
        .iter()
        .map(|f| crate::registry::sha256_file(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::registry::sha256_bytes(parts.join("").as_bytes()))
}

/// What a model's weights are, for the manifest: their hash, or the server's name for a served one.
pub fn model_hash(m: &ModelRef) -> Result<String> {
    Ok(match &m.remote {
        // Nothing to hash: the server's name is all there is (and it can change under it).
        Some(r) => format!("served: {} at {}", r.model, r.server.base_url),
        None => hash_path(&m.path)?,
    })
}

/// `m` as a backend: a server's, or the local engine with `m`'s adapter loaded under its label.
pub fn open(m: &ModelRef, device: &Device, batch_size: usize) -> Result<Box<dyn Backend>> {
    if let Some(r) = &m.remote {
        return Ok(Box::new(OpenAiBackend::new(r.server.clone(), &r.model)?));
    }
    let loaded = LoadedModel::load(&m.path, m.spec(), device)
        .with_context(|| format!("loading {} ({})", m.label, m.path.display()))?;
    let mut backend = LocalBackend::new(loaded, m.spec())?;
    backend.batch_size = batch_size.max(1);
    if let Some(dir) = &m.adapter {
        backend.add_adapter(&m.label, dir)?;
    }
    Ok(Box::new(backend))
}

/// Finetunes `base` on `train` into `out`: a LoRA adapter trained here (resuming from its last
/// checkpoint), or, for a served model, a hosted job with the recipe's epochs, batch size and seed.
pub fn finetune(
    base: &ModelRef,
    train: &Path,
    cfg: &FinetuneConfig,
    out: &Path,
    device: &Device,
    progress: bool,
) -> Result<Trained> {
    if let Some(r) = &base.remote {
        return Ok(Trained::Hosted(Box::new(
            HostedFinetune {
                config: r.server.clone(),
                model: r.model.clone(),
                train: train.to_path_buf(),
                val: None,
                out: out.to_path_buf(),
                hyperparameters: HostedHyperparameters {
                    n_epochs: Some(cfg.epochs),
                    batch_size: Some(cfg.batch_size),
                    learning_rate_multiplier: None,
                },
                seed: cfg.seed,
                suffix: None,
                poll: std::time::Duration::from_secs_f64(r.server.poll_s),
                progress,
            }
            .run()?,
        )));
    }
    let model = LoadedModel::load(&base.path, base.spec(), device)
        .with_context(|| format!("loading {} ({})", base.label, base.path.display()))?;
    Finetune {
        model: &model,
        base_model: base.path.display().to_string(),
        config: cfg.clone(),
        train: train.to_path_buf(),
        val: None,
        out: out.to_path_buf(),
        resume: true,
        progress,
    }
    .run()
    .map(Trained::Local)
}

/// The output a finished stage recorded (None: it has not run).
pub fn stage_output<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>> {
    let marker = dir.join("stages").join(format!("{name}.json"));
    let Ok(text) = std::fs::read_to_string(&marker) else {
        return Ok(None);
    };
    let m: StageMarker<T> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a stage marker", marker.display()))?;
    Ok(Some(m.output))
}
