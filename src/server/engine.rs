//! The engine thread: it owns the model and decodes continuously. Chat requests join a decode batch
//! between steps as soon as there is room (a request never waits for others to finish), stream their text
//! as it settles, and leave when done or when their client goes away. Each row runs its request's adapter
//! (rows of different adapters and of the base decode together); requests with different sampling
//! settings decode in separate batches (grouped as the local backend groups them, so served answers equal
//! local ones to the bit), which take turns, one step each. Legacy completions (with their echoed prompt
//! log-probs) run whole between steps. Work that changes the engine (loading or dropping an adapter,
//! training one) is queued as a task: intake stops, what came before it finishes, then it runs with the
//! engine to itself.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::{mpsc, oneshot};

use super::wire::{CompletionJob, Prompt};
use super::{ApiError, Limits};
use crate::backend::{
    ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, LocalBackend, TokenLogprob,
};
use crate::engine::live::settled_len;
use crate::engine::{Completion, Event, LiveBatch, RowSpec, Sequence};
use crate::model::hooks::RowHooks;

type Reply = oneshot::Sender<Result<ChatResponse, ApiError>>;
type CompletionReply = oneshot::Sender<Result<Vec<CompletionResponse>, ApiError>>;

/// What a streamed chat request hears from the engine.
pub enum StreamEvent {
    /// It was checked and joined a decode batch (the HTTP answer can start).
    Admitted,
    /// More text of choice `choice` that no later token can change, with the tokens decoded since the
    /// last delta (when log-probs were asked for).
    Delta {
        choice: usize,
        text: String,
        tokens: Vec<TokenLogprob>,
    },
    /// The whole answer, as a request without `stream` gets it.
    Done(Result<ChatResponse, ApiError>),
}

/// Where a chat request's answer goes.
enum ChatSink {
    Whole(Reply),
    Stream(mpsc::UnboundedSender<StreamEvent>),
}

impl ChatSink {
    fn finish(self, answer: Result<ChatResponse, ApiError>) {
        // A client that went away has dropped its receiver: nothing to do.
        match self {
            ChatSink::Whole(tx) => {
                let _ = tx.send(answer);
            }
            ChatSink::Stream(tx) => {
                let _ = tx.send(StreamEvent::Done(answer));
            }
        }
    }

    /// Whether its client went away.
    fn gone(&self) -> bool {
        match self {
            ChatSink::Whole(tx) => tx.is_closed(),
            ChatSink::Stream(tx) => tx.is_closed(),
        }
    }
}

enum Job {
    Chat {
        request: ChatRequest,
        sink: ChatSink,
    },
    Completion {
        job: CompletionJob,
        reply: CompletionReply,
    },
    Task(Task),
}

/// Work run on the engine thread with the engine to itself.
pub type Task = Box<dyn FnOnce(&mut LocalBackend) + Send>;

pub struct Engine {
    jobs: SyncSender<Job>,
}

/// What submitting a request came to: its answer to wait for, or None when the queue holds
/// `max_queued` requests (answer 503).
pub type Submit<T> = Option<oneshot::Receiver<Result<T, ApiError>>>;

impl Engine {
    pub fn start(backend: LocalBackend, limits: &Limits) -> Self {
        let (jobs, rx) = sync_channel::<Job>(limits.max_queued.max(1));
        let max_batch = limits.max_batch_requests.max(1);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || Decoder::new(backend, max_batch).run(rx))
            .expect("spawning the engine thread");
        Self { jobs }
    }

    pub fn submit(&self, request: ChatRequest) -> Submit<ChatResponse> {
        let (reply, rx) = oneshot::channel();
        let sink = ChatSink::Whole(reply);
        self.send(Job::Chat { request, sink }).then_some(rx)
    }

    /// Queues a request whose answer streams; None when the queue is full.
    pub fn submit_stream(
        &self,
        request: ChatRequest,
    ) -> Option<mpsc::UnboundedReceiver<StreamEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = ChatSink::Stream(tx);
        self.send(Job::Chat { request, sink }).then_some(rx)
    }

    pub fn submit_completion(&self, job: CompletionJob) -> Submit<Vec<CompletionResponse>> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Completion { job, reply }).then_some(rx)
    }

    /// Queues `task`; false when the queue is full.
    pub fn submit_task(&self, task: Task) -> bool {
        self.send(Job::Task(task))
    }

    /// Runs `f` on the engine thread and waits for what it returns (None: the queue was full).
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut LocalBackend) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let task: Task = Box::new(move |backend| {
            let _ = tx.send(f(backend));
        });
        if !self.submit_task(task) {
            return None;
        }
        rx.await.ok()
    }

    fn send(&self, job: Job) -> bool {
        !matches!(
            self.jobs.try_send(job),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
        )
    }
}

