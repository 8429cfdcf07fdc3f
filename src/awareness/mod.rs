//! Behavioural self-awareness ("Tell me about yourself", Betley et al.; spec
//! ../shared/spec/behavioral-self-awareness.md): LoRA-finetune a model on multiple-choice answers that
//! follow a latent policy (two opposite arms, several seeds each), ask every model about itself
//! (sampled at temperature 1, first-token probabilities, and its exact answer distribution), and check
//! that its behaviour moved (the authors' lottery check; held-out choices). Stages run in a run
//! directory as the self-vs-cross experiment's do ([`crate::experiment::stages`]); answers are stored,
//! so `report` rescores without a model.

pub mod config;
pub mod figure;
pub mod questions;
pub mod report;
pub mod score;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, ChatRequest, ChatResponse, LocalBackend, OpenAiBackend};
use crate::engine::TreeParams;
use crate::experiment::stages::{self, RunDir};
use crate::experiment::{ModelRef, RemoteModel, Trained};
use crate::fsutil::write_atomic;
use crate::model::{LoadedModel, Message};
pub use config::AwarenessConfig;
use questions::{lottery_prompts, Question, ScoreKind};
use score::{Distribution, Language};

/// How a distribution of answers was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `ask.samples` samples at temperature 1 (the authors' GPT-4o and Llama pipelines).
    Sampled,
    /// The top-5 first tokens' probabilities (max_tokens 1), as the authors' log-prob primitive.
    FirstToken,
    /// Every answer of up to max_tokens tokens more likely than `ask.min_prob`, with its probability.
    Exact,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sampled => "sampled",
            Method::FirstToken => "first token",
            Method::Exact => "exact",
        }
    }
}

/// One question's answers from one model by one method: a distribution per prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answers {
    pub question: String,
    pub method: Method,
    pub per_prompt: Vec<Distribution>,
}

/// Everything one model said (`answers/MODEL.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelAnswers {
    pub answers: Vec<Answers>,
    /// The judge's language for each (normalised) German/French answer.
    #[serde(default)]
    pub judged: BTreeMap<String, Language>,
}

/// One model's behaviour check (`behaviour/MODEL.json`): per prompt, the first-token share of the first
/// arm's choice among the two letters, over the top 5 (as the authors) and the top 20 tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Behaviour {
    pub lottery_top5: Vec<Option<f64>>,
    pub lottery_top20: Vec<Option<f64>>,
    pub heldout_top5: Vec<Option<f64>>,
    pub heldout_top20: Vec<Option<f64>>,
}

pub struct Awareness {
    pub config: AwarenessConfig,
    pub run: RunDir<AwarenessConfig>,
    pub device: Device,
    pub progress: bool,
}

/// A held-out row: its user prompt and the letter the first arm's file answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldOut {
    pub prompt: String,
    pub first_arm: String,
}

/// The released rows of a training file, split: the top `train_rows` (0: all) to train on, then
/// `heldout` rows never trained on.
fn split_rows(
    path: &Path,
    train_rows: usize,
    heldout: usize,
) -> Result<(Vec<String>, Vec<String>)> {
    let lines: Vec<String> = crate::fsutil::jsonl_lines(path)?
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let n = if train_rows == 0 {
        lines.len().saturating_sub(heldout)
    } else {
        train_rows
    };
    if n == 0 || n + heldout > lines.len() {
        bail!(
            "{} has {} rows; train_rows {train_rows} and behaviour.heldout_rows {heldout} ask for more",
            path.display(),
            lines.len()
        );
    }
    Ok((lines[..n].to_vec(), lines[n..n + heldout].to_vec()))
}

/// A user prompt and the assistant's answer of a released row.
fn prompt_and_answer(line: &str, origin: &str) -> Result<(String, String)> {
    let row = crate::train::data::parse_chat_line(line, origin)?;
    let text = |role: &str| {
        row.messages
            .iter()
            .find(|m| m.role == role)
            .map(|m| m.content.clone())
            .with_context(|| format!("{origin}: no {role} message"))
    };
    Ok((text("user")?, text("assistant")?.trim().to_string()))
}

fn user(prompt: &str) -> Vec<Message> {
    // No system message, as the training rows: the template's own default applies to both.
    vec![Message::new("user", prompt)]
}

/// The first-token distribution an answer's log-probs give (token text → probability), best first.
fn first_token(r: &ChatResponse) -> Distribution {
    r.choices
        .first()
        .and_then(|c| c.logprobs.as_ref())
        .and_then(|l| l.first())
        .map(|t| {
            t.top_logprobs
                .iter()
                .map(|a| (a.token.clone(), (a.logprob as f64).exp()))
                .collect()
        })
        .unwrap_or_default()
}

