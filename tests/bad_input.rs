//! Bad input gives a clear error naming the file and the field, a non-zero exit, and never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Runs `introspect generate --model MODEL` and returns stderr, asserting a clean failure.
fn generate_fails(model: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_introspect"))
        .args([
            "generate",
            "--max-tokens",
            "2",
            "--messages",
            r#"[{"role":"user","content":"hi"}]"#,
            "--model",
        ])
        .arg(model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure for {}",
        model.display()
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    err
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error should mention {p:?}: {err}");
    }
}

/// A copy of tiny-llama3 whose config.json is edited by `edit`.
fn tiny_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = common::golden().join("tiny-llama3");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    dir
}

/// SmolLM2 exported to HF layout once; variants link to its weights.
fn smollm2_hf() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("smollm2-hf");
        introspect::model::export::export_hf(&common::smollm2_gguf(), None, &p).unwrap();
        (d, p)
    })
    .1
}

fn smollm2_variant(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(smollm2_hf()).unwrap() {
        let p = entry.unwrap().path();
        std::os::unix::fs::symlink(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    edit(dir.path());
    dir
}

#[test]
fn missing_model_path() {
    let err = generate_fails(Path::new("/nonexistent/model.gguf"));
    assert_mentions(&err, &["/nonexistent/model.gguf"]);
}

#[test]
fn missing_tokenizer_json() {
    let dir = tiny_with_config(|_| {});
    assert_mentions(&generate_fails(dir.path()), &["tokenizer.json"]);
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_with_config(|_| {});
    let f = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(
        &generate_fails(dir.path()),
        &["model.safetensors", "truncated"],
    );
}

#[test]
fn corrupt_safetensors_header() {
    let dir = tiny_with_config(|_| {});
    let f = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&f, bytes).unwrap();
    assert_mentions(&generate_fails(dir.path()), &["model.safetensors"]);
}

#[test]
fn corrupt_and_truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(
        &bad,
        b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xffgarbage",
    )
    .unwrap();
    assert_mentions(&generate_fails(&bad), &["bad.gguf", "header"]);
    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, b"this is not a gguf file at all").unwrap();
    assert_mentions(&generate_fails(&not_gguf), &["text.gguf"]);
    let real = std::fs::read(common::smollm2_gguf()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &real[..real.len() - 1_000_000]).unwrap();
    assert_mentions(&generate_fails(&cut), &["cut.gguf", "tensor"]);
}

#[test]
fn tensor_of_the_wrong_shape() {
    let dir = tiny_with_config(|c| c["intermediate_size"] = 96.into());
    assert_mentions(
        &generate_fails(dir.path()),
        &["model.layers.0.mlp.gate_proj.weight", "shape"],
    );
}

#[test]
fn out_of_range_config_fields() {
    let dir = tiny_with_config(|c| c["num_key_value_heads"] = 3.into());
    assert_mentions(
        &generate_fails(dir.path()),
        &["config.json", "num_key_value_heads"],
    );
    let dir = tiny_with_config(|c| c["rms_norm_eps"] = (-1.0).into());
    assert_mentions(
        &generate_fails(dir.path()),
        &["config.json", "rms_norm_eps"],
    );
    let dir = tiny_with_config(|c| c["hidden_size"] = "wide".into());
    assert_mentions(&generate_fails(dir.path()), &["config.json", "hidden_size"]);
    let dir = tiny_with_config(|c| c["rope_scaling"]["rope_type"] = "yarn".into());
    assert_mentions(
        &generate_fails(dir.path()),
        &["config.json", "rope_scaling", "yarn"],
    );
    let dir = tiny_with_config(|c| c["eos_token_id"] = 100000.into());
    assert_mentions(
        &generate_fails(dir.path()),
        &["config.json", "eos_token_id"],
    );
}

#[test]
fn unknown_architecture() {
    let dir = tiny_with_config(|c| {
        c["model_type"] = "gpt2".into();
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    });
    assert_mentions(
        &generate_fails(dir.path()),
        &["config.json", "model_type", "gpt2"],
    );
}

#[test]
fn template_that_fails_to_render() {
    let dir = smollm2_variant(|d| {
        let p = d.join("tokenizer_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg["chat_template"] = "{% if messages|length < 2 %}{{ raise_exception('needs a system message') }}{% endif %}".into();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, cfg.to_string()).unwrap();
    });
    assert_mentions(
        &generate_fails(dir.path()),
        &[
            "tokenizer_config.json",
            "chat_template",
            "needs a system message",
        ],
    );
}

#[test]
fn template_that_does_not_parse() {
    let dir = smollm2_variant(|d| {
        let p = d.join("tokenizer_config.json");
        std::fs::remove_file(&p).unwrap();
        std::fs::write(
            &p,
            r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#,
        )
        .unwrap();
    });
    assert_mentions(
        &generate_fails(dir.path()),
        &["tokenizer_config.json", "chat_template", "parse"],
    );
}

#[test]
fn malformed_messages_file_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.jsonl");
    std::fs::write(&f, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"messages\": [{\"role\": \"user\"}]}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_introspect"))
        .args(["generate", "--messages-file"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_mentions(&err, &["in.jsonl:2", "messages"]);
}