fn context_error(context: usize, prompt: usize, max_tokens: usize) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "this model's context is {context} tokens; the prompt has {prompt} and max_tokens asks for {max_tokens} more"
        ),
        kind: "invalid_request_error",
        param: Some("max_tokens".into()),
        code: Some("context_length_exceeded"),
    }
}

/// The job's prompts as token ids, each checked against the vocabulary and the context.
fn completion_requests(
    backend: &LocalBackend,
    job: &CompletionJob,
) -> Result<Vec<CompletionRequest>, ApiError> {
    let context = backend.model.llama.cfg.max_position_embeddings;
    let vocab = backend.model.llama.cfg.vocab_size;
    let mut out = vec![];
    for (i, p) in job.prompts.iter().enumerate() {
        let ids = match p {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(t) => backend
                .model
                .tokenizer
                .encode_with_specials(t)
                .map_err(|e| ApiError::bad_request(format!("prompt {i}: {e:#}"), Some("prompt")))?,
        };
        if ids.is_empty() {
            return Err(ApiError::bad_request(
                format!("prompt {i} has no tokens"),
                Some("prompt"),
            ));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::bad_request(
                format!("prompt {i}: token id {bad} is outside the vocabulary of {vocab}"),
                Some("prompt"),
            ));
        }
        if ids.len() + job.template.max_tokens > context {
            return Err(context_error(context, ids.len(), job.template.max_tokens));
        }
        out.push(CompletionRequest {
            prompt: ids,
            ..job.template.clone()
        });
    }
    Ok(out)
}

/// Whether a request names an adapter the engine no longer has (dropped after the request was checked).
fn unloaded(backend: &LocalBackend, model: &Option<String>) -> bool {
    model
        .as_ref()
        .is_some_and(|name| backend.adapter(name).is_err())
}

fn unloaded_error(model: &Option<String>) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "the model `{}` was unloaded",
            model.as_deref().unwrap_or_default()
        ),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
    }
}

/// A chat request checked and waiting for room in its batch.
struct Waiting {
    request: ChatRequest,
    prompt: Vec<u32>,
    /// Its interventions and captures, checked against the model.
    hooks: Option<Arc<RowHooks>>,
    sink: ChatSink,
}

/// A decode batch's sampling settings.
type BatchKey = String;

fn batch_key(r: &ChatRequest) -> BatchKey {
    LocalBackend::batch_key(r)
}

/// A chat request decoding.
struct Decoding {
    request: ChatRequest,
    prompt_len: usize,
    batch: BatchKey,
    sink: ChatSink,
    /// Each finished sample.
    samples: Vec<Option<Completion>>,
    /// Bytes of each choice's text streamed so far.
    streamed: Vec<usize>,
}

/// The engine thread's state.
struct Decoder {
    backend: LocalBackend,
    /// Requests checked into `waiting` at most (the channel holds the rest).
    max_batch: usize,
    waiting: VecDeque<Waiting>,
    /// One decode batch per sampling settings.
    batches: BTreeMap<BatchKey, LiveBatch>,
    decoding: HashMap<usize, Decoding>,
    completions: Vec<(Vec<CompletionRequest>, CompletionReply)>,
    tasks: VecDeque<Task>,
    next_key: usize,
}

