//! Experiments end to end (spec §6): self- vs cross-prediction and the behaviour shift, from one TOML
//! into one run directory. Each stage writes its outputs, then a marker under `stages/`; a restart skips
//! marked stages and resumes the one that was cut (object/hypothetical logs and finetuning checkpoints
//! resume on their own). The report is computed from the stored outputs only.

pub mod analysis;
pub mod compare;
pub mod config;
pub mod figures;
pub mod report;
pub mod stages;

use stages::RunDir;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::hosted::HostedRecord;
use crate::backend::{Backend, OpenAiConfig};
use crate::fsutil::write_atomic;
use crate::lora::peft;
use crate::model::{LoadSpec, Message, QuantType, WeightMode};
use crate::runs::calibrate::{self, Calibration, CalibrationResult, CalibrationSettings};
use crate::runs::training::{self, ChatExample, TrainingSetConfig};
use crate::runs::{self, extract, Record, Run, RunKind, RunSettings, RunSummary};
use crate::tasks::build::{read_strings, write_task_files, SourceString};
use crate::tasks::generate::Generator as StringGenerator;
use crate::tasks::task::Source;
use crate::tasks::{complies, Property, Task};
use crate::train::trainer::{FinetuneConfig, Summary as TrainSummary};
pub use config::ExperimentConfig;

/// The git commit this binary was built from (see build.rs).
pub const GIT_COMMIT: &str = env!("INTROSPECT_GIT_COMMIT");

/// A model as the stages use it: weights, and the adapter on top if any; or a model behind a server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRef {
    pub label: String,
    pub path: PathBuf,
    pub weights: WeightMode,
    #[serde(default)]
    pub quantize: QuantType,
    pub adapter: Option<PathBuf>,
    /// Served elsewhere (path, weights and adapter unused): finetuning it makes a new model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteModel>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteModel {
    pub server: OpenAiConfig,
    /// The server's name for the model.
    pub model: String,
}

/// What a finetuning stage made: a local adapter (the trainer's summary) or a hosted job's model.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Trained {
    Local(TrainSummary),
    Hosted(Box<HostedRecord>),
}

impl ModelRef {
    /// The model `trained` made from this one, named `label`; a local adapter lies in `dir`.
    pub fn trained(&self, label: &str, dir: PathBuf, trained: &Trained) -> Result<Self> {
        match (trained, &self.remote) {
            (Trained::Hosted(r), Some(remote)) => Ok(Self {
                label: label.into(),
                remote: Some(RemoteModel {
                    server: remote.server.clone(),
                    model: r
                        .fine_tuned_model
                        .clone()
                        .context("the hosted job named no model")?,
                }),
                ..self.clone()
            }),
            (Trained::Local(_), None) => Ok(self.with_adapter(label, dir)),
            _ => bail!("{label}: the finetuning stage's record is of the other backend; start a new run directory"),
        }
    }

    pub fn spec(&self) -> LoadSpec {
        LoadSpec {
            mode: self.weights,
            quantize: self.quantize,
        }
    }

    fn with_adapter(&self, label: &str, dir: PathBuf) -> Self {
        Self {
            label: label.into(),
            path: self.path.clone(),
            weights: self.weights,
            quantize: self.quantize,
            adapter: Some(dir),
            remote: None,
        }
    }
}

/// The DataRow files of each (split, task).
type DataFiles = BTreeMap<String, BTreeMap<String, Vec<PathBuf>>>;

pub struct Experiment {
    pub config: ExperimentConfig,
    pub dir: PathBuf,
    run: RunDir<ExperimentConfig>,
    pub device: Device,
    pub progress: bool,
}

/// Everything stored under the run directory's `manifest.json`.
pub type Manifest = stages::Manifest<ExperimentConfig>;

