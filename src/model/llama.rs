//! The Llama forward pass: RMSNorm, RoPE (incl. llama3 scaling), grouped-query attention, SwiGLU MLP,
//! tied or untied head. Rows may be left-padded and carry their own positions, so prompts of different
//! lengths share one forward; the head runs only on the rows the caller asks for.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope;

use super::cache::KvCache;
use super::config::LlamaConfig;
use super::cpu::Kernels;
use super::hooks::{Captured, HookPoint, RowHooks, StepHooks};
use super::linear::Linear;
use super::ops::{self, rms_norm};
use super::weights::WeightStore;
use crate::lora::{Adapter, RowAdapters, RowGroups, Target};

pub use super::ops::{causal_mask, last_position, log_softmax};

pub(crate) struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

pub(crate) struct Mlp {
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

pub(crate) struct Block {
    pub(crate) input_layernorm: Tensor,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: Tensor,
    pub(crate) mlp: Mlp,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub(crate) embed_tokens: Tensor,
    pub(crate) layers: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    pub(crate) inv_freq: Tensor,
    /// CPU kernels or the device-generic path, chosen once at load ([`Kernels::for_device`]).
    pub kernels: Kernels,
    /// The KV cache's dtype: bf16 where the weights are not f32 on the generic path (half the memory
    /// of a GPU's cache), f32 on the CPU kernels (their decode reads f32) and for f32 weights.
    kv_dtype: DType,
    device: Device,
}

/// One layer's walk settings: its index, the rows' adapters and the model's kernels.
#[derive(Clone, Copy)]
struct LayerLora<'a> {
    adapters: &'a PreparedAdapters<'a>,
    layer: usize,
    kernels: Kernels,
    kv_dtype: DType,
}

/// A forward's rows by adapter, with what gathering them takes on the device, made once per forward.
enum PreparedAdapters<'a> {
    Base,
    Whole(&'a Adapter),
    /// Each adapter's rows (as a u32 index tensor); `base` rows run none; `order` puts the groups'
    /// rows, stacked group by group and then the base rows, back in row order.
    Mixed {
        groups: Vec<(&'a Adapter, Tensor, usize)>,
        base: usize,
        order: Tensor,
    },
}

impl<'a> PreparedAdapters<'a> {
    fn new(adapters: RowAdapters<'a>, b: usize, device: &Device) -> Result<Self> {
        Ok(match adapters.groups(b) {
            RowGroups::Base => PreparedAdapters::Base,
            RowGroups::Whole(a) => PreparedAdapters::Whole(a),
            RowGroups::Mixed(groups) => {
                let mut stacked: Vec<usize> = groups.iter().flat_map(|g| g.rows.clone()).collect();
                let with_adapter = stacked.len();
                stacked.extend((0..b).filter(|r| adapters.of(*r).is_none()));
                let mut order = vec![0u32; b];
                for (at, &r) in stacked.iter().enumerate() {
                    order[r] = at as u32;
                }
                PreparedAdapters::Mixed {
                    groups: groups
                        .into_iter()
                        .map(|g| {
                            let n = g.rows.len();
                            let idx: Vec<u32> = g.rows.iter().map(|&r| r as u32).collect();
                            Ok((g.adapter, Tensor::new(idx.as_slice(), device)?, n))
                        })
                        .collect::<Result<_>>()?,
                    base: b - with_adapter,
                    order: Tensor::new(order.as_slice(), device)?,
                }
            }
        })
    }
}

impl LayerLora<'_> {
    /// `linear(x)`, plus each row's `scale · (x Aᵀ) Bᵀ` where its adapter adapts `target` in this layer.
    fn project(&self, linear: &Linear, target: Target, x: &Tensor) -> Result<Tensor> {
        let y = linear.forward(x, self.kernels)?;
        let delta = |a: &Adapter, x: &Tensor, shape: &[usize]| -> Result<Option<Tensor>> {
            let Some(p) = a.pair(self.layer, target) else {
                return Ok(None);
            };
            let rows = x.elem_count() / x.dims()[x.rank() - 1];
            let z = ops::lora_down(&x.reshape((rows, ()))?, p, a.scale)?;
            Ok(Some(ops::lora_up(&z, p)?.reshape(shape)?))
        };
        match self.adapters {
            PreparedAdapters::Base => Ok(y),
            PreparedAdapters::Whole(a) => match delta(a, x, y.dims())? {
                Some(d) => Ok((y + d)?),
                None => Ok(y),
            },
            PreparedAdapters::Mixed {
                groups,
                base,
                order,
            } => {
                // Each adapter's rows gathered, their rank-r products batched, stacked and put back.
                let mut parts = vec![];
                let mut any = false;
                let shape_of = |rows: usize| {
                    let mut s = y.dims().to_vec();
                    s[0] = rows;
                    s
                };
                for (a, idx, n) in groups {
                    let xg = x.index_select(idx, 0)?;
                    match delta(a, &xg, &shape_of(*n))? {
                        Some(d) => {
                            any = true;
                            parts.push(d);
                        }
                        None => parts.push(Tensor::zeros(shape_of(*n), y.dtype(), y.device())?),
                    }
                }
                if !any {
                    return Ok(y);
                }
                if *base > 0 {
                    parts.push(Tensor::zeros(shape_of(*base), y.dtype(), y.device())?);
                }
                let delta = Tensor::cat(&parts, 0)?.index_select(order, 0)?;
                Ok((y + delta)?)
            }
        }
    }
}

