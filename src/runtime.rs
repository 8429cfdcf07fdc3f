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
}

pub fn device(kind: DeviceKind) -> Result<Device> {
    Ok(match kind {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda if cfg!(feature = "cuda") => Device::new_cuda(0)?,
        DeviceKind::Metal if cfg!(feature = "metal") => Device::new_metal(0)?,
        other => bail!(
            "--device {other:?}: this build has no {other:?} support; rebuild with `--features {}`",
            format!("{other:?}").to_lowercase()
        ),
    })
}
