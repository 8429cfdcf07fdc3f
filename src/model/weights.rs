//! The tensors of a checkpoint, under the Hub's names, whatever file they came from.
//!
//! Each tensor is read from its file on the host, converted there to what it will be on the device (f32,
//! bf16 or GGUF blocks, per [`LoadSpec`]) and only then uploaded, one at a time: the load peak is the
//! resident size plus one tensor. GGUF tensors are renamed to the Hub's names and their q/k rows
//! un-permuted (llama.cpp stores them in the interleaved-RoPE order), so that one model implementation with
//! the half-split RoPE of transformers serves both.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::{LoadSpec, WeightMode};

/// One stored weight: dense (f32 or bf16), or GGUF blocks.
#[derive(Clone)]
pub enum Weight {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl Weight {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Quant(q) => q.shape().dims().to_vec(),
        }
    }

    /// The weight as a dense tensor: itself (f32 or bf16), or its blocks dequantized to f32.
    pub fn dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.clone(),
            Weight::Quant(q) => q.dequantize(device)?,
        })
    }
}

/// What a checkpoint tensor is to the model, which decides how it is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// One of a block's seven projections.
    Projection,
    Embedding,
    Head,
    /// Norm weights and anything else: always f32.
    Other,
}

fn role(name: &str) -> Role {
    const PROJECTIONS: [&str; 7] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    if name == "model.embed_tokens.weight" {
        Role::Embedding
    } else if name == "lm_head.weight" {
        Role::Head
    } else if PROJECTIONS
        .iter()
        .any(|p| name.ends_with(&format!(".{p}.weight")))
    {
        Role::Projection
    } else {
        Role::Other
    }
}

/// A dense host tensor in the form its role and the spec ask for, uploaded to `device`. In quantized mode
/// the projections and the head become GGUF blocks and the embedding bf16 (its lookup widens rows to f32).
fn place(t: Tensor, role: Role, spec: LoadSpec, device: &Device) -> Result<Weight> {
    let dense = |dtype: DType| -> Result<Weight> {
        Ok(Weight::Dense(t.to_dtype(dtype)?.to_device(device)?))
    };
    match (role, spec.mode) {
        (Role::Other, _) | (_, WeightMode::F32) => dense(DType::F32),
        (_, WeightMode::Bf16) | (Role::Embedding, WeightMode::Quantized) => dense(DType::BF16),
        (Role::Projection | Role::Head, WeightMode::Quantized) => {
            let q =
                QTensor::quantize_onto(&t, spec.quantize.ggml(), device).with_context(|| {
                    format!(
                        "cannot quantize a {:?} weight to {}; choose another --quantize type",
                        t.dims(),
                        spec.quantize.name()
                    )
                })?;
            Ok(Weight::Quant(Arc::new(q)))
        }
    }
}

