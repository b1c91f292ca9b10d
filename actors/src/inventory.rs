//! What a node has: its host (CPU cores, RAM via sysinfo), its CUDA devices (count from libtorch,
//! names and memory from NVML when the driver is present), and the split of those devices between
//! inference and training.

use serde::{Deserialize, Serialize};

/// One compute device of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Device {
    /// The host CPU. A CPU-only node counts as one CPU device.
    Cpu,
    /// `cuda:<index>`.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: usize,
    /// From NVML; `None` when NVML is not available.
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
    /// Percent of the last sample period a kernel ran (NVML).
    #[serde(default)]
    pub utilization_percent: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub os: String,
    pub cpu_cores: usize,
    pub cpu_brand: String,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inventory {
    pub host: HostInfo,
    pub cuda_available: bool,
    pub gpus: Vec<GpuInfo>,
    /// Why NVML could not be used, if it could not (no driver on CPU-only machines).
    pub nvml_error: Option<String>,
}

impl Inventory {
    /// Looks at this machine. Never fails: what cannot be read is left empty.
    pub fn detect() -> Self {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        sys.refresh_cpu_all();
        let host = HostInfo {
            hostname: sysinfo::System::host_name().unwrap_or_default(),
            os: sysinfo::System::long_os_version().unwrap_or_default(),
            cpu_cores: sys.cpus().len(),
            cpu_brand: sys
                .cpus()
                .first()
                .map(|c| c.brand().trim().to_string())
                .unwrap_or_default(),
            memory_total_bytes: sys.total_memory(),
            memory_available_bytes: sys.available_memory(),
        };
        let cuda_available = tch::Cuda::is_available();
        let count = if cuda_available {
            usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
        } else {
            0
        };
        let (gpus, nvml_error) = match gpu_details(count) {
            Ok(gpus) => (gpus, None),
            Err(e) => (
                (0..count)
                    .map(|index| GpuInfo {
                        index,
                        name: None,
                        memory_total_bytes: None,
                        memory_free_bytes: None,
                        utilization_percent: None,
                    })
                    .collect(),
                Some(e),
            ),
        };
        Self {
            host,
            cuda_available,
            gpus,
            nvml_error,
        }
    }

    /// The same inventory with host memory and GPU memory and utilisation as they are now.
    pub fn refreshed(&self) -> Self {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        let mut now = self.clone();
        now.host.memory_available_bytes = sys.available_memory();
        if self.gpus.is_empty() {
            return now;
        }
        if let Ok(gpus) = gpu_details(self.gpus.len()) {
            now.gpus = gpus;
        }
        now
    }

    /// The node's devices: its GPUs, or the CPU alone when it has none.
    pub fn devices(&self) -> Vec<Device> {
        if self.gpus.is_empty() {
            vec![Device::Cpu]
        } else {
            self.gpus.iter().map(|g| Device::Cuda(g.index)).collect()
        }
    }
}

fn gpu_details(count: usize) -> Result<Vec<GpuInfo>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
    (0..count)
        .map(|index| {
            let dev = nvml
                .device_by_index(index as u32)
                .map_err(|e| e.to_string())?;
            let mem = dev.memory_info().ok();
            Ok(GpuInfo {
                index,
                name: dev.name().ok(),
                memory_total_bytes: mem.as_ref().map(|m| m.total),
                memory_free_bytes: mem.as_ref().map(|m| m.free),
                utilization_percent: dev.utilization_rates().ok().map(|u| u.gpu),
            })
        })
        .collect()
}

/// Free memory of CUDA devices now (NVML), by index; `None` where NVML cannot tell.
pub fn gpu_free_bytes(indices: &[usize]) -> Vec<(usize, Option<u64>)> {
    let nvml = nvml_wrapper::Nvml::init().ok();
    indices
        .iter()
        .map(|&i| {
            let free = nvml.as_ref().and_then(|n| {
                n.device_by_index(i as u32)
                    .ok()?
                    .memory_info()
                    .ok()
                    .map(|m| m.free)
            });
            (i, free)
        })
        .collect()
}

/// Whether `need` bytes fit on each device, given each one's free bytes (`None`: unknown, not
/// checked). The error names the devices short of it and what they have.
pub fn fits_on_each(need: u64, free: &[(usize, Option<u64>)]) -> Result<(), String> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let short: Vec<String> = free
        .iter()
        .filter_map(|&(i, f)| {
            f.filter(|&f| f < need)
                .map(|f| format!("cuda:{i} has {:.1} GiB free", gib(f)))
        })
        .collect();
    if short.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "needs {:.1} GiB free on each of its devices; {}",
            gib(need),
            short.join(", ")
        ))
    }
}

