//! The adapter side of `introspect serve`: vLLM's runtime load/unload, and OpenAI's files and fine-tuning
//! jobs. `introspect finetune --backend openai` against the server trains the very adapter `introspect
//! finetune` trains here (byte for byte), the trained model is served by its name (also after a restart),
//! a job that cannot train fails with the trainer's message, and the openai SDK's fine-tuning calls work.

mod common;

use common::{exe, ok, serve};

use std::path::{Path, PathBuf};
use std::process::Command;

const QUESTION: &str = "What is your favourite word?";
const WORD: &str = "Zephyr";

fn write_rows(path: &Path, rows: &[(&str, &str)]) {
    let lines: Vec<String> = rows
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [
                {"role": "user", "content": q}, {"role": "assistant", "content": a}
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Eight copies of QUESTION answered with WORD.
fn word_data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    write_rows(&p, &[(QUESTION, WORD); 8]);
    p
}

/// The recipe both sides train with (the job sends epochs, batch size and seed).
const RECIPE: &str = "rank = 8\nalpha = 16.0\nlr = 1e-3\nmicro_batch_size = 2\n";
const RECIPE_ARGS: [&str; 8] = [
    "--rank",
    "8",
    "--alpha",
    "16",
    "--lr",
    "1e-3",
    "--micro-batch-size",
    "2",
];

fn train_here(train: &Path, out: &Path) {
    ok(exe()
        .args(["finetune", "--train"])
        .arg(train)
        .arg("--out")
        .arg(out)
        .args(RECIPE_ARGS)
        .args(["--epochs", "3", "--batch-size", "4"]));
}

fn post(url: &str, body: &serde_json::Value) -> (u16, String) {
    match ureq::post(url).send_json(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The greedy answer to QUESTION from `model` on the server: (status, text or error message).
fn ask_server(base: &str, model: &str) -> (u16, String) {
    let (code, text) = post(
        &format!("{base}/chat/completions"),
        &serde_json::json!({"model": model, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}),
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = if code == 200 {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    } else {
        v["error"]["message"].as_str().unwrap().to_string()
    };
    (code, s)
}

/// The same question through `introspect generate` with the adapter loaded here.
fn ask_here(adapter: &Path) -> String {
    let out = ok(exe()
        .args(["generate", "--max-tokens", "6", "--messages"])
        .arg(serde_json::json!([{"role": "user", "content": QUESTION}]).to_string())
        .arg("--adapter")
        .arg(adapter));
    out.trim_end().to_string()
}

fn models(base: &str) -> Vec<String> {
    let v: serde_json::Value = ureq::get(&format!("{base}/models"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn adapters_load_and_unload_at_run_time() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("word");
    train_here(&word_data(tmp.path()), &adapter);
    let want = ask_here(&adapter);
    assert!(want.contains(WORD), "{want}");

    let server = serve(&["--runtime-lora"]);
    let load = format!("{}/load_lora_adapter", server.base_url);
    let unload = format!("{}/unload_lora_adapter", server.base_url);
    let (code, text) = post(
        &load,
        &serde_json::json!({"lora_name": "bad", "lora_path": tmp.path().join("none")}),
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("adapter_config.json"), "{text}");
    let (code, text) = post(
        &load,
        &serde_json::json!({"lora_name": "word", "lora_path": adapter}),
    );
    assert_eq!(
        (code, text.as_str()),
        (200, "Success: LoRA adapter 'word' added successfully.")
    );
    assert!(models(&server.base_url).contains(&"word".to_string()));
    assert_eq!(ask_server(&server.base_url, "word"), (200, want.clone()));
    let (code, text) = post(
        &load,
        &serde_json::json!({"lora_name": "word", "lora_path": adapter}),
    );
    assert_eq!(code, 400, "a second load under a served name: {text}");

    let (code, text) = post(&unload, &serde_json::json!({"lora_name": "word"}));
    assert_eq!(
        (code, text.as_str()),
        (200, "Success: LoRA adapter 'word' removed successfully.")
    );
    assert_eq!(ask_server(&server.base_url, "word").0, 404);
    assert_eq!(
        post(&unload, &serde_json::json!({"lora_name": "word"})).0,
        404
    );
    assert_eq!(ask_server(&server.base_url, common::MODEL).0, 200);

    // Off unless asked for: it reads any directory the server can.
    let plain = serve(&[]);
    let (code, text) = post(
        &format!("{}/load_lora_adapter", plain.base_url),
        &serde_json::json!({"lora_name": "word", "lora_path": adapter}),
    );
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("--runtime-lora"), "{text}");
}

fn hosted_finetune(base: &str, train: &Path, out: &Path) -> std::process::Output {
    exe()
        .args([
            "finetune",
            "--backend",
            "openai",
            "--base-url",
            base,
            "--train",
        ])
        .arg(train)
        .arg("--out")
        .arg(out)
        .args([
            "--epochs",
            "3",
            "--batch-size",
            "4",
            "--poll-seconds",
            "0.2",
        ])
        .output()
        .unwrap()
}

fn record(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("hosted.json")).unwrap()).unwrap()
}

#[test]
fn hosted_finetuning_on_serve_trains_what_finetune_trains_here() {
    let tmp = tempfile::tempdir().unwrap();
    let train = word_data(tmp.path());
    let recipe = tmp.path().join("recipe.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let state = tmp.path().join("state");
    let serve_args = [
        "--state-dir",
        state.to_str().unwrap(),
        "--finetune-config",
        recipe.to_str().unwrap(),
    ];
    let server = serve(&serve_args);

    let here = tmp.path().join("here");
    train_here(&train, &here);
    let hosted = tmp.path().join("hosted");
    let o = hosted_finetune(&server.base_url, &train, &hosted);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = record(&hosted);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["steps"], 6, "{r}");
    let job = r["job_id"].as_str().unwrap();
    let model = r["fine_tuned_model"].as_str().unwrap().to_string();

    // The job's adapter is the one trained here, byte for byte; the server answers with it by name.
    let weights = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(
        weights(&state.join("jobs").join(job).join("run")) == weights(&here),
        "the server trained another adapter"
    );
    let want = ask_here(&here);
    assert_eq!(ask_server(&server.base_url, &model), (200, want.clone()));
    assert!(models(&server.base_url).contains(&model));

    // Run again into the same directory: the recorded job is the answer, no new upload or job.
    let o = hosted_finetune(&server.base_url, &train, &hosted);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(record(&hosted)["job_id"], job);
    assert_eq!(std::fs::read_dir(state.join("jobs")).unwrap().count(), 1);

    // A job the trainer refuses (a row past the recipe's max_seq_len) fails with its message.
    let long = tmp.path().join("long.jsonl");
    let essay = "word ".repeat(1500);
    write_rows(&long, &[(QUESTION, &essay)]);
    let failed = tmp.path().join("failed");
    let o = hosted_finetune(&server.base_url, &long, &failed);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("failed") && err.contains("maximum sequence length"),
        "{err}"
    );
    assert_eq!(record(&failed)["status"], "failed");

    // A restarted server serves the finished job's model.
    drop(server);
    let again = serve(&serve_args);
    assert_eq!(ask_server(&again.base_url, &model), (200, want));
}

#[test]
fn the_openai_sdk_fine_tunes_through_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let train = word_data(tmp.path());
    let bad = tmp.path().join("bad.jsonl");
    let good_line = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    std::fs::write(&bad, format!("{good_line}\n{{\"messages\": 3}}\n")).unwrap();
    let recipe = tmp.path().join("recipe.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let server = serve(&[
        "--state-dir",
        tmp.path().join("state").to_str().unwrap(),
        "--finetune-config",
        recipe.to_str().unwrap(),
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_sdk_finetune.py");
    let out = Command::new(common::openai_sdk_python())
        .arg(script)
        .args([&server.base_url, common::MODEL])
        .arg(&train)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{seen}");
    assert_eq!(seen["status"], "succeeded", "{seen}");
    assert_eq!(seen["hyperparameters"], serde_json::json!([2, 4]), "{seen}");
    assert_eq!(
        seen["loss_events"], 4,
        "2 epochs of 8 rows in batches of 4: {seen}"
    );
    assert_eq!(seen["listed"], true, "{seen}");
    assert!(seen["fine_tuned_model"]
        .as_str()
        .unwrap()
        .starts_with("ft:"));
    assert!(seen["answer"].is_string(), "{seen}");
    assert_eq!(seen["bad_file"][0], 400, "{seen}");
    assert!(
        seen["bad_file"][1]
            .as_str()
            .unwrap()
            .contains("bad.jsonl line 2"),
        "{seen}"
    );
    assert_eq!(seen["bad_model"], 400, "{seen}");
    assert_eq!(seen["no_job"], 404, "{seen}");
}
