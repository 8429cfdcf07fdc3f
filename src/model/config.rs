//! Llama hyper-parameters, read from an HF `config.json` (transformers 4.x and 5.x spellings) or from
//! GGUF metadata, and validated once so the model code can trust them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::Value;

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (transformers' "linear").
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling (transformers' "llama3").
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors stored in the file (llama.cpp's `rope_freqs.weight`).
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Reads `config.json`; every error names the file and the field.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_json(&json).with_context(|| format!("in model config {}", path.display()))
    }

    pub fn from_hf_json(json: &Value) -> Result<Self> {
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = json
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let llama_like = matches!(model_type, "llama" | "mistral")
            || archs
                .iter()
                .any(|a| matches!(*a, "LlamaForCausalLM" | "MistralForCausalLM"));
        if !llama_like {
            bail!(
                "field `model_type`: unsupported architecture {model_type:?} (architectures {archs:?}); \
                 introspect runs Llama-architecture models only"
            );
        }
        for (field, what) in [
            ("attention_bias", "attention biases"),
            ("mlp_bias", "MLP biases"),
        ] {
            if json.get(field).and_then(Value::as_bool) == Some(true) {
                bail!("field `{field}`: {what} are not supported");
            }
        }
        let hidden_size = req_usize(json, "hidden_size")?;
        let num_attention_heads = req_usize(json, "num_attention_heads")?;
        let num_key_value_heads =
            opt_usize(json, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match opt_usize(json, "head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        // transformers 5.x nests the RoPE settings in `rope_parameters`; 4.x uses `rope_theta` + `rope_scaling`.
        let rope_params = json.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = json
            .get("rope_theta")
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let scaling = json
            .get("rope_scaling")
            .filter(|v| v.is_object())
            .or(rope_params);
        let rope_scaling = match scaling {
            None => RopeScaling::Default,
            Some(s) => parse_rope_scaling(s).context("field `rope_scaling`")?,
        };
        let eos_token_ids = match json.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![as_id(n.as_u64(), "eos_token_id")?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| as_id(v.as_u64(), "eos_token_id"))
                .collect::<Result<_>>()?,
            Some(other) => {
                bail!("field `eos_token_id`: expected an id or a list of ids, got {other}")
            }
        };
        let bos_token_id = match json.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_id(v.as_u64(), "bos_token_id")?),
        };
        let cfg = Self {
            hidden_size,
            intermediate_size: req_usize(json, "intermediate_size")?,
            num_hidden_layers: req_usize(json, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: req_usize(json, "vocab_size")?,
            rms_norm_eps: json
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(json, "max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id,
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the `llama.*` keys of a GGUF header. `rope_freqs` are llama.cpp's stored per-frequency factors.
    pub fn from_gguf(content: &gguf_file::Content, rope_freqs: Option<Vec<f32>>) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            bail!(
                "field `general.architecture`: unsupported architecture {arch:?}; introspect runs Llama-architecture models only"
            );
        }
        let get_u = |key: &str| -> Result<usize> {
            let v = md
                .get(key)
                .with_context(|| format!("missing field `{key}`"))?;
            Ok(v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x as u64))
                .with_context(|| format!("field `{key}`: not an integer"))? as usize)
        };
        let get_f = |key: &str| -> Option<f64> {
            md.get(key)
                .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
        };
        let num_attention_heads = get_u("llama.attention.head_count")?;
        let hidden_size = get_u("llama.embedding_length")?;
        let num_key_value_heads =
            get_u("llama.attention.head_count_kv").unwrap_or(num_attention_heads);
        let head_dim = match get_u("llama.attention.key_length") {
            Ok(d) => d,
            Err(_) if num_attention_heads > 0 => hidden_size / num_attention_heads,
            Err(_) => 0,
        };
        let vocab_size = match get_u("llama.vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .context("missing field `llama.vocab_size` and no `tokenizer.ggml.tokens`")?,
        };
        let rope_scaling = match rope_freqs {
            Some(f) => RopeScaling::Factors(f),
            None => match md
                .get("llama.rope.scaling.type")
                .and_then(|v| v.to_string().ok())
            {
                Some(t) if t == "linear" => RopeScaling::Linear {
                    factor: get_f("llama.rope.scaling.factor").unwrap_or(1.0),
                },
                Some(t) if t != "none" => {
                    bail!("field `llama.rope.scaling.type`: unsupported value {t:?}")
                }
                _ => RopeScaling::Default,
            },
        };
        let id = |key: &str| get_u(key).ok().map(|v| v as u32);
        let cfg = Self {
            hidden_size,
            intermediate_size: get_u("llama.feed_forward_length")?,
            num_hidden_layers: get_u("llama.block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: get_f("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: get_f("llama.rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: get_u("llama.context_length").unwrap_or(4096),
            // Decided by the loader from the presence of `output.weight`.
            tie_word_embeddings: false,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects values the model code cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                bail!("field `{field}` must be positive, got 0");
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.num_key_value_heads,
                self.num_attention_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "field `head_dim` must be even for RoPE, got {}",
                self.head_dim
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            bail!(
                "field `rms_norm_eps` must be in (0, 1), got {}",
                self.rms_norm_eps
            );
        }
        if !(self.rope_theta > 1.0 && self.rope_theta.is_finite()) {
            bail!(
                "field `rope_theta` must be a finite number > 1, got {}",
                self.rope_theta
            );
        }
        for &id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if id as usize >= self.vocab_size {
                bail!(
                    "field `eos_token_id`/`bos_token_id`: id {id} is outside the vocabulary of {}",
                    self.vocab_size
                );
            }
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                bail!(
                    "tensor `rope_freqs.weight` has {} factors, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                );
            }
        }
        Ok(())
    }

    /// Rotary inverse frequencies (head_dim/2 of them), scaled exactly as transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64))
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => base.iter().map(|&f| (f / factor) as f32).collect(),
            RopeScaling::Factors(div) => base
                .iter()
                .zip(div)
                .map(|(&f, &d)| (f / d as f64) as f32)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                        if medium {
                            let smooth = (original_max_position_embeddings / wavelen
                                - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
        }
    }

    /// The HF `config.json` of this configuration (written by `model export`).
    pub fn to_hf_json(&self) -> Value {
        let mut j = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [one] => serde_json::json!(one),
                many => serde_json::json!(many),
            },
        });
        match &self.rope_scaling {
            RopeScaling::Default | RopeScaling::Factors(_) => {}
            RopeScaling::Linear { factor } => {
                j["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                j["rope_scaling"] = serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                });
            }
        }
        j
    }
}

