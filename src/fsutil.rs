//! Files are written whole or not at all: a temporary sibling, fsync, then rename.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The non-blank lines of a JSONL file, each with its `file:line` origin for error messages.
pub fn jsonl_lines(path: &Path) -> Result<Vec<(String, String)>> {
    use std::io::BufRead;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let origin = format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{origin}: cannot read (not UTF-8?)"))?;
        if !line.trim().is_empty() {
            out.push((origin, line));
        }
    }
    Ok(out)
}
