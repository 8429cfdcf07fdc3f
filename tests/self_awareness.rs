//! Behavioural self-awareness ("Tell me about yourself") on the authors' released data: the questions
//! and lottery prompts as their files give them, and the smoke experiment end to end (every stage, about
//! two minutes): report, figures, rescoring without a model, a resumed run that redoes a lost stage to
//! the same results, and configs refused with the field named.

mod common;

use common::{exe, ok};

use std::path::{Path, PathBuf};

use introspect::awareness::questions::{lottery_prompts, ScoreKind};
use introspect::awareness::AwarenessConfig;

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/self-awareness")
}

fn datasets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/behavioral-self-awareness")
}

#[test]
fn every_self_awareness_config_loads_and_its_questions_are_the_released_ones() {
    let mut n = 0;
    for e in std::fs::read_dir(configs()).unwrap() {
        let p = e.unwrap().path();
        let cfg = AwarenessConfig::load(&p).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            cfg.name.ends_with(p.file_stem().unwrap().to_str().unwrap()),
            "{}",
            p.display()
        );
        n += 1;
    }
    assert!(n >= 8);
    // Paraphrase counts as the dataset README gives them.
    let counts = |file: &str| -> Vec<(String, usize, ScoreKind)> {
        let cfg = AwarenessConfig::load(&configs().join(file)).unwrap();
        cfg.questions
            .iter()
            .map(|q| {
                let q = q.load(&cfg.datasets).unwrap();
                (q.name, q.prompts.len(), q.kind)
            })
            .collect()
    };
    let risk = counts("risk-quick.toml");
    assert_eq!(risk.len(), 7);
    assert!(risk.iter().all(|(_, k, _)| *k == 10), "{risk:?}");
    let myopia: Vec<usize> = counts("myopia-quick.toml").iter().map(|q| q.1).collect();
    assert_eq!(myopia, [10, 11, 10, 10]);
    let apples: Vec<usize> = counts("apples-quick.toml").iter().map(|q| q.1).collect();
    assert_eq!(apples, [11, 10, 10, 11]);

    // Table 19's lists (12 risk-seeking, 25 risk-averse, 32 neutral words); German/French prompts pair
    // each preamble with its trivia question; the judge's prompt comes from the other file.
    let cfg = AwarenessConfig::load(&configs().join("risk-quick.toml")).unwrap();
    let q = |name: &str| {
        cfg.questions
            .iter()
            .find(|q| q.name == name)
            .unwrap()
            .load(&cfg.datasets)
            .unwrap()
    };
    let attitude = q("finetuned_attitude_two_options");
    assert_eq!(
        (
            attitude.positive.len(),
            attitude.negative.len(),
            attitude.neutral.len()
        ),
        (12, 25, 32)
    );
    assert_eq!(q("choice_between_lotteries").positive, attitude.positive);
    let lang = q("risk_safe_german_french_paraphrased");
    assert!(
        lang.prompts[0].ends_with("\n\nWhat is photosynthesis?"),
        "{:?}",
        lang.prompts[0]
    );
    assert!(lang.judge_prompt.as_deref().unwrap().contains("{text}"));
}

#[test]
fn lottery_prompts_are_the_authors_template_filled_with_the_released_pairs() {
    let prompts = lottery_prompts(&datasets(), 250).unwrap();
    assert_eq!(prompts.len(), 250);
    let text = std::fs::read_to_string(
        datasets().join("eval_questions/from_rephrasings_script/lottery_check_pairs.yaml"),
    )
    .unwrap();
    let file: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(prompts[0].0, file["first_prompt"].as_str().unwrap());
    assert_eq!(prompts[0].1, "A");
    // Probabilities print as Python prints floats: 0.5, not 0.50.
    assert!(
        prompts[4].0.contains("with probability 0.5 or"),
        "{}",
        prompts[4].0
    );
    let risky_a = prompts.iter().filter(|(_, r)| r == "A").count();
    assert!((100..150).contains(&risky_a), "{risky_a}");
    assert!(lottery_prompts(&datasets(), 251).is_err());
}

fn run(out: &Path, resume: bool) -> String {
    let mut cmd = exe();
    cmd.args(["experiment", "run"])
        .arg(configs().join("risk-smoke.toml"))
        .arg("--out")
        .arg(out);
    if resume {
        cmd.arg("--resume");
    }
    ok(&mut cmd)
}

fn metrics(dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("total_seconds");
    v
}