fn parse_rope_scaling(s: &Value) -> Result<RopeScaling> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        let v = s
            .get(k)
            .and_then(Value::as_f64)
            .with_context(|| format!("`{k}` is missing or not a number"))?;
        if !(v.is_finite() && v > 0.0) {
            bail!("`{k}` must be a positive number, got {v}");
        }
        Ok(v)
    };
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => {
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            if high <= low {
                bail!("`high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})");
            }
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }
        }
        other => bail!("rope type {other:?} is not supported (supported: default, linear, llama3)"),
    })
}

fn opt_usize(json: &Value, field: &str) -> Result<Option<usize>> {
    match json.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= (1 << 32) => Ok(Some(n as usize)),
            _ => bail!("field `{field}`: expected a non-negative integer below 2^32, got {v}"),
        },
    }
}

fn req_usize(json: &Value, field: &str) -> Result<usize> {
    opt_usize(json, field)?.with_context(|| format!("missing field `{field}`"))
}

fn as_id(v: Option<u64>, field: &str) -> Result<u32> {
    match v {
        Some(n) if n < u32::MAX as u64 => Ok(n as u32),
        _ => bail!("field `{field}`: expected a token id"),
    }
}

impl crate::lora::LoraBase for LlamaConfig {
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }

    /// (out, in) of a projection's weight.
    fn projection_shape(&self, target: crate::lora::Target) -> (usize, usize) {
        use crate::lora::Target;
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match target {
            Target::Q => (q, h),
            Target::K | Target::V => (kv, h),
            Target::O => (h, q),
            Target::Gate | Target::Up => (i, h),
            Target::Down => (h, i),
        }
    }
}
