//! The OpenAI-compatible backend against `introspect serve` on loopback: object-level and hypothetical runs
//! give the same records as the local backend (greedy, base and adapter by model name), chat answers with
//! log-probs and seeded samples are the same, and the server's errors arrive as OpenAI's with their 4xx.

mod common;

use common::{exe, ok, serve, serve_with};

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use introspect::backend::{Backend, ChatRequest, LocalBackend, OpenAiBackend, OpenAiConfig};
use introspect::lora::{peft, Adapter, LoraConfig, Target};
use introspect::model::{LoadedModel, Message, WeightMode};

const MODEL: &str = "smollm2-135m-instruct";

/// A SmolLM2 adapter whose B matrices are seeded noise, so that it changes the answers.
fn noisy_adapter(dir: &Path) {
    let m = common::smollm2_f32();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        layers: None,
        use_rslora: false,
    };
    let mut adapter = Adapter::init(cfg, &m.llama.cfg, 11, &Device::Cpu).unwrap();
    common::seed_lora_b(&mut adapter, 5, 0.05);
    peft::save(&adapter, dir, "smollm2").unwrap();
}

/// The log's lines, sorted (the OpenAI backend finishes requests in another order).
fn log_lines(dir: &Path, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(name)).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines.sort();
    lines
}

