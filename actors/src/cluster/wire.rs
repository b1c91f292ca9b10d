//! What crosses the cluster socket: serde enums framed as JSON bytes inside ractor_cluster's
//! messages. Small control and token messages only; weights, checkpoints and datasets stay on
//! shared storage and only their paths travel.

use ractor::BytesConvertable;
use serde::{Deserialize, Serialize};

use crate::inventory::Inventory;
use crate::jobs::{Assignment, ProgressPoint, RunResult};
use crate::messages::{ChatWork, ReplicaInfo, StreamEvent};
use crate::placement::Placement;

/// Events of one stream a worker may send ahead of the head's credit.
pub const STREAM_WINDOW: u32 = 64;

/// The head grants credit in batches of this many delivered events.
pub const CREDIT_BATCH: u32 = 16;

/// pg group of the head's cluster actor.
pub const HEAD_GROUP: &str = "tessera.head";

/// pg group of one worker's agent.
pub fn worker_group(node: &str) -> String {
    format!("tessera.worker.{node}")
}

/// A worker as it introduces itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique node name (host, pid and a random suffix).
    pub node: String,
    pub hostname: String,
    pub inventory: Inventory,
    pub placement: Placement,
    /// Its replicas, named as on the worker (`inference-0`).
    pub replicas: Vec<ReplicaInfo>,
    /// Its trainers: (name on the worker, device).
    pub trainers: Vec<(String, String)>,
    /// Jobs its trainers still run (after a reconnect): (trainer, job id, attempt).
    pub running: Vec<(String, String, u32)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToHead {
    Register(Box<WorkerInfo>),
    Pong {
        node: String,
        seq: u64,
    },
    Stream {
        request_id: String,
        event: StreamEvent,
    },
    JobProgress {
        node: String,
        trainer: String,
        job_id: String,
        attempt: u32,
        point: ProgressPoint,
    },
    JobFinished {
        node: String,
        trainer: String,
        job_id: String,
        attempt: u32,
        result: RunResult,
    },
    /// A worker with no model configured asks for the head's.
    WhichModel {
        node: String,
    },
    /// The worker leaves on purpose (Ctrl-C): not a failure.
    Leaving {
        node: String,
    },
    /// Local only: the heartbeat timer.
    Tick,
    /// Local only: a cluster session closed (`authenticated`: it had passed the cookie check).
    SessionClosed {
        peer: String,
        address: String,
        authenticated: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    Ping {
        seq: u64,
    },
    Generate {
        work: ChatWork,
    },
    Cancel {
        request_id: String,
    },
    /// The head delivered `n` more events of this stream to its client: the worker may send `n` more.
    Credit {
        request_id: String,
        n: u32,
    },
    RunJob {
        trainer: String,
        assignment: Box<Assignment>,
    },
    CancelJob {
        trainer: String,
        job_id: String,
        checkpoint: bool,
        /// `Some(attempt)`: that attempt is stale; stop it without writing.
        #[serde(default)]
        stale_attempt: Option<u32>,
    },
    /// The head dropped this worker (missed heartbeats): stop its jobs, then register again.
    Evicted,
    /// The head does not know this worker (it restarted): register again.
    Reregister,
    /// The model path the head serves (answer to `WhichModel`).
    UseModel {
        path: std::path::PathBuf,
    },
}

macro_rules! json_inbox {
    ($name:ident, $inner:ty) => {
        pub struct $name(pub $inner);

        impl BytesConvertable for $name {
            fn into_bytes(self) -> Vec<u8> {
                serde_json::to_vec(&self.0).expect("cluster messages serialise")
            }
            fn from_bytes(bytes: Vec<u8>) -> Self {
                // A peer of another version could send what we cannot read: make it visible.
                Self(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    panic!(
                        "undecodable cluster message ({e}); are head and worker the same version?"
                    )
                }))
            }
        }
    };
}

json_inbox!(HeadInbox, ToHead);
json_inbox!(WorkerInbox, ToWorker);
