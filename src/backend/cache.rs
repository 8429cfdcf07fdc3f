//! A request cache in front of any backend: identical requests (same messages, settings and model
//! fingerprint) are answered from an append-only JSONL file instead of being generated again.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Backend, ChatRequest, ChatResponse, Usage};

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    response: ChatResponse,
}

pub struct CachedBackend<'a> {
    inner: &'a dyn Backend,
    path: PathBuf,
    entries: Mutex<HashMap<String, ChatResponse>>,
    /// Requests answered from the cache so far.
    pub hits: std::sync::atomic::AtomicUsize,
}

impl<'a> CachedBackend<'a> {
    /// Opens (or starts) the cache file; a torn last line from a killed run is ignored.
    pub fn open(inner: &'a dyn Backend, path: &Path) -> Result<Self> {
        let mut entries = HashMap::new();
        if path.exists() {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open cache {}", path.display()))?;
            for line in std::io::BufReader::new(file).lines() {
                let Ok(line) = line else { break };
                if let Ok(e) = serde_json::from_str::<Entry>(&line) {
                    entries.insert(e.key, e.response);
                }
            }
        }
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            entries: Mutex::new(entries),
            hits: Default::default(),
        })
    }

    fn key(&self, r: &ChatRequest) -> Result<String> {
        let mut h = Sha256::new();
        h.update(self.inner.fingerprint(r.model.as_deref())?);
        h.update(serde_json::to_vec(r)?);
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    fn append(&self, new: &[Entry]) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut text = String::new();
        for e in new {
            text.push_str(&serde_json::to_string(e)?);
            text.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot write cache {}", self.path.display()))?;
        // A torn line from an earlier kill must not swallow the first new entry.
        if f.metadata()?.len() > 0 && !ends_with_newline(&self.path)? {
            f.write_all(b"\n")?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
        Ok(())
    }
}

fn ends_with_newline(path: &Path) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::End(-1))?;
    let mut b = [0u8];
    f.read_exact(&mut b)?;
    Ok(b[0] == b'\n')
}

impl Backend for CachedBackend<'_> {
    fn fingerprint(&self, model: Option<&str>) -> Result<String> {
        self.inner.fingerprint(model)
    }

    fn chat_each(
        &self,
        requests: &[ChatRequest],
        done: &mut dyn FnMut(usize, ChatResponse) -> Result<()>,
    ) -> Result<()> {
        let keys = requests
            .iter()
            .map(|r| self.key(r))
            .collect::<Result<Vec<_>>>()?;
        // Hits are answered at once; each distinct miss is generated once and fans out to its copies.
        let mut misses: Vec<usize> = vec![];
        let mut copies: std::collections::HashMap<&str, Vec<usize>> = Default::default();
        for (i, k) in keys.iter().enumerate() {
            let hit = self.entries.lock().unwrap().get(k).cloned();
            match hit {
                Some(r) => {
                    self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    done(i, r)?;
                }
                None => {
                    let c = copies.entry(k.as_str()).or_default();
                    if c.is_empty() {
                        misses.push(i);
                    }
                    c.push(i);
                }
            }
        }
        if misses.is_empty() {
            return Ok(());
        }
        let miss_requests: Vec<ChatRequest> = misses.iter().map(|&i| requests[i].clone()).collect();
        let mut pending: Vec<Entry> = vec![];
        self.inner.chat_each(&miss_requests, &mut |m, response| {
            let key = &keys[misses[m]];
            pending.push(Entry {
                key: key.clone(),
                response: response.clone(),
            });
            if pending.len() >= 16 {
                self.append(&pending)?;
                pending.clear();
            }
            self.entries
                .lock()
                .unwrap()
                .insert(key.clone(), response.clone());
            for &i in &copies[key.as_str()] {
                done(i, response.clone())?;
            }
            Ok(())
        })?;
        self.append(&pending)
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }
}
