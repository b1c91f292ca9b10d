//! The job manager's messages and figures: what the HTTP side, the trainers (their reports) and
//! the cluster send it. Apart from the actor, so that the directory (which holds the manager's
//! address) and the manager (which finds trainers in the directory) do not import each other.

use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::types::{
    JobError, JobEvent, JobPage, JobQuery, JobRecord, JobSpec, JobState, ProgressPoint, RunResult,
};

pub type Reply<T> = RpcReplyPort<Result<T, JobError>>;

pub enum JobMsg {
    Submit(JobSpec, Reply<JobRecord>),
    Get(String, Reply<JobRecord>),
    List(JobQuery, Reply<JobPage>),
    Cancel(String, Reply<JobRecord>),
    /// Progress and state changes of a job, until it ends.
    Subscribe(String, mpsc::Sender<JobEvent>, Reply<JobRecord>),
    Stats(RpcReplyPort<JobStats>),
    /// From a trainer's thread.
    Progress {
        job_id: String,
        trainer: String,
        attempt: u32,
        point: ProgressPoint,
    },
    Finished {
        job_id: String,
        trainer: String,
        attempt: u32,
        result: RunResult,
    },
    /// The directory's trainers changed (one started, restarted or was lost).
    TrainersChanged,
    /// Assign queued jobs again (a refusal's backoff is over).
    Dispatch,
    /// Stop assigning; stop running jobs at a checkpoint (they go back to the queue); end the
    /// event streams; reply when every trainer has reported.
    Shutdown(RpcReplyPort<()>),
}

impl ractor::Message for JobMsg {}

/// For `/metrics` and `/cluster`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStats {
    pub counts: Vec<(JobState, usize)>,
    /// Sum over running jobs of their latest tokens/s.
    pub training_tokens_per_s: f64,
    /// Trainer name → the job it runs.
    pub running: Vec<(String, String)>,
}