/// What one forward call sees: token ids, their positions and the additive attention mask.
pub struct Batch<'a> {
    /// (b, t) u32
    pub ids: &'a Tensor,
    /// (b, t) f32 positions (left padding shifts them per row)
    pub positions: &'a Tensor,
    /// (b, 1, t, kv) additive mask, or None when every row may see every earlier key
    pub mask: Option<&'a Tensor>,
    /// Each row's LoRA adapter, applied on top of the frozen weights.
    pub adapters: RowAdapters<'a>,
    /// Each row's interventions and captures at the hook points.
    pub hooks: Option<&'a StepHooks<'a>>,
}

/// `hooks` at `point` on x, when there are hooks.
fn hook(hooks: Option<&StepHooks>, point: HookPoint, x: Tensor) -> Result<Tensor> {
    match hooks {
        Some(h) => h.apply_tensor(point, x),
        None => Ok(x),
    }
}

impl Attention {
    fn load(w: &WeightStore, p: &str, cfg: &LlamaConfig, kernels: Kernels) -> Result<Self> {
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        Ok(Self {
            q_proj: Linear::new(w.get(&format!("{p}.q_proj.weight"), &[q, h])?, kernels)?,
            k_proj: Linear::new(w.get(&format!("{p}.k_proj.weight"), &[kv, h])?, kernels)?,
            v_proj: Linear::new(w.get(&format!("{p}.v_proj.weight"), &[kv, h])?, kernels)?,
            o_proj: Linear::new(w.get(&format!("{p}.o_proj.weight"), &[h, q])?, kernels)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        lora: LayerLora,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope(
            &heads(lora.project(&self.q_proj, Target::Q, x)?, nh)?,
            cos,
            sin,
        )?;
        let k = rope(
            &heads(lora.project(&self.k_proj, Target::K, x)?, nkv)?,
            cos,
            sin,
        )?;
        let v = heads(lora.project(&self.v_proj, Target::V, x)?, nkv)?;
        // Keys and values in the cache's dtype: bf16 with bf16 weights on the generic path, whose
        // products read them with f32 accumulation (PyTorch's bf16 attention); the softmax is f32.
        let kv = lora.kv_dtype;
        let (k, v) = (k.to_dtype(kv)?, v.to_dtype(kv)?);
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        let kv_len = k.dim(2)?;
        // Grouped-query attention without copying keys: the g query heads of one kv head become g*t rows.
        let g = nh / nkv;
        let q = q.reshape((b, nkv, g * t, hd))?.to_dtype(kv)?;
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * (1.0 / (hd as f64).sqrt()))?
            .reshape((b, nh, t, kv_len))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores)?.reshape((b, nkv, g * t, kv_len))?;
        let out = probs
            .to_dtype(kv)?
            .matmul(&v)?
            .to_dtype(DType::F32)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        lora.project(&self.o_proj, Target::O, &out)
    }
}