/// One tensor's entry in a safetensors header.
#[derive(serde::Deserialize)]
struct SafetensorsEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Reads `file` tensor by tensor (no mapping of the whole file, so its pages never count as the process's
/// memory) and hands each to `f` as a host tensor in its stored dtype.
fn read_safetensors(file: &Path, mut f: impl FnMut(String, Tensor) -> Result<()>) -> Result<()> {
    let bad = || {
        format!(
            "{}: cannot read safetensors (missing, truncated or corrupt)",
            file.display()
        )
    };
    let mut fh = std::fs::File::open(file).with_context(bad)?;
    let size = fh.metadata().with_context(bad)?.len() as usize;
    let mut len = [0u8; 8];
    fh.read_exact(&mut len).with_context(bad)?;
    let header_len = u64::from_le_bytes(len) as usize;
    if header_len > size.saturating_sub(8) || header_len > 100 << 20 {
        bail!("{}: header length {header_len} exceeds the file", bad());
    }
    let mut header = vec![0u8; header_len];
    fh.read_exact(&mut header).with_context(bad)?;
    let mut entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{}: the header is not valid JSON", bad()))?;
    entries.remove("__metadata__");
    let data_start = 8 + header_len;
    let mut entries: Vec<(String, SafetensorsEntry)> = entries
        .into_iter()
        .map(|(name, v)| {
            let e: SafetensorsEntry = serde_json::from_value(v)
                .with_context(|| format!("{}: bad header entry for tensor `{name}`", bad()))?;
            Ok((name, e))
        })
        .collect::<Result<_>>()?;
    // File order: one forward pass over the file.
    entries.sort_by_key(|(_, e)| e.data_offsets[0]);
    for (name, e) in entries {
        let dtype = match e.dtype.as_str() {
            "F32" => DType::F32,
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            "F64" => DType::F64,
            other => bail!(
                "{}: tensor `{name}` has dtype {other}; expected F32, BF16 or F16",
                file.display()
            ),
        };
        let [a, b] = e.data_offsets;
        let want = e.shape.iter().product::<usize>() * dtype.size_in_bytes();
        if b < a || b - a != want || data_start + b > size {
            bail!(
                "{}: tensor `{name}` ({:?} {}) does not fit its data offsets {a}..{b}: {}",
                file.display(),
                e.shape,
                e.dtype,
                bad()
            );
        }
        let mut bytes = vec![0u8; b - a];
        fh.seek(SeekFrom::Start((data_start + a) as u64))
            .with_context(bad)?;
        fh.read_exact(&mut bytes).with_context(bad)?;
        let t = Tensor::from_raw_buffer(&bytes, dtype, &e.shape, &Device::Cpu)?;
        drop(bytes);
        f(name, t)?;
    }
    Ok(())
}

pub struct WeightStore {
    /// The file(s) the weights came from, for error messages.
    pub source: PathBuf,
    tensors: HashMap<String, Weight>,
    device: Device,
}

impl WeightStore {
    pub fn from_tensors(
        source: PathBuf,
        tensors: HashMap<String, Weight>,
        device: &Device,
    ) -> Self {
        Self {
            source,
            tensors,
            device: device.clone(),
        }
    }

    /// Loads `model.safetensors`, or every shard named by `model.safetensors.index.json`, as f32.
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_hf_dir_as(dir, LoadSpec::default(), false, device)
    }

    /// [`WeightStore::from_hf_dir`] in the form `spec` asks for. `tied`: the head is the embedding, so in
    /// quantized mode a quantized copy becomes `lm_head.weight` beside the bf16 embedding.
    pub fn from_hf_dir_as(dir: &Path, spec: LoadSpec, tied: bool, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing field `weight_map`", index.display()))?;
            let mut names: Vec<String> = map
                .values()
                .map(|v| {
                    v.as_str().map(String::from).with_context(|| {
                        format!("{}: field `weight_map` holds a non-string", index.display())
                    })
                })
                .collect::<Result<_>>()?;
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json; is this an HF model directory?",
                dir.display()
            );
        };
        let mut tensors = HashMap::new();
        let progress = super::load_progress(&files);
        for file in &files {
            read_safetensors(file, |name, t| {
                progress.inc((t.elem_count() * t.dtype().size_in_bytes()) as u64);
                let r = role(&name);
                if tied && r == Role::Head {
                    return Ok(()); // the embedding is the head (transformers ties them the same way)
                }
                if tied && r == Role::Embedding && spec.mode == WeightMode::Quantized {
                    tensors.insert(
                        "lm_head.weight".to_string(),
                        place(t.clone(), Role::Head, spec, device).with_context(|| {
                            format!("{}: tensor `{name}` as the head", file.display())
                        })?,
                    );
                }
                let w = place(t, r, spec, device)
                    .with_context(|| format!("{}: tensor `{name}`", file.display()))?;
                tensors.insert(name, w);
                Ok(())
            })?;
        }
        progress.finish_and_clear();
        Ok(Self {
            source: dir.to_path_buf(),
            tensors,
            device: device.clone(),
        })
    }

    /// Reads every tensor of a GGUF file in the form `spec` asks for: in quantized mode the projections
    /// (and the head, a tied embedding included) keep their GGUF blocks; dense ones are quantized at load.
    pub fn from_gguf(
        path: &Path,
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        cfg: &LlamaConfig,
        spec: LoadSpec,
        device: &Device,
    ) -> Result<Self> {
        let mut tensors = HashMap::new();
        let untied = content.tensor_infos.contains_key("output.weight");
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort_by_key(|n| content.tensor_infos[*n].offset);
        for gguf_name in names {
            if gguf_name == "rope_freqs.weight" {
                continue; // folded into the config's RoPE scaling
            }
            let Some(hf_name) = hf_name_of_gguf(gguf_name) else {
                bail!(
                    "{}: unexpected tensor `{gguf_name}` in a llama GGUF",
                    path.display()
                );
            };
            let q = content
                .tensor(file, gguf_name, &Device::Cpu)
                .with_context(|| {
                    format!(
                        "{}: cannot read tensor `{gguf_name}` (truncated or corrupt file?)",
                        path.display()
                    )
                })?;
            let heads = if hf_name.ends_with("q_proj.weight") {
                Some(cfg.num_attention_heads)
            } else if hf_name.ends_with("k_proj.weight") {
                Some(cfg.num_key_value_heads)
            } else {
                None
            };
            let r = role(&hf_name);
            let quantized = spec.mode == WeightMode::Quantized;
            let is_blocks = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            // A tied embedding is also the head: kept as blocks, decode streams 30 MB of Q8_0 a token
            // instead of 113 MB of f32 (the embedding lookup dequantizes its own copy).
            let tied_head = r == Role::Embedding && !untied;
            let weight = if quantized
                && is_blocks
                && (matches!(r, Role::Projection | Role::Head) || tied_head)
            {
                let q = match heads {
                    Some(h) => unpermute_rows_quant(&q, h)?,
                    None => q,
                };
                Weight::Quant(Arc::new(to_device_quant(q, device)?))
            } else {
                let t = q.dequantize(&Device::Cpu)?;
                let t = match heads {
                    Some(h) => unpermute_rows(&t, h)?,
                    None => t,
                };
                // The GGUF's own blocks held the embedding's values; rounding them to bf16 in quantized
                // mode would move them, so a dequantized embedding stays f32 there.
                let r = match (r, quantized && is_blocks) {
                    (Role::Embedding, true) => Role::Other,
                    _ => r,
                };
                place(t, r, spec, device)
                    .with_context(|| format!("{}: tensor `{gguf_name}`", path.display()))?
            };
            tensors.insert(hf_name, weight);
        }
        Ok(Self {
            source: path.to_path_buf(),
            tensors,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The weight `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let w = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.source.display()))?;
        if w.dims() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?} from the config",
                self.source.display(),
                w.dims(),
                shape
            );
        }
        Ok(w.clone())
    }

    /// `name` as a dense tensor (f32 or bf16; blocks dequantized to f32), checked to have `shape`.
    pub fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)?.dense(&self.device)
    }

    /// Every tensor as dense f32 (for export).
    pub fn all_dense(&self) -> Result<HashMap<String, Tensor>> {
        self.tensors
            .iter()
            .map(|(k, w)| {
                let t = w.dense(&self.device)?.to_dtype(DType::F32)?;
                Ok((k.clone(), t.contiguous()?))
            })
            .collect()
    }
}

/// llama.cpp's tensor names → the Hub's.
fn hf_name_of_gguf(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The permutation from llama.cpp's interleaved q/k row order to HF's half-split order:
/// HF row `h*d + j*d/2 + i` is GGUF row `h*d + 2*i + j`.
fn unpermuted_row_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    let d = head_rows(rows, heads)?;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                order.push(h * d + 2 * i + j);
            }
        }
    }
    Ok(order)
}

/// Rows per head, checked to split evenly into two RoPE halves.
fn head_rows(rows: usize, heads: usize) -> Result<usize> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        bail!("cannot un-permute {rows} rows for {heads} heads");
    }
    Ok(rows / heads)
}

fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let d = head_rows(rows, heads)?;
    Ok(t.reshape((heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

/// The inverse of [`unpermute_rows`]: HF order → llama.cpp's (used by tests and GGUF writers).
pub fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let d = rows / heads;
    Ok(t.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

/// GGUF blocks read on the host, moved to `device`.
fn to_device_quant(q: QTensor, device: &Device) -> Result<QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let shape = q.shape().clone();
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    Ok(QTensor::new(storage, shape)?)
}

/// Row permutation on the raw blocks: quantization blocks run along a row, so rows move as byte ranges.
fn unpermute_rows_quant(q: &QTensor, heads: usize) -> Result<QTensor> {
    let device = &Device::Cpu;
    let dims = q.shape().dims().to_vec();
    let [rows, cols] = dims[..] else {
        bail!("expected a 2-D q/k weight, got shape {dims:?}");
    };
    let row_bytes = cols / q.dtype().block_size() * q.dtype().type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(data.len());
    for src in unpermuted_row_order(rows, heads)? {
        out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, q.dtype())?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips() -> Result<()> {
        let t = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)?.reshape((8, 3))?;
        let back = unpermute_rows(&permute_rows(&t, 2)?, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, t.to_vec2::<f32>()?);
        // Row 1 of HF order (head 0, first half, i=1) sits at GGUF row 2.
        let p = permute_rows(&t, 2)?.to_vec2::<f32>()?;
        assert_eq!(p[2], t.to_vec2::<f32>()?[1]);
        Ok(())
    }

    #[test]
    fn gguf_names_map_to_hub_names() {
        assert_eq!(
            hf_name_of_gguf("blk.3.attn_k.weight").unwrap(),
            "model.layers.3.self_attn.k_proj.weight"
        );
        assert_eq!(hf_name_of_gguf("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name_of_gguf("blk.x.attn_k.weight").is_none());
    }
}