/// Which devices of a node serve inference and which train.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub inference: Vec<Device>,
    pub training: Vec<Device>,
}

/// Splits a node's devices by fractions.
///
/// * No GPU: the CPU serves both roles (one slot each; the counts are configured elsewhere).
/// * One GPU: both roles share it (when both fractions are above zero).
/// * Two or more: `round(n × fraction)` each, at least one for a role whose fraction is above
///   zero, never more than `n` together (the larger share gives way).
pub fn split(devices: &[Device], inference_fraction: f64, training_fraction: f64) -> Split {
    let gpus: Vec<Device> = devices
        .iter()
        .filter(|d| matches!(d, Device::Cuda(_)))
        .cloned()
        .collect();
    let wants = |f: f64| f > 0.0;
    match gpus.len() {
        0 => Split {
            inference: if wants(inference_fraction) {
                vec![Device::Cpu]
            } else {
                vec![]
            },
            training: if wants(training_fraction) {
                vec![Device::Cpu]
            } else {
                vec![]
            },
        },
        1 => Split {
            inference: if wants(inference_fraction) {
                gpus.clone()
            } else {
                vec![]
            },
            training: if wants(training_fraction) {
                gpus
            } else {
                vec![]
            },
        },
        n => {
            let share = |f: f64| {
                if wants(f) {
                    ((n as f64 * f).round() as usize).max(1)
                } else {
                    0
                }
            };
            let (mut inf, mut train) = (share(inference_fraction), share(training_fraction));
            while inf + train > n {
                if inf >= train {
                    inf -= 1;
                } else {
                    train -= 1;
                }
            }
            Split {
                inference: gpus[..inf].to_vec(),
                training: gpus[n - train..].to_vec(),
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_model_fits_only_where_every_device_has_room() {
        let gib = 1u64 << 30;
        assert!(fits_on_each(4 * gib, &[(0, Some(10 * gib)), (1, None)]).is_ok());
        let e = fits_on_each(
            4 * gib,
            &[(0, Some(10 * gib)), (1, Some(3 * gib)), (2, Some(gib))],
        )
        .unwrap_err();
        assert!(
            e.starts_with("needs 4.0 GiB free on each of its devices"),
            "{e}"
        );
        assert!(
            e.contains("cuda:1 has 3.0 GiB free") && e.contains("cuda:2 has 1.0 GiB free"),
            "{e}"
        );
        assert!(!e.contains("cuda:0"), "{e}");
    }

    use super::*;

    fn cuda(n: usize) -> Vec<Device> {
        (0..n).map(Device::Cuda).collect()
    }

    #[test]
    fn cpu_only_node_serves_both_roles_on_the_cpu() {
        let s = split(&[Device::Cpu], 0.6, 0.4);
        assert_eq!(s.inference, vec![Device::Cpu]);
        assert_eq!(s.training, vec![Device::Cpu]);
    }

    #[test]
    fn one_gpu_is_shared() {
        let s = split(&cuda(1), 0.6, 0.4);
        assert_eq!(s.inference, cuda(1));
        assert_eq!(s.training, cuda(1));
    }

    #[test]
    fn several_gpus_split_by_fraction_without_overlap() {
        for (n, inf, train) in [(2, 1, 1), (4, 2, 2), (5, 3, 2), (8, 5, 3), (10, 6, 4)] {
            let s = split(&cuda(n), 0.6, 0.4);
            assert_eq!((s.inference.len(), s.training.len()), (inf, train), "n={n}");
            assert!(s.inference.iter().all(|d| !s.training.contains(d)), "n={n}");
        }
    }

    #[test]
    fn zero_fraction_gets_nothing_and_the_rest_is_respected() {
        let s = split(&cuda(4), 1.0, 0.0);
        assert_eq!(s.inference, cuda(4));
        assert!(s.training.is_empty());
        let s = split(&cuda(3), 0.9, 0.9);
        assert_eq!(s.inference.len() + s.training.len(), 3);
    }

    #[test]
    fn detect_reports_this_host() {
        let inv = Inventory::detect();
        assert!(inv.host.cpu_cores >= 1);
        assert!(inv.host.memory_total_bytes > 0);
        assert!(!inv.devices().is_empty());
    }
}
