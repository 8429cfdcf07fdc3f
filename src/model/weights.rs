//! The tensors of a checkpoint, under the Hub's names, whatever file they came from.
//!
//! HF safetensors (one file or shards) are loaded as f32. GGUF tensors are renamed to the Hub's names and
//! their q/k rows un-permuted (llama.cpp stores them in the interleaved-RoPE order), so that one model
//! implementation with the half-split RoPE of transformers serves both; they stay quantized until a caller
//! asks for a dense copy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;

/// One stored weight: dense f32, or GGUF blocks kept as they are.
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

    pub fn dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.clone(),
            Weight::Quant(q) => q.dequantize(device)?,
        })
    }
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
        for file in &files {
            let loaded = candle_core::safetensors::load(file, device).with_context(|| {
                format!(
                    "{}: cannot read safetensors (missing, truncated or corrupt)",
                    file.display()
                )
            })?;
            for (name, t) in loaded {
                let t = match t.dtype() {
                    DType::F32 => t,
                    DType::BF16 | DType::F16 | DType::F64 => t.to_dtype(DType::F32)?,
                    other => bail!(
                        "{}: tensor `{name}` has dtype {other:?}; expected f32, bf16 or f16",
                        file.display()
                    ),
                };
                tensors.insert(name, Weight::Dense(t));
            }
        }
        Ok(Self {
            source: dir.to_path_buf(),
            tensors,
            device: device.clone(),
        })
    }

    /// Reads every tensor of a GGUF file. `keep_quantized` keeps the 2-D projection weights as GGUF blocks.
    pub fn from_gguf(
        path: &Path,
        content: &gguf_file::Content,
        file: &mut std::fs::File,
        cfg: &LlamaConfig,
        keep_quantized: bool,
        device: &Device,
    ) -> Result<Self> {
        let mut tensors = HashMap::new();
        for gguf_name in content.tensor_infos.keys() {
            if gguf_name == "rope_freqs.weight" {
                continue; // folded into the config's RoPE scaling
            }
            let Some(hf_name) = hf_name_of_gguf(gguf_name) else {
                bail!(
                    "{}: unexpected tensor `{gguf_name}` in a llama GGUF",
                    path.display()
                );
            };
            let q = content.tensor(file, gguf_name, device).with_context(|| {
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
            // A tied embedding is also the head: kept as blocks, decode streams 30 MB of Q8_0 a token
            // instead of 113 MB of f32 (the embedding lookup dequantizes its own copy).
            let tied_head = hf_name == "model.embed_tokens.weight"
                && !content.tensor_infos.contains_key("output.weight");
            let is_projection = hf_name.contains(".self_attn.")
                || hf_name.contains(".mlp.")
                || hf_name == "lm_head.weight"
                || tied_head;
            let keep = keep_quantized
                && is_projection
                && !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
            let weight = if keep {
                let q = match heads {
                    Some(h) => unpermute_rows_quant(&q, h, device)?,
                    None => q,
                };
                Weight::Quant(Arc::new(q))
            } else {
                let t = q.dequantize(device)?;
                let t = match heads {
                    Some(h) => unpermute_rows(&t, h)?,
                    None => t,
                };
                Weight::Dense(t)
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

    /// Stores the blocks' seven projection weights as bf16 ([`super::WeightMode::Bf16`]).
    pub fn projections_to_bf16(&mut self) -> Result<()> {
        const PROJECTIONS: [&str; 7] = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        for (name, w) in self.tensors.iter_mut() {
            let is_projection = PROJECTIONS
                .iter()
                .any(|p| name.ends_with(&format!(".{p}.weight")));
            if is_projection {
                *w = Weight::Dense(w.dense(&self.device)?.to_dtype(DType::BF16)?);
            }
        }
        Ok(())
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

    /// A dense f32 copy of `name`, checked to have `shape`.
    pub fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)?.dense(&self.device)
    }

    /// Every tensor as dense f32 (for export).
    pub fn all_dense(&self) -> Result<HashMap<String, Tensor>> {
        self.tensors
            .iter()
            .map(|(k, w)| Ok((k.clone(), w.dense(&self.device)?.contiguous()?)))
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

/// Row permutation on the raw blocks: quantization blocks run along a row, so rows move as byte ranges.
fn unpermute_rows_quant(q: &QTensor, heads: usize, device: &Device) -> Result<QTensor> {
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
