//! What a fine-tune job is: its spec, state, priority, the assignment of one attempt to a trainer,
//! its progress history and outcome. Serde types, shared by the store, the actors, the HTTP facade
//! and other nodes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tessera_engine::train::hyperparams::TrainJob;
use tessera_engine::train::trainer::Progress;

use crate::tags::Tags;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Priority::High, Priority::Normal, Priority::Low]
            .into_iter()
            .find(|p| p.as_str() == s)
    }

    /// Sort key: lower runs first.
    pub fn rank(self) -> i64 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }
}

/// A job to queue: what to train (paths already checked by the facade) and how urgently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub train: TrainJob,
    pub priority: Priority,
    /// Tags a node must carry for its trainers to run the job (`placement.tags`).
    #[serde(default)]
    pub tags: Tags,
}

/// One attempt of a job handed to a trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub job_id: String,
    /// The attempt number (1 for the first run): every progress point and result carries it, and
    /// the job manager ignores those of any attempt but the current one.
    pub attempt: u32,
    pub job: TrainJob,
    /// Continue from the latest checkpoint under the output path (a re-queued job).
    pub resume: bool,
}

/// One point of a job's progress history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressPoint {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub tokens_per_s: f64,
    pub eval_loss: Option<f64>,
    /// Seconds since the Unix epoch.
    pub at: f64,
}

impl ProgressPoint {
    pub fn from_progress(p: &Progress, at: f64) -> Self {
        Self {
            step: p.step,
            total_steps: p.total_steps,
            epoch: p.epoch,
            loss: p.loss,
            learning_rate: p.learning_rate,
            tokens_per_s: p.tokens_per_s,
            eval_loss: p.eval_loss,
            at,
        }
    }
}

/// How a trainer's run of a job ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RunResult {
    /// The adapter is written; `summary` is `training_summary.json`'s content.
    Succeeded {
        summary: serde_json::Value,
    },
    Failed {
        error: String,
    },
    /// Stopped by a cancel (the user's, or a shutdown's: the manager knows which).
    Stopped {
        step: usize,
    },
    /// Not started: the trainer was busy with another job. Not an attempt that failed.
    Refused {
        reason: String,
    },
}

/// A job as stored and as `GET /jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub status: JobState,
    pub priority: Priority,
    pub dataset_path: PathBuf,
    pub output_path: PathBuf,
    pub base_model: Option<PathBuf>,
    pub hyperparameters: serde_json::Value,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// The trainer (and node) running it, or that ran it last.
    pub trainer: Option<String>,
    pub node: Option<String>,
    /// Times a trainer was given it (more than one after a resume); the current attempt's number.
    pub attempts: u32,
    /// Attempts that ended without an outcome (the head or the trainer crashed or was lost);
    /// at `jobs.max_attempts` the job fails.
    pub interruptions: u32,
    /// The latest progress point.
    pub progress: Option<ProgressPoint>,
    pub error: Option<String>,
    /// The adapter directory, once succeeded (usable as `adapter_path` at once).
    pub adapter_path: Option<PathBuf>,
    pub summary: Option<serde_json::Value>,
    /// Every progress point, oldest first (only in single-job views).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<ProgressPoint>>,
    /// Tags a node must carry to run it (`placement.tags`).
    #[serde(default)]
    pub tags: Tags,
    /// Why a queued job waits when it is not just its turn (no node carries its tags).
    #[serde(default)]
    pub pending_reason: Option<String>,
}

/// A filter and a page of `GET /jobs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobQuery {
    pub status: Option<JobState>,
    pub limit: usize,
    pub offset: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPage {
    pub jobs: Vec<JobRecord>,
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
}

/// What `GET /jobs/{id}/events` streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    Progress(ProgressPoint),
    /// The job changed state; the record as it is now.
    State(Box<JobRecord>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JobError {
    #[error("no job with id `{0}`")]
    NotFound(String),
    #[error("job `{id}` is already {state}; only queued or running jobs can be cancelled")]
    Final { id: String, state: &'static str },
    #[error("job store: {0}")]
    Store(String),
    #[error("the job manager is not running; retry shortly")]
    Unavailable,
    #[error(
        "the job manager did not answer within {0} s (its database may be slow to sync); retry"
    )]
    Busy(u64),
    /// The queue is at `jobs.max_queued`.
    #[error(
        "{queued} jobs are already queued (jobs.max_queued = {max}); retry when some have run"
    )]
    QueueFull { queued: usize, max: usize },
    /// Two live jobs would write the same directory, or one inside the other.
    #[error("output_path: `{path}` overlaps `{other_path}`, where job {other} ({state}) writes; no two queued or running jobs may write the same directory or one inside the other")]
    OutputConflict {
        path: String,
        other: String,
        other_path: String,
        state: String,
    },
}
