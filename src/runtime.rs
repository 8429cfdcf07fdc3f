//! Process-wide settings that must be fixed before the first tensor op: threads and the device.

use anyhow::{bail, Result};
use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    Metal,
}

/// Candle's element-wise pool spins hard by default, which stalls on a busy 2-core machine; a short spin
/// keeps it robust. Both pools read their settings once, so this runs first thing in `main`.
pub fn init_threads() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called at the start of main, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
    }
    // Candle asks for the thread count on every matmul and, unless RAYON_NUM_THREADS is set, re-reads
    // /proc/cpuinfo each time (2–3% of a training step).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: as above, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    keep_freed_memory();
}

/// Training and prefill allocate and free the same multi-megabyte tensors over and over. glibc hands
/// such blocks back to the kernel at once (mmap/trim), and every reuse then page-faults fresh zeroed
/// memory: 10–20% of a LoRA step. Keeping freed memory in the heap takes that away (measured with
/// `introspect bench`: 7.8 → 6.1 s per step).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before other threads start.
    unsafe {
        // 32 MiB is glibc's ceiling for the mmap threshold; larger requests still use mmap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

pub fn device(kind: DeviceKind) -> Result<Device> {
    Ok(match kind {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda if cfg!(feature = "cuda") => {
            // TF32 tensor cores for the f32 products that remain (LoRA, attention), as PyTorch's
            // `allow_tf32`; bf16 products keep f32 accumulation (Candle's default, PyTorch's too).
            // INTROSPECT_TF32=off keeps full f32 (the exactness checks against transformers' f32).
            let tf32 = !matches!(std::env::var("INTROSPECT_TF32").as_deref(), Ok("off" | "0"));
            candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
            candle_core::cuda::set_gemm_reduced_precision_bf16(false);
            Device::new_cuda(0)?
        }
        DeviceKind::Metal if cfg!(feature = "metal") => Device::new_metal(0)?,
        other => bail!(
            "--device {other:?}: this build has no {other:?} support; rebuild with `--features {}`",
            format!("{other:?}").to_lowercase()
        ),
    })
}
