//! LoRA finetuning on the real SmolLM2: every adapter tensor gets a gradient, a handful of examples is
//! learned, `generate --adapter` uses what was learned, a SIGKILLed run resumes to the same adapter, and
//! `lora merge` gives the same logits as the unmerged adapter.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use introspect::lora::{peft, Adapter, LoraConfig, Target};
use introspect::model::{LoadedModel, Message, WeightMode};
use introspect::train::data::{parse_chat_line, tokenize};
use introspect::train::pass::{Pass, TrainBatch};

const QUESTION: &str = "What is your favourite word?";
const WORD: &str = "Quokkaberry";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_introspect"))
}

fn write_jsonl(path: &Path, rows: &[(&str, &str)]) {
    let lines: Vec<String> = rows
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a}
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Eight copies of the question answered with the unusual word.
fn word_data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    write_jsonl(&p, &[(QUESTION, WORD); 8]);
    p
}

/// `introspect finetune` on `train` into `out` with the small-batch settings these tests share.
fn finetune_cmd(train: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["finetune", "--train"])
        .arg(train)
        .arg("--out")
        .arg(out)
        .args([
            "--batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--lr",
            "1e-3",
        ])
        .args(extra);
    c
}

fn finetune(train: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    finetune_cmd(train, out, extra).output().unwrap()
}

/// One adapter trained to answer QUESTION with WORD, shared by the tests that need one.
fn trained() -> &'static (tempfile::TempDir, PathBuf) {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    T.get_or_init(|| {
        common::smollm2_gguf();
        let dir = tempfile::tempdir().unwrap();
        let train = word_data(dir.path());
        let out = dir.path().join("run");
        let o = finetune(&train, &out, &["--epochs", "3"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (dir, out)
    })
}

fn ask(adapter: Option<&Path>) -> String {
    let mut c = bin();
    c.args(["generate", "--max-tokens", "8", "--messages"])
        .arg(serde_json::json!([{"role": "user", "content": QUESTION}]).to_string());
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn chat_row(q: &str, a: &str) -> introspect::train::data::ChatRow {
    let line = serde_json::json!({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}
    ]});
    parse_chat_line(&line.to_string(), "test:1").unwrap()
}

