//! A bounded load test of `introspect serve` on loopback: many concurrent clients, a fixed number of
//! chat requests, a slow client and one that hangs up, then a clean stop. Beside it, the same requests
//! answered by the engine directly in one batched call — what the server's overhead and its
//! batch-at-a-time scheduling cost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{bind, Limits, ServeConfig};
use crate::backend::{Backend, ChatRequest, LocalBackend};
use crate::model::Message;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub clients: usize,
    pub requests: usize,
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub completion_tokens: u64,
    pub tokens_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// The same requests through the engine in one call, no HTTP.
    pub engine_seconds: f64,
    pub engine_tokens_per_s: f64,
    /// Peak resident memory of the whole process (engine run, server and clients), GiB.
    pub peak_rss_gib: f64,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "| | requests | errors | seconds | requests/s | completion tokens/s | p50 ms | p99 ms |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|")?;
        writeln!(
            f,
            "| server, {} clients | {} | {} | {:.1} | {:.2} | {:.1} | {:.0} | {:.0} |",
            self.clients,
            self.requests,
            self.errors,
            self.seconds,
            self.requests_per_s,
            self.tokens_per_s,
            self.latency_p50_ms,
            self.latency_p99_ms
        )?;
        writeln!(
            f,
            "| engine, one batched call | {} | 0 | {:.1} | {:.2} | {:.1} | | |",
            self.requests,
            self.engine_seconds,
            self.requests as f64 / self.engine_seconds.max(1e-9),
            self.engine_tokens_per_s
        )?;
        write!(f, "peak RSS {:.2} GiB", self.peak_rss_gib)
    }
}

/// The i-th request: short chat questions that differ, greedy.
fn request(i: usize, max_tokens: usize) -> ChatRequest {
    const THINGS: [&str; 8] = [
        "animal", "colour", "city", "fruit", "river", "planet", "tree", "metal",
    ];
    ChatRequest::greedy(
        vec![
            Message::new("system", ""),
            Message::new(
                "user",
                &format!(
                    "Name a {} whose name has {} letters.",
                    THINGS[i % THINGS.len()],
                    3 + i % 7
                ),
            ),
        ],
        max_tokens,
    )
}

/// Runs the engine figure, then the server under load; the backend serves the load.
pub fn run(backend: LocalBackend, base_name: &str, spec: &LoadSpec) -> Result<LoadReport> {
    let requests: Vec<ChatRequest> = (0..spec.requests)
        .map(|i| request(i, spec.max_tokens))
        .collect();
    let started = Instant::now();
    let direct = backend.chat(&requests)?;
    let engine_seconds = started.elapsed().as_secs_f64();
    let engine_tokens: u64 = direct
        .iter()
        .filter_map(|r| r.usage)
        .map(|u| u.completion_tokens)
        .sum();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = ServeConfig {
        base_name: base_name.into(),
        api_key: None,
        limits: Limits::default(),
        runtime_lora: false,
        fine_tuning: None,
    };
    let (addr, server) =
        runtime.block_on(bind(backend, config, "127.0.0.1:0".parse()?, async {
            let _ = stop_rx.await;
        }))?;
    let server = runtime.spawn(server);
    let url = format!("http://{addr}/v1/chat/completions");
    let body = |r: &ChatRequest| {
        serde_json::json!({
            "model": base_name, "messages": r.messages, "max_tokens": r.max_tokens, "temperature": 0,
        })
    };
    let base = base_name.to_string();
    let misbehaving = std::thread::spawn(move || misbehave(addr, &base));
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(spec.requests));
    let errors = AtomicUsize::new(0);
    let tokens = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..spec.clients.max(1) {
            s.spawn(|| {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(600))
                    .build();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests.len() {
                        break;
                    }
                    let t = Instant::now();
                    match agent.post(&url).send_json(body(&requests[i])) {
                        Ok(r) => {
                            let json: serde_json::Value = r.into_json().unwrap_or_default();
                            let n = json["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                            tokens.fetch_add(n as usize, Ordering::Relaxed);
                            latencies
                                .lock()
                                .unwrap()
                                .push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                        Err(e) => {
                            tracing::warn!("load test request {i}: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    misbehaving
        .join()
        .map_err(|_| anyhow::anyhow!("the misbehaving clients panicked"))??;
    let _ = stop_tx.send(());
    runtime
        .block_on(server)
        .context("the server task")?
        .context("serving")?;
    let mut lat = latencies.into_inner().unwrap();
    lat.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let completion_tokens = tokens.load(Ordering::Relaxed) as u64;
    Ok(LoadReport {
        clients: spec.clients,
        requests: spec.requests,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        requests_per_s: spec.requests as f64 / seconds.max(1e-9),
        completion_tokens,
        tokens_per_s: completion_tokens as f64 / seconds.max(1e-9),
        latency_p50_ms: pick(0.5),
        latency_p99_ms: pick(0.99),
        engine_seconds,
        engine_tokens_per_s: engine_tokens as f64 / engine_seconds.max(1e-9),
        peak_rss_gib: crate::bench::peak_rss_gib(),
    })
}

/// A client that sends half a request and stalls, and one that hangs up before its answer: neither may
/// hold up the others. Returns once both are done (the stalled one gives up after a few seconds).
fn misbehave(addr: SocketAddr, model: &str) -> Result<()> {
    use std::io::Write;
    let body = serde_json::json!({
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4
    })
    .to_string();
    let mut slow = std::net::TcpStream::connect(addr)?;
    write!(
        slow,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        body.len(),
        &body[..body.len() / 2]
    )?;
    let mut gone = std::net::TcpStream::connect(addr)?;
    write!(
        gone,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    drop(gone);
    std::thread::sleep(Duration::from_secs(3));
    drop(slow);
    Ok(())
}

/// Refuses a load test that could not say anything.
pub fn check(spec: &LoadSpec) -> Result<()> {
    if spec.requests == 0 || spec.clients == 0 || spec.max_tokens == 0 {
        bail!("--requests, --clients and --max-tokens must be at least 1");
    }
    Ok(())
}
