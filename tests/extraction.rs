//! LLM-extracted properties end to end on SmolLM2 (spec §2.2): stories and advice answered, the
//! extractor reading each answer through the authors' prompt into `extracted/<property>/` (resumable,
//! logged, its prompt recorded), the values merged into the object run and scored like any property.

mod common;

use common::{exe, ok};

use introspect::runs::{read_run, RunKind};
use introspect::tasks::text::py_strip;
use introspect::tasks::{complies, Property};

#[test]
fn extracted_properties_are_read_logged_and_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Instructions and letters written for this test (the paper's files are not released).
    let strings = t.join("strings.jsonl");
    std::fs::write(
        &strings,
        [
            "Write a short story about a lighthouse keeper who finds a message in a bottle.",
            "Write a short story set on a train crossing the mountains at night.",
            "Write a short story about a baker who loses her sense of taste.",
        ]
        .map(|s| format!("{{\"string\": {s:?}}}\n"))
        .concat(),
    )
    .unwrap();
    let letters = t.join("letters.jsonl");
    std::fs::write(
        &letters,
        [
            "My roommate never cleans the kitchen and I am tired of doing it alone.",
            "My brother borrowed money two years ago and never paid it back.",
        ]
        .map(|s| format!("{{\"string\": {s:?}}}\n"))
        .concat(),
    )
    .unwrap();
    for (task, file) in [
        ("writing_stories_pick_name", &strings),
        ("dear_abbie", &letters),
    ] {
        ok(exe()
            .args(["dataset", "build", "--task", task, "--strings"])
            .arg(file)
            .arg("--out")
            .arg(t.join("ds")));
    }
    let stories = t.join("ds/writing_stories_pick_name_main_character_name.jsonl");
    let advice = t.join("ds/dear_abbie_sympathetic_advice.jsonl");
    let obj = t.join("obj");
    ok(exe()
        .args(["object", "--max-tokens", "48", "--data"])
        .arg(&stories)
        .arg(&advice)
        .arg("--out")
        .arg(&obj));
    // Before extraction the values are undefined: no rule gives them.
    let (_, before) = read_run(&obj, RunKind::Object).unwrap();
    assert!(before
        .iter()
        .all(|r| r.value(Property::MainCharacterName).is_none()
            && r.value(Property::SympatheticAdvice).is_none()));

    let stdout = ok(exe().args(["extract", "--out"]).arg(&obj));
    assert!(
        stdout.contains("extracted main_character_name: 3 rows (3 new"),
        "{stdout}"
    );
    assert!(
        stdout.contains("extracted sympathetic_advice: 2 rows (2 new"),
        "{stdout}"
    );
    for p in [Property::MainCharacterName, Property::SympatheticAdvice] {
        let dir = obj.join("extracted").join(p.name());
        // The prompt is recorded; the extractor's settings and answers are a run like any other.
        let recorded: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("extraction.json")).unwrap())
                .unwrap();
        assert_eq!(recorded["prompt"], p.extraction_prompt().unwrap());
        let (settings, answers) = read_run(&dir, RunKind::Hypothetical).unwrap();
        assert_eq!(settings.system, None);
        assert_eq!(settings.temperature, 0.0);
        // Merged: each answer's value is the extractor's answer, stripped, where it complied.
        let (_, records) = read_run(&obj, RunKind::Object).unwrap();
        for a in &answers {
            let r = records.iter().find(|r| r.string == a.string).unwrap();
            let response = a.response.as_deref().unwrap();
            let expected = complies(response, &[p.hypothetical_group()])
                .then(|| py_strip(response).to_string());
            assert_eq!(r.value(p), expected, "{a:?}");
        }
    }
    // Again: resumed, nothing new.
    let again = ok(exe().args(["extract", "--out"]).arg(&obj));
    assert!(again.contains("3 rows (0 new"), "{again}");

    // The hypothetical questions and the evaluation read the extracted values.
    let hyp = t.join("hyp");
    ok(exe()
        .args(["hypothetical", "--data"])
        .arg(&stories)
        .arg(&advice)
        .arg("--out")
        .arg(&hyp)
        .arg("--filter-by")
        .arg(&obj));
    let report = ok(exe()
        .args(["evaluate", "--object"])
        .arg(&obj)
        .arg("--hypothetical")
        .arg(&hyp));
    assert!(
        report.contains("| writing_stories_pick_name | main_character_name |")
            && report.contains("| dear_abbie | sympathetic_advice |"),
        "{report}"
    );

    // An object run of tasks without such properties has nothing to extract, and says so.
    let refused = exe()
        .args(["extract", "--out"])
        .arg(t.join("nothing"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
}
