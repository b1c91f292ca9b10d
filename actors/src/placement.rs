//! From a node's split to its actors: inference devices grouped into replicas of the configured
//! tensor-parallel degree, and one trainer per training device (a CPU device holds the configured
//! number of slots of each kind).

use serde::{Deserialize, Serialize};

use crate::inventory::{Device, Split};

/// The resources a node was configured with (`resources.*`): what its placement is made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub inference_gpu_fraction: f64,
    pub training_gpu_fraction: f64,
    pub cpu_inference_slots: usize,
    pub cpu_training_slots: usize,
    pub tensor_parallel: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaPlan {
    pub name: String,
    pub devices: Vec<Device>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerPlan {
    pub name: String,
    pub device: Device,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub split: Split,
    pub tensor_parallel: usize,
    pub replicas: Vec<ReplicaPlan>,
    pub trainers: Vec<TrainerPlan>,
    /// Inference devices left over when their count is not a multiple of the TP degree.
    pub unused: Vec<Device>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resources.tensor_parallel: {0}")]
pub struct PlacementError(String);

pub fn place(
    split: Split,
    tensor_parallel: usize,
    cpu_inference_slots: usize,
    cpu_training_slots: usize,
) -> Result<Placement, PlacementError> {
    if tensor_parallel == 0 {
        return Err(PlacementError("must be at least 1".into()));
    }
    let gpus: Vec<Device> = split
        .inference
        .iter()
        .filter(|d| matches!(d, Device::Cuda(_)))
        .cloned()
        .collect();
    let mut replicas = Vec::new();
    let mut unused = Vec::new();
    if split.inference.contains(&Device::Cpu) {
        // Tensor parallelism over one CPU makes no sense: each slot is a whole replica.
        for _ in 0..cpu_inference_slots {
            replicas.push(vec![Device::Cpu]);
        }
    } else if !gpus.is_empty() {
        if gpus.len() < tensor_parallel {
            return Err(PlacementError(format!(
                "{tensor_parallel} GPUs per replica, but inference has {} ({})",
                gpus.len(),
                gpus.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for chunk in gpus.chunks(tensor_parallel) {
            if chunk.len() == tensor_parallel {
                replicas.push(chunk.to_vec());
            } else {
                unused.extend_from_slice(chunk);
            }
        }
    }
    let mut trainers = Vec::new();
    for d in &split.training {
        let slots = if *d == Device::Cpu {
            cpu_training_slots
        } else {
            1
        };
        for _ in 0..slots {
            trainers.push(d.clone());
        }
    }
    Ok(Placement {
        tensor_parallel,
        replicas: replicas
            .into_iter()
            .enumerate()
            .map(|(i, devices)| ReplicaPlan {
                name: format!("inference-{i}"),
                devices,
            })
            .collect(),
        trainers: trainers
            .into_iter()
            .enumerate()
            .map(|(i, device)| TrainerPlan {
                name: format!("trainer-{i}"),
                device,
            })
            .collect(),
        unused,
        split,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::split;

    #[test]
    fn cpu_node_gets_its_configured_slots() {
        let p = place(split(&[Device::Cpu], 0.6, 0.4), 1, 2, 1).unwrap();
        assert_eq!(p.replicas.len(), 2);
        assert_eq!(p.trainers.len(), 1);
        assert_eq!(p.replicas[1].name, "inference-1");
    }

    #[test]
    fn gpus_are_grouped_by_tensor_parallel_degree() {
        let gpus: Vec<Device> = (0..8).map(Device::Cuda).collect();
        let p = place(split(&gpus, 0.6, 0.4), 2, 1, 1).unwrap();
        // round(8 × 0.6) = 5 inference GPUs → two TP-2 replicas and one unused; 3 trainers.
        assert_eq!(p.replicas.len(), 2);
        assert_eq!(
            p.replicas[1].devices,
            vec![Device::Cuda(2), Device::Cuda(3)]
        );
        assert_eq!(p.unused, vec![Device::Cuda(4)]);
        assert_eq!(p.trainers.len(), 3);
        assert_eq!(p.trainers[0].device, Device::Cuda(5));
    }

    #[test]
    fn too_few_gpus_for_the_degree_is_an_error() {
        let gpus: Vec<Device> = (0..2).map(Device::Cuda).collect();
        let e = place(split(&gpus, 0.5, 0.5), 2, 1, 1).unwrap_err();
        assert!(
            e.to_string().starts_with("resources.tensor_parallel"),
            "{e}"
        );
    }
}
