//! Experiments end to end on SmolLM2 with the smoke config (every stage, a few minutes): the report, the
//! figures and the manifest; re-rendering the report without a model; a run killed mid-finetuning that
//! resumes to the same results; configs that are refused with the file and field named.

mod common;

use common::{exe, ok, refused};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use introspect::experiment::{read_manifest, ExperimentConfig};

fn smoke_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/smoke.toml")
}

fn run_to_end(out: &Path, resume: bool) -> String {
    let mut cmd = exe();
    cmd.args(["experiment", "run"])
        .arg(smoke_config())
        .arg("--out")
        .arg(out);
    if resume {
        cmd.arg("--resume");
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into()
}

/// The results of a run without its timings.
fn results(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("metrics.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m = v.as_object_mut().unwrap();
    for timing in ["stage_seconds", "total_seconds", "stages"] {
        m.remove(timing);
    }
    v
}

fn adapter_hashes(dir: &Path) -> Vec<(String, String)> {
    read_manifest(dir)
        .unwrap()
        .hashes
        .into_iter()
        .filter(|(k, _)| k.contains("adapter"))
        .collect()
}

#[test]
fn smoke_experiment_runs_reports_and_resumes_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let stdout = run_to_end(&a, false);
    assert!(
        stdout.contains("held-out accuracy (notebook rules): self"),
        "{stdout}"
    );

    // Every stage's outputs and the report.
    for f in [
        "manifest.json",
        "metrics.json",
        "report.md",
        "m1ft/adapter/adapter_model.safetensors",
        "m2/model/model.safetensors",
        "mc/adapter/adapter_config.json",
        "figures/self_vs_cross.svg",
        "figures/self_vs_cross.png",
        "figures/behaviour_shift.png",
        "figures/calibration.png",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    let png = std::fs::read(a.join("figures/self_vs_cross.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let manifest = read_manifest(&a).unwrap();
    assert_eq!(
        manifest.config,
        ExperimentConfig::load(&smoke_config()).unwrap()
    );
    // 40 hex digits, "-dirty" when built from uncommitted changes.
    let hex = manifest.git_commit.trim_end_matches("-dirty");
    assert!(
        hex.len() == 40 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{}",
        manifest.git_commit
    );
    assert!(
        manifest.candle_version.starts_with("0.11"),
        "{}",
        manifest.candle_version
    );
    assert_eq!(manifest.seeds.len(), 6, "{:?}", manifest.seeds); // data, finetune, calibration, shift, M2 derive ×2
    assert_eq!(adapter_hashes(&a).len(), 4, "{:?}", manifest.hashes);
    assert!(manifest.hashes.contains_key("M1 base"));
    // Where it ran, as the kernels saw it: one machine (the run resumed on the same one).
    assert_eq!(manifest.machines.len(), 1, "{:?}", manifest.machines);
    let here = &manifest.machines[0];
    assert_eq!(here.device, "Cpu");
    assert!(
        here.threads >= 1 && here.kernels.contains("bf16 products"),
        "{here:?}"
    );
    assert_eq!(
        here.features,
        introspect_kernels::cpu_features()
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    );
    let report = std::fs::read_to_string(a.join("report.md")).unwrap();
    assert!(
        report.contains(&format!("- Ran on {}", here.cpu)),
        "{report}"
    );
    let m = results(&a);
    let groups = m["self_vs_cross"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "animals_long and all held-out");
    // 8 val strings × 2 properties, both predictors asked about every row; by the notebook's rules
    // each is scored on the strings its own object-level answer complied with (M2ft's own run).
    assert_eq!(m["rules"], "notebook");
    for side in ["self_rows", "cross_rows"] {
        let r = &groups[1][side];
        assert_eq!(r["asked"], 16, "{r}");
        assert_eq!(r["predictor_filtered"], true, "{r}");
        assert!(r["predictor"].as_u64() <= Some(16) && r["scored"].as_u64() <= r["both"].as_u64());
    }
    assert!(a.join("m2ft/object-val/run.json").exists());
    let other = m["self_vs_cross_other_rules"].as_array().unwrap();
    assert_eq!(other[1]["rules"], "spec");
    assert_eq!(other[1]["self_rows"]["predictor_filtered"], false);
    // Entropy-controlled before/after and shift comparisons (§6.7): equal baselines by construction.
    let e = &m["entropy_controlled"];
    assert_eq!(e["a"]["n"], e["b"]["n"], "{e}");
    assert_eq!(e["a"]["mode_baseline"], e["b"]["mode_baseline"], "{e}");
    assert!(m["behaviour_shift"]["overall"].is_object());
    assert_eq!(m["calibration"].as_object().unwrap().len(), 3);
    let report = std::fs::read_to_string(a.join("report.md")).unwrap();
    for section in [
        "## Self- vs cross-prediction",
        "## Behaviour shift",
        "## Calibration",
        "**Confound.**",
    ] {
        assert!(
            report.contains(section),
            "{section} missing from the report"
        );
    }

    // The report is re-rendered from stored outputs alone, to the same metrics.
    std::fs::remove_file(a.join("metrics.json")).unwrap();
    std::fs::remove_file(a.join("report.md")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_introspect"))
        .env("INTROSPECT_HOME", tmp.path().join("no-models-here"))
        .args(["experiment", "report"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(results(&a), m);
    assert_eq!(
        std::fs::read_to_string(a.join("report.md")).unwrap(),
        report
    );

    // A second run, killed while the cross-predictor trains (after its first checkpoint), then resumed.
    let b = tmp.path().join("b");
    let mut child = exe()
        .args(["experiment", "run"])
        .arg(smoke_config())
        .arg("--out")
        .arg(&b)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = b.join("m2ft/adapter/checkpoints");
    let start = Instant::now();
    while !std::fs::read_dir(&checkpoints).is_ok_and(|mut d| d.next().is_some()) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !b.join("stages/m2ft_finetune.json").exists(),
        "killed too late"
    );

    // Without --resume the directory is refused; with it, the run ends as the uninterrupted one.
    let stderr = refused(
        exe()
            .args(["experiment", "run"])
            .arg(smoke_config())
            .arg("--out")
            .arg(&b),
    );
    assert!(stderr.contains("--resume"));
    run_to_end(&b, true);
    assert_eq!(adapter_hashes(&b), adapter_hashes(&a));
    assert_eq!(results(&b), m);
    // The same config and seeds on the same machine: metrics.json is the same bytes, even across the
    // kill (timings live in timings.json).
    assert_eq!(
        std::fs::read(a.join("metrics.json")).unwrap(),
        std::fs::read(b.join("metrics.json")).unwrap()
    );
    assert!(b.join("timings.json").exists());
    let cmp = ok(exe()
        .args(["experiment", "report", "--compare"])
        .arg(&a)
        .arg(&b));
    assert!(cmp.contains("metrics.json is byte-identical"), "{cmp}");
    assert!(
        cmp.contains("| m2ft/object-val | Object | 8 | 0 |"),
        "{cmp}"
    );
    // B resumed on the same machine: the manifests differ only in when they started.
    assert!(!cmp.contains("- machines"), "{cmp}");

    // Re-rendered by the spec's rules: the headline changes rules, the notebook's go beside it.
    assert!(ok(exe()
        .args(["experiment", "report", "--rules", "spec"])
        .arg(&b))
    .contains("(spec rules)"));
    let spec = results(&b);
    assert_eq!(spec["rules"], "spec");
    assert_eq!(spec["self_vs_cross"], m["self_vs_cross_other_rules"]);
    let report = std::fs::read_to_string(b.join("report.md")).unwrap();
    assert!(
        report.contains("by the spec's rules (rows with"),
        "{report}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let smoke = std::fs::read_to_string(smoke_config()).unwrap();
    let err = |path: &Path| format!("{:#}", ExperimentConfig::load(path).unwrap_err());

    let typo = write(
        tmp.path(),
        "typo.toml",
        &smoke.replace("n_val = 8", "n_vall = 8"),
    );
    let e = err(&typo);
    assert!(e.contains("typo.toml") && e.contains("n_vall"), "{e}");

    let leak = write(
        tmp.path(),
        "leak.toml",
        &smoke.replace(
            r#"train_tasks = ["colors_long"]"#,
            r#"train_tasks = ["colors_long", "animals_long"]"#,
        ),
    );
    let e = err(&leak);
    assert!(
        e.contains("data.train_tasks") && e.contains("animals_long"),
        "{e}"
    );

    let prop = write(
        tmp.path(),
        "prop.toml",
        &smoke.replace("\"first_word\"]", "\"fifth_word\"]"),
    );
    let e = err(&prop);
    assert!(
        e.contains("data.properties") && e.contains("fifth_word"),
        "{e}"
    );

    let external = write(
        tmp.path(),
        "external.toml",
        &smoke.replace(
            r#"held_out_tasks = ["animals_long"]"#,
            r#"held_out_tasks = ["mmlu_non_cot"]"#,
        ),
    );
    let e = err(&external);
    assert!(e.contains("[data.strings.mmlu_non_cot]"), "{e}");

    // A served model: the backend's kind and fields are checked, and its calibration must sample.
    let served = |extra: &str| {
        smoke.replace(
            "label = \"SmolLM2-B\"",
            &format!("label = \"SmolLM2-B\"\nbackend = {{ kind = \"openai\", base_url = \"http://127.0.0.1:1/v1\"{extra} }}"),
        )
    };
    let exact = write(
        tmp.path(),
        "exact.toml",
        &(served("") + "\nmethod = \"exact\"\n"),
    );
    let e = err(&exact);
    assert!(
        e.contains("calibration.method") && e.contains("sampled"),
        "{e}"
    );
    let field = write(tmp.path(), "field.toml", &served(", base_ur = \"x\""));
    let e = err(&field);
    assert!(e.contains("base_ur"), "{e}");
    let kind = write(
        tmp.path(),
        "kind.toml",
        &served("").replace("kind = \"openai\"", "kind = \"vllm\""),
    );
    let e = err(&kind);
    assert!(e.contains("vllm"), "{e}");

    // Resuming a run directory with another config names the first setting that differs.
    let dir = tmp.path().join("run");
    let cfg = ExperimentConfig::load(&smoke_config()).unwrap();
    introspect::experiment::Experiment::prepare(cfg.clone(), &dir, false).unwrap();
    let mut other = cfg;
    other.finetune.lr = 3e-4;
    let e = match introspect::experiment::Experiment::prepare(other, &dir, true) {
        Err(e) => format!("{e:#}"),
        Ok(_) => panic!("a changed config was accepted"),
    };
    assert!(e.contains("finetune.lr"), "{e}");
}

#[test]
fn every_config_in_the_repo_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let cfg = ExperimentConfig::load(&p).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(
                Some(cfg.name.as_str()),
                p.file_stem().and_then(|s| s.to_str()),
                "a config's name is its file name (the default run directory)"
            );
            n += 1;
        }
    }
    assert!(n >= 4, "quick, smoke and the paper profiles");
}

/// The smoke config without M2's derivation, so that M2 is the base model a server can also serve.
fn underived_smoke() -> String {
    std::fs::read_to_string(smoke_config())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("derive = "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_model_behind_a_server_gives_the_same_results_as_the_local_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let local_cfg = write(tmp.path(), "local.toml", &underived_smoke());
    // The server trains hosted jobs with the smoke config's [finetune] recipe (the job sends its
    // epochs, batch size and seed).
    let recipe = write(
        tmp.path(),
        "recipe.toml",
        "rank = 8\nalpha = 16.0\nlr = 1e-4\nbatch_size = 4\nmicro_batch_size = 4\nsave_every = 2\n",
    );
    let server = common::serve(&[
        "--state-dir",
        tmp.path().join("state").to_str().unwrap(),
        "--finetune-config",
        recipe.to_str().unwrap(),
    ]);
    let served = underived_smoke().replace(
        "label = \"SmolLM2-B\"",
        &format!(
            "label = \"SmolLM2-B\"\nbackend = {{ kind = \"openai\", base_url = \"{}\", poll_s = 0.2 }}",
            server.base_url
        ),
    );
    assert_ne!(served, underived_smoke());
    let remote_cfg = write(tmp.path(), "remote.toml", &served);
    for (cfg, out) in [(&local_cfg, "local"), (&remote_cfg, "remote")] {
        ok(exe()
            .args(["experiment", "run"])
            .arg(cfg)
            .arg("--out")
            .arg(tmp.path().join(out)));
    }
    let (a, b) = (tmp.path().join("local"), tmp.path().join("remote"));
    // M2's object-level answers, its cross-trained adapter (trained by the server's job) and every
    // metric that depends on them: the same both ways.
    assert_eq!(results(&a), results(&b));
    let hosted: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("m2ft/adapter/hosted.json")).unwrap())
            .unwrap();
    assert_eq!(hosted["status"], "succeeded", "{hosted}");
    let job = hosted["job_id"].as_str().unwrap();
    let weights = |d: PathBuf| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(
        weights(a.join("m2ft/adapter"))
            == weights(tmp.path().join("state/jobs").join(job).join("run")),
        "the server's job trained another M2ft"
    );
    let hashes = read_manifest(&b).unwrap().hashes;
    assert!(hashes["M2 base"].starts_with("served: smollm2-135m-instruct at http://"));
}
