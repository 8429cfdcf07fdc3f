//! The CPU fast path: the only code in src/ that reads CPU storage or calls `introspect_kernels`.
//!
//! Everything outside this module is device-generic Candle (the code CUDA and Metal run, see
//! `model/ops.rs`). A model decides once, at load, whether its walks take these kernels ([`Kernels`]);
//! `INTROSPECT_KERNELS=off` makes a CPU model take the generic path, so the tests cover it here.

pub mod decode;
pub mod linear;
pub mod train;

use std::ops::Range;

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Storage, StorageRef, Tensor, WithDType};
use introspect_kernels::{DenseWeight, Weights};

/// Which code a model's three walks (tensor forward, decode step, training pass) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// introspect's CPU kernels where they apply (contiguous f32/bf16 data in CPU memory).
    Cpu,
    /// Candle's device-generic ops only: what CUDA and Metal run.
    Generic,
}

impl Kernels {
    /// The kernels for a model on `device`: the CPU's unless `INTROSPECT_KERNELS=off`.
    pub fn for_device(device: &Device) -> Self {
        let off = std::env::var("INTROSPECT_KERNELS").is_ok_and(|v| v == "off" || v == "0");
        if device.is_cpu() && !off {
            Kernels::Cpu
        } else {
            Kernels::Generic
        }
    }

    pub fn cpu(self) -> bool {
        self == Kernels::Cpu
    }

    /// `f` over the tensors' f32 data when these are the CPU kernels and every tensor is contiguous f32 in
    /// CPU memory; None otherwise (the caller then runs Candle's ops).
    pub fn f32_slices<R>(
        self,
        ts: &[&Tensor],
        f: impl FnOnce(&[&[f32]]) -> R,
    ) -> Result<Option<R>> {
        if !self.cpu() {
            return Ok(None);
        }
        let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
        let mut slices = Vec::with_capacity(ts.len());
        for (storage, layout) in &guards {
            match (&**storage, layout.contiguous_offsets()) {
                (Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) => {
                    slices.push(&data[a..b])
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(f(&slices)))
    }
}

/// A contiguous CPU tensor's data of element type `T`, borrowed without a copy for as long as this lives.
pub(crate) struct CpuSlice<'a, T> {
    storage: StorageRef<'a>,
    range: Range<usize>,
    elem: std::marker::PhantomData<T>,
}

/// Most weights and activations are f32.
pub(crate) type CpuF32<'a> = CpuSlice<'a, f32>;

impl<'a, T: WithDType> CpuSlice<'a, T> {
    pub(crate) fn of(t: &'a Tensor) -> Result<Self> {
        ensure!(
            t.dtype() == T::DTYPE,
            "reading in place needs {:?} tensors, not {:?}",
            T::DTYPE,
            t.dtype()
        );
        let (storage, layout) = t.storage_and_layout();
        let Some((a, b)) = layout.contiguous_offsets() else {
            bail!("reading in place needs contiguous tensors")
        };
        ensure!(
            matches!(&*storage, Storage::Cpu(_)),
            "reading in place runs on the CPU"
        );
        Ok(Self {
            storage,
            range: a..b,
            elem: std::marker::PhantomData,
        })
    }
}

impl<T: WithDType> std::ops::Deref for CpuSlice<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &*self.storage {
            Storage::Cpu(c) => &c.as_slice::<T>().expect("checked dtype")[self.range.clone()],
            _ => unreachable!("checked on the CPU"),
        }
    }
}

/// A dense weight read in place: f32, or bf16 (`WeightMode::Bf16`), whose products are bf16 × bf16.
pub(crate) enum DenseSlice<'a> {
    F32(CpuF32<'a>),
    Bf16(CpuSlice<'a, half::bf16>),
}

impl<'a> DenseSlice<'a> {
    pub(crate) fn of(t: &'a Tensor) -> Result<Self> {
        Ok(match t.dtype() {
            candle_core::DType::BF16 => DenseSlice::Bf16(CpuSlice::of(t)?),
            _ => DenseSlice::F32(CpuF32::of(t)?),
        })
    }

    /// The elements as the bf16 products read them.
    pub(crate) fn elements(&self) -> introspect_kernels::Elements<'_> {
        match self {
            DenseSlice::F32(v) => introspect_kernels::Elements::F32(v),
            DenseSlice::Bf16(v) => introspect_kernels::Elements::Bf16(v),
        }
    }

    /// As a (rows × cols) product's weights.
    pub(crate) fn weights(&self, rows: usize, cols: usize) -> Weights<'_> {
        match self {
            DenseSlice::F32(w) => DenseWeight::weights(w, rows, cols),
            DenseSlice::Bf16(w) => DenseWeight::weights(w, rows, cols),
        }
    }

    /// Row `i` of a (rows × cols) matrix as f32 (the embedding lookup).
    pub(crate) fn row_f32(&self, i: usize, cols: usize, out: &mut Vec<f32>) {
        match self {
            DenseSlice::F32(w) => out.extend_from_slice(&w[i * cols..(i + 1) * cols]),
            DenseSlice::Bf16(w) => {
                out.extend(w[i * cols..(i + 1) * cols].iter().map(|v| v.to_f32()))
            }
        }
    }
}
