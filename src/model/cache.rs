//! Per-layer key/value cache owned by the caller, so one model can serve many batches. Each layer's
//! keys and values live in buffers with room to grow: a decode step writes its column in place instead
//! of copying the whole history (which cost more than the step's own arithmetic at batch 16). A cache
//! made for a generation of N tokens allocates room for all N at once, so no step reallocates (on a GPU
//! a reallocation copies every layer's history).

use anyhow::Result;
use candle_core::Tensor;

/// Spare positions allocated beyond what is needed, so most steps write in place.
const HEADROOM: usize = 128;

#[derive(Clone)]
struct LayerKv {
    /// (b, kv_heads, capacity, d); the first `len` positions are filled.
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    fn with_capacity(k: &Tensor, v: &Tensor, cap: usize) -> Result<Self> {
        let (b, h, t, d) = k.dims4()?;
        let kb = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
        let vb = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
        kb.slice_set(&k.contiguous()?, 2, 0)?;
        vb.slice_set(&v.contiguous()?, 2, 0)?;
        Ok(Self {
            k: kb,
            v: vb,
            len: t,
        })
    }

    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }
}

#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions allocated beyond the filled ones whenever a layer's buffer is (re)made.
    room: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_room(num_layers, HEADROOM)
    }

    /// A cache whose buffers keep room for `room` more positions than their prompt (a generation's
    /// max_tokens): the decode steps then write in place to the end.
    pub fn with_room(num_layers: usize, room: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            room: room.max(1),
        }
    }

    /// Number of cached positions (including left padding).
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values (b, kv_heads, t, d) and returns the whole history.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let slot = &mut self.layers[layer];
        match slot {
            None => *slot = Some(LayerKv::with_capacity(k, v, t + self.room)?),
            Some(l) if l.len + t > l.k.dim(2)? => {
                let (pk, pv) = l.filled()?;
                let grown = LayerKv::with_capacity(
                    &Tensor::cat(&[&pk, k], 2)?,
                    &Tensor::cat(&[&pv, v], 2)?,
                    2 * (l.len + t) + HEADROOM,
                )?;
                *l = grown;
            }
            Some(l) => {
                l.k.slice_set(&k.contiguous()?, 2, l.len)?;
                l.v.slice_set(&v.contiguous()?, 2, l.len)?;
                l.len += t;
            }
        }
        slot.as_ref().expect("just filled").filled()
    }

    /// Keeps (and reorders or repeats) batch rows: used to drop finished rows and to fan a prompt out to n samples.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            l.k = l.k.index_select(rows, 0)?;
            l.v = l.v.index_select(rows, 0)?;
        }
        Ok(())
    }

    /// Appends another cache's rows below these. The shorter history is left-padded with zeros to the
    /// longer one's length; returns how many padding columns each side gained (self, other), which the
    /// caller adds to those rows' padding so the mask hides them.
    pub fn merge(&mut self, other: KvCache) -> Result<(usize, usize)> {
        let (t1, t2) = (self.len(), other.len());
        if self.is_empty() {
            let room = self.room.max(other.room);
            *self = other;
            self.room = room;
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
            if let (Some(a), Some(b)) = (mine.as_ref(), theirs) {
                let ((k1, v1), (k2, v2)) = (a.filled()?, b.filled()?);
                let k = Tensor::cat(&[pad(&k1, t - t1)?, pad(&k2, t - t2)?], 0)?;
                let v = Tensor::cat(&[pad(&v1, t - t1)?, pad(&v2, t - t2)?], 0)?;
                *mine = Some(LayerKv::with_capacity(&k, &v, t + self.room)?);
            }
        }
        Ok((t - t1, t - t2))
    }

    /// Drops the first `n` positions of every row (padding no row needs any more).
    pub fn trim_left(&mut self, n: usize) -> Result<()> {
        for slot in self.layers.iter_mut() {
            if let Some(l) = slot.as_ref() {
                let (k, v) = l.filled()?;
                let len = l.len;
                *slot = Some(LayerKv::with_capacity(
                    &k.narrow(2, n, len - n)?,
                    &v.narrow(2, n, len - n)?,
                    len - n + self.room,
                )?);
            }
        }
        Ok(())
    }

    /// Puts each row's cached positions in a new order (`orders[row]` lists old columns): used to move
    /// padding that sat between a shared prompt start and its rest to the front.
    pub fn reorder_positions(&mut self, orders: &[Vec<u32>]) -> Result<()> {
        let mut index: Option<Tensor> = None;
        for slot in self.layers.iter_mut() {
            let Some(l) = slot.as_ref() else { continue };
            let (k, v) = l.filled()?;
            let (b, h, t, d) = k.dims4()?;
            let idx = match &index {
                Some(i) => i.clone(),
                None => {
                    let mut flat = Vec::with_capacity(b * h * t * d);
                    for order in orders {
                        for _ in 0..h {
                            for &c in order {
                                flat.extend(std::iter::repeat_n(c, d));
                            }
                        }
                    }
                    let i = Tensor::from_vec(flat, (b, h, t, d), k.device())?;
                    index = Some(i.clone());
                    i
                }
            };
            let k = k.contiguous()?.gather(&idx, 2)?;
            let v = v.contiguous()?.gather(&idx, 2)?;
            *slot = Some(LayerKv::with_capacity(&k, &v, t + self.room)?);
        }
        Ok(())
    }
}
