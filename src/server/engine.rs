//! The engine thread: it owns the model and answers queued requests in batches — every request waiting
//! when it becomes free (up to `max_batch_requests`) goes into one call of the local backend, which groups
//! them by adapter and settings into batched generations.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use axum::http::StatusCode;
use tokio::sync::oneshot;

use super::{ApiError, Limits};
use crate::backend::{Backend, ChatRequest, ChatResponse, LocalBackend};

type Reply = oneshot::Sender<Result<ChatResponse, ApiError>>;

struct Job {
    request: ChatRequest,
    reply: Reply,
}

pub struct Engine {
    jobs: SyncSender<Job>,
}

/// What submitting a request came to.
pub enum Submit {
    Queued(oneshot::Receiver<Result<ChatResponse, ApiError>>),
    /// The queue holds `max_queued` requests: answer 503.
    Full,
}

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

    pub fn submit(&self, request: ChatRequest) -> Submit {
        let (reply, rx) = oneshot::channel();
        match self.jobs.try_send(Job { request, reply }) {
            Ok(()) => Submit::Queued(rx),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Submit::Full,
        }
    }
}

fn run(backend: LocalBackend, rx: Receiver<Job>, max_batch: usize) {
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
        for job in jobs {
            match backend.prompt_tokens(&job.request) {
                Ok(p) if p + job.request.max_tokens > context => {
                    let _ = job.reply.send(Err(ApiError {
                        status: StatusCode::BAD_REQUEST,
                        message: format!(
                            "this model's context is {context} tokens; the prompt has {p} and max_tokens asks for {} more",
                            job.request.max_tokens
                        ),
                        kind: "invalid_request_error",
                        param: Some("max_tokens".into()),
                        code: Some("context_length_exceeded"),
                    }));
                }
                Ok(_) => batch.push((job.request, Some(job.reply))),
                Err(e) => {
                    let _ = job.reply.send(Err(ApiError::bad_request(
                        format!("the messages cannot be put in the chat template: {e:#}"),
                        Some("messages"),
                    )));
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let requests: Vec<ChatRequest> = batch.iter().map(|(r, _)| r.clone()).collect();
        let result = backend.chat_each(&requests, &mut |i, answer| {
            // A client that went away has dropped its receiver: nothing to do.
            if let Some(reply) = batch[i].1.take() {
                let _ = reply.send(Ok(answer));
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!("engine: {e:#}");
            for (_, reply) in &mut batch {
                if let Some(reply) = reply.take() {
                    let _ =
                        reply.send(Err(ApiError::internal(format!("the engine failed: {e:#}"))));
                }
            }
        }
    }
}