impl Mlp {
    fn load(w: &WeightStore, p: &str, cfg: &LlamaConfig, kernels: Kernels) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::new(w.get(&format!("{p}.gate_proj.weight"), &[i, h])?, kernels)?,
            up_proj: Linear::new(w.get(&format!("{p}.up_proj.weight"), &[i, h])?, kernels)?,
            down_proj: Linear::new(w.get(&format!("{p}.down_proj.weight"), &[h, i])?, kernels)?,
        })
    }

    fn forward(&self, x: &Tensor, lora: LayerLora) -> Result<Tensor> {
        let gate = lora.project(&self.gate_proj, Target::Gate, x)?.silu()?;
        let up = lora.project(&self.up_proj, Target::Up, x)?;
        lora.project(&self.down_proj, Target::Down, &(gate * up)?)
    }
}

impl Block {
    fn load(w: &WeightStore, i: usize, cfg: &LlamaConfig, kernels: Kernels) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: w.dense(&format!("{p}.input_layernorm.weight"), &[h])?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg, kernels)?,
            post_attention_layernorm: w
                .dense(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg, kernels)?,
        })
    }
}

impl Block {
    /// The block on the residual stream x (b, t, hidden), its hook points on the way: resid_pre, the
    /// attention's output, resid_mid, the MLP's output, resid_post.
    fn forward(
        &self,
        x: Tensor,
        (cos, sin): (&Tensor, &Tensor),
        batch: &Batch,
        cache: Option<(&mut KvCache, usize)>,
        lora: LayerLora,
        eps: f64,
    ) -> Result<Tensor> {
        let (l, hooks) = (lora.layer, batch.hooks);
        let x = hook(hooks, HookPoint::ResidPre(l), x)?;
        let h = rms_norm(&x, &self.input_layernorm, eps)?;
        let h = self
            .self_attn
            .forward(&h, cos, sin, batch.mask, cache, lora)?;
        let h = hook(hooks, HookPoint::AttnOut(l), h)?;
        let x = hook(hooks, HookPoint::ResidMid(l), (x + h)?)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, eps)?;
        let h = hook(hooks, HookPoint::MlpOut(l), self.mlp.forward(&h, lora)?)?;
        hook(hooks, HookPoint::ResidPost(l), (x + h)?)
    }
}

impl Llama {
    pub fn load(cfg: LlamaConfig, w: &WeightStore, device: &Device) -> Result<Self> {
        Self::load_with(cfg, w, device, Kernels::for_device(device))
    }

