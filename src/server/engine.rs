//! The engine thread: it owns the model and answers queued requests in batches — every request waiting
//! when it becomes free (up to `max_batch_requests`) goes into one call of the local backend, which groups
//! them by adapter and settings into batched generations. Work that changes the engine (loading or
//! dropping an adapter, training one) is queued as a task and runs on the same thread after the batch it
//! was queued beside.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use axum::http::StatusCode;
use tokio::sync::oneshot;

use super::wire::{CompletionJob, Prompt};
use super::{ApiError, Limits};
use crate::backend::{
    Backend, ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, LocalBackend,
};

type Reply = oneshot::Sender<Result<ChatResponse, ApiError>>;
type CompletionReply = oneshot::Sender<Result<Vec<CompletionResponse>, ApiError>>;

enum Job {
    Chat {
        request: ChatRequest,
        reply: Reply,
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
            .spawn(move || run(backend, rx, max_batch))
            .expect("spawning the engine thread");
        Self { jobs }
    }

    pub fn submit(&self, request: ChatRequest) -> Submit<ChatResponse> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Chat { request, reply }).then_some(rx)
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

fn run(mut backend: LocalBackend, rx: Receiver<Job>, max_batch: usize) {
    let context = backend.model.llama.cfg.max_position_embeddings;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Requests that cannot run are answered alone, so they do not fail the batch.
        let mut batch: Vec<(ChatRequest, Option<Reply>)> = vec![];
        let mut completions: Vec<(Vec<CompletionRequest>, CompletionReply)> = vec![];
        let mut tasks: Vec<Task> = vec![];
        for job in jobs {
            match job {
                Job::Chat { reply, request } if unloaded(&backend, &request.model) => {
                    let _ = reply.send(Err(unloaded_error(&request.model)));
                }
                Job::Completion { reply, job } if unloaded(&backend, &job.template.model) => {
                    let _ = reply.send(Err(unloaded_error(&job.template.model)));
                }
                Job::Chat { request, reply } => match backend.prompt_tokens(&request) {
                    Ok(p) if p + request.max_tokens > context => {
                        let _ = reply.send(Err(context_error(context, p, request.max_tokens)));
                    }
                    Ok(_) => batch.push((request, Some(reply))),
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::bad_request(
                            format!("the messages cannot be put in the chat template: {e:#}"),
                            Some("messages"),
                        )));
                    }
                },
                Job::Task(t) => tasks.push(t),
                Job::Completion { job, reply } => match completion_requests(&backend, &job) {
                    Ok(requests) => completions.push((requests, reply)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
            }
        }
        if !batch.is_empty() {
            answer_chats(&backend, batch);
        }
        if !completions.is_empty() {
            answer_completions(&backend, completions);
        }
        for task in tasks {
            task(&mut backend);
        }
    }
}

fn answer_chats(backend: &LocalBackend, batch: Vec<(ChatRequest, Option<Reply>)>) {
    let (requests, mut replies): (Vec<ChatRequest>, Vec<Option<Reply>>) = batch.into_iter().unzip();
    let result = backend.chat_each(&requests, &mut |i, answer| {
        // A client that went away has dropped its receiver: nothing to do.
        if let Some(reply) = replies[i].take() {
            let _ = reply.send(Ok(answer));
        }
        Ok(())
    });
    if let Err(e) = result {
        tracing::error!("engine: {e:#}");
        for reply in &mut replies {
            if let Some(reply) = reply.take() {
                let _ = reply.send(Err(ApiError::internal(format!("the engine failed: {e:#}"))));
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