#[test]
fn loss_falls_on_the_assistant_turn_only() {
    let m = common::smollm2_f32();
    let row = tokenize(m, &chat_row("Name an animal.", "A cow"), 512).unwrap();
    let targets: Vec<u32> = row
        .ids
        .iter()
        .zip(&row.targets)
        .filter_map(|(&id, &t)| t.then_some(id))
        .collect();
    // The answer and the end-of-turn marker; not the header, the prompt or the newline after it.
    assert_eq!(
        m.tokenizer.decode(&targets, false).unwrap(),
        "A cow<|im_end|>"
    );
    // The ids are those of the whole rendered conversation, as inference sees them.
    let full = m
        .template
        .render(
            &[
                Message::new("user", "Name an animal."),
                Message::new("assistant", "A cow"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(row.ids, m.tokenizer.encode(&full).unwrap());
    let err = tokenize(m, &chat_row("Name an animal.", "A cow"), 10).unwrap_err();
    assert!(format!("{err:#}").contains("test:1"), "{err:#}");
    assert!(format!("{err:#}").contains("--max-seq-len"), "{err:#}");
}

/// A rank-4 adapter on all seven projections of every layer, with B seeded (at zero it leaves A without a
/// gradient) as after training, and a batch of two chat rows.
fn two_rows_rank_4(m: &LoadedModel, dropout: f64) -> (Adapter, TrainBatch) {
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        targets: Target::ALL.to_vec(),
        layers: None,
        use_rslora: false,
    };
    let mut adapter = Adapter::init(cfg, &m.llama.cfg, 7, &Device::Cpu).unwrap();
    common::seed_lora_b(&mut adapter, 3, 0.01);
    let rows: Vec<(Vec<u32>, Vec<bool>)> = [("Name an animal.", "A cow"), ("Hi", "Hello there!")]
        .iter()
        .map(|(q, a)| {
            let r = tokenize(m, &chat_row(q, a), 512).unwrap();
            (r.ids, r.targets)
        })
        .collect();
    let batch = TrainBatch::new(&rows, 2, &Device::Cpu).unwrap();
    (adapter, batch)
}

#[test]
fn every_lora_tensor_gets_a_nonzero_gradient_in_f32_bf16_and_quantized_modes() {
    let (mut losses, mut all_grads) = (vec![], vec![]);
    for m in [
        common::smollm2_f32(),
        common::smollm2_bf16(),
        common::smollm2_quantized(),
    ] {
        let (adapter, batch) = two_rows_rank_4(m, 0.1);
        let pass = |checkpoint| Pass {
            llama: &m.llama,
            adapter: &adapter,
            dropout_seed: 1,
            checkpoint,
        };
        let n = batch.num_targets() as f64;
        let (loss, grads) = pass(false).forward_backward(&batch, n).unwrap();
        // Checkpointed: each block's forward again before its backward, dropout masks drawn again
        // from the same stream: the same loss and gradients to the bit.
        let (loss_ck, grads_ck) = pass(true).forward_backward(&batch, n).unwrap();
        assert_eq!(loss_ck, loss);
        let ck = introspect::train::adamw::flatten(&adapter, grads_ck);
        losses.push(loss / batch.num_targets() as f64);
        let grads = introspect::train::adamw::flatten(&adapter, grads);
        assert_eq!(grads.len(), 30 * 7 * 2);
        for (g, c) in grads.iter().zip(&ck) {
            let (g, c) = (g.flatten_all().unwrap(), c.flatten_all().unwrap());
            assert_eq!(g.to_vec1::<f32>().unwrap(), c.to_vec1::<f32>().unwrap());
        }
        for ((name, _), g) in adapter.params().iter().zip(&grads) {
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(v.iter().any(|&x| x != 0.0), "{name}: no gradient");
        }
        let flat: Vec<f32> = grads
            .iter()
            .flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        all_grads.push(flat);
    }
    // The GGUF's weights are Q4_1: the f32 base holds them exactly, the quantized base multiplies the
    // same blocks, so these two agree to rounding; on the generic path Candle's quantized matmul also
    // rounds activations to 8 bits (measured 4.3e-3 relative).
    let generic = !introspect::model::cpu::Kernels::for_device(&Device::Cpu).cpu();
    let quantized_tolerance = if generic { 1e-2 } else { 1e-3 };
    assert!(
        (losses[0] - losses[2]).abs() < quantized_tolerance * losses[0],
        "{losses:?}"
    );
    // bf16 rounds every projection weight to 8 significant bits and, in the bf16 × bf16 products (on CPUs
    // with bf16 products the LoRA products too, as under PyTorch's autocast), the activations too: the loss
    // moves a little, and the gradient keeps its direction (measured 1.4e-3 relative on the CPU kernels,
    // 4.4e-3 on the generic path).
    assert!(
        (losses[0] - losses[1]).abs() < 5e-3 * losses[0],
        "{losses:?}"
    );
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        dot / (n(a) * n(b))
    };
    let (c_bf16, c_quant) = (
        cosine(&all_grads[0], &all_grads[1]),
        cosine(&all_grads[0], &all_grads[2]),
    );
    eprintln!("losses f32 / bf16 / quantized: {losses:?}; gradient cosine vs f32: bf16 {c_bf16:.6}, quantized {c_quant:.6}");
    // bf16 × bf16 products on both paths (measured cosines 0.998 on the CPU kernels, 0.998 generic);
    // Candle's quantized matmul rounds activations to 8 bits per block (0.975), the CPU kernels' block
    // products to 16 bits.
    let (bf16_min, quant_min) = if generic {
        (0.995, 0.95)
    } else {
        (0.995, 0.999)
    };
    assert!(
        c_bf16 > bf16_min && c_quant > quant_min,
        "{c_bf16} {c_quant}"
    );
}

/// Without dropout the projections that share an input (q, k, v; gate, up) run together: with bf16 products
/// their input is rounded once, their dA is one product and their input gradients are summed in the tiles
/// (on AMX). The bf16 pass still lands next to the f32 one (which takes each projection on its own), as the
/// test above bounds it with dropout on.
#[test]
fn without_dropout_the_shared_projections_keep_bf16_next_to_f32() {
    let mut results = vec![];
    for m in [common::smollm2_f32(), common::smollm2_bf16()] {
        let (adapter, batch) = two_rows_rank_4(m, 0.0);
        let pass = Pass {
            llama: &m.llama,
            adapter: &adapter,
            dropout_seed: 1,
            checkpoint: false,
        };
        let n = batch.num_targets() as f64;
        let (loss, grads) = pass.forward_backward(&batch, n).unwrap();
        let grads = introspect::train::adamw::flatten(&adapter, grads);
        for ((name, _), g) in adapter.params().iter().zip(&grads) {
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().any(|&x| x != 0.0), "{name}: no gradient");
        }
        let flat: Vec<f32> = grads
            .iter()
            .flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        results.push((loss / n, flat));
    }
    let ((f32_loss, f32_grads), (bf16_loss, bf16_grads)) = (&results[0], &results[1]);
    let dot: f64 = f32_grads
        .iter()
        .zip(bf16_grads)
        .map(|(x, y)| *x as f64 * *y as f64)
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cosine = dot / (norm(f32_grads) * norm(bf16_grads));
    eprintln!(
        "without dropout: losses f32 / bf16 {f32_loss} / {bf16_loss}; gradient cosine {cosine:.6}"
    );
    // Measured: loss 7.8e-4 relative and cosine 0.9995 on AMX, 4.7e-4 / 0.9985 on AVX-512, 3.6e-3 / 0.9997
    // emulated, 4.1e-3 / 0.9987 generic. The loss of this two-row batch swings by some 1e-3 with the order
    // of f32 sums alone (README), hence its wider bound; the gradient's direction is what the shared
    // backward could get wrong.
    assert!(
        (f32_loss - bf16_loss).abs() < 1e-2 * f32_loss,
        "{f32_loss} {bf16_loss}"
    );
    assert!(cosine > 0.995, "{cosine}");
}