    /// [`Llama::load`] with the kernels chosen by the caller (tests compare the two paths in one process).
    pub fn load_with(
        cfg: LlamaConfig,
        w: &WeightStore,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = w.dense("model.embed_tokens.weight", &[v, h])?;
        // A tied model's store holds `lm_head.weight` only where it differs in form from the embedding
        // (quantized at load); otherwise the head is the embedding itself.
        let head = match w.contains("lm_head.weight") {
            true => "lm_head.weight",
            false => "model.embed_tokens.weight",
        };
        let lm_head = Linear::new(w.get(head, &[v, h])?, kernels)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(w, i, &cfg, kernels))
            .collect::<Result<Vec<_>>>()?;
        let inv_freq = Tensor::new(cfg.inv_freq(), device)?;
        let kv_dtype = match (kernels.cpu(), embed_tokens.dtype()) {
            (false, DType::BF16) => DType::BF16,
            _ => DType::F32,
        };
        Ok(Self {
            norm: w.dense("model.norm.weight", &[h])?,
            embed_tokens,
            layers,
            lm_head,
            inv_freq,
            kernels,
            kv_dtype,
            device: device.clone(),
            cfg,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// How many of the blocks' projections and the head are held as GGUF blocks.
    pub fn quantized_projections(&self) -> usize {
        let blocks = |l: &Linear| usize::from(matches!(l, Linear::Blocks(_) | Linear::Quant(_)));
        let per_layer: usize = self
            .layers
            .iter()
            .map(|b| {
                let (a, m) = (&b.self_attn, &b.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .into_iter()
                .map(blocks)
                .sum::<usize>()
            })
            .sum();
        per_layer + blocks(&self.lm_head)
    }

    /// The dtype the embedding is held in (f32, or bf16 in bf16 mode).
    pub fn embed_tokens_dtype(&self) -> candle_core::DType {
        self.embed_tokens.dtype()
    }

    /// Hidden states after the last block and the final norm, (b, t, hidden). With a cache, keys and
    /// values are appended to it and attention covers everything cached.
    pub fn forward(&self, batch: &Batch, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = batch.ids.dims2()?;
        let eps = self.cfg.rms_norm_eps;
        // cos/sin per row and position: (b, t, head_dim/2).
        let (cos, sin) = ops::rope_tables(batch.positions, &self.inv_freq)?;
        let mut x = self
            .embed_tokens
            .index_select(&batch.ids.flatten_all()?, 0)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((b, t, ()))?;
        let adapters = PreparedAdapters::new(batch.adapters, b, &self.device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let lora = LayerLora {
                adapters: &adapters,
                layer: i,
                kernels: self.kernels,
                kv_dtype: self.kv_dtype,
            };
            let cache = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(x, (&cos, &sin), batch, cache, lora, eps)?;
        }
        hook(
            batch.hooks,
            HookPoint::LnFinal,
            rms_norm(&x, &self.norm, eps)?,
        )
    }

    /// Logits for selected hidden rows: (n, hidden) → (n, vocab).
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden_rows, self.kernels)
    }

    /// Logits at every position of one unpadded sequence (tests and scoring).
    pub fn full_logits(&self, ids: &[u32]) -> Result<Tensor> {
        self.full_logits_with(ids, None)
    }

    /// [`Llama::full_logits`] with an adapter.
    pub fn full_logits_with(&self, ids: &[u32], adapter: Option<&Adapter>) -> Result<Tensor> {
        let h = self.forward_one(ids, adapter, None)?;
        self.logits(&h)
    }

    /// One unpadded sequence through the model with a row's interventions and captures: the hidden
    /// states after the final norm (t, hidden) and what the captures read, in the order the walk passed
    /// them.
    pub fn forward_hooked(
        &self,
        ids: &[u32],
        adapter: Option<&Adapter>,
        hooks: &RowHooks,
    ) -> Result<(Tensor, Vec<Captured>)> {
        hooks.check(self.cfg.hidden_size)?;
        let step = StepHooks::new(vec![Some(hooks)], vec![(0..ids.len()).map(Some).collect()]);
        let h = self.forward_one(ids, adapter, Some(&step))?;
        let captured = step.into_captured().pop().unwrap_or_default();
        Ok((h, captured))
    }

    fn forward_one(
        &self,
        ids: &[u32],
        adapter: Option<&Adapter>,
        hooks: Option<&StepHooks>,
    ) -> Result<Tensor> {
        let t = ids.len();
        let ids_t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let positions = Tensor::arange(0f32, t as f32, &self.device)?.unsqueeze(0)?;
        let mask = causal_mask(&[0], t, 0, &self.device)?;
        let batch = Batch {
            ids: &ids_t,
            positions: &positions,
            mask: mask.as_ref(),
            adapters: RowAdapters::Same(adapter),
            hooks,
        };
        Ok(self.forward(&batch, None)?.squeeze(0)?)
    }
}
