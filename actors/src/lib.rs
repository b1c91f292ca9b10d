//! Tessera's actor tree (ractor). Per node: a [`supervisor`] with restart policies over the
//! [`jobs`] manager, [`trainer`]s, [`inference`] replicas and (on a head) the [`deployments`]
//! manager with its per-deployment [`autoscaler`]; the [`router`] that picks a replica
//! per request; the [`inventory`] and its [`placement`] into actors; the node's [`tags`]; the
//! [`node`] handle the HTTP facade drives. Every payload that may cross nodes is a serde type ([`messages`], [`jobs::types`]).

pub mod autoscaler;
pub mod cluster;
pub mod deployments;
pub mod directory;
pub mod failover;
pub mod health;
pub mod inference;
pub mod inventory;
pub mod jobs;
pub mod messages;
pub mod node;
pub mod placement;
pub mod restart_policy;
pub mod router;
pub mod supervisor;
pub mod tags;
pub mod trainer;

pub use node::{Node, NodeConfig};
