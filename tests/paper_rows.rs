//! The paper's released DataRow files, rebuilt byte for byte from (original_question, original_dataset,
//! behavioral_property), and `introspect dataset validate` on good and tampered files.

mod common;

use std::process::Command;

use introspect::tasks::datarow::{parse_line, validate_file, DataRow};

fn release_files() -> Vec<std::path::PathBuf> {
    let dir = common::shared().join("datasets/looking-inward/train");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 24,
        "expected the 24 released train files in {}",
        dir.display()
    );
    files
}

#[test]
fn every_released_row_is_rebuilt_byte_for_byte() {
    let mut rows = 0;
    for path in release_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            let origin = format!("{}:{}", path.display(), i + 1);
            let got = parse_line(line, &origin).unwrap();
            let rebuilt = DataRow::build(
                got.task,
                &got.row.original_question,
                got.property,
                got.row.target(),
            )
            .unwrap();
            assert_eq!(rebuilt.to_line(), line, "{origin}");
            rows += 1;
        }
    }
    assert_eq!(rows, 20_765);
}

#[test]
fn validate_accepts_the_release_and_names_the_first_difference() {
    let files = release_files();
    let report = validate_file(&files[0]).unwrap();
    assert_eq!((report.rows, report.layout_differs), (458, 0));

    // One changed character on row 3's hypothetical prompt.
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(
        common::shared().join("datasets/looking-inward/train/wealth_seeking_ethical_stance.jsonl"),
    )
    .unwrap();
    let mut lines: Vec<String> = src.lines().map(String::from).collect();
    lines[2] = lines[2].replacen("the more wealth-seeking", "the more wealth seeking", 1);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let err = format!("{:#}", validate_file(&bad).unwrap_err());
    assert!(err.contains("bad.jsonl:3"), "{err}");
    assert!(err.contains("hypothetical_prompt"), "{err}");

    let exe = env!("CARGO_BIN_EXE_introspect");
    let ok = Command::new(exe)
        .args(["dataset", "validate"])
        .args(&files[..3])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = Command::new(exe)
        .args(["dataset", "validate"])
        .arg(&files[0])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.jsonl:3") && stderr.contains("hypothetical_prompt"),
        "{stderr}"
    );

    // A row whose task is unknown names the field.
    std::fs::write(&bad, lines[0].replace("wealth_seeking", "wealth_hunting")).unwrap();
    let err = format!("{:#}", validate_file(&bad).unwrap_err());
    assert!(
        err.contains("bad.jsonl:1") && err.contains("original_dataset"),
        "{err}"
    );
}