impl Decoder {
    fn new(backend: LocalBackend, max_batch: usize) -> Self {
        Self {
            backend,
            max_batch,
            waiting: VecDeque::new(),
            batches: BTreeMap::new(),
            decoding: HashMap::new(),
            completions: vec![],
            tasks: VecDeque::new(),
            next_key: 0,
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            if self.waiting.is_empty() && self.decoding.is_empty() {
                for task in std::mem::take(&mut self.tasks) {
                    task(&mut self.backend);
                }
                match rx.recv() {
                    Ok(job) => self.take(job),
                    // The server stopped and nothing is left to answer.
                    Err(_) => return,
                }
            }
            // What queued meanwhile. A task stops the intake: it runs once what came before it is answered.
            while self.tasks.is_empty() && self.waiting.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(job) => self.take(job),
                    Err(_) => break,
                }
            }
            if !self.completions.is_empty() {
                answer_completions(&self.backend, std::mem::take(&mut self.completions));
            }
            self.admit();
            self.step();
        }
    }

    /// Checks a job: a chat request waits for room (or is answered with its 4xx now).
    fn take(&mut self, job: Job) {
        let backend = &self.backend;
        let context = backend.model.llama.cfg.max_position_embeddings;
        match job {
            Job::Task(t) => self.tasks.push_back(t),
            Job::Chat { sink, request } if unloaded(backend, &request.model) => {
                sink.finish(Err(unloaded_error(&request.model)));
            }
            Job::Completion { reply, job } if unloaded(backend, &job.template.model) => {
                let _ = reply.send(Err(unloaded_error(&job.template.model)));
            }
            Job::Chat { request, sink } => match backend.model.render_chat(&request.messages) {
                Ok((prompt, _)) if prompt.len() + request.max_tokens > context => {
                    sink.finish(Err(context_error(
                        context,
                        prompt.len(),
                        request.max_tokens,
                    )));
                }
                Ok((prompt, chat)) => match backend.row_hooks(&request, prompt.len(), &chat) {
                    Ok(hooks) => self.waiting.push_back(Waiting {
                        request,
                        prompt,
                        hooks,
                        sink,
                    }),
                    Err(e) => {
                        let message = format!("{e:#}");
                        let param = if message.starts_with("capture") {
                            "capture"
                        } else {
                            "intervene"
                        };
                        sink.finish(Err(ApiError::bad_request(message, Some(param))));
                    }
                },
                Err(e) => sink.finish(Err(ApiError::bad_request(
                    format!("the messages cannot be put in the chat template: {e:#}"),
                    Some("messages"),
                ))),
            },
            Job::Completion { job, reply } => match completion_requests(backend, &job) {
                Ok(requests) => self.completions.push((requests, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }

    /// Moves waiting requests, in order, into their batches while the rows fit (the device's
    /// memory and `--batch-size` bound a batch); those joining one batch prefill together.
    fn admit(&mut self) {
        let mut joining: BTreeMap<BatchKey, Vec<Waiting>> = BTreeMap::new();
        while let Some(w) = self.waiting.front() {
            let key = batch_key(&w.request);
            let batch = self.batches.get(&key);
            let peers = joining.get(&key).map_or(&[][..], Vec::as_slice);
            let rows = batch.map_or(0, LiveBatch::len)
                + peers.iter().map(|p| p.request.n.max(1)).sum::<usize>();
            let longest = peers
                .iter()
                .map(|p| p.prompt.len() + p.request.max_tokens)
                .chain(batch.map(LiveBatch::longest))
                .max()
                .unwrap_or(0)
                .max(w.prompt.len() + w.request.max_tokens);
            let fit = self.backend.base_generator().rows_that_fit(longest);
            let n = w.request.n.max(1);
            let live = batch.map_or(0, LiveBatch::len);
            // A batch already decoding takes new rows once a quarter of it is free: each join copies
            // the batch's cache, which costs more than it saves when rows join one by one.
            if live > 0 && fit.saturating_sub(live) < (fit / 4).max(n) {
                break;
            }
            if rows > 0 && rows + n > fit {
                break;
            }
            let w = self.waiting.pop_front().expect("a front");
            joining.entry(key).or_default().push(w);
        }
        let gen = self.backend.base_generator();
        for (key, group) in joining {
            // Each row leases its adapter now: an unload while it decodes does not pull it away.
            let mut leased = vec![];
            for w in group {
                match w.request.model.as_deref().map(|m| self.backend.adapter(m)) {
                    Some(Err(_)) => w.sink.finish(Err(unloaded_error(&w.request.model))),
                    Some(Ok(a)) => leased.push((w, Some(a.clone()))),
                    None => leased.push((w, None)),
                }
            }
            let group = leased;
            let ids: Vec<usize> = (self.next_key..self.next_key + group.len()).collect();
            self.next_key += group.len();
            let params: Vec<_> = group
                .iter()
                .map(|(w, _)| Arc::new(LocalBackend::params(&w.request)))
                .collect();
            let seqs: Vec<Sequence> = group
                .iter()
                .zip(&ids)
                .zip(&params)
                .map(|(((w, adapter), &id), params)| Sequence {
                    key: id,
                    prompt: &w.prompt,
                    params: params.clone(),
                    row: RowSpec {
                        adapter: adapter.clone(),
                        hooks: w.hooks.clone(),
                    },
                })
                .collect();
            let batch = self.batches.entry(key.clone()).or_default();
            let joined = batch.admit(&gen, &seqs);
            drop(seqs);
            for ((w, _), id) in group.into_iter().zip(ids) {
                if let Err(e) = &joined {
                    tracing::error!("engine: {e:#}");
                    w.sink
                        .finish(Err(ApiError::internal(format!("the engine failed: {e:#}"))));
                    continue;
                }
                if let ChatSink::Stream(tx) = &w.sink {
                    let _ = tx.send(StreamEvent::Admitted);
                }
                let n = w.request.n.max(1);
                self.decoding.insert(
                    id,
                    Decoding {
                        prompt_len: w.prompt.len(),
                        batch: key.clone(),
                        request: w.request,
                        sink: w.sink,
                        samples: vec![None; n],
                        streamed: vec![0; n],
                    },
                );
            }
        }
    }

    /// One decode step of every batch; rows of clients that went away leave first.
    fn step(&mut self) {
        let backend = &self.backend;
        let decoding = &mut self.decoding;
        for (key, batch) in self.batches.iter_mut() {
            let mine = |d: &Decoding| d.batch == *key;
            let gen = backend.base_generator();
            let result = (|| -> anyhow::Result<()> {
                let gone: HashSet<usize> = decoding
                    .iter()
                    .filter(|(_, d)| mine(d) && d.sink.gone())
                    .map(|(&k, _)| k)
                    .collect();
                if !gone.is_empty() {
                    batch.cancel(&gen, &|k| gone.contains(&k))?;
                    decoding.retain(|k, _| !gone.contains(k));
                    tracing::info!(
                        "engine: {} requests whose clients went away left the batch",
                        gone.len()
                    );
                }
                batch.step(&gen, &mut |event| {
                    on_event(backend, decoding, event);
                    Ok(())
                })
            })();
            if let Err(e) = result {
                tracing::error!("engine: {e:#}");
                *batch = LiveBatch::default();
                let failed: Vec<usize> = decoding
                    .iter()
                    .filter(|(_, d)| mine(d))
                    .map(|(&k, _)| k)
                    .collect();
                for k in failed {
                    if let Some(d) = decoding.remove(&k) {
                        d.sink
                            .finish(Err(ApiError::internal(format!("the engine failed: {e:#}"))));
                    }
                }
            }
        }
        self.batches.retain(|_, b| !b.is_empty());
    }
}

/// A sample's new token (streamed when its request streams) or its end (the request is answered
/// once all its samples ended).
fn on_event(backend: &LocalBackend, decoding: &mut HashMap<usize, Decoding>, event: Event) {
    match event {
        Event::Token {
            key,
            sample,
            step,
            ids,
        } => {
            let Some(d) = decoding.get_mut(&key) else {
                return;
            };
            let ChatSink::Stream(tx) = &d.sink else {
                return;
            };
            let text = backend
                .model
                .tokenizer
                .decode(ids, true)
                .unwrap_or_default();
            let end = settled_len(&text, &d.request.stop);
            let from = d.streamed[sample];
            let delta = match text.get(from..end) {
                Some(new) if end > from => {
                    d.streamed[sample] = end;
                    new.to_string()
                }
                _ => String::new(),
            };
            let tokens = if d.request.logprobs {
                vec![backend.token_logprob(step)]
            } else {
                vec![]
            };
            if !delta.is_empty() || !tokens.is_empty() {
                let _ = tx.send(StreamEvent::Delta {
                    choice: sample,
                    text: delta,
                    tokens,
                });
            }
        }
        Event::Done {
            key,
            sample,
            completion,
        } => {
            let Some(d) = decoding.get_mut(&key) else {
                return;
            };
            d.samples[sample] = Some(completion);
            if d.samples.iter().all(Option::is_some) {
                let d = decoding.remove(&key).expect("present");
                let completions = d.samples.into_iter().flatten().collect();
                let answer = backend.response(d.prompt_len, completions, &d.request);
                d.sink.finish(Ok(answer));
            }
        }
    }
}

/// Every queued completion job's prompts in one call (prompts sharing settings generate together).
fn answer_completions(
    backend: &LocalBackend,
    jobs: Vec<(Vec<CompletionRequest>, CompletionReply)>,
) {
    let all: Vec<CompletionRequest> = jobs.iter().flat_map(|(r, _)| r.clone()).collect();
    match backend.complete(&all) {
        Ok(answers) => {
            let mut answers = answers.into_iter();
            for (requests, reply) in jobs {
                let mine: Vec<CompletionResponse> = answers.by_ref().take(requests.len()).collect();
                let _ = reply.send(Ok(mine));
            }
        }
        Err(e) => {
            tracing::error!("engine: {e:#}");
            for (_, reply) in jobs {
                let _ = reply.send(Err(ApiError::internal(format!("the engine failed: {e:#}"))));
            }
        }
    }
}