impl Experiment {
    /// Creates the run directory, or checks that an existing one was made by the same config.
    pub fn prepare(config: ExperimentConfig, dir: &Path, resume: bool) -> Result<Self> {
        let run = RunDir::prepare(&config, config.seeds(), dir, resume)?;
        Ok(Self {
            config,
            dir: dir.to_path_buf(),
            run,
            device: Device::Cpu,
            progress: true,
        })
    }

    fn update_manifest(&self, f: impl FnOnce(&mut Manifest)) -> Result<()> {
        self.run.update_manifest(f)
    }

    /// Runs `f` unless its marker exists; records its output and time.
    fn stage<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.run.stage(name, f)
    }

    fn open(&self, m: &ModelRef) -> Result<Box<dyn Backend>> {
        stages::open(m, &self.device, self.config.generation.batch_size)
    }

    /// An object-level or hypothetical run of `model` over the rows of `files`, into `dir`.
    #[allow(clippy::too_many_arguments)]
    fn run_prompts(
        &self,
        model: &ModelRef,
        kind: RunKind,
        files: &[PathBuf],
        dir: &str,
        temperature: f32,
        seed: u64,
    ) -> Result<RunSummary> {
        let backend = self.open(model)?;
        let adapter = adapter_name(model);
        let g = &self.config.generation;
        let settings = RunSettings {
            kind,
            model: model.label.clone(),
            fingerprint: backend.fingerprint(adapter.as_deref())?,
            adapter,
            n: 1,
            temperature,
            max_tokens: match kind {
                RunKind::Object => g.object_max_tokens,
                RunKind::Hypothetical => g.hypothetical_max_tokens,
            },
            seed,
            system: Some(String::new()),
        };
        let items = runs::items_from_files(kind, files, None)?;
        let summary = Run {
            backend: backend.as_ref(),
            settings,
            dir: self.dir.join(dir),
            chunk: g.batch_size.max(1),
            progress: self.progress,
        }
        .run(&items)?;
        drop(backend);
        if kind == RunKind::Object {
            self.extract(dir)?;
        }
        Ok(summary)
    }

    /// The LLM-extracted properties of an object-level run (spec §2.2), read by the extractor (default:
    /// M1's base model) into `DIR/extracted/`; nothing when no task asks about one.
    fn extract(&self, dir: &str) -> Result<()> {
        let records = self.records(dir, RunKind::Object)?;
        if extract::extracted_properties(&records)?.is_empty() {
            return Ok(());
        }
        let spec = self.config.extractor.as_ref().unwrap_or(&self.config.m1);
        let model = self.resolve(spec, "extractor")?;
        let backend = self.open(&model)?;
        let settings = RunSettings {
            kind: RunKind::Hypothetical,
            model: model.label.clone(),
            fingerprint: backend.fingerprint(None)?,
            adapter: None,
            n: 1,
            temperature: 0.0,
            max_tokens: self.config.generation.hypothetical_max_tokens,
            seed: 0,
            system: None,
        };
        extract::extract(
            &self.dir.join(dir),
            backend.as_ref(),
            settings,
            self.config.generation.batch_size.max(1),
            self.progress,
        )?;
        Ok(())
    }

    fn records(&self, dir: &str, kind: RunKind) -> Result<Vec<Record>> {
        Ok(runs::read_run(&self.dir.join(dir), kind)?.1)
    }

    fn finetune(
        &self,
        base: &ModelRef,
        train: &Path,
        cfg: &FinetuneConfig,
        out: &str,
    ) -> Result<Trained> {
        stages::finetune(
            base,
            train,
            cfg,
            &self.dir.join(out),
            &self.device,
            self.progress,
        )
    }

    /// Folds `model`'s adapter into its weights as an HF directory (a new base to train on).
    fn merge(&self, model: &ModelRef, out: &str) -> Result<ModelRef> {
        if model.remote.is_some() {
            return Ok(model.clone()); // a hosted fine-tuned model is a whole model under its name
        }
        let dir = self.dir.join(out);
        match &model.adapter {
            Some(a) => crate::model::export::merge_adapter(&model.path, a, &dir)?,
            None => crate::model::export::export_hf(&model.path, None, &dir)?,
        }
        Ok(ModelRef {
            label: model.label.clone(),
            path: dir,
            // The merged directory is f32 on disk; it loads in the configured mode, tensor by tensor.
            weights: model.weights,
            quantize: model.quantize,
            adapter: None,
            remote: None,
        })
    }

    fn write_examples(&self, path: &str, examples: &[ChatExample]) -> Result<PathBuf> {
        if examples.is_empty() {
            bail!("no training examples for {path}: every answer was non-compliant or undefined");
        }
        let p = self.dir.join(path);
        write_atomic(&p, training::to_jsonl(examples).as_bytes())?;
        Ok(p)
    }

    /// Self-/cross-prediction examples from an object-level run.
    fn prediction_set(&self, object_dir: &str, out: &str) -> Result<usize> {
        let cfg = TrainingSetConfig {
            per_pair: self.config.data.per_pair,
            seed: self.config.data.seed,
            properties: self.config.properties()?,
            ..Default::default()
        };
        let (examples, _) = training::build(&self.records(object_dir, RunKind::Object)?, &cfg)?;
        self.write_examples(out, &examples)?;
        Ok(examples.len())
    }

    /// Object-level examples (prompt → the model's compliant answer), at most `limit` per task.
    fn behaviour_set(&self, object_dir: &str, out: &str, limit: usize) -> Result<usize> {
        let mut per_task: BTreeMap<String, usize> = BTreeMap::new();
        let mut examples = vec![];
        for r in self.records(object_dir, RunKind::Object)? {
            let task = Task::get(&r.task)?;
            let Some(answer) = r.response.as_deref() else {
                continue;
            };
            let n = per_task.entry(r.task.clone()).or_default();
            if *n >= limit || !complies(answer, task.object_groups) {
                continue;
            }
            *n += 1;
            examples.push(ChatExample {
                messages: vec![
                    Message::new("system", ""),
                    Message::new("user", &task.prompt(&r.string)),
                    Message::new("assistant", answer),
                ],
            });
        }
        self.write_examples(out, &examples)?;
        Ok(examples.len())
    }

    fn data(&self) -> Result<DataFiles> {
        let d = &self.config.data;
        let wanted = self.config.properties()?;
        let mut files: DataFiles = BTreeMap::new();
        for name in self.config.tasks() {
            let task = Task::get(name)?;
            let props: Vec<Property> = task
                .properties
                .iter()
                .copied()
                .filter(|p| wanted.as_ref().is_none_or(|w| w.contains(p)))
                .collect();
            if props.is_empty() {
                bail!(
                    "task {name} has none of data.properties (its own: {})",
                    task.properties
                        .iter()
                        .map(|p| p.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let (train, val): (Vec<SourceString>, Vec<SourceString>) = match task.source {
                Source::Generated(g) => {
                    let (t, v) = StringGenerator::get(g)?.generate(d.n_train, d.n_val, d.seed)?;
                    let wrap = |v: Vec<String>| {
                        v.into_iter()
                            .map(|string| SourceString {
                                string,
                                target: None,
                            })
                            .collect()
                    };
                    (wrap(t), wrap(v))
                }
                Source::External(_) => {
                    let s = &d.strings[name];
                    let mut t = read_strings(&s.train)?;
                    let mut v = read_strings(&s.val)?;
                    t.truncate(d.n_train);
                    v.truncate(d.n_val);
                    (t, v)
                }
            };
            for (split, strings) in [("train", train), ("val", val)] {
                let written =
                    write_task_files(&self.dir.join("data").join(split), task, &strings, &props)?;
                let rel = written
                    .into_iter()
                    .map(|p| {
                        p.strip_prefix(&self.dir)
                            .map(Path::to_path_buf)
                            .unwrap_or(p)
                    })
                    .collect();
                files
                    .entry(split.into())
                    .or_default()
                    .insert(name.into(), rel);
            }
        }
        Ok(files)
    }

    fn files(&self, data: &DataFiles, split: &str, tasks: &[String]) -> Vec<PathBuf> {
        tasks
            .iter()
            .flat_map(|t| data[split][t].iter().map(|p| self.dir.join(p)))
            .collect()
    }

    fn resolve(&self, spec: &config::ModelSpec, role: &str) -> Result<ModelRef> {
        if let config::BackendSpec::Openai(server) = &spec.backend {
            return Ok(ModelRef {
                label: spec.label(role),
                path: PathBuf::new(),
                weights: spec.weights,
                quantize: spec.quantize,
                adapter: None,
                remote: Some(RemoteModel {
                    server: server.clone(),
                    model: spec.model.clone(),
                }),
            });
        }
        Ok(ModelRef {
            label: spec.label(role),
            path: crate::registry::resolve(&spec.model)
                .with_context(|| format!("{role}.model = {:?}", spec.model))?,
            weights: spec.weights,
            quantize: spec.quantize,
            adapter: None,
            remote: None,
        })
    }

    /// Every stage in order; returns the report's metrics.
    pub fn run(&self) -> Result<report::Metrics> {
        let cfg = &self.config;
        let started = Instant::now();
        self.run.record_machine(&self.device)?;
        let m1_base = self.resolve(&cfg.m1, "M1")?;
        let m2_base = self.resolve(&cfg.m2, "M2")?;
        let data = self.stage("data", || self.data())?;
        let train_tasks = &cfg.data.train_tasks;
        let held_out = &cfg.data.held_out_tasks;
        let hashes = self.stage("hash_models", || {
            let mut h = BTreeMap::new();
            for (name, m) in [("M1 base", &m1_base), ("M2 base", &m2_base)] {
                h.insert(name.to_string(), stages::model_hash(m)?);
            }
            Ok(h)
        })?;
        self.update_manifest(|m| m.hashes.extend(hashes))?;

        let m1 = self.derived(&cfg.m1, &m1_base, &data, "m1")?;
        let m2 = self.derived(&cfg.m2, &m2_base, &data, "m2")?;

        // M1 and its self-prediction training (spec §5).
        let object_train = self.files(&data, "train", train_tasks);
        let val_held_out = self.files(&data, "val", held_out);
        self.stage("m1_object_train", || {
            self.run_prompts(
                &m1,
                RunKind::Object,
                &object_train,
                "m1/object-train",
                0.0,
                0,
            )
        })?;
        self.stage("m1ft_training_set", || {
            self.prediction_set("m1/object-train", "m1ft/train.jsonl")
        })?;
        let t = self.stage("m1ft_finetune", || {
            self.finetune(
                &m1,
                &self.dir.join("m1ft/train.jsonl"),
                &cfg.finetune,
                "m1ft/adapter",
            )
        })?;
        let m1ft = m1.trained(
            &format!("{}ft", m1.label),
            self.dir.join("m1ft/adapter"),
            &t,
        )?;
        self.stage("m1ft_object_train", || {
            self.run_prompts(
                &m1ft,
                RunKind::Object,
                &object_train,
                "m1ft/object-train",
                0.0,
                0,
            )
        })?;
        for (model, dir) in [(&m1, "m1/object-val"), (&m1ft, "m1ft/object-val")] {
            self.stage(&format!("{}_object_val", stage_name(dir)), || {
                self.run_prompts(model, RunKind::Object, &val_held_out, dir, 0.0, 0)
            })?;
        }

        // Cross-prediction (spec §5.4): M2 trained on M1ft's train-split behaviour.
        self.stage("m2ft_training_set", || {
            self.prediction_set("m1ft/object-train", "m2ft/train.jsonl")
        })?;
        let t = self.stage("m2ft_finetune", || {
            self.finetune(
                &m2,
                &self.dir.join("m2ft/train.jsonl"),
                &cfg.finetune,
                "m2ft/adapter",
            )
        })?;
        let m2ft = m2.trained(
            &format!("{}ft", m2.label),
            self.dir.join("m2ft/adapter"),
            &t,
        )?;

        // M2ft's own behaviour on the held-out tasks: the authors ask a predictor only about strings its
        // own object-level answer handled compliantly (spec §6.1); the notebook's rules apply that.
        self.stage("m2ft_object_val", || {
            self.run_prompts(
                &m2ft,
                RunKind::Object,
                &val_held_out,
                "m2ft/object-val",
                0.0,
                0,
            )
        })?;

        // Hypothetical questions on the held-out tasks, every predictor on every string (each rule set
        // then takes its rows from the stored answers).
        for (model, dir) in [
            (&m1ft, "m1ft/hyp-val"),
            (&m2ft, "m2ft/hyp-val"),
            (&m1, "m1/hyp-val"),
        ] {
            self.stage(&format!("{}_hypothetical_val", stage_name(dir)), || {
                self.run_prompts(model, RunKind::Hypothetical, &val_held_out, dir, 0.0, 0)
            })?;
        }

        // Behaviour shift (spec §6.5): M1ft taught M2's object-level answers on the held-out tasks'
        // train split, then asked about itself on their val split.
        if cfg.shift.enabled {
            let shift_train = self.files(&data, "train", held_out);
            self.stage("shift_m2_object", || {
                self.run_prompts(
                    &m2,
                    RunKind::Object,
                    &shift_train,
                    "shift/m2-object",
                    0.0,
                    0,
                )
            })?;
            self.stage("shift_training_set", || {
                self.behaviour_set("shift/m2-object", "shift/train.jsonl", cfg.shift.n_train)
            })?;
            let merged = self.stage("shift_merge_m1ft", || {
                self.merge(&m1ft, "shift/m1ft-merged")
            })?;
            let t = self.stage("shift_finetune", || {
                self.finetune(
                    &merged,
                    &self.dir.join("shift/train.jsonl"),
                    &cfg.shift.finetune,
                    "mc/adapter",
                )
            })?;
            let mc = merged.trained("Mc", self.dir.join("mc/adapter"), &t)?;
            self.stage("mc_object_val", || {
                self.run_prompts(&mc, RunKind::Object, &val_held_out, "mc/object-val", 0.0, 0)
            })?;
            self.stage("mc_hypothetical_val", || {
                self.run_prompts(
                    &mc,
                    RunKind::Hypothetical,
                    &val_held_out,
                    "mc/hyp-val",
                    0.0,
                    0,
                )
            })?;
        }

        // Calibration (spec §6.6): self, cross and untrained.
        if cfg.calibration.enabled {
            for (setup, object, hypothetical) in [
                ("self", &m1ft, &m1ft),
                ("cross", &m1ft, &m2ft),
                ("untrained", &m1, &m1),
            ] {
                self.stage(&format!("calibration_{setup}"), || {
                    self.calibrate(&data, setup, object, hypothetical)
                        .map(|r| r.mad)
                })?;
            }
        }

        let adapters = self.stage("hash_adapters", || {
            let mut h = BTreeMap::new();
            for (name, dir) in [
                ("M1 derive adapter", "m1/derive/adapter"),
                ("M1ft adapter", "m1ft/adapter"),
                ("M2 derive adapter", "m2/derive/adapter"),
                ("M2ft adapter", "m2ft/adapter"),
                ("Mc adapter", "mc/adapter"),
            ] {
                let p = self.dir.join(dir).join(peft::WEIGHTS_FILE);
                if p.exists() {
                    h.insert(name.to_string(), crate::registry::sha256_file(&p)?);
                }
            }
            Ok(h)
        })?;
        self.update_manifest(|m| m.hashes.extend(adapters))?;
        eprintln!(
            "all stages done in {:.0} s (this session)",
            started.elapsed().as_secs_f64()
        );
        report::write(&self.dir, None)
    }

    /// The model itself, or — with `derive` — the model finetuned on its own sampled answers to every
    /// task's train-split prompts, adapter merged (stages `{role}_derive_*`, files under `{role}/`).
    fn derived(
        &self,
        spec: &config::ModelSpec,
        base: &ModelRef,
        data: &DataFiles,
        role: &str,
    ) -> Result<ModelRef> {
        let Some(derive) = &spec.derive else {
            return Ok(base.clone());
        };
        let all_tasks: Vec<String> = self.config.tasks().map(String::from).collect();
        let every_train_split = self.files(data, "train", &all_tasks);
        let dir = |f: &str| format!("{role}/derive/{f}");
        self.stage(&format!("{role}_derive_object"), || {
            self.run_prompts(
                base,
                RunKind::Object,
                &every_train_split,
                &dir("object-sampled"),
                derive.temperature,
                derive.seed,
            )
        })?;
        self.stage(&format!("{role}_derive_training_set"), || {
            self.behaviour_set(&dir("object-sampled"), &dir("train.jsonl"), usize::MAX)
        })?;
        let t = self.stage(&format!("{role}_derive_finetune"), || {
            self.finetune(
                base,
                &self.dir.join(dir("train.jsonl")),
                &derive.finetune,
                &dir("adapter"),
            )
        })?;
        let with = base.trained(&base.label, self.dir.join(dir("adapter")), &t)?;
        self.stage(&format!("{role}_merge"), || {
            self.merge(&with, &format!("{role}/model"))
        })
    }

    fn calibrate(
        &self,
        data: &DataFiles,
        setup: &str,
        object: &ModelRef,
        hypothetical: &ModelRef,
    ) -> Result<CalibrationResult> {
        let c = &self.config.calibration;
        let property = Property::parse(&c.property).expect("checked with the config");
        let files = self.files(data, "val", std::slice::from_ref(&c.task));
        let items: Vec<_> =
            calibrate::items(runs::items_from_files(RunKind::Object, &files, None)?)
                .into_iter()
                .take(c.strings)
                .collect();
        let ob = self.open(object)?;
        let same = object.label == hypothetical.label;
        let hb = if same {
            None
        } else {
            Some(self.open(hypothetical)?)
        };
        let hb_ref = hb.as_ref().unwrap_or(&ob).as_ref();
        let name = adapter_name;
        let settings = CalibrationSettings {
            model: format!("{} / {}", object.label, hypothetical.label),
            fingerprint_object: ob.fingerprint(name(object).as_deref())?,
            fingerprint_hypothetical: hb_ref.fingerprint(name(hypothetical).as_deref())?,
            object_adapter: name(object),
            hypothetical_adapter: name(hypothetical),
            method: c.method,
            property,
            samples: c.samples,
            seed: c.seed,
            max_tokens: 3,
        };
        Calibration {
            object_backend: ob.as_ref(),
            hypothetical_backend: hb_ref,
            settings,
            dir: self.dir.join("calibration").join(setup),
            chunk: self.config.generation.batch_size.max(1),
            progress: self.progress,
        }
        .run(&items)
    }
}

/// The adapter a local model's requests name (a served model's name is its backend's).
fn adapter_name(m: &ModelRef) -> Option<String> {
    m.adapter.as_ref().map(|_| m.label.clone())
}

/// `m1ft/object-val` → `m1ft`.
fn stage_name(dir: &str) -> &str {
    dir.split('/').next().unwrap_or(dir)
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    stages::read_manifest(dir)
}

/// Loads what a report needs without any model.
pub fn load_records(dir: &Path, sub: &str, kind: RunKind) -> Result<Option<Vec<Record>>> {
    let d = dir.join(sub);
    if !d.join("run.json").exists() {
        return Ok(None);
    }
    Ok(Some(runs::read_run(&d, kind)?.1))
}