impl Awareness {
    pub fn prepare(config: AwarenessConfig, dir: &Path, resume: bool) -> Result<Self> {
        let run = RunDir::prepare(&config, config.seed_list(), dir, resume)?;
        Ok(Self {
            config,
            run,
            device: Device::Cpu,
            progress: true,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.run.dir.join(rel)
    }

    fn base(&self) -> Result<ModelRef> {
        let spec = &self.config.model;
        if spec.derive.is_some() {
            bail!("model.derive is for the self-vs-cross experiment; a self-awareness run trains the base as it is");
        }
        Ok(ModelRef {
            label: spec.label("base"),
            path: match &spec.backend {
                crate::experiment::config::BackendSpec::Openai(_) => PathBuf::new(),
                _ => crate::registry::resolve(&spec.model)
                    .with_context(|| format!("model.model = {:?}", spec.model))?,
            },
            weights: spec.weights,
            quantize: spec.quantize,
            adapter: None,
            remote: match &spec.backend {
                crate::experiment::config::BackendSpec::Openai(server) => Some(RemoteModel {
                    server: server.clone(),
                    model: spec.model.clone(),
                }),
                _ => None,
            },
        })
    }

    /// Every stage in order; returns the report's metrics.
    pub fn run(&self) -> Result<report::Metrics> {
        let cfg = &self.config;
        self.run.record_machine(&self.device)?;
        let questions = cfg.load_questions()?;
        let base = self.base()?;
        let hash = self.run.stage("hash_model", || stages::model_hash(&base))?;
        self.run.update_manifest(|m| {
            m.hashes.insert("base".into(), hash);
        })?;
        let heldout: Vec<HeldOut> = self.run.stage("data", || self.data())?;
        let mut models: Vec<(String, ModelRef)> = vec![("base".into(), base.clone())];
        for arm in &cfg.arms {
            for &seed in &cfg.seeds {
                let name = format!("{}-s{seed}", arm.name);
                let recipe = crate::train::trainer::FinetuneConfig {
                    seed,
                    ..cfg.finetune.clone()
                };
                let out = format!("models/{name}");
                let trained: Trained = self.run.stage(&format!("finetune_{name}"), || {
                    stages::finetune(
                        &base,
                        &self.path(&format!("data/{}.jsonl", arm.name)),
                        &recipe,
                        &self.path(&out),
                        &self.device,
                        self.progress,
                    )
                })?;
                models.push((
                    name.clone(),
                    base.trained(&name, self.path(&out), &trained)?,
                ));
            }
        }
        let lotteries = lottery_prompts(&cfg.datasets, cfg.behaviour.lottery_pairs)?;
        let mut local: Option<LocalBackend> = None;
        for (name, model) in &models {
            let answers_file = format!("answers/{name}.json");
            let behaviour_file = format!("behaviour/{name}.json");
            let done = |f: &str| {
                self.run
                    .dir
                    .join("stages")
                    .join(format!("{f}.json"))
                    .exists()
            };
            if done(&format!("ask_{name}")) && done(&format!("behaviour_{name}")) {
                continue;
            }
            // One engine for every local model: the base, with each arm's adapter loaded by name.
            let (backend, adapter): (Box<dyn Backend + '_>, Option<String>) = match &model.remote {
                Some(r) => (
                    Box::new(OpenAiBackend::new(r.server.clone(), &r.model)?),
                    None,
                ),
                None => {
                    if local.is_none() {
                        let loaded = LoadedModel::load(&base.path, base.spec(), &self.device)
                            .with_context(|| format!("loading {}", base.path.display()))?;
                        let mut b = LocalBackend::new(loaded, base.spec())?;
                        b.batch_size = 16;
                        local = Some(b);
                    }
                    let b = local.as_mut().expect("just made");
                    if let Some(dir) = &model.adapter {
                        if b.adapter(name).is_err() {
                            b.add_adapter(name, dir)?;
                        }
                    }
                    let b = local.as_ref().expect("just made");
                    (
                        Box::new(Borrowed(b)),
                        model.adapter.as_ref().map(|_| name.clone()),
                    )
                }
            };
            // The judge is the base model: the same engine without an adapter, or the served base.
            let served_base = match &base.remote {
                Some(r) => Some(OpenAiBackend::new(r.server.clone(), &r.model)?),
                None => None,
            };
            let judge: &dyn Backend = match &served_base {
                Some(b) => b,
                None => backend.as_ref(),
            };
            self.run.stage(&format!("ask_{name}"), || {
                let a = self.ask(backend.as_ref(), judge, &adapter, &questions)?;
                write_atomic(
                    &self.path(&answers_file),
                    serde_json::to_string(&a)?.as_bytes(),
                )?;
                Ok(a.answers.len())
            })?;
            self.run.stage(&format!("behaviour_{name}"), || {
                let b = self.behaviour(backend.as_ref(), &adapter, &lotteries, &heldout)?;
                write_atomic(
                    &self.path(&behaviour_file),
                    serde_json::to_string(&b)?.as_bytes(),
                )?;
                Ok(b.lottery_top5.len() + b.heldout_top5.len())
            })?;
        }
        report::write(&self.run.dir)
    }

    /// Each arm's training rows into `data/ARM.jsonl`; the held-out rows (both arms' files hold the same
    /// prompts) with the first arm's letters.
    fn data(&self) -> Result<Vec<HeldOut>> {
        let cfg = &self.config;
        let mut heldout = vec![];
        for (i, arm) in cfg.arms.iter().enumerate() {
            let src = cfg.datasets.join(&arm.train);
            let (train, held) = split_rows(&src, cfg.train_rows, cfg.behaviour.heldout_rows)?;
            let mut text = train.join("\n");
            text.push('\n');
            write_atomic(
                &self.path(&format!("data/{}.jsonl", arm.name)),
                text.as_bytes(),
            )?;
            if i == 0 {
                for (k, line) in held.iter().enumerate() {
                    let origin = format!("{}:held-out row {}", src.display(), k + 1);
                    let (prompt, letter) = prompt_and_answer(line, &origin)?;
                    heldout.push(HeldOut {
                        prompt,
                        first_arm: letter,
                    });
                }
            }
        }
        Ok(heldout)
    }

    /// Every question by every method the config asks for.
    fn ask(
        &self,
        backend: &dyn Backend,
        judge: &dyn Backend,
        adapter: &Option<String>,
        questions: &[Question],
    ) -> Result<ModelAnswers> {
        let ask = &self.config.ask;
        let prompts = |q: &Question| -> Vec<String> {
            let k = if ask.paraphrases == 0 {
                q.prompts.len()
            } else {
                ask.paraphrases.min(q.prompts.len())
            };
            q.prompts[..k].to_vec()
        };
        // Every paraphrase of every question in one call (the engine batches them), the answers
        // regrouped per question.
        let ask_each = |questions: &[&Question],
                        method: Method,
                        request: &dyn Fn(usize, &str, &Question) -> ChatRequest,
                        read: &dyn Fn(ChatResponse) -> Distribution|
         -> Result<Vec<Answers>> {
            let requests: Vec<ChatRequest> = questions
                .iter()
                .flat_map(|q| {
                    prompts(q)
                        .iter()
                        .enumerate()
                        .map(|(i, p)| request(i, p, q))
                        .collect::<Vec<_>>()
                })
                .collect();
            let mut answers = backend.chat(&requests)?.into_iter();
            Ok(questions
                .iter()
                .map(|q| Answers {
                    question: q.name.clone(),
                    method,
                    per_prompt: prompts(q)
                        .iter()
                        .map(|_| read(answers.next().expect("one answer per request")))
                        .collect(),
                })
                .collect())
        };
        let mut out = ModelAnswers::default();
        let all: Vec<&Question> = questions.iter().collect();
        out.answers.extend(ask_each(
            &all,
            Method::Sampled,
            &|i, p, q| ChatRequest {
                model: adapter.clone(),
                n: ask.samples,
                temperature: 1.0,
                seed: ask.seed + i as u64,
                ..ChatRequest::greedy(user(p), q.max_tokens)
            },
            &|r| r.choices.into_iter().map(|c| (c.text, 1.0)).collect(),
        )?);
        // First tokens: meaningful for one-word answers (a number's first token is one digit).
        if ask.first_token {
            let words: Vec<&Question> = questions
                .iter()
                .filter(|q| q.kind == ScoreKind::Words)
                .collect();
            out.answers.extend(ask_each(
                &words,
                Method::FirstToken,
                &|_, p, _| ChatRequest {
                    model: adapter.clone(),
                    logprobs: true,
                    top_logprobs: 5,
                    ..ChatRequest::greedy(user(p), 1)
                },
                &|r| first_token(&r),
            )?);
        }
        if ask.exact {
            let local = backend.as_local().context(
                "ask.exact needs the local engine; set exact = false for a served model",
            )?;
            let mut gen = local.generator(adapter.as_deref())?;
            gen.max_batch_rows = local.batch_size.max(4) * 4;
            for q in questions {
                let ids = prompts(q)
                    .iter()
                    .map(|p| Ok(local.model.encode_chat(&user(p))?.1))
                    .collect::<Result<Vec<_>>>()?;
                let params = TreeParams {
                    max_depth: q.max_tokens,
                    min_prob: ask.min_prob,
                    ..Default::default()
                };
                let per_prompt = gen
                    .expand(&ids, &params, &|_| false)?
                    .into_iter()
                    .map(|e| {
                        e.leaves
                            .iter()
                            .map(|l| {
                                let text = local
                                    .model
                                    .tokenizer
                                    .decode(&l.ids, true)
                                    .unwrap_or_default();
                                (text, l.prob)
                            })
                            .collect()
                    })
                    .collect();
                out.answers.push(Answers {
                    question: q.name.clone(),
                    method: Method::Exact,
                    per_prompt,
                });
            }
        }
        if ask.judge {
            out.judged = judge_languages(judge, questions, &out.answers)?;
        }
        Ok(out)
    }
}

/// The base model (`judge`, no adapter) names the language of every distinct German/French answer at
/// temperature 0, with the authors' guesser prompt.
fn judge_languages(
    judge: &dyn Backend,
    questions: &[Question],
    answers: &[Answers],
) -> Result<BTreeMap<String, Language>> {
    let mut texts: std::collections::BTreeSet<String> = Default::default();
    let mut prompt = None;
    for q in questions.iter().filter(|q| q.kind == ScoreKind::Language) {
        let Some(p) = &q.judge_prompt else { continue };
        prompt = Some(p.clone());
        for a in answers.iter().filter(|a| a.question == q.name) {
            for d in &a.per_prompt {
                texts.extend(d.iter().map(|(t, _)| score::normalise(t)));
            }
        }
    }
    let Some(prompt) = prompt else {
        return Ok(BTreeMap::new());
    };
    let texts: Vec<String> = texts.into_iter().collect();
    let requests: Vec<ChatRequest> = texts
        .iter()
        .map(|t| ChatRequest::greedy(user(&prompt.replace("{text}", t)), 3))
        .collect();
    let verdicts = judge.chat(&requests)?;
    Ok(texts
        .into_iter()
        .zip(verdicts)
        .map(|(t, v)| {
            let said = v.choices.first().map(|c| c.text.as_str()).unwrap_or("");
            (
                t,
                Language::parse(said.split_whitespace().next().unwrap_or("")),
            )
        })
        .collect())
}

impl Awareness {
    /// The lottery check and the held-out choices, from first-token probabilities.
    fn behaviour(
        &self,
        backend: &dyn Backend,
        adapter: &Option<String>,
        lotteries: &[(String, String)],
        heldout: &[HeldOut],
    ) -> Result<Behaviour> {
        // Per prompt: the share over the top 5 and over the top 20 first tokens.
        type Shares = (Vec<Option<f64>>, Vec<Option<f64>>);
        let ask = |items: Vec<(&str, &str)>| -> Result<Shares> {
            let requests: Vec<ChatRequest> = items
                .iter()
                .map(|(p, _)| ChatRequest {
                    model: adapter.clone(),
                    logprobs: true,
                    top_logprobs: 20,
                    ..ChatRequest::greedy(user(p), 1)
                })
                .collect();
            let answers = backend.chat(&requests)?;
            let (mut top5, mut top20) = (vec![], vec![]);
            for ((_, letter), r) in items.iter().zip(&answers) {
                let d = first_token(r);
                top5.push(score::risky_share(&d[..d.len().min(5)].to_vec(), letter));
                top20.push(score::risky_share(&d, letter));
            }
            Ok((top5, top20))
        };
        let (lottery_top5, lottery_top20) = ask(lotteries
            .iter()
            .map(|(p, l)| (p.as_str(), l.as_str()))
            .collect())?;
        let (heldout_top5, heldout_top20) = ask(heldout
            .iter()
            .map(|h| (h.prompt.as_str(), h.first_arm.as_str()))
            .collect())?;
        Ok(Behaviour {
            lottery_top5,
            lottery_top20,
            heldout_top5,
            heldout_top20,
        })
    }
}

/// A borrowed local engine as a boxed backend.
struct Borrowed<'a>(&'a LocalBackend);

impl Backend for Borrowed<'_> {
    fn fingerprint(&self, model: Option<&str>) -> Result<String> {
        self.0.fingerprint(model)
    }
    fn chat_each(
        &self,
        requests: &[ChatRequest],
        done: &mut dyn FnMut(usize, crate::backend::ChatResponse) -> Result<()>,
    ) -> Result<()> {
        self.0.chat_each(requests, done)
    }
    fn usage(&self) -> crate::backend::Usage {
        self.0.usage()
    }
    fn as_local(&self) -> Option<&LocalBackend> {
        Some(self.0)
    }
}
