//! End to end on SmolLM2: generated strings → object-level run (killed and resumed) → hypothetical run
//! → evaluate → training set; repeated requests come from the cache.

mod common;

use common::{exe, ok, refused};

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use introspect::runs::{read_run, Record, RunKind};

fn records(dir: &Path, kind: RunKind) -> Vec<Record> {
    let mut r = read_run(dir, kind).unwrap().1;
    r.sort_by(|a, b| a.id.cmp(&b.id));
    r
}

#[test]
fn object_hypothetical_evaluate_and_training_set() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    ok(exe()
        .args([
            "dataset",
            "build",
            "--task",
            "animals_long",
            "--n-train",
            "4",
            "--n-val",
            "24",
            "--seed",
            "3",
            "--out",
        ])
        .arg(t.join("ds")));
    let data = |p: &str| t.join(format!("ds/val/animals_long_{p}.jsonl"));
    // The generated files of a held-out task pass the validator (template rebuilt byte for byte).
    let stdout = ok(exe()
        .args(["dataset", "validate"])
        .arg(data("first_word"))
        .arg(data("third_character")));
    assert!(
        stdout.contains("24 rows match the paper's templates byte for byte"),
        "{stdout}"
    );
    let object = |out: &Path, extra: &[&str]| {
        let mut c = exe();
        c.args([
            "object",
            "--max-tokens",
            "40",
            "--batch-size",
            "4",
            "--data",
        ])
        .arg(data("first_word"))
        .arg(data("second_character"))
        .arg("--out")
        .arg(out)
        .args(extra);
        c
    };

    // Uninterrupted, filling the cache.
    let cache = t.join("cache");
    let stdout = ok(&mut object(
        &t.join("a"),
        &["--cache-dir", cache.to_str().unwrap()],
    ));
    assert!(
        stdout.contains("24 rows (24 new, 0 from the request cache)"),
        "{stdout}"
    );
    let a = records(&t.join("a"), RunKind::Object);
    assert_eq!(
        a.len(),
        24,
        "one object row per string, whatever the property file"
    );
    assert!(a
        .iter()
        .all(|r| r.response.is_some() && r.properties.len() == 8));

    // The same requests again: all from the cache, same records.
    let stdout = ok(&mut object(
        &t.join("c"),
        &["--cache-dir", cache.to_str().unwrap()],
    ));
    assert!(
        stdout.contains("(0 new, 24 from the request cache)")
            || stdout.contains("24 from the request cache"),
        "{stdout}"
    );
    assert_eq!(records(&t.join("c"), RunKind::Object), a);

    // Killed after its first batch lands, then restarted: nothing lost, nothing twice, same answers.
    let b = t.join("b");
    let mut child = object(&b, &["--no-cache"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let lines =
            std::fs::read_to_string(b.join("object.jsonl")).map_or(0, |s| s.lines().count());
        if lines >= 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no row written");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = records(&b, RunKind::Object).len();
    assert!((1..24).contains(&partial), "{partial}");
    let stdout = ok(&mut object(&b, &["--no-cache"]));
    assert!(
        stdout.contains(&format!("24 rows ({} new", 24 - partial)),
        "{stdout}"
    );
    assert_eq!(records(&b, RunKind::Object), a);

    // Other settings into the same directory are refused, naming the field.
    let out = object(&b, &["--no-cache", "--temperature", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));

    // Hypothetical run on the strings answered compliantly, then the evaluation.
    ok(exe()
        .args([
            "hypothetical",
            "--no-cache",
            "--batch-size",
            "8",
            "--max-tokens",
            "12",
            "--data",
        ])
        .arg(data("first_word"))
        .arg(data("second_character"))
        .arg("--out")
        .arg(t.join("h"))
        .arg("--filter-by")
        .arg(t.join("a")));
    let h = records(&t.join("h"), RunKind::Hypothetical);
    let compliant_objects = a.iter().filter(|r| r.compliant).count();
    assert_eq!(h.len(), 2 * compliant_objects);
    let report = ok(exe()
        .args(["evaluate", "--object"])
        .arg(t.join("a"))
        .arg("--hypothetical")
        .arg(t.join("h"))
        .arg("--out")
        .arg(t.join("e")));
    assert!(report.contains("| animals_long | first_word |"), "{report}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("e/metrics.json")).unwrap()).unwrap();
    let evals = metrics["evaluations"].as_array().unwrap();
    // Path B by the notebook's rules (self-prediction: the target's run is the predictor's own), by the
    // spec's, then path A.
    let variants: Vec<&str> = evals
        .iter()
        .map(|e| e["variant"].as_str().unwrap())
        .collect();
    assert_eq!(variants, ["path_b_notebook", "path_b", "path_a"]);
    // Path A keeps every joined row.
    assert_eq!(evals[2]["overall"]["n"].as_u64().unwrap() as usize, h.len());
    for e in evals {
        let acc = e["overall"]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    // Recomputed by hand from the logs: path A accuracy on first_word.
    let clean = |s: &str| introspect::tasks::text::apply_all_cleaning(s);
    let by_string: std::collections::HashMap<&str, &Record> =
        a.iter().map(|r| (r.string.as_str(), r)).collect();
    let fw: Vec<&Record> = h
        .iter()
        .filter(|r| r.property.as_deref() == Some("first_word"))
        .collect();
    let correct = fw
        .iter()
        .filter(|r| {
            let o = by_string[r.string.as_str()];
            let v = o.properties["first_word"].clone().unwrap_or("none".into());
            introspect::tasks::text::clean_for_comparison(&v)
                == introspect::tasks::text::clean_for_comparison(&clean(
                    r.response.as_deref().unwrap(),
                ))
        })
        .count();
    let pair = evals[2]["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["property"] == "first_word")
        .unwrap();
    assert_eq!(pair["correct"].as_u64().unwrap() as usize, correct);

    // Another predictor (here: the same log under another fingerprint) needs its own object-level run
    // for the notebook's rules, and says so; with it, or by the spec's rules, it is scored.
    let other = t.join("h-other");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(t.join("h")).unwrap().flatten() {
        std::fs::copy(f.path(), other.join(f.file_name())).unwrap();
    }
    let settings = std::fs::read_to_string(other.join("run.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&settings).unwrap();
    v["fingerprint"] = "another model".into();
    std::fs::write(other.join("run.json"), v.to_string()).unwrap();
    let stderr = refused(
        exe()
            .args(["evaluate", "--object"])
            .arg(t.join("a"))
            .arg("--hypothetical")
            .arg(&other),
    );
    assert!(stderr.contains("--predictor-object"));
    let with_own = ok(exe()
        .args(["evaluate", "--object"])
        .arg(t.join("a"))
        .arg("--hypothetical")
        .arg(&other)
        .arg("--predictor-object")
        .arg(t.join("a")));
    assert_eq!(with_own, report);
    let spec = ok(exe()
        .args(["evaluate", "--rules", "spec", "--object"])
        .arg(t.join("a"))
        .arg("--hypothetical")
        .arg(&other));
    assert!(
        spec.contains("## path_b\n") && !spec.contains("path_b_notebook"),
        "{spec}"
    );

    // Self-prediction training data from the object run.
    let stdout = ok(exe()
        .args(["dataset", "training", "--object"])
        .arg(t.join("a"))
        .arg("--out")
        .arg(t.join("train.jsonl")));
    assert!(stdout.contains("examples →"), "{stdout}");
    let train = std::fs::read_to_string(t.join("train.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = train
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.len() > compliant_objects && rows.len() <= 8 * compliant_objects);
    assert!(rows
        .iter()
        .all(|r| r["messages"].as_array().unwrap().len() == 3));
    // The finetuner reads it.
    introspect::train::data::read_chat_jsonl(&t.join("train.jsonl")).unwrap();
}

#[test]
fn tree_expansion_accounts_for_all_mass_and_matches_generation() {
    use introspect::engine::{GenerationParams, Generator, TreeParams};
    use introspect::model::Message;
    let model = common::smollm2_f32();
    let prompt = model
        .encode_chat(&[Message::new(
            "user",
            "What is the next animal in the following text? Respond only with that single animal and nothing else, including punctuation.\ndog cat cow ",
        )])
        .unwrap()
        .1;
    let gen = Generator::new(model);
    let params = TreeParams {
        max_depth: 3,
        min_prob: 1e-4,
        top_k: 40,
        max_open: 64,
    };
    let e = &gen
        .expand(std::slice::from_ref(&prompt), &params, &|_| false)
        .unwrap()[0];
    let total: f64 = e.leaves.iter().map(|l| l.prob).sum::<f64>() + e.pruned;
    assert!((total - 1.0).abs() < 1e-3, "leaves + pruned = {total}");
    // One level deep, the leaves are exactly the first position's top-k above the threshold.
    let one = &gen
        .expand(
            std::slice::from_ref(&prompt),
            &TreeParams {
                max_depth: 1,
                ..params
            },
            &|_| false,
        )
        .unwrap()[0];
    let first = &gen
        .generate(
            std::slice::from_ref(&prompt),
            &GenerationParams {
                max_tokens: 1,
                top_logprobs: 40,
                ..Default::default()
            },
        )
        .unwrap()[0][0]
        .steps[0];
    let expected: f64 = first
        .top
        .iter()
        .map(|t| (t.logprob.0 as f64).exp())
        .filter(|&p| p >= 1e-4)
        .sum();
    let got: f64 = one.leaves.iter().map(|l| l.prob).sum();
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    assert_eq!(
        one.leaves.len(),
        first
            .top
            .iter()
            .filter(|t| (t.logprob.0 as f64).exp() >= 1e-4)
            .count()
    );
    // The greedy 3-token path is a leaf with the probability generation reports for it.
    let g = &gen
        .generate(
            std::slice::from_ref(&prompt),
            &GenerationParams {
                max_tokens: 3,
                ..Default::default()
            },
        )
        .unwrap()[0][0];
    let logp: f64 = g.steps.iter().map(|s| s.logprob.0 as f64).sum();
    let leaf = e
        .leaves
        .iter()
        .find(|l| l.ids == g.token_ids)
        .expect("the greedy path is a leaf");
    assert!(
        (leaf.prob.ln() - logp).abs() < 1e-3,
        "{} vs {logp}",
        leaf.prob.ln()
    );
    assert!(
        e.leaves.iter().all(|l| l.prob <= leaf.prob + 1e-9),
        "greedy path is the most likely leaf"
    );
}

#[test]
fn calibration_sampled_and_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    ok(exe()
        .args([
            "dataset",
            "build",
            "--task",
            "animals",
            "--n-train",
            "2",
            "--n-val",
            "6",
            "--seed",
            "5",
            "--properties",
            "second_character",
            "--out",
        ])
        .arg(t.join("ds")));
    let data = t.join("ds/val/animals_second_character.jsonl");
    for method in ["sampled", "exact"] {
        let out = t.join(method);
        let stdout = ok(exe()
            .args([
                "calibrate",
                "--method",
                method,
                "--samples",
                "8",
                "--batch-size",
                "3",
                "--data",
            ])
            .arg(&data)
            .arg("--out")
            .arg(&out));
        assert!(stdout.contains("6 strings"), "{stdout}");
        let result: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("calibration.json")).unwrap())
                .unwrap();
        let mad = result["mad"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&mad), "{mad}");
        let points = result["points"].as_array().unwrap();
        assert!(!points.is_empty() && points.len() <= 18);
        for p in points {
            for k in ["object", "hypothetical"] {
                assert!((0.0..=1.0 + 1e-9).contains(&p[k].as_f64().unwrap()));
            }
        }
        // Every distribution sums to 1.
        for line in std::fs::read_to_string(out.join("calibration.jsonl"))
            .unwrap()
            .lines()
        {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            for k in ["object", "hypothetical"] {
                if let Some(d) = r[k].as_object() {
                    let s: f64 = d.values().map(|v| v.as_f64().unwrap()).sum();
                    assert!((s - 1.0).abs() < 1e-6, "{k} sums to {s}");
                }
            }
        }
        // Rerun: nothing left to do, same result.
        let again = ok(exe()
            .args([
                "calibrate",
                "--method",
                method,
                "--samples",
                "8",
                "--batch-size",
                "3",
                "--data",
            ])
            .arg(&data)
            .arg("--out")
            .arg(&out));
        assert!(again.contains(&format!("MAD {mad:.1} pp")), "{again}");
    }
}

#[test]
fn prompts_sharing_a_start_generate_as_they_do_alone() {
    use introspect::engine::{GenerationParams, Generator};
    use introspect::model::Message;
    use introspect::tasks::Task;
    let model = common::smollm2_f32();
    let task = Task::get("animals_long").unwrap();
    // Different lengths after a common start of system header + task template.
    let prompts: Vec<Vec<u32>> = [
        "dog cat ",
        "lion tiger bear wolf fox ",
        "cow cow cow pig duck rabbit deer ",
    ]
    .iter()
    .map(|s| {
        let m = [
            Message::new("system", ""),
            Message::new("user", &task.object_prompt(s)),
        ];
        model.encode_chat(&m).unwrap().1
    })
    .collect();
    let shared = (0..prompts[0].len())
        .take_while(|&j| prompts.iter().all(|p| p.get(j) == prompts[0].get(j)))
        .count();
    assert!(shared >= 30, "the prompts share {shared} tokens");
    let params = GenerationParams {
        max_tokens: 12,
        top_logprobs: 5,
        ..Default::default()
    };
    let gen = Generator::new(model);
    let batched = gen.generate(&prompts, &params).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let alone = &gen.generate(std::slice::from_ref(p), &params).unwrap()[0][0];
        assert_eq!(alone.token_ids, b[0].token_ids);
        for (x, y) in alone.steps.iter().zip(&b[0].steps) {
            assert!(
                (x.logprob.0 - y.logprob.0).abs() < 1e-3,
                "{} vs {}",
                x.logprob.0,
                y.logprob.0
            );
        }
    }
}
