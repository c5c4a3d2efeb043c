//! Where the GPUs come from: NVML on a machine with an NVIDIA driver, or simulated GPUs.
//!
//! NVML is loaded at run time (`libnvidia-ml.so.1`); on a machine without a driver it fails to
//! load and the scheduler falls back to simulated GPUs, saying so in its start-up log. Simulated
//! GPUs have a fixed total and a "foreign" usage that tests set through the API.

use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

use crate::table::{Gpu, GpuObservation};

/// Errors from the GPU inventory.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("NVML is not available: {0}")]
    NvmlUnavailable(String),
    #[error("NVML reported no GPUs")]
    NoDevices,
    #[error("NVML query failed on GPU {index}: {message}")]
    Query { index: u32, message: String },
}

/// The source of GPU readings.
#[derive(Clone)]
pub enum Inventory {
    Nvml(Arc<Nvml>),
    Simulated,
}

impl Inventory {
    /// "nvml" or "simulated", as `GetStatus` reports it.
    pub fn kind(&self) -> &'static str {
        match self {
            Inventory::Nvml(_) => "nvml",
            Inventory::Simulated => "simulated",
        }
    }
}

/// Try to load NVML and list its GPUs.
pub fn open_nvml(reserve: u64) -> Result<(Inventory, Vec<Gpu>), InventoryError> {
    let nvml = Nvml::init().map_err(|e| InventoryError::NvmlUnavailable(e.to_string()))?;
    let count = nvml
        .device_count()
        .map_err(|e| InventoryError::NvmlUnavailable(e.to_string()))?;
    if count == 0 {
        return Err(InventoryError::NoDevices);
    }
    let mut gpus = Vec::new();
    for index in 0..count {
        let q = |e: nvml_wrapper::error::NvmlError| InventoryError::Query {
            index,
            message: e.to_string(),
        };
        let dev = nvml.device_by_index(index).map_err(q)?;
        let mem = dev.memory_info().map_err(q)?;
        gpus.push(Gpu {
            index,
            uuid: dev.uuid().map_err(q)?,
            name: dev.name().map_err(q)?,
            simulated: false,
            total: mem.total,
            reserve: reserve.min(mem.total),
            observed_used: mem.used,
            processes: processes(&dev),
            simulated_foreign: 0,
        });
    }
    Ok((Inventory::Nvml(Arc::new(nvml)), gpus))
}

/// Compute and graphics processes with their memory, merged by pid. `None` if NVML cannot list
/// them (then foreign use is estimated as used minus leased).
fn processes(dev: &nvml_wrapper::Device<'_>) -> Option<Vec<(u32, u64)>> {
    let compute = dev.running_compute_processes().ok()?;
    let graphics = dev.running_graphics_processes().unwrap_or_default();
    let mut out: Vec<(u32, u64)> = Vec::new();
    for p in compute.into_iter().chain(graphics) {
        let used = match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => b,
            UsedGpuMemory::Unavailable => 0,
        };
        match out.iter_mut().find(|(pid, _)| *pid == p.pid) {
            Some((_, u)) => *u = (*u).max(used),
            None => out.push((p.pid, used)),
        }
    }
    Some(out)
}

/// Read every GPU once (blocking: call from `spawn_blocking`).
pub fn read_nvml(nvml: &Nvml) -> Result<Vec<GpuObservation>, InventoryError> {
    let count = nvml
        .device_count()
        .map_err(|e| InventoryError::NvmlUnavailable(e.to_string()))?;
    let mut out = Vec::new();
    for index in 0..count {
        let q = |e: nvml_wrapper::error::NvmlError| InventoryError::Query {
            index,
            message: e.to_string(),
        };
        let dev = nvml.device_by_index(index).map_err(q)?;
        let mem = dev.memory_info().map_err(q)?;
        out.push(GpuObservation {
            index,
            total: mem.total,
            used: mem.used,
            processes: processes(&dev),
        });
    }
    Ok(out)
}

/// Simulated GPUs of the given sizes.
pub fn simulated(sizes: &[u64], reserve: u64) -> Vec<Gpu> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &total)| Gpu {
            index: i as u32,
            uuid: format!("GPU-simulated-{i}"),
            name: format!("Simulated GPU {i}"),
            simulated: true,
            total,
            reserve: reserve.min(total),
            observed_used: 0,
            processes: None,
            simulated_foreign: 0,
        })
        .collect()
}
