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
    /// Its tags (`--tag`, `resources.tags`).
    #[serde(default)]
    pub tags: crate::tags::Tags,
    /// Its `resources.*` settings.
    #[serde(default)]
    pub resources: Option<crate::placement::Resources>,
}

/// What a worker sends the head, inside a [`HeadFrame`] that names the sender. Local events of
/// the head (its timer, session changes) are not here: they never come from the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToHead {
    /// "Send my session key": the head answers `Welcome` to this node's agent on the node's own
    /// session (the only frame accepted without a key).
    Hello,
    Register(Box<WorkerInfo>),
    Pong {
        seq: u64,
    },
    Stream {
        request_id: String,
        event: StreamEvent,
    },
    JobProgress {
        trainer: String,
        job_id: String,
        attempt: u32,
        point: ProgressPoint,
    },
    JobFinished {
        trainer: String,
        job_id: String,
        attempt: u32,
        result: RunResult,
    },
    /// A worker with no model configured asks for the head's.
    WhichModel,
    /// The worker leaves on purpose (Ctrl-C): not a failure.
    Leaving,
    /// Its replicas changed (one started, loaded, drains or stopped): all of them, as now.
    Replicas {
        replicas: Vec<ReplicaInfo>,
    },
    /// It did not start the replica of `deployment` the head asked for on `slot`, and why (its
    /// memory, its roots).
    ReplicaRefused {
        slot: String,
        deployment: String,
        why: String,
    },
}

/// One message to the head: the sending node and the key the head gave that node's session. The
/// head accepts it only when the key is the one it sent to `node`'s agent over `node`'s own
/// session, so a peer cannot speak for another node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadFrame {
    pub node: String,
    pub key: String,
    pub msg: ToHead,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    Ping {
        seq: u64,
    },
    Generate {
        work: Box<ChatWork>,
        /// The worker's replica the head chose (`None`: any).
        #[serde(default)]
        replica: Option<String>,
    },
    /// Start a replica of a deployment on a free inference slot (the model path is on shared
    /// storage, as datasets and adapters are).
    StartReplica {
        slot: String,
        deployment: String,
        path: std::path::PathBuf,
        dtype: crate::deployments::Dtype,
    },
    /// Drain a replica (it finishes what it holds), then stop it and free its slot.
    StopReplica {
        slot: String,
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
    /// This session's key, to put in every `HeadFrame` (answer to `Hello`).
    Welcome {
        key: String,
    },
}

macro_rules! json_inbox {
    ($name:ident, $inner:ty) => {
        /// A frame as JSON bytes. Bytes that do not decode (a peer of another version, or a hostile
        /// one) become `Undecodable` with the reason: the receiver logs and drops them.
        #[derive(Debug)]
        pub enum $name {
            Frame($inner),
            Undecodable(String),
        }

        impl BytesConvertable for $name {
            fn into_bytes(self) -> Vec<u8> {
                match self {
                    Self::Frame(f) => serde_json::to_vec(&f).unwrap_or_default(),
                    // Never sent: only ever built on receipt.
                    Self::Undecodable(_) => Vec::new(),
                }
            }
            fn from_bytes(bytes: Vec<u8>) -> Self {
                match serde_json::from_slice(&bytes) {
                    Ok(f) => Self::Frame(f),
                    Err(e) => Self::Undecodable(format!(
                        "{e} ({} bytes; are head and worker the same version?)",
                        bytes.len()
                    )),
                }
            }
        }
    };
}

json_inbox!(HeadInbox, HeadFrame);
json_inbox!(WorkerInbox, ToWorker);