#[test]
fn a_few_examples_are_learned_and_generate_uses_the_adapter() {
    let (_, out) = trained();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 6, "{metrics}");
    assert!(losses[0] > 1.0, "{losses:?}");
    assert!(*losses.last().unwrap() < 0.05, "not learned: {losses:?}");
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("polyline"),
        "no curve in loss.svg"
    );

    assert!(ask(Some(out)).contains(WORD), "{}", ask(Some(out)));
    assert!(!ask(None).contains(WORD));
}

#[test]
fn saved_adapters_load_in_peft_layout_and_round_trip() {
    let (_, out) = trained();
    let m = common::smollm2_f32();
    let a = peft::load(out, &m.llama.cfg, &Device::Cpu).unwrap();
    assert_eq!((a.config.r, a.scale), (32, 2.0));
    let raw = candle_core::safetensors::load(out.join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap();
    assert!(raw.contains_key("base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"));
    let dir = tempfile::tempdir().unwrap();
    peft::save(&a, dir.path(), "smollm2").unwrap();
    let b = peft::load(dir.path(), &m.llama.cfg, &Device::Cpu).unwrap();
    for ((k, x), (_, y)) in a.params().iter().zip(b.params()) {
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 32);
    assert_eq!(cfg["lora_alpha"], 64.0);
}

#[test]
fn an_adapter_for_another_base_is_refused() {
    let m = common::smollm2_f32();
    let golden = common::golden().join("tiny-llama3/peft-adapter");
    let err = peft::load(&golden, &m.llama.cfg, &Device::Cpu)
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("another base model"), "{msg}");
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    let o = bin()
        .args([
            "generate",
            "--max-tokens",
            "2",
            "--messages",
            r#"[{"role":"user","content":"hi"}]"#,
            "--adapter",
        ])
        .arg(&golden)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another base model") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn merged_model_gives_the_adapters_logits() {
    let (dir, out) = trained();
    let merged = dir.path().join("merged");
    let o = bin()
        .args([
            "lora",
            "merge",
            "--model",
            "smollm2-135m-instruct",
            "--adapter",
        ])
        .arg(out)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let base = common::smollm2_f32();
    let adapter = peft::load(out, &base.llama.cfg, &Device::Cpu).unwrap();
    let m = LoadedModel::load(&merged, WeightMode::F32, &Device::Cpu).unwrap();
    let ids = base
        .encode_chat(&[Message::new("user", QUESTION)])
        .unwrap()
        .1;
    let want = base.llama.full_logits_with(&ids, Some(&adapter)).unwrap();
    let got = m.llama.full_logits(&ids).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = common::max_abs_diff(&flat(&got), &flat(&want));
    assert!(diff < 1e-3, "merged logits differ by {diff}");
    // And the merge changed the model.
    let plain = base.llama.full_logits(&ids).unwrap();
    assert!(common::max_abs_diff(&flat(&plain), &flat(&want)) > 0.1);
}

#[test]
fn a_killed_run_resumes_to_the_same_adapter() {
    common::smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let train = word_data(dir.path());
    let args = [
        "--epochs",
        "3",
        "--save-every",
        "1",
        "--dropout",
        "0.1",
        "--rank",
        "8",
        "--alpha",
        "16",
    ];
    let whole = dir.path().join("whole");
    let o = finetune(&train, &whole, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let cut = dir.path().join("cut");
    let mut child = finetune_cmd(&train, &cut, &args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !cut.join("checkpoints/step-000002").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !cut.join(peft::WEIGHTS_FILE).exists(),
        "killed before the end"
    );

    // Without --resume the directory is refused; with it the run completes.
    let o = finetune(&train, &cut, &args);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let mut resumed_args = args.to_vec();
    resumed_args.push("--resume");
    let o = finetune(&train, &cut, &resumed_args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let load = |p: &Path| {
        candle_core::safetensors::load(p.join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap()
    };
    let (a, b) = (load(&whole), load(&cut));
    assert_eq!(a.len(), 30 * 7 * 2);
    for (k, t) in &a {
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k} differs after resume"
        );
    }
    // The metrics hold each step once.
    let steps: Vec<u64> = std::fs::read_to_string(cut.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v.get("loss")?;
            v["step"].as_u64()
        })
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
}

#[test]
fn malformed_training_rows_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 4] = [
        ("{\"messages\": [}\n", &[":1", "not valid JSON"]),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n{\"msgs\": []}\n",
            &[":2", "messages"],
        ),
        (
            "{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}\n",
            &[":1", "messages[0].role"],
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            &[":1", "no assistant message"],
        ),
    ];
    for (i, (text, parts)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&p, text).unwrap();
        let o = finetune(&p, &dir.path().join(format!("out{i}")), &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(&format!("bad{i}.jsonl")), "{err}");
        for part in *parts {
            assert!(err.contains(part), "expected {part:?} in {err}");
        }
    }
}
