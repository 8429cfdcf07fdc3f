//! `--model org/name` resolves through the hf-hub cache ($HF_HOME/hub), as a downloaded Llama-3 would.

mod common;

use std::process::Command;

#[test]
fn repo_id_resolves_to_the_snapshot_in_the_hub_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--local--smollm2-hf");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    introspect::model::export::export_hf(&common::smollm2_gguf(), None, &snap).unwrap();

    let msg = r#"[{"role":"user","content":"What is the next 5 animals in the following text? Respond only with the next 5 animals and nothing else, including punctuation.\ndeer cow deer chicken fish rabbit deer rat rabbit panda \n"}]"#;
    let out = Command::new(env!("CARGO_BIN_EXE_introspect"))
        .args([
            "generate",
            "--model",
            "local/smollm2-hf",
            "--max-tokens",
            "6",
            "--messages",
            msg,
        ])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The golden greedy start for this prompt (no_system case): "deer cow chicken fish rabbit".
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deer cow chicken fish rabbit"
    );
}