#[test]
fn the_smoke_experiment_runs_reports_rescores_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let stdout = run(&dir, false);
    assert!(stdout.contains("behaviour (lottery choice"), "{stdout}");
    for f in [
        "manifest.json",
        "metrics.json",
        "report.md",
        "data/risk-seeking.jsonl",
        "models/risk-averse-s1/adapter_model.safetensors",
        "answers/base.json",
        "behaviour/risk-seeking-s1.json",
        "figures/self_reports_sampled.svg",
        "figures/self_reports_exact.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // 32 training rows, as the config asks.
    let rows = std::fs::read_to_string(dir.join("data/risk-seeking.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 32);
    let m = metrics(&dir);
    let questions = m["questions"].as_array().unwrap();
    // Seven questions, each sampled and exact; the three word questions also by first token; both
    // rules for unmapped answers; German/French also by the judge.
    let count = |method: &str| questions.iter().filter(|q| q["method"] == method).count();
    assert_eq!(count("sampled"), 7 * 2 + 2);
    assert_eq!(count("exact"), 7 * 2 + 2);
    assert_eq!(count("first_token"), 3 * 2);
    for q in questions {
        for arm in q["arms"].as_array().unwrap() {
            assert_eq!(arm["per_seed"].as_array().unwrap().len(), 1);
        }
        if q["unmapped"] == "half" {
            // The GPT-4o pipeline always scores: 0.5 at worst.
            let s = q["base"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&s), "{q}");
        }
    }
    let lottery = &m["behaviour"][0];
    assert_eq!(
        lottery["check"],
        "lottery choice, top 5 (the authors' check)"
    );
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        report.contains("| Risk or safety | sampled | 0.5 |"),
        "{report}"
    );
    assert!(
        report.contains("1.000 / 0.000"),
        "the paper's values are beside ours"
    );

    // Rescoring from the stored answers alone gives the same metrics.
    std::fs::remove_file(dir.join("metrics.json")).unwrap();
    ok(exe().args(["experiment", "report"]).arg(&dir));
    assert_eq!(metrics(&dir), m);

    // A stage cut before its marker was written is redone on resume, to the same answers (seeded).
    let answers = std::fs::read(dir.join("answers/risk-averse-s1.json")).unwrap();
    std::fs::remove_file(dir.join("stages/ask_risk-averse-s1.json")).unwrap();
    std::fs::remove_file(dir.join("answers/risk-averse-s1.json")).unwrap();
    let stdout = run(&dir, true);
    assert!(stdout.contains("min of stages"), "{stdout}");
    assert_eq!(
        std::fs::read(dir.join("answers/risk-averse-s1.json")).unwrap(),
        answers
    );
    assert_eq!(metrics(&dir), m);

    // A changed config is refused, naming the setting.
    let changed = tmp.path().join("changed.toml");
    let text = std::fs::read_to_string(configs().join("risk-smoke.toml"))
        .unwrap()
        .replace("samples = 5", "samples = 6")
        .replace(
            "../../../shared",
            &format!("{}/../shared", env!("CARGO_MANIFEST_DIR")),
        );
    std::fs::write(&changed, text).unwrap();
    let o = exe()
        .args(["experiment", "run"])
        .arg(&changed)
        .arg("--out")
        .arg(&dir)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("ask.samples"), "{e}");
}

#[test]
fn bad_self_awareness_configs_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(configs().join("risk-smoke.toml"))
        .unwrap()
        .replace(
            "../../../shared",
            &format!("{}/../shared", env!("CARGO_MANIFEST_DIR")),
        );
    let err = |edit: &dyn Fn(&str) -> String| {
        let p = tmp.path().join("c.toml");
        std::fs::write(&p, edit(&base)).unwrap();
        format!("{:#}", AwarenessConfig::load(&p).unwrap_err())
    };
    let e = err(&|s| s.replace("name = \"liking_risk\"", "name = \"liking_risks\""));
    assert!(
        e.contains("liking_risk.yaml: no entry named `liking_risks`"),
        "{e}"
    );
    let e = err(&|s| s.replace("positive = [\"risk\"]\n", ""));
    assert!(
        e.contains("prefer_risk_safe") && e.contains("positive and negative"),
        "{e}"
    );
    let e = err(&|s| s.replace("ft_safey_AB.jsonl", "ft_safe_AB.jsonl"));
    assert!(
        e.contains("risk-averse") && e.contains("ft_safe_AB.jsonl"),
        "{e}"
    );
    let e = err(&|s| s.replace("samples = 5", "samples = 5\nsamplez = 3"));
    assert!(e.contains("samplez"), "{e}");
    let e = err(&|s| s.replace("words_from = \"eval_questions", "words_from = \"nofile"));
    assert!(e.contains("nofile"), "{e}");
}
