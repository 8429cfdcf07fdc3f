//! Append-only JSONL result logs: each finished batch is appended and synced, so a kill loses at most the
//! batch in flight; on reopening, a torn last line is cut off and the finished records are returned.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub struct AppendLog {
    path: PathBuf,
}

impl AppendLog {
    /// Opens `path` (creating it) and returns the records already in it.
    pub fn open<T: DeserializeOwned>(path: &Path) -> Result<(Self, Vec<T>)> {
        let mut records = vec![];
        if path.exists() {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut good = 0usize;
            let mut start = 0usize;
            for (i, &b) in bytes.iter().enumerate() {
                if b != b'\n' {
                    continue;
                }
                let line = &bytes[start..i];
                start = i + 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    good = start;
                    continue;
                }
                match serde_json::from_slice::<T>(line) {
                    Ok(r) => {
                        records.push(r);
                        good = start;
                    }
                    Err(e) => anyhow::bail!(
                        "{}:{}: not a record of this run ({e}); was the file edited?",
                        path.display(),
                        records.len() + 1
                    ),
                }
            }
            if good < bytes.len() {
                // The tail after the last newline is a write cut short by a kill.
                let f = std::fs::OpenOptions::new().write(true).open(path)?;
                f.set_len(good as u64)?;
                f.sync_all()?;
            }
        } else {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }
        Ok((
            Self {
                path: path.to_path_buf(),
            },
            records,
        ))
    }

    pub fn append<T: Serialize>(&self, records: &[T]) -> Result<()> {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
        Ok(())
    }
}

/// Reads every record of a finished (or partial) log.
pub fn read_log<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            // Only the last line may be torn (a run killed mid-write).
            Err(_) if i + 1 == text.lines().count() && !text.ends_with('\n') => break,
            Err(e) => anyhow::bail!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}
