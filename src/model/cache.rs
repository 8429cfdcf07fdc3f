//! Per-layer key/value cache owned by the caller, so one model can serve many batches.

use anyhow::Result;
use candle_core::Tensor;

#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions (including left padding).
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values (b, kv_heads, t, d) and returns the whole history.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match &self.layers[layer] {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }

    /// Keeps (and reorders or repeats) batch rows: used to drop finished rows and to fan a prompt out to n samples.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }

    /// Appends another cache's rows below these. The shorter history is left-padded with zeros to the
    /// longer one's length; returns how many padding columns each side gained (self, other), which the
    /// caller adds to those rows' padding so the mask hides them.
    pub fn merge(&mut self, other: KvCache) -> Result<(usize, usize)> {
        let (t1, t2) = (self.len(), other.len());
        if self.is_empty() || self.layers.iter().all(Option::is_none) {
            *self = other;
            return Ok((0, 0));
        }
        let t = t1.max(t2);
        let pad = |x: &Tensor, by: usize| -> Result<Tensor> {
            if by == 0 {
                return Ok(x.clone());
            }
            let (b, h, _, d) = x.dims4()?;
            let z = Tensor::zeros((b, h, by, d), x.dtype(), x.device())?;
            Ok(Tensor::cat(&[&z, x], 2)?)
        };
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            if let (Some((k1, v1)), Some((k2, v2))) = (mine.as_ref(), theirs) {
                let k = Tensor::cat(&[pad(k1, t - t1)?, pad(&k2, t - t2)?], 0)?;
                let v = Tensor::cat(&[pad(v1, t - t1)?, pad(&v2, t - t2)?], 0)?;
                *mine = Some((k, v));
            }
        }
        Ok((t - t1, t - t2))
    }

    /// Drops the first `n` positions of every row (padding no row needs any more).
    pub fn trim_left(&mut self, n: usize) -> Result<()> {
        let t = self.len();
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, n, t - n)?;
            *v = v.narrow(2, n, t - n)?;
        }
        Ok(())
    }
}
