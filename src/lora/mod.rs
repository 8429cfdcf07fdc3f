//! LoRA adapters: `W x + (alpha/r) · B A x` on any of a Llama block's seven projections.
//!
//! An [`Adapter`] is plain data (A and B per adapted projection) kept apart from the frozen model, so one
//! loaded model serves several adapters chosen per request, and training updates only these tensors.

pub mod peft;
pub mod rows;

pub use rows::{same_adapter, AdapterGroup, RowAdapters, RowGroups};

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

/// The seven projections of a Llama block, named as on the Hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    pub fn hub_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`: the module that holds the projection.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_hub_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.hub_name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What an adapter needs to know of its base model: how many blocks, and each projection's (out, in).
/// The model implements it (`LlamaConfig`), so this module depends on no model code.
pub trait LoraBase {
    fn num_layers(&self) -> usize;
    fn projection_shape(&self, target: Target) -> (usize, usize);
}

/// Parses "q_proj,v_proj" or "all".
pub fn parse_targets(s: &str) -> Result<Vec<Target>> {
    if s.trim() == "all" {
        return Ok(Target::ALL.to_vec());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match Target::from_hub_name(part) {
            Some(t) if !out.contains(&t) => out.push(t),
            Some(_) => {}
            None => bail!(
                "unknown LoRA target `{part}`; use any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or `all`"
            ),
        }
    }
    if out.is_empty() {
        bail!("no LoRA target given");
    }
    out.sort();
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// Only these layers carry adapters (None: all).
    pub layers: Option<Vec<usize>>,
    /// rsLoRA scales by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// Rank `r` on all seven projections of every layer, alpha/r scaling, no dropout.
    pub fn every_projection(r: usize, alpha: f64) -> Self {
        Self {
            r,
            alpha,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            layers: None,
            use_rslora: false,
        }
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn adapts_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }
}

/// One adapted projection: A (r, in) and B (out, r).
#[derive(Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

#[derive(Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    /// `layers[l][target.index()]`.
    pub layers: Vec<[Option<LoraPair>; 7]>,
    /// alpha/r, kept as a field because every forward needs it.
    pub scale: f64,
}

impl Adapter {
    /// A fresh adapter with PEFT's default initialisation: A ~ Kaiming-uniform(a=√5), i.e. U(±1/√in), and
    /// B = 0, so training starts from the base model. Seeded by us (Candle's CPU RNG cannot be seeded).
    pub fn init(
        config: LoraConfig,
        model: &impl LoraBase,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if config.r == 0 {
            bail!("LoRA rank must be at least 1");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(model.num_layers());
        for l in 0..model.num_layers() {
            let mut row: [Option<LoraPair>; 7] = Default::default();
            if config.adapts_layer(l) {
                for &t in &config.targets {
                    let (out, inp) = model.projection_shape(t);
                    let bound = 1.0 / (inp as f32).sqrt();
                    let a: Vec<f32> = (0..config.r * inp)
                        .map(|_| rng.random_range(-bound..bound))
                        .collect();
                    row[t.index()] = Some(LoraPair {
                        a: Tensor::from_vec(a, (config.r, inp), device)?,
                        b: Tensor::zeros((out, config.r), candle_core::DType::F32, device)?,
                    });
                }
            }
            layers.push(row);
        }
        Ok(Self {
            scale: config.scale(),
            config,
            layers,
        })
    }

    pub fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Every (layer, target, pair), in a fixed order (layer, then target).
    pub fn pairs(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.layers.iter().enumerate().flat_map(|(l, row)| {
            Target::ALL
                .into_iter()
                .filter_map(move |t| row[t.index()].as_ref().map(|p| (l, t, p)))
        })
    }

    /// The lowest layer with an adapter: backpropagation stops there.
    pub fn lowest_layer(&self) -> Option<usize> {
        self.layers
            .iter()
            .position(|row| row.iter().any(Option::is_some))
    }

    /// The trainable tensors under PEFT's names, A then B of each pair, in [`Adapter::pairs`] order.
    pub fn params(&self) -> Vec<(String, Tensor)> {
        self.pairs()
            .flat_map(|(l, t, p)| {
                [
                    (peft::key(l, t, "A"), p.a.clone()),
                    (peft::key(l, t, "B"), p.b.clone()),
                ]
            })
            .collect()
    }

    /// Replaces the trainable tensors, given in [`Adapter::params`] order.
    pub fn set_params(&mut self, values: Vec<Tensor>) -> Result<()> {
        let slots: Vec<(usize, Target)> = self.pairs().map(|(l, t, _)| (l, t)).collect();
        if values.len() != 2 * slots.len() {
            bail!(
                "expected {} tensors for this adapter, got {}",
                2 * slots.len(),
                values.len()
            );
        }
        let mut it = values.into_iter();
        for (l, t) in slots {
            let p = self.layers[l][t.index()]
                .as_mut()
                .expect("listed by pairs()");
            let (a, b) = (it.next().expect("counted"), it.next().expect("counted"));
            if a.shape() != p.a.shape() || b.shape() != p.b.shape() {
                bail!("shape mismatch for {}", peft::key(l, t, "A"));
            }
            p.a = a;
            p.b = b;
        }
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.pairs()
            .map(|(_, _, p)| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// `scale · B A`, the change this adapter makes to the weight of (layer, target).
    pub fn delta(&self, layer: usize, target: Target) -> Result<Option<Tensor>> {
        Ok(match self.pair(layer, target) {
            Some(p) => Some((p.b.matmul(&p.a)? * self.scale)?),
            None => None,
        })
    }
}

/// Adapters loaded side by side, chosen by name per request. Each is held by an owned handle: a row that
/// leased one keeps it while it decodes, even if the adapter is dropped from the set meanwhile.
#[derive(Default, Clone)]
pub struct AdapterSet {
    adapters: BTreeMap<String, Arc<Adapter>>,
}

impl AdapterSet {
    pub fn insert(&mut self, name: &str, adapter: Adapter) {
        self.adapters.insert(name.to_string(), Arc::new(adapter));
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Adapter>> {
        match self.adapters.get(name) {
            Some(a) => Ok(a),
            None => bail!(
                "no adapter named `{name}`; loaded: {}",
                if self.adapters.is_empty() {
                    "none".to_string()
                } else {
                    self.names().collect::<Vec<_>>().join(", ")
                }
            ),
        }
    }

    /// Drops the adapter; false when there was none of that name.
    pub fn remove(&mut self, name: &str) -> bool {
        self.adapters.remove(name).is_some()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}