#[test]
fn runs_through_the_server_match_the_local_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    ok(exe()
        .args(["dataset", "build", "--task", "animals_long"])
        .args(["--n-train", "2", "--n-val", "8", "--seed", "4", "--out"])
        .arg(t.join("ds")));
    let data = |p: &str| t.join(format!("ds/val/animals_long_{p}.jsonl"));
    let adapter = t.join("adapter");
    noisy_adapter(&adapter);
    let adapter_arg = format!("shifted={}", adapter.display());
    let server = serve(&["--adapter", &adapter_arg]);
    let remote = ["--backend", "openai", "--base-url", &server.base_url];

    let run = |kind: &str, out: &str, extra: &[&str]| {
        let stdout = ok(exe()
            .args([kind, "--max-tokens", "24", "--no-cache", "--data"])
            .arg(data("first_word"))
            .arg("--out")
            .arg(t.join(out))
            .args(extra));
        assert!(stdout.contains("8 rows (8 new"), "{stdout}");
        stdout
    };
    let mut runs = vec![];
    for (kind, log) in [
        ("object", "object.jsonl"),
        ("hypothetical", "hypothetical.jsonl"),
    ] {
        run(kind, &format!("{kind}-local"), &["--model", MODEL]);
        let stdout = run(
            kind,
            &format!("{kind}-remote"),
            &[&remote[..], &["--model", MODEL]].concat(),
        );
        // The server's token counts reach the run's tally.
        assert!(!stdout.contains(" 0 prompt + "), "{stdout}");
        run(
            kind,
            &format!("{kind}-adapter-local"),
            &["--model", MODEL, "--adapter", &adapter_arg],
        );
        run(
            kind,
            &format!("{kind}-adapter-remote"),
            &[&remote[..], &["--model", "shifted"]].concat(),
        );
        for variant in ["", "adapter-"] {
            let local = log_lines(&t.join(format!("{kind}-{variant}local")), log);
            let served = log_lines(&t.join(format!("{kind}-{variant}remote")), log);
            assert_eq!(local.len(), 8);
            assert_eq!(local, served, "{kind} {variant}: records differ");
        }
        let base = log_lines(&t.join(format!("{kind}-local")), log);
        let shifted = log_lines(&t.join(format!("{kind}-adapter-local")), log);
        assert_ne!(base, shifted, "{kind}: the adapter changed nothing");
        let usage: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(t.join(format!("{kind}-remote/usage.json"))).unwrap(),
        )
        .unwrap();
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 8 * 20, "{usage}");
        runs.push(usage);
    }

    // Calibration's sampled method (20 samples at T = 1 per prompt, seeded) gives the same records both
    // ways; the exact method is refused with a server.
    ok(exe()
        .args([
            "dataset",
            "build",
            "--task",
            "animals",
            "--n-train",
            "2",
            "--n-val",
            "4",
        ])
        .args(["--seed", "5", "--properties", "second_character", "--out"])
        .arg(t.join("cal-ds")));
    let cal_data = t.join("cal-ds/val/animals_second_character.jsonl");
    let calibrate = |out: &str, method: &str, extra: &[&str]| {
        let mut c = exe();
        c.args(["calibrate", "--method", method, "--samples", "6", "--data"])
            .arg(&cal_data)
            .arg("--out")
            .arg(t.join(out))
            .args(extra);
        c
    };
    ok(&mut calibrate("cal-local", "sampled", &[]));
    ok(&mut calibrate(
        "cal-remote",
        "sampled",
        &[&remote[..], &["--model", MODEL]].concat(),
    ));
    assert_eq!(
        log_lines(&t.join("cal-local"), "calibration.jsonl"),
        log_lines(&t.join("cal-remote"), "calibration.jsonl")
    );
    let refused = calibrate("cal-exact", "exact", &remote).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--method sampled"));

    // Chat with log-probs, and seeded samples: the same answers both ways (the CPU kernels make a row's
    // numbers independent of the batch it is in).
    let local = LocalBackend::new(
        LoadedModel::load(&common::smollm2_gguf(), WeightMode::F32, &Device::Cpu).unwrap(),
        WeightMode::F32,
    )
    .unwrap();
    let client = OpenAiBackend::new(OpenAiConfig::new(&server.base_url), MODEL).unwrap();
    let messages = |q: &str| vec![Message::new("system", ""), Message::new("user", q)];
    let requests = vec![
        ChatRequest {
            logprobs: true,
            top_logprobs: 5,
            ..ChatRequest::greedy(messages("Name a colour."), 12)
        },
        ChatRequest {
            n: 3,
            temperature: 1.0,
            seed: 9,
            ..ChatRequest::greedy(messages("Say a word."), 8)
        },
        ChatRequest {
            stop: vec![".".into()],
            ..ChatRequest::greedy(messages("Tell me about the sea."), 40)
        },
    ];
    let (a, b) = (
        local.chat(&requests).unwrap(),
        client.chat(&requests).unwrap(),
    );
    assert_eq!(a, b);
    let steps = a[0].choices[0].logprobs.as_ref().unwrap();
    assert!(!steps.is_empty() && steps.iter().all(|s| s.top_logprobs.len() == 5));
    assert_eq!(a[1].choices.len(), 3);
    assert!(!a[2].choices[0].text.contains('.'), "{:?}", a[2]);

    // n beyond what one request may carry is split, and comes back whole.
    let capped = OpenAiBackend::new(
        OpenAiConfig {
            max_n: 2,
            ..OpenAiConfig::new(&server.base_url)
        },
        MODEL,
    )
    .unwrap();
    let five = ChatRequest {
        n: 5,
        temperature: 1.0,
        ..ChatRequest::greedy(messages("Say a word."), 4)
    };
    assert_eq!(capped.chat(&[five]).unwrap()[0].choices.len(), 5);

    // The server's refusals are reported with its message, not retried.
    let unknown = OpenAiBackend::new(OpenAiConfig::new(&server.base_url), "no-such-model").unwrap();
    let err = format!(
        "{:#}",
        unknown
            .chat(&[ChatRequest::greedy(messages("Hi"), 4)])
            .unwrap_err()
    );
    assert!(
        err.contains("HTTP 404") && err.contains("does not exist"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        client
            .chat(&[ChatRequest {
                logprobs: true,
                top_logprobs: 21,
                ..ChatRequest::greedy(messages("Hi"), 4)
            }])
            .unwrap_err()
    );
    assert!(
        err.contains("HTTP 400") && err.contains("top_logprobs"),
        "{err}"
    );
    assert_eq!(
        client
            .client
            .retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_server_that_fails_is_retried_and_one_that_refuses_is_not() {
    // A loopback server that answers 503 (with Retry-After) twice, then a completion; and a path that
    // always answers 400.
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut served = 0;
        for stream in listener.incoming() {
            let mut s = stream.unwrap();
            let mut buf = vec![0u8; 65536];
            let mut got = 0;
            // Read the head and the body (Content-Length).
            loop {
                let n = s.read(&mut buf[got..]).unwrap();
                got += n;
                let text = String::from_utf8_lossy(&buf[..got]).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if got >= head_end + 4 + len || n == 0 {
                        break;
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf[..got]).to_string();
            let (status, body) = if head.starts_with("POST /bad/") {
                ("400 Bad Request", r#"{"error":{"message":"n is too large","type":"invalid_request_error","param":"n","code":null}}"#.to_string())
            } else if served < 2 {
                served += 1;
                (
                    "503 Service Unavailable",
                    r#"{"error":{"message":"busy"}}"#.to_string(),
                )
            } else {
                ("200 OK", r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#.to_string())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 0\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let good = OpenAiBackend::new(OpenAiConfig::new(&format!("http://{addr}/v1")), "m").unwrap();
    let r = good
        .chat(&[ChatRequest::greedy(vec![Message::new("user", "hi")], 4)])
        .unwrap();
    assert_eq!(r[0].choices[0].text, "hello");
    assert_eq!(
        good.client
            .retries
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(good.usage().prompt_tokens, 7);
    let bad = OpenAiBackend::new(OpenAiConfig::new(&format!("http://{addr}/bad/v1")), "m").unwrap();
    let err = format!(
        "{:#}",
        bad.chat(&[ChatRequest::greedy(vec![Message::new("user", "hi")], 4)])
            .unwrap_err()
    );
    assert!(err.contains("HTTP 400: n is too large"), "{err}");
    assert_eq!(
        bad.client
            .retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// POSTs raw bytes; returns the status and the body as JSON.
fn post_raw(url: &str, key: Option<&str>, body: &[u8]) -> (u16, serde_json::Value) {
    let mut req = ureq::post(url).set("content-type", "application/json");
    if let Some(k) = key {
        req = req.set("authorization", &format!("Bearer {k}"));
    }
    let (status, text) = match req.send_bytes(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let json = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({"raw": text}));
    (status, json)
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = serve_with(
        &["--api-key-env", "INTROSPECT_TEST_KEY"],
        &[("INTROSPECT_TEST_KEY", "sesame")],
    );
    let url = format!("{}/chat/completions", server.base_url);
    let good = serde_json::json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0
    });
    let with = |patch: serde_json::Value| {
        let mut b = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        serde_json::to_vec(&b).unwrap()
    };
    let huge = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(10 << 20)
    );
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        (
            "truncated JSON",
            br#"{"model": "smollm2-135m-instruct", "messa"#.to_vec(),
            400,
            None,
        ),
        (
            "invalid UTF-8",
            b"{\"model\": \"\xff\xfe\"}".to_vec(),
            400,
            None,
        ),
        (
            "n as a string",
            with(serde_json::json!({"n": "two"})),
            400,
            None,
        ),
        (
            "huge n",
            with(serde_json::json!({"n": 100000})),
            400,
            Some("n"),
        ),
        (
            "negative max_tokens",
            with(serde_json::json!({"max_tokens": -5})),
            400,
            Some("max_tokens"),
        ),
        (
            "temperature 3",
            with(serde_json::json!({"temperature": 3.0})),
            400,
            Some("temperature"),
        ),
        (
            "top_logprobs 21",
            with(serde_json::json!({"logprobs": true, "top_logprobs": 21})),
            400,
            Some("top_logprobs"),
        ),
        (
            "unknown role",
            with(serde_json::json!({"messages": [{"role": "wizard", "content": "x"}]})),
            400,
            Some("messages"),
        ),
        (
            "no messages",
            with(serde_json::json!({"messages": []})),
            400,
            Some("messages"),
        ),
        (
            "unknown model",
            with(serde_json::json!({"model": "gpt-9"})),
            404,
            Some("model"),
        ),
        (
            "past the context",
            with(serde_json::json!({"max_tokens": 100000})),
            400,
            Some("max_tokens"),
        ),
        ("10 MB body", huge.into_bytes(), 413, None),
    ];
    for (name, body, status, param) in &cases {
        let (got, json) = post_raw(&url, Some("sesame"), body);
        assert_eq!(got, *status, "{name}: {json}");
        let e = &json["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {json}"
        );
        assert!(e["type"].is_string(), "{name}: {json}");
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{name}: {json}");
        }
    }
    let (got, json) = post_raw(&url, Some("wrong"), &with(serde_json::json!({})));
    assert_eq!(got, 401, "{json}");
    let (got, json) = post_raw(&url, None, &with(serde_json::json!({})));
    assert_eq!(got, 401, "{json}");
    let (got, json) = post_raw(
        &format!("{}/nothing", server.base_url),
        Some("sesame"),
        b"{}",
    );
    assert_eq!(got, 404, "{json}");

    // Still serving: a completion, with -inf-free log-probs, and a stream that ends with [DONE].
    let (got, json) = post_raw(
        &url,
        Some("sesame"),
        &with(serde_json::json!({"logprobs": true, "top_logprobs": 20, "n": 2})),
    );
    assert_eq!(got, 200, "{json}");
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["choices"].as_array().unwrap().len(), 2);
    for c in json["choices"].as_array().unwrap() {
        for t in c["logprobs"]["content"].as_array().unwrap() {
            assert!(t["logprob"].is_f64(), "{t}");
            assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 20);
            assert!(t["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| a["logprob"].is_f64()));
        }
    }
    assert!(json["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let stream = ureq::post(&url)
        .set("authorization", "Bearer sesame")
        .send_json(serde_json::json!({
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "temperature": 0, "stream": true, "stream_options": {"include_usage": true}
        }))
        .unwrap()
        .into_string()
        .unwrap();
    let data: Vec<&str> = stream
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{stream}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let (_, whole) = post_raw(&url, Some("sesame"), &with(serde_json::json!({})));
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let models: serde_json::Value = ureq::get(&format!("{}/models", server.base_url))
        .set("authorization", "Bearer sesame")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
}

#[test]
fn the_openai_python_sdk_works_against_the_server() {
    let server = serve(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_sdk.py");
    let out = Command::new(common::openai_sdk_python())
        .arg(script)
        .args([&server.base_url, MODEL])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{seen}");
    // The same greedy answer as the local engine gives.
    let local = LocalBackend::new(
        LoadedModel::load(&common::smollm2_gguf(), WeightMode::F32, &Device::Cpu).unwrap(),
        WeightMode::F32,
    )
    .unwrap();
    let want = local
        .chat(&[ChatRequest::greedy(
            vec![
                Message::new("system", ""),
                Message::new("user", "Name a colour."),
            ],
            12,
        )])
        .unwrap();
    assert_eq!(seen["plain"], want[0].choices[0].text.as_str(), "{seen}");
    assert_eq!(seen["stream"], seen["plain"], "{seen}");
    assert!(seen["usage"].as_u64().unwrap() > 0 && seen["stream_usage"] == seen["usage"]);
    assert_eq!(seen["n"], 4);
    assert_eq!(seen["seeded_repeat"], true, "{seen}");
    assert_eq!(seen["logprobs_ok"], true, "{seen}");
    assert_eq!(seen["logprob_text"], true, "{seen}");
    assert_eq!(seen["not_found"], 404, "{seen}");
    assert_eq!(seen["bad_request"][0], 400, "{seen}");
    assert_eq!(seen["bad_request"][1], "n", "{seen}");
    assert_eq!(seen["models"][0], MODEL, "{seen}");
}

#[test]
fn sigterm_lets_the_requests_in_flight_finish() {
    let mut server = serve(&[]);
    let url = format!("{}/chat/completions", server.base_url);
    let in_flight = std::thread::spawn(move || {
        post_raw(
            &url,
            None,
            &serde_json::to_vec(&serde_json::json!({
                "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 96, "temperature": 0
            }))
            .unwrap(),
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(400));
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let (status, json) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["choices"][0]["finish_reason"], "length", "{json}");
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// lm-eval-harness's `local-completions` loglikelihood request (token ids, echo, logprobs 1, max_tokens 1)
/// against transformers' references (../shared/golden/smollm2): the echoed prompt carries a log-prob for
/// every token but the first, each token of transformers' greedy continuation is the most likely one at
/// its position (lm-eval's `is_greedy`), the first one's log-prob is transformers' within 1e-3, and the
/// generated token's alternatives are transformers' top-10. Also its `local-chat-completions` shape.
#[test]
fn lm_eval_harness_requests_get_what_it_reads() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden().join("smollm2/cases.json")).unwrap(),
    )
    .unwrap();
    let server = serve(&[]);
    let url = format!("{}/completions", server.base_url);
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = cases["cases"].as_array().unwrap();
    // One batched request, as lm-eval sends them: context + continuation per row.
    let rows: Vec<(Vec<u32>, usize)> = cases
        .iter()
        .map(|c| {
            let prompt = ids(&c["prompt_ids"]);
            let cont = ids(&c["greedy_new_ids"]);
            let ctxlen = prompt.len();
            ([prompt, cont[..4].to_vec()].concat(), ctxlen)
        })
        .collect();
    let body = serde_json::json!({
        "model": MODEL, "prompt": rows.iter().map(|r| &r.0).collect::<Vec<_>>(),
        "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true
    });
    let (status, json) = post_raw(&url, None, &serde_json::to_vec(&body).unwrap());
    assert_eq!(status, 200, "{json}");
    let choices = json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), cases.len());
    for ((choice, (row, ctxlen)), case) in choices.iter().zip(&rows).zip(cases) {
        let lp = &choice["logprobs"];
        let token_logprobs = lp["token_logprobs"].as_array().unwrap();
        let tops = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(
            token_logprobs.len(),
            row.len() + 1,
            "echoed prompt + one new token"
        );
        assert!(token_logprobs[0].is_null() && tops[0].is_null());
        // lm-eval: sum(token_logprobs[ctxlen:-1]) and is_greedy over the same slice.
        let mut sum = 0.0;
        for j in *ctxlen..row.len() {
            let v = token_logprobs[j].as_f64().unwrap();
            let best = tops[j]
                .as_object()
                .unwrap()
                .values()
                .map(|x| x.as_f64().unwrap())
                .fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(v, best, "{}: token {j} is not the greedy one", case["name"]);
            sum += v;
        }
        assert!(sum < 0.0 && sum.is_finite());
        let want = case["first_token_top10"][0]["logprob"].as_f64().unwrap();
        let got = token_logprobs[*ctxlen].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-3,
            "{}: {got} vs {want}",
            case["name"]
        );
        assert_eq!(lp["tokens"].as_array().unwrap().len(), row.len() + 1);
        let offsets = lp["text_offset"].as_array().unwrap();
        assert!(offsets.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()));
        assert!(choice["text"].as_str().unwrap().len() > 10);
    }
    // The generated token's ten alternatives after the bare prompt: transformers' top-10.
    let case = &cases[0];
    let body = serde_json::json!({
        "model": MODEL, "prompt": ids(&case["prompt_ids"]), "temperature": 0, "max_tokens": 1,
        "logprobs": 10
    });
    let (status, json) = post_raw(&url, None, &serde_json::to_vec(&body).unwrap());
    assert_eq!(status, 200, "{json}");
    let top = json["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap()
        .clone();
    for want in case["first_token_top10"].as_array().unwrap() {
        let got = top[want["token"].as_str().unwrap()].as_f64().unwrap();
        assert!(
            (got - want["logprob"].as_f64().unwrap()).abs() < 1e-3,
            "{want} vs {got}"
        );
    }
    assert_eq!(json["choices"][0]["text"], "de");
    // A string prompt, a list of strings with n = 2, and bad ones.
    let body = serde_json::json!({"model": MODEL, "prompt": ["The sea is", "Cats are"], "max_tokens": 4,
        "temperature": 0.0, "n": 2});
    let (status, json) = post_raw(&url, None, &serde_json::to_vec(&body).unwrap());
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["choices"].as_array().unwrap().len(), 4);
    assert_eq!(json["choices"][3]["index"], 3);
    for (bad, param) in [
        (
            serde_json::json!({"model": MODEL, "prompt": [[]]}),
            "prompt",
        ),
        (
            serde_json::json!({"model": MODEL, "prompt": [[99999999]]}),
            "prompt",
        ),
        (
            serde_json::json!({"model": MODEL, "prompt": "x", "logprobs": 21}),
            "logprobs",
        ),
        (
            serde_json::json!({"model": MODEL, "prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
    ] {
        let (status, json) = post_raw(&url, None, &serde_json::to_vec(&bad).unwrap());
        assert_eq!(status, 400, "{bad}: {json}");
        assert_eq!(json["error"]["param"], param, "{json}");
    }
    // local-chat-completions: messages, max_tokens, temperature, stop[:4], seed.
    let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Count: 1, 2,"}],
        "max_tokens": 16, "temperature": 0, "stop": ["\n\n", "7"], "seed": 1234});
    let (status, json) = post_raw(
        &format!("{}/chat/completions", server.base_url),
        None,
        &serde_json::to_vec(&body).unwrap(),
    );
    assert_eq!(status, 200, "{json}");
    assert!(json["choices"][0]["message"]["content"].is_string());
}

#[test]
fn a_small_load_test_has_no_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("load.json");
    let stdout = ok(exe()
        .args([
            "load-test",
            "--model",
            MODEL,
            "--clients",
            "8",
            "--requests",
            "40",
        ])
        .args(["--max-tokens", "4", "--json"])
        .arg(&json));
    assert!(
        stdout.contains("| server, 8 clients | 40 | 0 |"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["errors"], 0);
    assert!(report["completion_tokens"].as_u64().unwrap() >= 40);
    assert!(report["peak_rss_gib"].as_f64().unwrap() > 0.0);
}

/// POSTs a streaming chat request and hands each server-sent event's JSON to `seen` as it arrives,
/// until `[DONE]` or until `seen` returns false (then the connection is dropped mid-stream).
fn stream_chat(
    url: &str,
    body: &serde_json::Value,
    seen: &mut dyn FnMut(serde_json::Value) -> bool,
) {
    let mut body = body.clone();
    body["stream"] = serde_json::json!(true);
    let response = ureq::post(url).send_json(body).unwrap();
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let reader = std::io::BufReader::new(response.into_reader());
    for line in std::io::BufRead::lines(reader) {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return;
        }
        if !seen(serde_json::from_str(data).unwrap()) {
            return;
        }
    }
    panic!("the stream ended without [DONE]");
}

/// A streamed answer's text, log-prob entries and finish reason (choice 0), from its events.
fn streamed(events: &[serde_json::Value]) -> (String, Vec<serde_json::Value>, String) {
    let mut text = String::new();
    let mut logprobs = vec![];
    let mut finish = String::new();
    for e in events {
        let c = &e["choices"][0];
        if c["index"] != 0 {
            continue;
        }
        text += c["delta"]["content"].as_str().unwrap_or_default();
        if let Some(lp) = c["logprobs"]["content"].as_array() {
            logprobs.extend(lp.iter().cloned());
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, logprobs, finish)
}

#[test]
fn streams_arrive_token_by_token_and_short_requests_overtake_long_ones() {
    let server = serve(&[]);
    let url = format!("{}/chat/completions", server.base_url);
    let long = serde_json::json!({"model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to read."}],
        "max_tokens": 160, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = {
        let (url, long) = (url.clone(), long.clone());
        std::thread::spawn(move || stream_chat(&url, &long, &mut |e| tx.send(e).is_ok()))
    };
    let mut events = vec![];
    // Wait until the long answer is decoding (its first words arrived).
    while !events.iter().any(|e: &serde_json::Value| {
        e["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    }) {
        events.push(rx.recv().unwrap());
    }
    // A short request joins the decoding batch and is answered while the long one still streams.
    let short = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4, "temperature": 0});
    let (status, json) = post_raw(&url, None, &serde_json::to_vec(&short).unwrap());
    assert_eq!(status, 200, "{json}");
    events.extend(rx.try_iter());
    assert!(
        events
            .iter()
            .all(|e| e["choices"][0]["finish_reason"].is_null()),
        "the long answer ended before the short one"
    );
    reader.join().unwrap();
    events.extend(rx.try_iter());
    let (text, logprobs, finish) = streamed(&events);
    let deltas = events
        .iter()
        .filter(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    assert_eq!(finish, "length");
    assert!(deltas >= 100, "{deltas} text deltas for 160 tokens");
    // Exactly the answer the request gets without streaming, log-probs included.
    let (status, whole) = post_raw(&url, None, &serde_json::to_vec(&long).unwrap());
    assert_eq!(status, 200, "{whole}");
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        logprobs,
        whole["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone()
    );
    // A stop string the text runs into: the stream holds back what may begin it and ends where the
    // whole answer is cut.
    let stop = serde_json::json!({"model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to read."}],
        "max_tokens": 40, "temperature": 0, "stop": [" the"], "n": 2, "seed": 3});
    let mut events = vec![];
    stream_chat(&url, &stop, &mut |e| {
        events.push(e);
        true
    });
    let (status, whole) = post_raw(&url, None, &serde_json::to_vec(&stop).unwrap());
    assert_eq!(status, 200, "{whole}");
    let (text, _, finish) = streamed(&events);
    assert_eq!(
        finish,
        whole["choices"][0]["finish_reason"].as_str().unwrap()
    );
    assert_eq!(finish, "stop", "{whole}");
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_rows() {
    // One row: a second request waits until the first leaves the batch.
    let server = common::serve_with(&["--batch-size", "1"], &[("RUST_LOG", "introspect=info")]);
    let url = format!("{}/chat/completions", server.base_url);
    let long = serde_json::json!({"model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 2000, "temperature": 0});
    let mut got = 0;
    stream_chat(&url, &long, &mut |e| {
        got += usize::from(
            e["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
        );
        got < 3
    });
    let short = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4, "temperature": 0});
    let (status, json) = post_raw(&url, None, &serde_json::to_vec(&short).unwrap());
    assert_eq!(status, 200, "{json}");
    let log = server.log.lock().unwrap().join("\n");
    assert!(
        log.contains("requests whose clients went away left the batch"),
        "{log}"
    );
}
